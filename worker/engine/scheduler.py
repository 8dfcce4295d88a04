"""The scheduler decides, each step, which requests compute how many tokens; it never executes.

Policy (continuous batching with chunked prefill, preemption by recompute):
- Running requests first, in admission order: a decode takes 1 token, a request still in (chunked)
  prefill takes min(remaining, budget). If its blocks cannot be allocated, the running request
  with the lowest priority (largest (priority, arrival_time), i.e. the latest arrival under FCFS)
  is preempted: blocks freed, computed tokens reset to 0, back to the waiting queue, keeping its
  output tokens, which it recomputes with its prompt when readmitted.
- Then, if nothing was preempted this step, waiting requests in (priority, arrival_time) order
  (lower value first, as vLLM; FCFS when every priority is 0): each takes its prefix-cache hit
  and then min(remaining, budget) tokens (chunked prefill), or its whole remainder only if that
  fits (no chunked prefill). Admission stops at the first request that does not fit, so order
  is kept. A preempted request keeps its arrival time and so waits ahead of later arrivals.
- Sliding-window layers (all of Mistral's, Gemma 2/3's local ones, each in its own KV-cache group):
  before a running request's blocks are extended, the block manager releases the windowed
  groups' blocks wholly out of its window (block_manager.py). Allocation, preemption and
  finishing cover every group of a request at once.
- Batch order of `SchedulerOutput.scheduled`: running requests (in admission order), then the
  requests admitted this step.
- Speculative decoding: a decoding request whose `spec_token_ids` the engine filled takes 1 + k
  tokens (its last token and the k proposed ones, verified in one pass). k is cut to the token
  budget, to max_tokens - 1 more outputs and to the context; when its blocks cannot be had the
  proposal is dropped before anyone is preempted. After verification `rollback_speculation` sets
  num_computed_tokens back to the accepted tokens and frees blocks only rejected tokens used.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from shardline.worker.config import ConfigError, EngineConfig
from shardline.worker.engine.block_manager import BlockManager
from shardline.worker.engine.outputs import FINISH_ABORT
from shardline.worker.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens starting at its
    num_computed_tokens. It samples when that reaches its num_tokens (prefill complete)."""

    request: Request
    num_new_tokens: int
    # Proposed tokens verified this step (the last len(spec_token_ids) of num_new_tokens).
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step completes the request's prefill and so samples (valid until
        update_after_step advances the request)."""
        num_real = self.num_new_tokens - len(self.spec_token_ids)
        return self.request.num_computed_tokens + num_real == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """What one step computes: scheduled requests in batch order, and who was preempted to make room."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Continuous batching under `max_num_batched_tokens` and `max_num_seqs`; the block manager
    owns the blocks, the scheduler only asks it for room."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int) -> None:
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            # Without chunking a (re)computed sequence must fit one step, or it would wait forever.
            raise ConfigError(
                f"max_num_batched_tokens: must be >= max_model_len ({max_model_len}) when chunked prefill "
                f"is disabled, got {config.max_num_batched_tokens}"
            )
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self._waiting: list[tuple[tuple[int, float, int], Request]] = []  # sorted by key
        self._order = itertools.count()
        self._keys: dict[str, tuple[int, float, int]] = {}
        self.num_preemptions_total = 0

    # ---- queues --------------------------------------------------------------------------------

    @property
    def waiting(self) -> list[Request]:
        """Waiting requests in admission order."""
        return [req for _, req in self._waiting]

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self._waiting)

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self._waiting, (self._keys[request.request_id], request), key=lambda item: item[0])

    def _dequeue(self, request: Request) -> None:
        key = self._keys.get(request.request_id)
        if key is None:
            return
        i = bisect.bisect_left(self._waiting, key, key=lambda item: item[0])
        if i < len(self._waiting) and self._waiting[i][1] is request:
            del self._waiting[i]

    def add_request(self, request: Request) -> None:
        """Queue a request. It was validated once at the edge (validation.py, against the engine's
        Limits, whose max_kv_tokens is this block pool's capacity), so it fits the context and the
        pool and scheduling can never stall on it; the scheduler does not check it again. A request
        built without a resolved output limit (max_tokens None) gets the rest of the context."""
        request.max_tokens = max(1, min(request.max_tokens, self.max_model_len - request.num_prompt_tokens))
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._keys[request.request_id] = (request.priority, request.arrival_time, next(self._order))
        self._enqueue(request)

    def finish_request(self, request: Request, reason: str) -> None:
        """Take the request out of the queues, free its blocks and mark it FINISHED with `reason`."""
        if request.status == RequestStatus.FINISHED:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self._dequeue(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
        self._keys.pop(request.request_id, None)

    def abort_request(self, request_id: str) -> Request | None:
        """Cancel a request: its blocks are freed at once. None if it is unknown or already done."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request, FINISH_ABORT)
        return request

    # ---- one step ------------------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.spec_token_ids = []
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._enqueue(request)

    def _victim(self) -> Request:
        return max(self.running, key=lambda r: self._keys[r.request_id])

    def _spec_tokens_to_verify(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The part of the request's proposal this step verifies: none unless it decodes (one new
        token, none pending), cut so that the step fits the budget and accepting all of it plus the
        bonus token stays within max_tokens and the context."""
        proposal = request.spec_token_ids
        if not proposal or num_new != 1 or request.num_pending_tokens:
            return []
        room = min(budget - 1,
                   request.max_tokens - request.num_output_tokens - 1,
                   self.max_model_len - request.num_tokens - 1)
        return list(proposal[: max(0, room)])

    def schedule(self) -> SchedulerOutput:
        """Decide this step's batch. Changes block tables and queues, not computed-token counts
        (those advance in update_after_step, once the step has run)."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        for request in list(self.running):
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step to make room
            if request.num_output_tokens + request.num_pending_tokens >= request.max_tokens:
                continue  # its last token is in flight; the engine finishes it when that arrives
            limit = min(request.num_tokens, self.max_model_len)
            num_new = min(limit - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue  # nothing left to compute; the engine finishes it
            spec = self._spec_tokens_to_verify(request, num_new, budget)
            num_new += len(spec)
            self.block_manager.release_out_of_window(request)  # windowed KV-cache groups only
            while not self.block_manager.allocate_slots(request, num_new):
                if spec:  # drop the proposal before preempting anyone
                    num_new -= len(spec)
                    spec = []
                    continue
                victim = self._victim()
                for j, entry in enumerate(scheduled):
                    if entry.request is victim:  # already scheduled this step: give its tokens back
                        budget += entry.num_new_tokens
                        del scheduled[j]
                        break
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new, spec))
                budget -= num_new

        if not preempted:
            num_admitted = 0
            for _, request in self._waiting:
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                # NOTE: a cached position has no logits, so a request that still owes prompt
                # logprobs computes its whole prompt (its blocks are still cached for others).
                hits, num_hit_tokens = (([], 0) if request.wants_prompt_logprobs else
                                        self.block_manager.get_computed_blocks(request, record_stats=False))
                remaining = min(request.num_tokens, self.max_model_len) - num_hit_tokens
                if self.enable_chunked_prefill:
                    num_new = min(remaining, budget)
                elif remaining <= budget:
                    num_new = remaining
                else:
                    break
                if not self.block_manager.allocate_slots(request, num_new, hits):
                    break
                self.block_manager.record_prefix_lookup(request.num_tokens, num_hit_tokens)
                if request.status == RequestStatus.WAITING:
                    request.num_cached_tokens = num_hit_tokens  # usage reports the first admission
                request.num_computed_tokens = num_hit_tokens
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                num_admitted += 1
            del self._waiting[:num_admitted]

        return SchedulerOutput(scheduled, preempted, self.max_num_batched_tokens - budget)

    def update_after_step(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed-token counts by what the step computed, register newly full blocks in
        the prefix cache, and append the sampled token of every request whose prefill completed.
        Returns those requests, in batch order; stop checks and finishing are the engine's.
        (advance + resolve in one call, for a step whose tokens are already on the host.)"""
        samplers = self.advance(output)
        for request in samplers:
            if request.status != RequestStatus.FINISHED and request.request_id not in sampled:
                raise ValueError(f"request {request.request_id}: its prefill completed but no token was sampled")
        return self.resolve(samplers, [sampled.get(r.request_id, -1) for r in samplers])

    def advance(self, output: SchedulerOutput) -> list[Request]:
        """The step was launched: advance computed-token counts and give every request whose
        prefill it completes one pending token. Returns those requests in batch order (the rows
        of the step's sampled tokens). Call before the next schedule(), which may then schedule
        the pending token's own step before its id is known (overlapped scheduling)."""
        samplers: list[Request] = []
        for entry in output.scheduled:
            request = entry.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted or finished after it was scheduled
            completes = entry.samples
            request.num_computed_tokens += entry.num_new_tokens
            self.block_manager.cache_full_blocks(request, request.num_computed_tokens)
            if completes:
                request.add_pending_token()
                samplers.append(request)
        return samplers

    def rollback_speculation(self, request: Request) -> None:
        """After a verification step's accepted tokens were appended: only the KV of tokens whose
        ids are known is valid (the rejected proposals' slots hold garbage), so the computed count
        goes back to num_known_tokens - 1 (the newest token's KV is computed next step), blocks
        that only rejected tokens used are freed, and the verified full blocks enter the prefix cache."""
        request.spec_token_ids = []
        if request.status != RequestStatus.RUNNING:
            return
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_known_tokens - 1)
        self.block_manager.trim_blocks(request, request.num_known_tokens)
        self.block_manager.cache_full_blocks(request, request.num_computed_tokens)

    def resolve(self, samplers: list[Request], token_ids: list[int]) -> list[Request]:
        """The step's sampled tokens arrived: each request in `samplers` (advance's list) turns its
        oldest pending token into an output token and registers the blocks that made full.
        Requests finished meanwhile are skipped; a request preempted meanwhile still keeps its
        token (it recomputes it on readmission). Returns the requests that got a token."""
        if len(samplers) != len(token_ids):
            raise ValueError(f"{len(samplers)} sampling requests but {len(token_ids)} tokens")
        progressed: list[Request] = []
        for request, token_id in zip(samplers, token_ids):
            if request.status == RequestStatus.FINISHED:
                continue
            request.resolve_pending_token(token_id)
            if request.status == RequestStatus.RUNNING:
                self.block_manager.cache_full_blocks(request, request.num_computed_tokens)
            progressed.append(request)
        return progressed
