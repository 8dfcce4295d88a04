"""proto/: the public gRPC API (package shardline.v1) and its generated Python stubs."""
