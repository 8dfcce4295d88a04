"""Verification of proposed tokens against the target model's distribution, batched on the device.

For one request with proposals d_0 .. d_{k-1} the target computed k + 1 distributions p_0 .. p_k
in one pass (p_j is the distribution after the request's tokens and d_0 .. d_{j-1}). Each p_j is
what the plain sampler would sample from at that point: the same processed logits (penalties
counting d_0 .. d_{j-1} as outputs, min_tokens counting them too), temperature, top-k/top-p/min-p.

- Greedy rows: d_j is accepted while it equals argmax p_j; the first mismatch emits argmax p_j
  instead, and if all k are accepted argmax p_k is the bonus token. The output is token for token
  what decoding without speculation produces.
- Sampled rows (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): d_j, drawn by the
  proposer from q_j, is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first
  rejection a token is drawn from the residual max(p_j - q_j, 0) (normalized), and if all k are
  accepted the bonus token is drawn from p_k. Every emitted token is then distributed exactly as
  under p. A deterministic proposer (n-gram) is the case q_j = one-hot(d_j): accept with
  probability p_j(d_j), else draw from p_j with d_j removed.

Randomness: a seeded request draws its uniforms and its one exponential-race noise row from its
own generator (so its output depends only on its seed and history), the others from a shared one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardline.worker.engine.sampler import (
    LogprobTensors,
    SamplingBatch,
    filtered_probs,
    gather_logprobs,
    processed_logits,
)
from shardline.worker.engine.transfer import to_device


@dataclass
class DraftTokens:
    """The proposals one verification step checks, for every sampling request of the step in row
    order (a request without a proposal has k = 0 and is sampled as usual from its one row)."""

    num_draft_tokens: list[int]  # [S] k per request
    token_ids: list[int]  # [sum k] the proposals, request after request
    probs: torch.Tensor | None = None  # [sum k, V] float32: q, the distribution each was drawn from; None: one-hot

    @property
    def row_offsets(self) -> list[int]:
        """First target row of each request (request s owns rows offset_s .. offset_s + k_s)."""
        offsets, row = [], 0
        for k in self.num_draft_tokens:
            offsets.append(row)
            row += k + 1
        return offsets

    @property
    def num_rows(self) -> int:
        return sum(self.num_draft_tokens) + len(self.num_draft_tokens)


@dataclass
class VerifiedTokens:
    """What verification emits, still on the device. Request s emits token_ids[s, :num_tokens[s]]
    (its accepted proposals, then one token from the target); the logprob of its j-th emitted token
    is row offset_s + j of `logprob_tensors`."""

    token_ids: torch.Tensor  # [S, max k + 1] int64, -1 past each request's emitted tokens
    num_tokens: torch.Tensor  # [S] int64, in [1, k_s + 1]
    logprob_tensors: LogprobTensors | None  # per target row, when any row asked


class RejectionSampler:
    """Accepts or rejects each request's proposals and draws its next token (module docstring)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, drafts: DraftTokens,
                 generators: list[torch.Generator | None]) -> VerifiedTokens:
        """logits: [R, V'] the target's rows (R = drafts.num_rows); batch: R rows (request s's row j
        shaped as if d_0 .. d_{j-1} were outputs); generators: one per request. Reads nothing back."""
        ks = drafts.num_draft_tokens
        num_reqs, num_rows = len(ks), drafts.num_rows
        if logits.shape[0] != num_rows or batch.num_rows != num_rows or len(generators) != num_reqs:
            raise ValueError(f"{logits.shape[0]} logit rows and {batch.num_rows} sampling rows for "
                             f"{num_reqs} requests with {sum(ks)} proposals ({num_rows} rows expected)")
        device = logits.device
        logits = processed_logits(logits, batch)
        vocab = logits.shape[1]
        logprobs = torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None
        greedy_ids = logits.argmax(dim=-1)  # [R]

        offsets = drafts.row_offsets
        max_k = max(ks, default=0)
        draft_req = [s for s, k in enumerate(ks) for _ in range(k)]
        draft_pos = [j for k in ks for j in range(k)]
        draft_rows = [offsets[s] + j for s, j in zip(draft_req, draft_pos)]
        greedy_req = [batch.greedy_rows[o] for o in offsets]
        sampled_reqs = [s for s in range(num_reqs) if not greedy_req[s]]

        req_greedy = to_device(greedy_req, torch.bool, device)
        offsets_t = to_device(offsets, torch.int64, device)
        k_t = to_device(ks, torch.int64, device)
        draft_ids = to_device(drafts.token_ids, torch.int64, device)
        # Proposals as [S, max_k + 1], -1 padded (the extra column is where a bonus token lands).
        padded = torch.full((num_reqs, max_k + 1), -1, dtype=torch.int64, device=device)
        req_idx = to_device(draft_req, torch.int64, device)
        pos_idx = to_device(draft_pos, torch.int64, device)
        if draft_req:
            padded[req_idx, pos_idx] = draft_ids

        probs = None
        if sampled_reqs:
            probs = filtered_probs(logits / batch.temperature.unsqueeze(1), batch)
            probs = probs / probs.sum(dim=-1, keepdim=True)  # min-p leaves it unnormalized
        uniforms, noise = self._draws(ks, sampled_reqs, generators, vocab, device)

        if draft_rows:
            rows = to_device(draft_rows, torch.int64, device)
            accept = greedy_ids.index_select(0, rows) == draft_ids
            if probs is not None:
                p = probs.index_select(0, rows).gather(1, draft_ids.unsqueeze(1)).squeeze(1)
                q = torch.ones_like(p) if drafts.probs is None else \
                    drafts.probs.gather(1, draft_ids.unsqueeze(1)).squeeze(1)
                accept_sampled = uniforms * q < p  # u < p / q without dividing by a tiny q
                accept = torch.where(req_greedy.index_select(0, req_idx), accept, accept_sampled)
            accepted = torch.zeros((num_reqs, max_k), dtype=torch.int64, device=device)
            accepted[req_idx, pos_idx] = accept.to(torch.int64)
            num_accepted = accepted.cumprod(dim=1).sum(dim=1)  # leading run of acceptances
        else:
            num_accepted = torch.zeros(num_reqs, dtype=torch.int64, device=device)

        final_rows = offsets_t + num_accepted  # [S]: the row whose distribution draws the last token
        final = greedy_ids.index_select(0, final_rows)
        if probs is not None:
            target = probs.index_select(0, final_rows)  # [S, V]
            rejected = num_accepted < k_t
            if drafts.probs is None:
                rejected_id = padded.gather(1, num_accepted.unsqueeze(1)).clamp_min(0)
                q_final = torch.zeros_like(target).scatter_(1, rejected_id, 1.0)
            else:
                draft_offsets = k_t.cumsum(0) - k_t
                flat = (draft_offsets + num_accepted).clamp_max(max(drafts.probs.shape[0] - 1, 0))
                q_final = drafts.probs.index_select(0, flat) if drafts.probs.shape[0] else torch.zeros_like(target)
            residual = torch.where(rejected.unsqueeze(1), (target - q_final).clamp_min(0.0), target)
            # Rounding can empty a residual whose rejection had a tiny probability: fall back to p.
            empty = residual.sum(dim=1, keepdim=True) <= 0
            residual = torch.where(empty, target, residual)
            sampled = (residual / noise).argmax(dim=1)
            final = torch.where(req_greedy, final, sampled)

        cols = torch.arange(max_k + 1, device=device).unsqueeze(0)
        out = torch.where(cols < num_accepted.unsqueeze(1), padded, torch.full_like(padded, -1))
        out.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
        logprob_tensors = None
        if logprobs is not None:
            row_tokens = torch.zeros(num_rows, dtype=torch.int64, device=device)
            if draft_rows:
                row_tokens[to_device(draft_rows, torch.int64, device)] = draft_ids
            row_tokens[final_rows] = final
            logprob_tensors = gather_logprobs(logprobs, row_tokens, batch)
        return VerifiedTokens(out, num_accepted + 1, logprob_tensors)

    def _draws(self, ks: list[int], sampled_reqs: list[int], generators: list[torch.Generator | None],
               vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per proposal a uniform in [0, 1) ([sum k], 1 on greedy requests' proposals) and per
        request one Exp(1) noise row for the exponential race ([S, V], 1 on greedy requests). A
        seeded request draws its k uniforms, then its noise row, from its own generator."""
        num_reqs = len(ks)
        uniforms = [torch.ones(k, device=device) for k in ks]
        noise = torch.ones((num_reqs, vocab), device=device)
        shared = [s for s in sampled_reqs if generators[s] is None]
        if shared:
            u = torch.rand(sum(ks[s] for s in shared), device=device, generator=self.generator)
            e = torch.empty((len(shared), vocab), device=device).exponential_(generator=self.generator)
            start = 0
            for i, s in enumerate(shared):
                uniforms[s] = u[start : start + ks[s]]
                start += ks[s]
            noise[to_device(shared, torch.int64, device)] = e
        for s in sampled_reqs:
            generator = generators[s]
            if generator is not None:
                uniforms[s] = torch.rand(ks[s], device=device, generator=generator)
                noise[s] = torch.empty(vocab, device=device).exponential_(generator=generator)
        # NOTE: exponential_ may return exactly 0; 0/0 would be NaN and win the argmax.
        flat = torch.cat(uniforms) if uniforms else torch.ones(0, device=device)
        return flat, noise.clamp_min_(torch.finfo(noise.dtype).tiny)
