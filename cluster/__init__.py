"""cluster/: the Ray Serve ReplicaGroup deployment and the application builder."""
