"""Serve's direct ingress (`ClusterConfig.direct_ingress`): each Ingress replica serves gRPC and
HTTP on ports of its own, so a request reaches our code without Serve's proxy in between.

Why: the proxy is a whole process hop on every request and every stream item. Measured at one
stream (gRPC, stand-in engine, 1-token requests, time stamps along the path, load average ~7):
client to our Ingress code 3-4 ms through the proxy against 1.0 ms direct, our last yield to the
client 1.8-2.9 ms against 0.6 ms; and the proxy spent ~0.4 ms of CPU per stream item
(docs/performance.md, "The serving path").

What it costs (Ray Serve 2.60, `RAY_SERVE_ENABLE_DIRECT_INGRESS`):
- The ports are Serve's: it allocates each Ingress replica a gRPC port from 40000 and an HTTP port
  from 30000 (`RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT` / `..._MIN_HTTP_PORT` move the ranges);
  `direct_ingress_ports` reads them from the controller. With several Ingress replicas a load
  balancer in front spreads clients over them (Serve's target groups are what it would be given).
- The replica's own gRPC server has no TLS option and binds every interface, so TLS configs are
  refused with it (ClusterConfig); the proxy (still started, on the head node only) keeps serving
  `grpc_port` / `http_port` as before, with its TLS.
- Every Serve process must see the switch: `shardline serve` puts it in the node's environment
  (cluster/proxies.py) and the replicas' runtime_env carries it; on KubeRay the pods' environment
  must carry `direct_ingress_environment` too (the controller allocates the ports), which
  deploy/kuberay does not set: its configs leave direct_ingress off.
- Serve keeps a stopping Ingress replica up for `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`
  (30 s by default, for load balancers to notice); set here to the proxies' short period, since
  our drain (cluster/drain.py) already refuses new requests first.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardline.cluster.config import ClusterConfig

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_INGRESS_DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DIRECT_INGRESS_DRAINING_PERIOD_S = "0.5"  # as the proxies' (cluster/proxies.py)


def direct_ingress_environment(config: "ClusterConfig") -> dict[str, str]:
    """Environment every Serve process must have for direct ingress (the controller allocates the
    ports, the Ingress replica starts the servers): empty when `config.direct_ingress` is off."""
    if not config.direct_ingress:
        return {}
    return {DIRECT_INGRESS_ENV: "1", DIRECT_INGRESS_DRAIN_ENV: DIRECT_INGRESS_DRAINING_PERIOD_S}


def direct_ingress_ports(app_name: str, timeout_s: float = 60.0) -> tuple[int, int]:
    """(gRPC port, HTTP port) of the application's first Ingress replica under direct ingress,
    from the controller's target groups (the addresses a load balancer in front would be given).
    Raises TimeoutError when no replica reports both within timeout_s."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.schema import TargetGroup

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while True:
        groups: list[TargetGroup] = ray.get(controller.get_target_groups.remote(app_name))
        ports = {str(group.protocol).rsplit(".", 1)[-1].lower(): group.targets[0].port
                 for group in groups if group.targets}
        if "grpc" in ports and "http" in ports:
            return ports["grpc"], ports["http"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no direct-ingress ports reported for the application {app_name!r}: {ports}")
        time.sleep(0.5)
