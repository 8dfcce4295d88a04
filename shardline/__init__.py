"""shardline: a distributed LLM serving cluster.

The installed distribution maps the repository's top-level folders onto one import namespace:
``shardline.worker`` (worker/: one replica group's engine), ``shardline.cluster`` (cluster/: Ray
Serve replica groups), ``shardline.router`` (router/: ingress and KV-aware routing) and
``shardline.proto`` (proto/: the gRPC API).
"""

__version__ = "0.1.0"
