"""The stand-in executor (`load_format="stand-in"`): no model, no KV pool, no compute. Each step
returns logits that make the next token `(previous token + 1) % vocab_size` (the others fall off
by 0.01 per id after it, so top-n logprobs are distinct numbers), after sleeping so
that steps are at least `extra["stand_in_step_ms"]` apart (default 0: as fast as the engine's own
scheduling, sampling and detokenizing go).

It exists to measure and test the serving path (streaming, coalescing, Serve's hops) apart from
the model: with it, the engine makes tokens at a set rate while costing the CPU almost nothing
but its own bookkeeping. Everything else (scheduler, block manager, sampler, detokenizer, stop
checks) is the real engine, so streams end, stop and abort exactly as with a model."""

from __future__ import annotations

import time

import torch

from shardline.worker.config import ConfigError, EngineConfig, ModelConfig
from shardline.worker.engine.model_runner import StepInputs

# Blocks the stand-in's block manager gets when num_kv_blocks is not set: enough for
# max_num_seqs requests at the full context, bounded so the pool's bookkeeping stays small.
_MAX_DEFAULT_BLOCKS = 65536


class StandInExecutor:
    """An Executor (worker/engine/executor.py) whose `execute` costs a sleep and one row of
    arithmetic per sampled sequence."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, device: torch.device) -> None:
        step_ms = float(config.extra.get("stand_in_step_ms", 0.0))
        if not 0.0 <= step_ms < float("inf"):
            raise ConfigError(f"extra.stand_in_step_ms: must be >= 0 and finite, got {step_ms!r}")
        self.step_s = step_ms / 1e3
        self.vocab_size = model_config.vocab_size
        self.device = device
        if config.num_kv_blocks is not None:
            self.num_blocks = config.num_kv_blocks
        else:
            per_seq = -(-config.resolved_max_model_len(model_config) // config.block_size)
            self.num_blocks = min(_MAX_DEFAULT_BLOCKS, config.max_num_seqs * per_seq)
        self._ids = torch.arange(self.vocab_size, dtype=torch.float32, device=device)
        self._last_return = time.monotonic()

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """[N, vocab] float32 logits for the N sample rows: 0 at the next token, -0.01 * k at k ids after it."""
        if self.step_s > 0:
            wait = self._last_return + self.step_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        previous = inputs.input_ids.index_select(0, inputs.sample_rows.to(inputs.input_ids.device))
        nxt = ((previous + 1) % self.vocab_size).to(self.device)
        logits = (self._ids.unsqueeze(0) - nxt.unsqueeze(1)).remainder_(self.vocab_size).mul_(-0.01)
        self._last_return = time.monotonic()
        return logits

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None
