"""The engine of one replica group: admits requests, runs scheduler steps on the executor, samples,
detokenizes, checks stops and emits deltas. Synchronous; async_engine.py drives it from a thread.

Overlapped scheduling (config.async_scheduling, on by default on CUDA): a step is *launched*
(inputs built, forward and sampling queued on the device, the sampled tokens' copy to the host
started) and *finished* (tokens read, stop checks, deltas) separately. Each call of step()
schedules and launches step N+1 before it finishes step N, so the host's scheduling, input
building, detokenizing and stop checks run while the device computes. Step N+1 is scheduled with
one pending token per decoding request (Request.num_pending_tokens): its input id is copied on the
device from step N's sampled tokens, never read by the host. A request that step N finishes (EOS,
stop string) has already been launched in N+1: that token is dropped, its blocks are freed at once
(device work is stream-ordered, so a block reused later is written after N+1 is done with it).
Penalties count the pending token on the device too (SamplingBatch's pending_token_ids).

It imports neither Ray nor gRPC, so it runs alone (offline `generate`, the CLI, benchmarks)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from shardline.worker.config import EngineConfig, ModelConfig
from shardline.worker.engine.block_manager import BlockManager
from shardline.worker.engine.detokenizer import IncrementalDetokenizer
from shardline.worker.engine.executor import Executor, LocalExecutor, ModelSpec
from shardline.worker.engine.model_runner import SeqSlice, build_step_inputs
from shardline.worker.engine.outputs import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    CompletionResult,
    RequestOutput,
)
from shardline.worker.engine.params import RequestError, SamplingParams
from shardline.worker.engine.request import Request, RequestStatus
from shardline.worker.engine.sampler import LogprobTensors, Sampler, SamplingBatch, make_generator
from shardline.worker.engine.scheduler import Scheduler, SchedulerOutput
from shardline.worker.engine.transfer import host_copy, to_device
from shardline.worker.engine.validation import Limits, validate_request
from shardline.worker.tokenizer import encode_prompt

log = logging.getLogger(__name__)

# A prompt is text, token ids, or chat messages ({"messages": [...]}).
Prompt = Union[str, Sequence[int], dict]


@dataclass
class _Tracked:
    """Engine-side state of one request beside the scheduler's Request."""

    request: Request
    detok: IncrementalDetokenizer | None
    generator: torch.Generator | None
    min_tokens_block: list[int]
    arrival: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    scheduled_time: float | None = None  # first time a step scheduled it (queue time ends)
    pending: list[int] = field(default_factory=list)


@dataclass
class _LaunchedStep:
    """A step whose forward and sampling are queued on the device; _finish_step reads its tokens."""

    samplers: list[Request]  # requests that sample, in the order of token_ids' rows
    token_ids: torch.Tensor  # [N] int64 on the device: the source of the next step's pending inputs
    host_token_ids: torch.Tensor  # [N] on the host, filled by a non-blocking copy
    ready: Any  # torch.cuda.Event recorded after that copy (None on CPU)
    logprobs: LogprobTensors | None  # per sampler row, when any asked; on the host once `ready`
    row_of: dict[int, int] = field(default_factory=dict)  # id(request) -> row of token_ids


