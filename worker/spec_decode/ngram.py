"""Prompt-lookup (n-gram) proposals: find the request's last n tokens earlier in its own prompt and
output, and propose the tokens that followed them there. Costs no model: it wins on input-grounded
work (summaries, edits, code and JSON quoting the input) and proposes nothing elsewhere."""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from shardline.worker.engine.request import Request
from shardline.worker.spec_decode.proposer import Proposal


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix of
    `tokens` (an int64 array) of length in [min_n, max_n]; [] when no such suffix recurs. Longer
    matches are tried first: they predict better. The occurrence must end before the suffix starts
    to be useful, i.e. leave at least one token to propose."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        windows = sliding_window_view(tokens[: length - 1], n)  # starts 0 .. length - 1 - n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent occurrence
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    """`ngram`: prompt lookup over prompt + output with n in [min_n, max_n]."""

    name = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: list[Request], num_tokens: list[int],
                generators: list[torch.Generator | None]) -> list[Proposal]:
        return [Proposal(ngram_lookup(np.asarray(r.all_token_ids, dtype=np.int64), self.min_n, self.max_n, k))
                for r, k in zip(requests, num_tokens)]

    def release(self, request_id: str) -> None:
        return None
