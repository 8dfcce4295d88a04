"""Serve's proxies as a ClusterConfig sets them up: ports, host, HTTPS files and the gRPC message
size bound. Used by `shardline serve` and the tests, so both start the same proxies.

Ray 2.60's gRPC proxy reads its message size bound from the environment
(RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, default 2 GiB) when its process starts, binds every interface
(`[::]:port`, whatever the HTTP host) and has no TLS option; docs/security.md says how to put
TLS and an interface bound in front of it."""

from __future__ import annotations

import os
from typing import Any

from shardline.cluster.config import PROXY_GRPC_ENV, ROUTER_LOOP_ENV, ClusterConfig

# The gRPC services the proxy must register (serve.start(grpc_options=...) / the YAML's grpc_options).
GRPC_SERVICER_FUNCTIONS = [
    # the generated add_GenerationServicer_to_server, after fixing the proxy's cancel (router/grpc_proxy.py)
    "shardline.router.grpc_proxy.add_generation_servicer",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def proxy_environment(config: ClusterConfig) -> dict[str, str]:
    """Environment the proxies' processes must inherit (set before ray.init starts the node): the
    gRPC message bound, the proxies' handles routing on their own loop (ROUTER_LOOP_ENV "0",
    as the replicas' runtime_env sets it: cluster/config.py REPLICA_ENV), and the transport to
    the Ingress (PROXY_GRPC_ENV, from serve_transport). A Ray node started otherwise (KubeRay)
    needs the same variables in its container's environment."""
    return {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(config.max_grpc_message_bytes),
            ROUTER_LOOP_ENV: config.replica_env()[ROUTER_LOOP_ENV],
            PROXY_GRPC_ENV: "1" if config.serve_transport == "grpc" else "0"}


def apply_proxy_environment(config: ClusterConfig) -> None:
    """Put proxy_environment into this process's environment, which a local Ray node inherits."""
    os.environ.update(proxy_environment(config))


def serve_start_options(config: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of `serve.start` for this config: HTTP (host, port, HTTPS files) and gRPC."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    http = HTTPOptions(host=config.host, port=config.http_port, ssl_certfile=config.ssl_certfile,
                       ssl_keyfile=config.ssl_keyfile)
    grpc = gRPCOptions(port=config.grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS))
    return {"http_options": http, "grpc_options": grpc}
