"""The Serve application builder: `build_app(args)` turns a ClusterConfig dict (the `args` of an
application in deploy/serve.yaml, the CLI's flags, or Python) into the application, an Ingress
bound to a ReplicaGroup deployment whose placement, replica count / autoscaling and request
router come from the config. `serve run deploy/serve.yaml` imports it as
`shardline.cluster.app:build_app`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from shardline.cluster.config import ClusterConfig
from shardline.cluster.replica_group import replica_group_deployment

# The gRPC services the proxy must register (serve.start(grpc_options=...) / the YAML's grpc_options).
GRPC_SERVICER_FUNCTIONS = [
    "shardline.proto.generation_pb2_grpc.add_GenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def build_app(args: dict[str, Any] | ClusterConfig | None = None) -> Application:
    """The shardline application for a config (a dict as in a Serve YAML's `args`, or a ClusterConfig)."""
    from shardline.router.ingress import Ingress

    config = args if isinstance(args, ClusterConfig) else ClusterConfig.from_dict(args)
    replica_group = replica_group_deployment(config)
    ingress = serve.deployment(name="Ingress")(Ingress).options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max(1024, 2 * config.max_in_flight))
    return ingress.bind(replica_group.bind(config), config)
