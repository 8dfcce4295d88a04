"""router/: the ingress (gRPC and OpenAI HTTP) and the KV-aware request router."""