class LLMEngine:
    """One replica group's engine. `generate()` for offline use; `add_request()` + `step()` for
    front ends that stream."""

    def __init__(self, config: EngineConfig, show_progress: bool = True, metrics: Any = None,
                 launcher: Any = None) -> None:
        from shardline.worker.layers.quantization import resolve_quantization
        from shardline.worker.loader.source import resolve_model
        from shardline.worker.tokenizer import load_tokenizer

        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.metrics = metrics
        self._launcher = launcher  # where tp ranks 1.. run (worker/parallel/launcher.py); None: local processes
        source = resolve_model(config.model, weights_required=config.load_format != "dummy")
        self.model_config = ModelConfig.from_hf_config(source.hf_config())
        self.tokenizer = load_tokenizer(source)
        load_format = config.load_format if config.load_format != "auto" else source.kind
        self.quantization = resolve_quantization(config.quantization, source.kind if load_format != "dummy" else None,
                                                 source.hf_config(), self.device)
        spec = ModelSpec(self.model_config, str(source.path), source.kind, load_format, self.dtype, self.device,
                         seed=config.seed, attention_backend=config.attention_backend, quantization=self.quantization)
        self.max_model_len = config.resolved_max_model_len(self.model_config)
        self.executor: Executor = self._make_executor(spec, show_progress)
        # Rank 0's weights as held in memory (None where the executor does not report them).
        self.weight_bytes: int | None = getattr(self.executor, "weight_bytes", None)
        log.info("model loaded", extra={"quantization": self.quantization.name, "weight_bytes": self.weight_bytes})
        self.block_manager = BlockManager(self.executor.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        self.sampler = Sampler()
        self.limits = Limits(max_model_len=self.max_model_len, vocab_size=self.model_config.vocab_size,
                             max_kv_tokens=self.executor.num_blocks * config.block_size)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else []
        self.eos_token_ids = sorted(set(tokenizer_eos) | set(self.model_config.eos_token_ids))
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.async_scheduling = config.resolved_async_scheduling()
        self._inflight: _LaunchedStep | None = None  # launched, not yet finished (overlap only)
        self.num_overlapped_steps = 0  # steps finished while the next one was already launched
        self._counted = (0, 0, 0)  # prefix queries, prefix hits, preemptions already sent to metrics

    def _make_executor(self, spec: ModelSpec, show_progress: bool) -> Executor:
        if self.config.tensor_parallel_size > 1:
            from shardline.worker.parallel.executor import TensorParallelExecutor

            return TensorParallelExecutor(spec, self.config, show_progress, launcher=self._launcher)
        return LocalExecutor(spec, self.config, show_progress)

    # ---- inputs -------------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, a token-id list, or {"messages": [...]} (chat template)."""
        return encode_prompt(self.tokenizer, prompt)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0, cache_salt: str | None = None, arrival_time: float | None = None) -> str:
        """Validate and queue a request; returns its id. Raises RequestError naming the bad field."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        try:
            if request_id in self._tracked:
                raise RequestError("request_id", f"{request_id!r} is already in flight")
            token_ids = self.encode_prompt(prompt)
            max_tokens = validate_request(token_ids, params, self.limits)
            if self.scheduler.num_waiting >= self.config.max_queue_len:
                raise RequestError("", f"the engine's queue is full ({self.config.max_queue_len} waiting requests); "
                                   "retry later", code="resource_exhausted")
        except RequestError as e:
            if self.metrics is not None:
                self.metrics.on_reject(e.code)
            raise
        now = time.monotonic()
        req = Request(request_id, token_ids, params, arrival_time=arrival_time or now, priority=priority,
                      cache_salt=cache_salt, max_tokens=max_tokens)
        block = [] if params.ignore_eos else list(self.eos_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params) if self.tokenizer is not None else None
        tracked = _Tracked(req, detok, make_generator(params.seed, self.device),
                           sorted(set(block) | set(params.stop_token_ids)), now)
        self.scheduler.add_request(req)  # first: if it refuses, nothing is left registered
        self._tracked[request_id] = tracked
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final (abort) output if it was live."""
        tracked = self._tracked.pop(request_id, None)
        self.scheduler.abort_request(request_id)
        if tracked is None:
            return None
        self._record_step()
        return self._final(tracked, FINISH_ABORT, [], "")

    # ---- the step ---------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns a delta for every request that produced a token or ended.
        With overlapped scheduling the deltas are those of the previous step, finished while this
        one runs on the device."""
        outputs: list[RequestOutput] = []
        sched = self.scheduler.schedule()
        launched = self._launch(sched) if sched.scheduled else None
        if self._inflight is not None:
            self.num_overlapped_steps += launched is not None
            outputs += self._finish_step(self._take_inflight())
        if launched is not None:
            if not self.async_scheduling:
                outputs += self._finish_step(launched)
            elif any(r.status != RequestStatus.FINISHED for r in launched.samplers):
                self._inflight = launched
            # else: no row samples, or every row stopped when the previous step was finished just
            # now: nothing will read its tokens, and keeping it would report the engine busy.
        self._record_step()
        return outputs

    def _take_inflight(self) -> _LaunchedStep:
        step, self._inflight = self._inflight, None
        assert step is not None
        return step

    def _launch(self, sched: SchedulerOutput) -> _LaunchedStep:
        """Build the step's inputs, queue its forward and sampling, advance the scheduler's counts
        and start copying the sampled tokens to the host. Reads nothing back from the device."""
        now = time.monotonic()
        for s in sched.scheduled:
            t = self._tracked.get(s.request.request_id)
            if t is not None and t.scheduled_time is None:
                t.scheduled_time = now
        samplers = [s.request for s in sched.scheduled if s.samples]
        logits = self.executor.execute(self._inputs(sched))
        token_ids = torch.empty(0, dtype=torch.int64, device=logits.device)
        logprobs = None
        if samplers:
            tracked = [self._tracked[r.request_id] for r in samplers]
            # The token sampled now is output number len(outputs) + pending (the pending ones are in flight).
            block = [t.min_tokens_block if r.num_output_tokens + r.num_pending_tokens < r.params.min_tokens else []
                     for r, t in zip(samplers, tracked)]
            batch = SamplingBatch.build(
                [r.params for r in samplers], [t.generator for t in tracked],
                [r.prompt_token_ids for r in samplers], [r.output_token_ids for r in samplers],
                self.model_config.vocab_size, logits.device, min_tokens_block=block,
                pending_token_ids=self._pending_token_ids(samplers, logits.device),
            )
            out = self.sampler(logits, batch)
            token_ids, logprobs = out.token_ids, out.logprob_tensors
        self.num_steps += 1
        advanced = self.scheduler.advance(sched)
        if [id(r) for r in advanced] != [id(r) for r in samplers]:
            raise RuntimeError("scheduler.advance disagrees with the step's sampling rows")
        host, ready = host_copy(token_ids), None
        if logprobs is not None:
            logprobs = logprobs.to_host()  # read in _finish_step: a read here would wait for this step
        if token_ids.device.type == "cuda":
            # On the tokens' own device: the thread's current device (cuda:0 in a fresh thread such
            # as AsyncEngine's) may be another GPU, whose stream says nothing about these copies.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(token_ids.device))
        return _LaunchedStep(samplers, token_ids, host, ready, logprobs, {id(r): i for i, r in enumerate(samplers)})

    def _pending_token_ids(self, samplers: list[Request], device: torch.device) -> torch.Tensor | None:
        """Per sampler row, its token still in flight (-1: none), gathered on the device; None when
        no row has one or no row uses a penalty (the only sampling stage that reads past outputs)."""
        inflight = self._inflight
        if inflight is None or not any(r.params.has_penalties for r in samplers):
            return None
        src = [inflight.row_of.get(id(r), -1) if r.num_pending_tokens else -1 for r in samplers]
        if all(i < 0 for i in src):
            return None
        idx = to_device(src, torch.int64, device)
        tokens = inflight.token_ids.to(device).index_select(0, idx.clamp(min=0))
        return torch.where(idx >= 0, tokens, torch.full_like(tokens, -1))

    def _finish_step(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Wait for the step's tokens, hand them to the scheduler, detokenize, check stops."""
        if not step.samplers:
            return []
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.host_token_ids.tolist()
        progressed = self.scheduler.resolve(step.samplers, tokens)
        lps = step.logprobs.tolist() if step.logprobs is not None else None
        outputs = []
        for r in progressed:
            out = self._after_token(r, lps[step.row_of[id(r)]] if lps is not None else None)
            if out is not None:
                outputs.append(out)
        return outputs

    def _record_step(self) -> None:
        """Send the scheduler's state and what the counters gained since last time to the metrics."""
        if self.metrics is None:
            return
        bm = self.block_manager
        now = (bm.prefix_cache_queries, bm.prefix_cache_hits, self.scheduler.num_preemptions_total)
        queries, hits, preemptions = (a - b for a, b in zip(now, self._counted))
        self._counted = now
        self.metrics.on_step(self.scheduler.num_running, self.scheduler.num_waiting, bm.usage,
                             prefix_queries_delta=queries, prefix_hits_delta=hits, preemptions_delta=preemptions)

    def _inputs(self, sched: SchedulerOutput):
        """The step's StepInputs. A token still pending (sampled by the in-flight step, id not on
        the host) gets a placeholder id, then its sampled id is copied in on the device."""
        slices = []
        pending_rows: list[int] = []  # rows of the flat batch that take a pending token
        pending_src: list[int] = []  # their rows in the in-flight step's token_ids
        row = 0
        for s in sched.scheduled:
            r = s.request
            c = r.num_computed_tokens
            ids = r.token_ids(c, c + s.num_new_tokens)
            missing = s.num_new_tokens - len(ids)
            if missing:
                inflight = self._inflight
                if missing != 1 or inflight is None or id(r) not in inflight.row_of:
                    raise RuntimeError(f"request {r.request_id}: {missing} input tokens are pending "
                                       "but no launched step holds them")
                pending_rows.append(row + len(ids))
                pending_src.append(inflight.row_of[id(r)])
                ids = ids + [0]
            slices.append(SeqSlice(ids, c, r.block_ids, s.samples))
            row += s.num_new_tokens
        inputs = build_step_inputs(slices, self.config.block_size, self.device)
        if pending_rows:
            src = self._inflight.token_ids  # type: ignore[union-attr]
            dst = to_device(pending_rows, torch.int64, self.device)
            idx = to_device(pending_src, torch.int64, src.device)
            inputs.input_ids.index_copy_(0, dst, src.index_select(0, idx).to(inputs.input_ids.device))
        return inputs

    def _after_token(self, req: Request, logprob) -> RequestOutput | None:
        t = self._tracked.get(req.request_id)
        if t is None:
            return None
        now = time.monotonic()
        if self.metrics is not None:
            if t.first_token_time is None:
                queued = (t.scheduled_time or now) - t.arrival
                self.metrics.on_first_token(now - t.arrival, queued)
            else:
                self.metrics.on_token(now - (t.last_token_time or now))
        if t.first_token_time is None:
            t.first_token_time = now
        t.last_token_time = now
        token = req.output_token_ids[-1]
        p = req.params
        may_stop = len(req.output_token_ids) >= p.min_tokens
        text, stop_str = t.detok.step([token], check_stop=may_stop) if t.detok else ("", None)
        reason = None
        if stop_str is not None:
            reason = FINISH_STOP_STRING
        elif may_stop and ((not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids):
            reason = FINISH_STOP
        elif len(req.output_token_ids) >= req.max_tokens or req.num_known_tokens >= self.max_model_len:
            reason = FINISH_LENGTH
        lps = [logprob] if logprob is not None else None
        if reason is None:
            return RequestOutput(req.request_id, [token], text, prompt_tokens=req.num_prompt_tokens,
                                 completion_tokens=len(req.output_token_ids), cached_tokens=req.num_cached_tokens,
                                 logprobs=lps)
        if reason != FINISH_STOP_STRING and t.detok is not None:
            text += t.detok.flush()
        self._tracked.pop(req.request_id, None)
        self.scheduler.finish_request(req, reason)
        out = self._final(t, reason, [token], text)
        out.logprobs = lps
        return out

    def _final(self, t: _Tracked, reason: str, new_ids: list[int], text: str) -> RequestOutput:
        r = t.request
        e2e = time.monotonic() - t.arrival
        if self.metrics is not None:
            self.metrics.on_finish(reason, r.num_prompt_tokens, len(r.output_token_ids), e2e)
        log.info("request finished", extra={
            "request_id": r.request_id, "finish_reason": reason, "prompt_tokens": r.num_prompt_tokens,
            "completion_tokens": len(r.output_token_ids), "cached_tokens": r.num_cached_tokens,
            "e2e_s": round(e2e, 4)})
        return RequestOutput(r.request_id, new_ids, text, finished=True, finish_reason=reason,
                             prompt_tokens=r.num_prompt_tokens, completion_tokens=len(r.output_token_ids),
                             cached_tokens=r.num_cached_tokens)

    # ---- offline API ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionResult]:
        """Run prompts to completion (batched by the scheduler); results in input order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        prompt_ids = {i: self._tracked[i].request.prompt_token_ids for i in ids}
        acc: dict[str, dict] = {i: {"ids": [], "text": [], "lps": []} for i in ids}
        results: dict[str, CompletionResult] = {}
        while len(results) < len(ids):
            for out in self.step():
                a = acc[out.request_id]
                a["ids"].extend(out.new_token_ids)
                a["text"].append(out.text_delta)
                if out.logprobs:
                    a["lps"].extend(out.logprobs)
                if out.finished:
                    results[out.request_id] = CompletionResult(
                        out.request_id, prompt_ids[out.request_id], a["ids"], "".join(a["text"]), out.finish_reason, out.prompt_tokens,
                        out.completion_tokens, out.cached_tokens, a["lps"] or None)
        return [results[i] for i in ids]

    # ---- introspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_blocks": bm.num_blocks,
            "free_blocks": bm.num_free_blocks,
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "num_steps": self.num_steps,
            "num_overlapped_steps": self.num_overlapped_steps,
        }

    def shutdown(self) -> None:
        self.executor.shutdown()
