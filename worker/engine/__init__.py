"""The engine: requests, block manager with prefix cache, scheduler, model runner, sampler."""
