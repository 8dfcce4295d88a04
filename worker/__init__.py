"""worker/: one replica group's engine: model, KV cache, scheduler, sampler, tensor-parallel ranks."""
