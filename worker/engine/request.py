"""One generation request as the engine tracks it: its tokens, how many of them have KV in the cache,
its block table, and where it is in its life (waiting, running, preempted, finished)."""

from __future__ import annotations

import enum
import sys
import time

from shardline.worker.engine.outputs import TokenLogprob
from shardline.worker.engine.params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life. PREEMPTED requests wait again and recompute their KV."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    """A prompt and the tokens generated for it so far, plus the bookkeeping the scheduler and the
    block manager share: computed-token count, block table and the chained hashes of full blocks.

    `max_tokens` is the resolved output limit (the engine computes it from the sampling params and
    max_model_len); when omitted it is `params.max_tokens`, or unbounded if that is None too (the
    scheduler then clamps it to the context)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.priority = priority
        self.cache_salt = cache_salt
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        if max_tokens is None:
            max_tokens = params.max_tokens if params.max_tokens is not None else sys.maxsize
        self.max_tokens: int = max_tokens
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0
        # Tokens sampled by a step whose result the host has not read yet (overlapped scheduling):
        # they count towards num_tokens (their KV slots are scheduled) but are not in output_token_ids.
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        # One block table per KV-cache group (worker/engine/kv_cache_groups.py): one for most
        # models, one per attention kind's group for hybrid ones (Gemma 2/3); the block manager
        # adds the others. block_ids is group 0's.
        self.block_tables: list[list[int]] = [[]]
        # Sliding-window groups: the first num_released[g] entries of block_tables[g] were released
        # (their KV is out of the group's window) and hold the placeholder 0; the request owns the rest.
        self.num_released: list[int] = [0]
        self.block_hashes: list[bytes] = []
        # Speculative decoding: tokens a proposer guessed to follow all_token_ids, to be verified
        # by the next step (never part of output_token_ids until the target accepts them).
        self.spec_token_ids: list[int] = []
        # Prompt logprobs (params.prompt_logprobs): entry p is prompt token p's, collected in order
        # as prefill chunks compute the positions before it; entry 0 is None (nothing precedes it).
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None)

    @property
    def block_ids(self) -> list[int]:
        """Group 0's block table (the only one unless the model is hybrid)."""
        return self.block_tables[0]

    @block_ids.setter
    def block_ids(self, value: list[int]) -> None:
        self.block_tables[0] = value

    @property
    def num_released_blocks(self) -> int:
        """Released leading entries of group 0's table."""
        return self.num_released[0]

    @num_released_blocks.setter
    def num_released_blocks(self, value: int) -> None:
        self.num_released[0] = value

    @property
    def prompt_logprob_positions(self) -> tuple[int, int]:
        """[first, end) of the positions whose logits still owe a prompt logprob (position p's
        logits give prompt token p + 1's); empty when none are asked or all are collected. After a
        preemption the recompute does not collect them twice."""
        if self.prompt_logprobs is None:
            return (0, 0)
        return (len(self.prompt_logprobs) - 1, len(self.prompt_token_ids) - 1)

    @property
    def wants_prompt_logprobs(self) -> bool:
        first, end = self.prompt_logprob_positions
        return first < end

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens, pending ones included: the length the KV cache must cover."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus generated tokens whose ids the host holds (num_tokens less the pending ones)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def append_output_token(self, token_id: int) -> None:
        """Record one sampled token; its KV is computed in a later step."""
        self.output_token_ids.append(token_id)

    def add_pending_token(self) -> None:
        """A step that samples for this request was launched; its token is not read yet."""
        self.num_pending_tokens += 1

    def resolve_pending_token(self, token_id: int) -> None:
        """The oldest pending token's id has arrived: it becomes an output token."""
        if self.num_pending_tokens <= 0:
            raise ValueError(f"request {self.request_id}: a token arrived but none was pending")
        self.num_pending_tokens -= 1
        self.append_output_token(token_id)

    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
