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

Speculative decoding (config.speculative_method, worker/spec_decode/): before each schedule a
proposer guesses up to k tokens for every decoding request; the step runs them as k + 1 query
tokens and the rejection sampler keeps the accepted run plus one token from the target, so the
output is what decoding without speculation produces (greedy: the same tokens; sampled: the same
distribution). It runs with overlapped scheduling off: a proposal needs the previous step's
tokens on the host.

Structured outputs (worker/structured/): a constrained request waits outside the scheduler until
its grammar is compiled (on a worker thread), then queues with its arrival time. Each step fills
the constrained rows' token mask on the host after queueing the forward and applies it on the
device in the sampler. Its matcher must have seen every earlier token, but under overlap the
previous step's token is still pending: so a step with a constrained row that has a pending token
first waits for the *previous* step's tokens (its event, recorded before this step's forward was
queued), advances the matcher with them, then fills the mask while this step's forward runs. The
device never idles for it unless filling takes longer than the forward; steps without constrained
rows never wait. docs/structured-outputs.md has the whole argument.

It imports neither Ray nor gRPC, so it runs alone (offline `generate`, the CLI, benchmarks)."""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence, Union

import torch

from shardline.worker.config import EngineConfig, ModelConfig
from shardline.worker.engine.block_manager import BlockManager
from shardline.worker.engine.detokenizer import IncrementalDetokenizer
from shardline.worker.engine.executor import Executor, LocalExecutor, ModelSpec
from shardline.worker.engine.generation import GenerationRequest
from shardline.worker.engine.model_runner import SeqSlice, StepInputs, build_step_inputs
from shardline.worker.engine.outputs import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    CompletionResult,
    RequestOutput,
    merge_into,
)
from shardline.worker.engine.params import RequestError, SamplingParams
from shardline.worker.engine.request import Request, RequestStatus
from shardline.worker.engine.sampler import LogprobTensors, Sampler, SamplingBatch, make_generator, prompt_logprobs
from shardline.worker.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from shardline.worker.engine.transfer import host_copy, to_device
from shardline.worker.engine.validation import Limits
from shardline.worker.spec_decode.rejection_sampler import DraftTokens, RejectionSampler, VerifiedTokens
from shardline.worker.spec_decode.stats import SpecDecodeStats
from shardline.worker.structured.bitmask import TokenBitmask
from shardline.worker.structured.compiler import GrammarCompilerPool
from shardline.worker.structured.matcher import GrammarState
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
    spec_k: int = 0  # speculative decoding: how many tokens to propose next (adapts to acceptance)
    draft_probs: torch.Tensor | None = None  # [len(request.spec_token_ids), V]: q of the proposal; None: one-hot
    grammar: GrammarState | None = None  # structured output: set once its grammar is compiled


@dataclass(frozen=True)
class _PromptLogprobRows:
    """A request's prompt positions [first, end) whose logits a step returns after its sampled
    rows; position p's logits give prompt token p + 1's logprob."""

    request: Request
    first: int
    end: int


@dataclass
class _LaunchedStep:
    """A step whose forward and sampling are queued on the device; _finish_step reads its tokens."""

    samplers: list[Request]  # requests that sample, in the order of token_ids' rows
    token_ids: torch.Tensor  # [N] int64 on the device: the source of the next step's pending inputs
    host_token_ids: torch.Tensor  # [N] on the host, filled by a non-blocking copy
    ready: Any  # torch.cuda.Event recorded after that copy (None on CPU)
    logprobs: LogprobTensors | None  # per sampler row, when any asked; on the host once `ready`
    row_of: dict[int, int] = field(default_factory=dict)  # id(request) -> row of token_ids
    # A verification step (speculative decoding): per sampler its emitted tokens, on the host.
    verified: VerifiedTokens | None = None
    drafts: DraftTokens | None = None
    # Prompt logprobs computed by this step: the rows, and their logprobs (on the host once `ready`).
    prompt_rows: list[_PromptLogprobRows] = field(default_factory=list)
    prompt_logprobs: LogprobTensors | None = None


@dataclass(frozen=True)
class EngineFootprint:
    """What one engine holds, reported at start-up and in `shardline bench`'s header: the weight
    scheme and bytes, the KV cache's dtype and bytes per token (rank 0's shard under TP), the pool."""

    quantization: str
    kv_cache_dtype: str
    weight_bytes: int | None  # None where the executor does not report it (the stand-in engine)
    kv_bytes_per_token: int | None  # all layers, keys and values
    num_kv_blocks: int
    block_size: int

    def describe(self) -> str:
        weights = "?" if self.weight_bytes is None else f"{self.weight_bytes / 2**20:.1f} MiB"
        kv = "?" if self.kv_bytes_per_token is None else f"{self.kv_bytes_per_token:,} B/token"
        return (f"quantization={self.quantization} weights={weights} kv_cache_dtype={self.kv_cache_dtype} "
                f"kv={kv} kv_blocks={self.num_kv_blocks}x{self.block_size}")


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
        source = resolve_model(config.model, weights_required=config.needs_weights)
        self.model_config = ModelConfig.from_hf_config(source.hf_config())
        self.tokenizer = load_tokenizer(source, special_tokens_in_content=config.special_tokens_in_content)
        load_format = config.load_format if config.load_format != "auto" else source.kind
        self.quantization = resolve_quantization(config.quantization, source.kind if load_format != "dummy" else None,
                                                 source.hf_config(), self.device)
        self.kv_cache_dtype = config.resolved_kv_cache_dtype()
        spec = ModelSpec(self.model_config, str(source.path), source.kind, load_format, self.dtype, self.device,
                         seed=config.seed, attention_backend=config.attention_backend, quantization=self.quantization,
                         kv_cache_dtype=self.kv_cache_dtype)
        self.max_model_len = config.resolved_max_model_len(self.model_config)
        self.executor: Executor = self._make_executor(spec, show_progress)
        # Rank 0's weights as held in memory (None where the executor does not report them).
        self.weight_bytes: int | None = getattr(self.executor, "weight_bytes", None)
        # Rank 0's KV-cache bytes per token, all layers, keys and values (None: the stand-in engine).
        self.kv_bytes_per_token: int | None = getattr(self.executor, "kv_bytes_per_token", None)
        self.footprint = EngineFootprint(self.quantization.name, str(self.kv_cache_dtype).removeprefix("torch."),
                                         self.weight_bytes, self.kv_bytes_per_token, self.executor.num_blocks,
                                         config.block_size)
        log.info("model loaded: %s", self.footprint.describe(), extra=asdict(self.footprint))
        self.block_manager = BlockManager(self.executor.num_blocks, config.block_size, config.enable_prefix_caching,
                                          group_windows=self.model_config.kv_cache_groups.group_windows)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        # Unseeded requests draw from one generator seeded by config.seed (vLLM's --seed): the same
        # requests in the same order sample the same tokens after a restart.
        self.sampler = Sampler(make_generator(config.seed, self.device))
        # The longest sequence whose blocks fit the pool at once: num_blocks * block_size for one
        # global group; less for a hybrid model (its windowed groups hold blocks too); unbounded
        # when every layer is windowed (a request holds only a window of KV).
        kv_bound = self.block_manager.max_tokens_held(config.max_num_batched_tokens)
        self.limits = Limits(max_model_len=self.max_model_len, vocab_size=self.model_config.vocab_size,
                             max_kv_tokens=kv_bound,
                             max_stop_strings=config.max_stop_strings, max_stop_string_len=config.max_stop_string_len)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else []
        self.eos_token_ids = sorted(set(tokenizer_eos) | set(self.model_config.eos_token_ids))
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.async_scheduling = config.resolved_async_scheduling()
        self._inflight: _LaunchedStep | None = None  # launched, not yet finished (overlap only)
        self.num_overlapped_steps = 0  # steps finished while the next one was already launched
        self._counted = (0, 0, 0)  # prefix queries, prefix hits, preemptions already sent to metrics
        self.proposer = None
        self.spec_stats = SpecDecodeStats(config.num_speculative_tokens or 0)
        if config.speculative_enabled:
            from shardline.worker.spec_decode import build_proposer

            if config.async_scheduling:
                log.warning("async_scheduling: turned off, speculative decoding (%s) needs each step's tokens "
                            "on the host before it proposes the next", config.speculative_method)
            self.proposer = build_proposer(config, self)
            self.rejection_sampler = RejectionSampler()
        self._grammars: GrammarCompilerPool | None = None  # built with the first constrained request
        self._compiling: dict[str, Future] = {}  # request id -> its grammar's compile, not yet queued

    def _make_executor(self, spec: ModelSpec, show_progress: bool) -> Executor:
        if self.config.load_format == "stand-in":
            from shardline.worker.engine.stand_in import StandInExecutor

            return StandInExecutor(self.model_config, self.config, self.device)
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
        """Tokenize, validate and queue a request; returns its id. Raises RequestError naming the bad field."""
        params = params or SamplingParams()
        try:
            request = GenerationRequest.validated(self.encode_prompt(prompt), params, self.limits,
                                                  request_id or f"req-{next(self._ids)}", priority, cache_salt)
        except RequestError as e:
            if self.metrics is not None:
                self.metrics.on_reject(e.code)
            raise
        return self.submit(request, arrival_time)

    def submit(self, request: GenerationRequest, arrival_time: float | None = None) -> str:
        """Queue a request validated at the edge (GenerationRequest.validated, against these same
        limits); returns its id. Raises RequestError for what only the engine knows: a duplicate id,
        a full queue, or n > 1 (the caller runs each choice as its own request: request.choice(i))."""
        params = request.params
        request_id = request.request_id
        try:
            if params.n != 1:
                raise RequestError("n", f"the engine runs one choice per request; submit request.choice(i) for each of the {params.n}")
            if request_id in self._tracked:
                raise RequestError("request_id", f"{request_id!r} is already in flight")
            if self.scheduler.num_waiting + len(self._compiling) >= self.config.max_queue_len:
                raise RequestError("", f"the engine's queue is full ({self.config.max_queue_len} waiting requests); "
                                   "retry later", code="resource_exhausted")
        except RequestError as e:
            if self.metrics is not None:
                self.metrics.on_reject(e.code)
            raise
        token_ids = request.prompt_token_ids
        now = time.monotonic()
        req = Request(request_id, token_ids, params, arrival_time=arrival_time or now, priority=request.priority,
                      cache_salt=request.cache_salt, max_tokens=request.max_tokens)
        block = [] if params.ignore_eos else list(self.eos_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params) if self.tokenizer is not None else None
        tracked = _Tracked(req, detok, make_generator(params.seed, self.device),
                           sorted(set(block) | set(params.stop_token_ids)), now,
                           spec_k=self.config.num_speculative_tokens or 0)
        if params.structured_output is not None:
            # Queued by _admit_compiled once compiled; until then only this request waits.
            future, cache_hit = self._grammar_pool().submit(params.structured_output)
            self._compiling[request_id] = future
            if self.metrics is not None:
                self.metrics.on_structured_request(cache_hit)
        else:
            self.scheduler.add_request(req)
        self._tracked[request_id] = tracked
        return request_id

    def _grammar_pool(self) -> GrammarCompilerPool:
        if self._grammars is None:
            if self.tokenizer is None:
                raise RequestError("structured_output", "this model has no tokenizer, so its output cannot be constrained")
            self._grammars = GrammarCompilerPool(
                self.tokenizer.hf, self.model_config.vocab_size, self.eos_token_ids,
                on_compiled=self.metrics.on_grammar_compiled if self.metrics is not None else None)
        return self._grammars

    def _admit_compiled(self) -> list[RequestOutput]:
        """Queue the requests whose grammar is compiled; end those whose compile failed."""
        outputs = []
        for request_id, future in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            t = self._tracked.get(request_id)
            if t is None:
                continue
            try:
                t.grammar = GrammarState(future.result())
            except Exception as e:  # noqa: BLE001 - the request's own input failed to compile
                self._tracked.pop(request_id, None)
                outputs.append(self._final(t, FINISH_ERROR, [], "", error=f"structured_output: {e}"))
                continue
            self.scheduler.add_request(t.request)
        return outputs

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final (abort) output if it was live."""
        tracked = self._tracked.pop(request_id, None)
        self._compiling.pop(request_id, None)
        self.scheduler.abort_request(request_id)
        if tracked is None:
            return None
        self._record_step()
        return self._final(tracked, FINISH_ABORT, [], "")

    # ---- the step ---------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._inflight is not None or bool(self._compiling)

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns a delta for every request that produced a token or ended.
        With overlapped scheduling the deltas are those of the previous step, finished while this
        one runs on the device."""
        outputs: list[RequestOutput] = []
        if self._compiling:
            if not self.scheduler.has_unfinished and self._inflight is None:
                # Nothing else to run: wait a little for a grammar rather than spin.
                wait(list(self._compiling.values()), timeout=0.02, return_when=FIRST_COMPLETED)
            outputs += self._admit_compiled()
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        launched = self._launch(sched) if sched.scheduled else None
        if self._inflight is not None:
            self.num_overlapped_steps += launched is not None
            outputs += self._finish_step(self._take_inflight())
        if launched is not None:
            if not self.async_scheduling:
                outputs += self._finish_step(launched)
            elif launched.prompt_rows or any(r.status != RequestStatus.FINISHED for r in launched.samplers):
                self._inflight = launched
            # else: no row samples and no prompt logprobs, or every row stopped when the previous
            # step was finished just now: nothing will read its results, and keeping it would
            # report the engine busy.
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
        inputs, prompt_rows = self._inputs(sched)
        logits = self.executor.execute(inputs)
        prompt_lps = None
        if prompt_rows:  # the extra rows come after the sampled ones (StepInputs.sample_rows)
            num_extra = sum(p.end - p.first for p in prompt_rows)
            prompt_lps = self._prompt_logprobs(logits[logits.shape[0] - num_extra:], prompt_rows)
            logits = logits[: logits.shape[0] - num_extra]
        if any(s.spec_token_ids for s in sched.scheduled):
            step = self._launch_verification(sched, logits)
            step.prompt_rows, step.prompt_logprobs = prompt_rows, prompt_lps
            return step
        token_ids = torch.empty(0, dtype=torch.int64, device=logits.device)
        logprobs = None
        if samplers:
            tracked = [self._tracked[r.request_id] for r in samplers]
            # The token sampled now is output number len(outputs) + pending (the pending ones are in flight).
            # A constrained request's end is the grammar's: min_tokens does not mask its EOS.
            block = [t.min_tokens_block if r.num_output_tokens + r.num_pending_tokens < r.params.min_tokens
                     and t.grammar is None else [] for r, t in zip(samplers, tracked)]
            batch = SamplingBatch.build(
                [r.params for r in samplers], [t.generator for t in tracked],
                [r.prompt_token_ids for r in samplers], [r.output_token_ids for r in samplers],
                self.model_config.vocab_size, logits.device, min_tokens_block=block,
                pending_token_ids=self._pending_token_ids(samplers, logits.device),
            )
            batch.token_bitmask = self._token_bitmask(samplers, tracked, logits.device)
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
        return _LaunchedStep(samplers, token_ids, host, ready, logprobs, {id(r): i for i, r in enumerate(samplers)},
                             prompt_rows=prompt_rows, prompt_logprobs=prompt_lps)

    def _prompt_logprobs(self, logits: torch.Tensor, rows: list[_PromptLogprobRows]) -> LogprobTensors:
        """Queue the prompt logprobs of `rows` ([E, V] logits in their order) and their copy to the host."""
        targets: list[int] = []
        num_logprobs: list[int | None] = []
        for p in rows:
            targets.extend(p.request.prompt_token_ids[p.first + 1: p.end + 1])
            num_logprobs.extend([p.request.params.prompt_logprobs] * (p.end - p.first))
        return prompt_logprobs(logits, to_device(targets, torch.int64, logits.device), num_logprobs).to_host()

    def _collect_prompt_logprobs(self, step: _LaunchedStep) -> None:
        """Append a finished step's prompt logprobs to their requests, in position order. A position
        already held (computed again after a preemption) is skipped."""
        if step.prompt_logprobs is None:
            return
        entries = step.prompt_logprobs.tolist()
        row = 0
        for p in step.prompt_rows:
            held = p.request.prompt_logprobs
            for position in range(p.first, p.end):
                if held is not None and len(held) == position + 1:
                    held.append(entries[row])
                row += 1

    # ---- speculative decoding ------------------------------------------------------------------------

    def _propose(self) -> None:
        """Ask the proposer for up to spec_k tokens for every request that decodes next step (no
        pending token, only its newest token left to compute); the scheduler cuts them to fit."""
        assert self.proposer is not None
        requests, ks = [], []
        for r in self.scheduler.running:
            r.spec_token_ids = []
        limit = self.config.speculative_disable_by_batch_size
        if limit is not None and self.scheduler.num_running >= limit:
            return  # a batch this large is compute-bound: verifying would cost what it saves
        for r in self.scheduler.running:
            t = self._tracked.get(r.request_id)
            if t is None or r.num_pending_tokens or r.num_computed_tokens != r.num_tokens - 1:
                continue
            if r.params.structured_output is not None:
                continue  # NOTE: a grammar masks one position per step; proposals would need k + 1 masks
            k = min(t.spec_k, r.max_tokens - r.num_output_tokens - 1, self.max_model_len - r.num_tokens - 1)
            if k >= 1:
                requests.append(r)
                ks.append(k)
        if not requests:
            return
        tracked = [self._tracked[r.request_id] for r in requests]
        proposals = self.proposer.propose(requests, ks, [t.generator for t in tracked])
        for r, t, k, p in zip(requests, tracked, ks, proposals):
            r.spec_token_ids = list(p.token_ids[:k])
            t.draft_probs = p.probs[: len(r.spec_token_ids)] if p.probs is not None else None

    def _launch_verification(self, sched: SchedulerOutput, logits: torch.Tensor) -> _LaunchedStep:
        """Sample a step that verifies proposals: every sampling request gets k + 1 rows (k = 0 for
        the ones without a proposal), each shaped as if the proposals before it were outputs (so
        penalties and min_tokens see what a step-by-step decode would), then the rejection sampler
        keeps each request's accepted run and one token from the target."""
        entries: list[ScheduledRequest] = [s for s in sched.scheduled if s.samples]
        params: list[SamplingParams] = []
        prompts, outputs, blocks = [], [], []
        generators, ks, draft_ids, draft_probs = [], [], [], []
        grammar_rows: list[tuple[int, GrammarState]] = []  # constrained requests: never a proposal, one row
        for e in entries:
            r, t = e.request, self._tracked[e.request.request_id]
            spec = e.spec_token_ids
            if t.grammar is not None and not spec:
                t.grammar.advance(r.output_token_ids)  # no pending token: speculation runs synchronously
                grammar_rows.append((len(params), t.grammar))
            for j in range(len(spec) + 1):
                out = r.output_token_ids + spec[:j]
                params.append(r.params)
                prompts.append(r.prompt_token_ids)
                outputs.append(out)
                blocks.append(t.min_tokens_block if len(out) < r.params.min_tokens and t.grammar is None else [])
            generators.append(t.generator)
            ks.append(len(spec))
            draft_ids.extend(spec)
            draft_probs.append(t.draft_probs[: len(spec)] if t.draft_probs is not None and spec else None)
        vocab = self.model_config.vocab_size
        batch = SamplingBatch.build(params, [None] * len(params), prompts, outputs, vocab, logits.device,
                                    min_tokens_block=blocks)
        batch.token_bitmask = TokenBitmask.fill(grammar_rows, vocab, logits.device) if grammar_rows else None
        probs = None
        if any(p is not None for p in draft_probs):
            probs = torch.cat([p if p is not None else torch.nn.functional.one_hot(
                torch.tensor(e.spec_token_ids, dtype=torch.int64), vocab).float().to(logits.device)
                for p, e in zip(draft_probs, entries)])
        drafts = DraftTokens(ks, draft_ids, probs)
        verified = self.rejection_sampler(logits, batch, drafts, generators)
        self.num_steps += 1
        samplers = [e.request for e in entries]
        advanced = self.scheduler.advance(sched)
        if [id(r) for r in advanced] != [id(r) for r in samplers]:
            raise RuntimeError("scheduler.advance disagrees with the step's sampling rows")
        logprobs = verified.logprob_tensors.to_host() if verified.logprob_tensors is not None else None
        host = VerifiedTokens(host_copy(verified.token_ids), host_copy(verified.num_tokens), logprobs)
        ready = None
        if logits.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(logits.device))
        return _LaunchedStep(samplers, verified.token_ids, host.token_ids, ready, None,
                             {id(r): i for i, r in enumerate(samplers)}, verified=host, drafts=drafts)

    def _finish_verification(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Append each request's emitted tokens one at a time with the usual stop checks (a stop or
        max_tokens inside an accepted run ends the request there; the rest is dropped), then roll
        its KV back to the accepted tokens and adapt its k."""
        assert step.verified is not None and step.drafts is not None
        tokens = step.verified.token_ids.tolist()
        counts = step.verified.num_tokens.tolist()
        lps = step.verified.logprob_tensors.tolist() if step.verified.logprob_tensors is not None else None
        offsets = step.drafts.row_offsets
        outputs: list[RequestOutput] = []
        for s, r in enumerate(step.samplers):
            if r.status == RequestStatus.FINISHED:
                continue  # aborted meanwhile
            k = step.drafts.num_draft_tokens[s]
            emitted = tokens[s][: counts[s]]
            if k:
                self.spec_stats.record(k, len(emitted) - 1)
                t = self._tracked.get(r.request_id)
                if t is not None and self.config.speculative_adaptive:
                    # Grow after a fully accepted proposal, else propose one more than was accepted.
                    limit = self.config.num_speculative_tokens or 0
                    t.spec_k = max(1, min(limit, k + 1 if len(emitted) - 1 == k else len(emitted)))
            delta: RequestOutput | None = None
            for j, token in enumerate(emitted):
                if j == 0:
                    r.resolve_pending_token(token)
                else:
                    r.append_output_token(token)
                out = self._after_token(r, lps[offsets[s] + j] if lps is not None else None)
                if out is not None:  # one delta for the step's tokens (a verification emits up to k + 1)
                    delta = out if delta is None else merge_into(delta, out)
                if r.status == RequestStatus.FINISHED:
                    break
            self.scheduler.rollback_speculation(r)
            if delta is not None:
                outputs.append(delta)
        return outputs

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

    def _token_bitmask(self, samplers: list[Request], tracked: list[_Tracked], device: torch.device) -> TokenBitmask | None:
        """The constrained rows' mask for this step (None without constrained rows). Each matcher
        first takes the tokens it has not seen, the one pending in the in-flight step included:
        reading that one waits for the in-flight step's tokens (see the module docstring)."""
        rows = [(i, t.grammar) for i, t in enumerate(tracked) if t.grammar is not None]
        if not rows:
            return None
        inflight_tokens: list[int] | None = None
        for i, state in rows:
            r = samplers[i]
            known = r.output_token_ids
            if r.num_pending_tokens:
                inflight = self._inflight
                if inflight is None or id(r) not in inflight.row_of:
                    raise RuntimeError(f"request {r.request_id}: a token is pending but no launched step holds it")
                if inflight_tokens is None:
                    if inflight.ready is not None:
                        inflight.ready.synchronize()  # the previous step's tokens, not this step's forward
                    inflight_tokens = inflight.host_token_ids.tolist()
                known = known + [inflight_tokens[inflight.row_of[id(r)]]]
            state.advance(known)
        return TokenBitmask.fill(rows, self.model_config.vocab_size, device)

    def _finish_step(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Wait for the step's tokens, hand them to the scheduler, detokenize, check stops."""
        if not step.samplers:
            if step.prompt_rows:  # a prefill chunk that samples nothing yet
                if step.ready is not None:
                    step.ready.synchronize()
                self._collect_prompt_logprobs(step)
            return []
        if step.ready is not None:
            step.ready.synchronize()
        self._collect_prompt_logprobs(step)
        if step.verified is not None:
            return self._finish_verification(step)
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
        if self.proposer is not None:
            self.metrics.on_spec_decode(self.spec_stats.take_delta())
        take_expert_load = getattr(self.executor, "take_expert_load", None)  # MoE-capable executors
        expert_load = take_expert_load() if take_expert_load is not None else None
        if expert_load is not None and any(expert_load):  # all zero: no forward ran since the last take
            self.metrics.on_expert_load(expert_load)

    def _inputs(self, sched: SchedulerOutput) -> tuple[StepInputs, list[_PromptLogprobRows]]:
        """The step's StepInputs, and the prompt positions whose logits it returns after the sampled
        rows (requests owing prompt logprobs). A token still pending (sampled by the in-flight step,
        id not on the host) gets a placeholder id, then its sampled id is copied in on the device."""
        slices = []
        pending_rows: list[int] = []  # rows of the flat batch that take a pending token
        pending_src: list[int] = []  # their rows in the in-flight step's token_ids
        prompt_rows: list[_PromptLogprobRows] = []
        row = 0
        for s in sched.scheduled:
            r = s.request
            c = r.num_computed_tokens
            num_real = s.num_new_tokens - len(s.spec_token_ids)
            ids = r.token_ids(c, c + num_real)
            missing = num_real - len(ids)
            if missing:
                inflight = self._inflight
                if missing != 1 or inflight is None or id(r) not in inflight.row_of:
                    raise RuntimeError(f"request {r.request_id}: {missing} input tokens are pending "
                                       "but no launched step holds them")
                pending_rows.append(row + len(ids))
                pending_src.append(inflight.row_of[id(r)])
                ids = ids + [0]
            owed_first, owed_end = r.prompt_logprob_positions
            first, end = max(owed_first, c), min(owed_end, c + num_real)
            extra = (0, 0)
            if first < end:
                extra = (first - c, end - c)
                prompt_rows.append(_PromptLogprobRows(r, first, end))
            slices.append(SeqSlice(ids + s.spec_token_ids, c, r.block_ids, s.samples, len(s.spec_token_ids), extra,
                                   tuple(r.block_tables[1:]), prompt=c < r.num_prompt_tokens))
            row += s.num_new_tokens
        inputs = build_step_inputs(slices, self.config.block_size, self.device)
        if pending_rows:
            src = self._inflight.token_ids  # type: ignore[union-attr]
            dst = to_device(pending_rows, torch.int64, self.device)
            idx = to_device(pending_src, torch.int64, src.device)
            inputs.input_ids.index_copy_(0, dst, src.index_select(0, idx).to(inputs.input_ids.device))
        return inputs, prompt_rows

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
        first_delta = t.first_token_time is None
        if first_delta:
            t.first_token_time = now
        t.last_token_time = now
        out = self._token_delta(req, t, logprob)
        if out is not None and first_delta and req.prompt_logprobs is not None:
            out.prompt_logprobs = list(req.prompt_logprobs)
        return out

    def _token_delta(self, req: Request, t: _Tracked, logprob) -> RequestOutput | None:
        """The delta of the request's newest token: detokenized, stop-checked, finished if it stops."""
        token = req.output_token_ids[-1]
        p = req.params
        may_stop = len(req.output_token_ids) >= p.min_tokens
        text, stop_str = t.detok.step([token], check_stop=may_stop) if t.detok else ("", None)
        reason = None
        grammar = t.grammar
        if grammar is not None and not grammar.advance(req.output_token_ids):
            self._tracked.pop(req.request_id, None)
            self.scheduler.finish_request(req, FINISH_ERROR)
            return self._final(t, FINISH_ERROR, [token], text, error=(
                f"structured_output: token {grammar.rejected_token} does not match the grammar"))
        if stop_str is not None:
            reason = FINISH_STOP_STRING
        elif grammar is not None and grammar.is_terminated:
            reason = FINISH_STOP  # the grammar is complete and took an EOS (even under ignore_eos)
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

    def _final(self, t: _Tracked, reason: str, new_ids: list[int], text: str, error: str | None = None) -> RequestOutput:
        r = t.request
        if self.proposer is not None:
            self.proposer.release(r.request_id)
        e2e = time.monotonic() - t.arrival
        if self.metrics is not None:
            self.metrics.on_finish(reason, r.num_prompt_tokens, len(r.output_token_ids), e2e)
        log.info("request finished", extra={
            "request_id": r.request_id, "finish_reason": reason, "prompt_tokens": r.num_prompt_tokens,
            "completion_tokens": len(r.output_token_ids), "cached_tokens": r.num_cached_tokens,
            "e2e_s": round(e2e, 4)})
        return RequestOutput(r.request_id, new_ids, text, finished=True, finish_reason=reason,
                             prompt_tokens=r.num_prompt_tokens, completion_tokens=len(r.output_token_ids),
                             cached_tokens=r.num_cached_tokens, error=error)

    # ---- offline API ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionResult]:
        """Run prompts to completion (batched by the scheduler); results in input order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        prompt_ids = {i: self._tracked[i].request.prompt_token_ids for i in ids}
        acc: dict[str, dict] = {i: {"ids": [], "text": [], "lps": [], "prompt_lps": None} for i in ids}
        results: dict[str, CompletionResult] = {}
        while len(results) < len(ids):
            for out in self.step():
                a = acc[out.request_id]
                a["ids"].extend(out.new_token_ids)
                a["text"].append(out.text_delta)
                if out.logprobs:
                    a["lps"].extend(out.logprobs)
                if out.prompt_logprobs is not None:
                    a["prompt_lps"] = out.prompt_logprobs
                if out.finished:
                    assert out.finish_reason is not None  # a finished output always carries its reason
                    results[out.request_id] = CompletionResult(
                        out.request_id, prompt_ids[out.request_id], a["ids"], "".join(a["text"]), out.finish_reason, out.prompt_tokens,
                        out.completion_tokens, out.cached_tokens, a["lps"] or None, a["prompt_lps"])
        return [results[i] for i in ids]

    # ---- introspection ----------------------------------------------------------------------------

    def params_in_flight(self) -> dict[str, SamplingParams]:
        """The SamplingParams of every request the engine holds, by request id (what the engine
        actually samples with: for inspecting a running server and for tests of the request path)."""
        return {rid: t.request.params for rid, t in list(self._tracked.items())}

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
            **self.spec_stats.totals(),
            "num_grammars_compiling": len(self._compiling),
            "grammar_cache_hits": self._grammars.stats.cache_hits if self._grammars else 0,
            "grammar_compiles": self._grammars.stats.compiles if self._grammars else 0,
            "grammar_compile_seconds": self._grammars.stats.compile_seconds if self._grammars else 0.0,
        }

    def shutdown(self) -> None:
        if self._grammars is not None:
            self._grammars.shutdown()
        self.executor.shutdown()

