"""Serve's proxies as a ClusterConfig sets them up: ports, host, HTTPS and gRPC TLS files and the
gRPC message size bound. Used by `shardline serve` and the tests, so both start the same proxies.

Ray 2.60's gRPC proxy reads its message size bound from the environment
(RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, default 2 GiB) when its process starts; it binds every
interface (`[::]:port`) and has no TLS option, which `ProxyGrpcOptions` (router/grpc_proxy.py)
adds: the gRPC proxy binds `host` too, with TLS when grpc_ssl_certfile is set."""

from __future__ import annotations

import os
from typing import Any

from shardline.cluster.config import PROXY_GRPC_ENV, ROUTER_LOOP_ENV, ClusterConfig
from shardline.cluster.direct_ingress import direct_ingress_environment

# How long Serve's proxy must have been draining before it reports itself drained (Serve's default
# is 30 s); cluster/drain.py drains the proxies after the ingress and waits for their streams.
PROXY_DRAIN_ENV = "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S"
PROXY_MIN_DRAINING_PERIOD_S = "0.5"

# The gRPC services the proxy must register (serve.start(grpc_options=...) / the YAML's grpc_options).
GRPC_SERVICER_FUNCTIONS = [
    # the generated add_GenerationServicer_to_server, after fixing the proxy's cancel (router/grpc_proxy.py)
    "shardline.router.grpc_proxy.add_generation_servicer",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def proxy_environment(config: ClusterConfig) -> dict[str, str]:
    """Environment the proxies' processes must inherit (set before ray.init starts the node): the
    gRPC message bound, the proxies' handles routing on their own loop (ROUTER_LOOP_ENV "0",
    as the replicas' runtime_env sets it: cluster/config.py REPLICA_ENV), a short minimum
    draining period (a drain waits for the proxies' own open requests: cluster/drain.py), and the
    transport to the Ingress (PROXY_GRPC_ENV, from serve_transport), and with direct_ingress the
    controller's and the Ingress replicas' switch for it (cluster/direct_ingress.py). deploy/kuberay sets the same
    variables in the pods' env (tests/test_deploy_manifests.py)."""
    return {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(config.max_grpc_message_bytes),
            ROUTER_LOOP_ENV: config.replica_env()[ROUTER_LOOP_ENV],
            PROXY_DRAIN_ENV: PROXY_MIN_DRAINING_PERIOD_S,
            PROXY_GRPC_ENV: "1" if config.serve_transport == "grpc" else "0"} | direct_ingress_environment(config)


def apply_proxy_environment(config: ClusterConfig) -> None:
    """Put proxy_environment into this process's environment, which a local Ray node inherits."""
    os.environ.update(proxy_environment(config))


def serve_start_options(config: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of `serve.start` for this config: HTTP (host, port, HTTPS files) and gRPC
    (port, the same host, TLS files)."""
    from ray.serve.config import HTTPOptions

    from shardline.router.grpc_proxy import ProxyGrpcOptions

    http = HTTPOptions(host=config.host, port=config.http_port, ssl_certfile=config.ssl_certfile,
                       ssl_keyfile=config.ssl_keyfile)
    grpc = ProxyGrpcOptions(port=config.grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
                            host=config.host, ssl_certfile=config.grpc_ssl_certfile,
                            ssl_keyfile=config.grpc_ssl_keyfile)
    return {"http_options": http, "grpc_options": grpc}
