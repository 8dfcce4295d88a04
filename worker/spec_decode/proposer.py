"""The proposer interface: given requests and how many tokens each may propose, guess the tokens
that follow each request's tokens so far. The target model then verifies every guess in one step
(worker/spec_decode/rejection_sampler.py), so a proposer only changes speed, never the output.

A proposer sees the engine's Request objects (prompt_token_ids + output_token_ids; the proposals
of the previous step are already resolved into outputs or discarded) and returns one Proposal per
request. Proposers that keep per-request state (a draft model's KV cache) drop it in `release`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from shardline.worker.engine.request import Request


@dataclass
class Proposal:
    """Up to k proposed token ids for one request. `probs` ([len(token_ids), V] float32 on the
    engine's device) is the distribution each token was drawn from; None means the tokens were
    chosen deterministically (q = one-hot), as n-gram lookup does."""

    token_ids: list[int]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    """Proposes tokens to verify. `num_tokens[i]` is the most request i may propose (>= 1)."""

    name: str

    def propose(self, requests: list[Request], num_tokens: list[int],
                generators: list[torch.Generator | None]) -> list[Proposal]: ...

    def release(self, request_id: str) -> None: ...
