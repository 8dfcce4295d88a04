"""Loading weights: safetensors directories, GGUF files, dummy random weights."""
