"""`draft_model` proposals: a small model with the target's tokenizer runs in the engine's process
(tensor parallel 1) on its own ModelRunner and its own paged KV cache, and decodes k tokens per
request. The draft's cache is kept in step with the target by prefix matching: each proposal
starts by comparing the tokens whose KV the draft holds with the request's tokens now (accepted
proposals match, rejected ones do not), keeps the common prefix and recomputes only the rest, so
acceptances, rejections, preemptions and prefix-cache hits of the target need no other signal.

The draft samples greedy requests by argmax and the others from softmax(logits / temperature),
returning that distribution q so the rejection sampler can keep the target's distribution exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shardline.worker.config import ConfigError, EngineConfig, ModelConfig
from shardline.worker.engine.block_manager import BlockManager
from shardline.worker.engine.model_runner import ModelRunner, SeqSlice, allocate_kv_caches, build_step_inputs
from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.request import Request
from shardline.worker.spec_decode.proposer import Proposal

if TYPE_CHECKING:
    from shardline.worker.engine.engine import LLMEngine

log = logging.getLogger(__name__)

_GREEDY_EPS = 1e-5  # as the sampler: temperatures below this are greedy


@dataclass
class _DraftSequence:
    """One request's state in the draft: the tokens whose KV its cache holds, in order, and a
    Request that carries its block table for the draft's own BlockManager."""

    blocks: Request
    fed: list[int] = field(default_factory=list)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModelProposer:
    """Proposes with any model that has LlamaForCausalLM's forward/compute_logits (a separate
    draft checkpoint, or layer_skip.py's view of the target's first layers)."""

    name = "draft_model"

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], num_blocks: int, block_size: int,
                 device: torch.device, vocab_size: int, max_positions: int) -> None:
        self.runner = ModelRunner(model, kv_caches, block_size, device)  # type: ignore[arg-type]  # duck-typed: forward + compute_logits
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.generator: torch.Generator | None = None  # shared noise for unseeded requests
        self._seqs: dict[str, _DraftSequence] = {}

    @classmethod
    def from_checkpoint(cls, config: EngineConfig, engine: "LLMEngine") -> "DraftModelProposer":
        """Load config.speculative_model beside the engine's target (same dtype, device, attention
        backend) with a KV pool of as many blocks as the target's. Raises ConfigError when its
        vocabulary differs from the target's."""
        from shardline.worker.engine.executor import ModelSpec, build_model
        from shardline.worker.loader.source import resolve_model

        assert config.speculative_model is not None
        source = resolve_model(config.speculative_model, weights_required=config.load_format != "dummy")
        draft_config = ModelConfig.from_hf_config(source.hf_config())
        target_vocab = engine.model_config.vocab_size
        if draft_config.vocab_size != target_vocab:
            raise ConfigError(f"speculative_model: its vocab_size {draft_config.vocab_size} differs from the "
                              f"target's {target_vocab}; a draft model must share the target's tokenizer")
        load_format = config.load_format if config.load_format != "auto" else source.kind
        spec = ModelSpec(draft_config, str(source.path), source.kind, load_format, engine.dtype, engine.device,
                         seed=config.seed, attention_backend=config.attention_backend,
                         kv_cache_dtype=engine.kv_cache_dtype)
        model = build_model(spec, show_progress=False)
        num_blocks = engine.executor.num_blocks
        caches = allocate_kv_caches(draft_config, model.num_kv_heads_per_rank, num_blocks, config.block_size,
                                    engine.kv_cache_dtype, engine.device)
        log.info("speculative decoding: draft model %s (%d layers) with %d KV blocks", config.speculative_model,
                 draft_config.num_hidden_layers, num_blocks)
        return cls(model, caches, num_blocks, config.block_size, engine.device, target_vocab,
                   draft_config.max_position_embeddings)

    def release(self, request_id: str) -> None:
        """Free the request's draft KV blocks (the engine calls this when it finishes or aborts)."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq.blocks)

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: list[int],
                generators: list[torch.Generator | None]) -> list[Proposal]:
        """One varlen step brings each request's draft KV up to its tokens and drafts the first
        token, then k - 1 single-token steps draft the rest (requests drop out at their own k)."""
        proposals = [Proposal([], None) for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active: list[int] = []
        slices: list[SeqSlice] = []
        for i, (r, k) in enumerate(zip(requests, num_tokens)):
            tokens = r.all_token_ids
            if len(tokens) + k > self.max_positions:
                continue  # past the draft's positions: no proposal
            seq = self._seqs.get(r.request_id)
            if seq is None:
                seq = self._seqs[r.request_id] = _DraftSequence(Request(r.request_id, tokens[:1], SamplingParams()))
            keep = min(_common_prefix(seq.fed, tokens), len(tokens) - 1)
            seq.blocks.num_computed_tokens = keep
            # Slots for the catch-up and the k - 1 proposals fed back (the last one is never fed).
            if not self.block_manager.allocate_slots(seq.blocks, len(tokens) - keep + k - 1):
                self.release(r.request_id)  # the pool is short: this request goes without, for now
                continue
            seq.fed = tokens
            slices.append(SeqSlice(tokens[keep:], keep, seq.blocks.block_ids, True))
            active.append(i)
        step = 0
        while active:
            logits = self.runner.execute(build_step_inputs(slices, self.block_size, self.device))[:, : self.vocab_size]
            drawn, q = self._draw(logits.float(), [requests[i].params for i in active], [generators[i] for i in active])
            step += 1
            next_active, slices = [], []
            for row, i in enumerate(active):
                proposals[i].token_ids.append(drawn[row])
                probs[i].append(q[row])
                if step < num_tokens[i]:
                    seq = self._seqs[requests[i].request_id]
                    slices.append(SeqSlice([drawn[row]], len(seq.fed), seq.blocks.block_ids, True))
                    seq.fed = seq.fed + [drawn[row]]
                    next_active.append(i)
            active = next_active
        for i, rows in enumerate(probs):
            if rows:
                proposals[i].probs = torch.stack(rows)
        return proposals

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              generators: list[torch.Generator | None]) -> tuple[list[int], torch.Tensor]:
        """One token per row and the distribution q it was drawn from ([N, V] float32): argmax
        (q one-hot) for greedy requests, else softmax(logits / temperature) by the exponential race."""
        greedy = [p.temperature < _GREEDY_EPS for p in params]
        temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=logits.device)
        q = torch.softmax(logits / temps.unsqueeze(1), dim=-1)
        noise = torch.ones_like(q)
        for row, (g, gen) in enumerate(zip(greedy, generators)):
            if not g:
                noise[row] = torch.empty(q.shape[1], device=q.device).exponential_(generator=gen or self.generator)
        drawn = (q / noise.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)
        greedy_t = torch.tensor(greedy, device=logits.device)
        drawn = torch.where(greedy_t, logits.argmax(dim=-1), drawn)
        one_hot = torch.zeros_like(q).scatter_(1, drawn.unsqueeze(1), 1.0)
        q = torch.where(greedy_t.unsqueeze(1), one_hot, q)
        return drawn.tolist(), q
