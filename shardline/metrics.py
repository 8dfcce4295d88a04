"""Prometheus metrics of an engine and of the router, under the names vLLM users already query
(`shardline:` instead of `vllm:`), plus the merge the ingress uses to serve every replica's
metrics on one /metrics endpoint.

Each recorder owns its own CollectorRegistry, so several engines in one process (tests, the
offline API) never clash in prometheus_client's global registry. The engine calls plain-value
methods (`on_step`, `on_finish`, ...); nothing here imports Ray, so GPU machines without Ray can
record and expose the same metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from shardline.worker.spec_decode.stats import SpecDecodeDelta

PREFIX = "shardline:"

# Family names as they appear in the text exposition and in PromQL (counters with `_total`).
NUM_REQUESTS_RUNNING = PREFIX + "num_requests_running"
NUM_REQUESTS_WAITING = PREFIX + "num_requests_waiting"
KV_CACHE_USAGE_PERC = PREFIX + "kv_cache_usage_perc"
PREFIX_CACHE_QUERIES = PREFIX + "prefix_cache_queries_total"
PREFIX_CACHE_HITS = PREFIX + "prefix_cache_hits_total"
NUM_PREEMPTIONS = PREFIX + "num_preemptions_total"
PROMPT_TOKENS = PREFIX + "prompt_tokens_total"
GENERATION_TOKENS = PREFIX + "generation_tokens_total"
REQUEST_SUCCESS = PREFIX + "request_success_total"
REQUEST_REJECTED = PREFIX + "request_rejected_total"
TIME_TO_FIRST_TOKEN = PREFIX + "time_to_first_token_seconds"
INTER_TOKEN_LATENCY = PREFIX + "inter_token_latency_seconds"
E2E_REQUEST_LATENCY = PREFIX + "e2e_request_latency_seconds"
REQUEST_QUEUE_TIME = PREFIX + "request_queue_time_seconds"
ROUTER_DECISIONS = PREFIX + "router_decisions_total"
SPEC_DECODE_NUM_DRAFTS = PREFIX + "spec_decode_num_drafts_total"
SPEC_DECODE_NUM_DRAFT_TOKENS = PREFIX + "spec_decode_num_draft_tokens_total"
SPEC_DECODE_NUM_ACCEPTED_TOKENS = PREFIX + "spec_decode_num_accepted_tokens_total"
SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS = PREFIX + "spec_decode_num_accepted_tokens_per_pos_total"
STRUCTURED_OUTPUT_REQUESTS = PREFIX + "structured_output_requests_total"
GRAMMAR_CACHE_HITS = PREFIX + "grammar_cache_hits_total"
GRAMMAR_COMPILE_SECONDS = PREFIX + "grammar_compile_seconds"
MOE_EXPERT_TOKENS = PREFIX + "moe_expert_tokens"

ENGINE_METRIC_NAMES: tuple[str, ...] = (
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    KV_CACHE_USAGE_PERC,
    PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    NUM_PREEMPTIONS,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUEST_SUCCESS,
    REQUEST_REJECTED,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    E2E_REQUEST_LATENCY,
    REQUEST_QUEUE_TIME,
    SPEC_DECODE_NUM_DRAFTS,
    SPEC_DECODE_NUM_DRAFT_TOKENS,
    SPEC_DECODE_NUM_ACCEPTED_TOKENS,
    SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS,
    STRUCTURED_OUTPUT_REQUESTS,
    GRAMMAR_CACHE_HITS,
    GRAMMAR_COMPILE_SECONDS,
    MOE_EXPERT_TOKENS,
)
ROUTER_METRIC_NAMES: tuple[str, ...] = (ROUTER_DECISIONS, REQUEST_REJECTED)

# Every family this module exports; dashboards and alert rules may only name these.
METRIC_NAMES: tuple[str, ...] = ENGINE_METRIC_NAMES + (ROUTER_DECISIONS,)

# Finish reasons of worker/engine/outputs.py, pre-created at zero so rate() sees them from the start.
KNOWN_FINISH_REASONS = ("stop", "stop_string", "length", "abort", "error")
ROUTER_DECISION_VALUES = ("prefix_hit", "fallback")

# Bucket bounds (seconds). TTFT spans a cached short prompt (ms) to a long prefill under load.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0,
                2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
# ITL: decode steps of a few ms on GPU up to seconds on a CPU test box.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
# Whole requests and queueing: up to an hour for long generations.
# Grammar compiles: a small schema in ms, a large schema on a busy CPU in seconds.
COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0)

# Tokens one expert of one layer received in one step (mixture-of-experts models): 0 (an idle
# expert) up to a whole prefill budget's worth.
EXPERT_TOKEN_BUCKETS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0)

_ENGINE_LABELS = ("model_name", "replica_group")


def _family(name: str) -> str:
    """The name prometheus_client wants for a family: counters are declared without `_total`."""
    return name[: -len("_total")] if name.endswith("_total") else name


class _WithoutCreated:
    """A view of a registry that drops the `_created` samples prometheus_client adds to counters
    and histograms: they double the exposition and no dashboard uses them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def _check_delta(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a counter only goes up), got {value}")


class EngineMetrics:
    """The metrics of one engine (one replica group), labelled with its model and replica group.

    Counters move only through these methods, with the values the engine passes.
    """

    def __init__(self, model_name: str, replica_group: str = "0") -> None:
        self.model_name = model_name
        self.replica_group = replica_group
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name, "replica_group": replica_group}
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _ENGINE_LABELS, registry=reg).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(_family(name), doc, _ENGINE_LABELS, registry=reg).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, _ENGINE_LABELS, buckets=buckets, registry=reg).labels(**labels)

        self._running = gauge(NUM_REQUESTS_RUNNING, "Requests in the running batch.")
        self._waiting = gauge(NUM_REQUESTS_WAITING, "Requests waiting to be scheduled.")
        self._kv_usage = gauge(KV_CACHE_USAGE_PERC, "Fraction of KV cache blocks in use (1 = 100 percent).")
        self._prefix_queries = counter(PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.")
        self._prefix_hits = counter(PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.")
        self._preemptions = counter(NUM_PREEMPTIONS, "Requests preempted (KV blocks freed, recomputed later).")
        self._prompt_tokens = counter(PROMPT_TOKENS, "Prompt tokens of finished requests.")
        self._generation_tokens = counter(GENERATION_TOKENS, "Generated tokens of finished requests.")
        self._success = Counter(
            _family(REQUEST_SUCCESS), "Finished requests by finish reason.",
            _ENGINE_LABELS + ("finished_reason",), registry=reg,
        )
        self._rejected = Counter(
            _family(REQUEST_REJECTED), "Requests refused before they ran, by reason.",
            _ENGINE_LABELS + ("reason",), registry=reg,
        )
        for reason in KNOWN_FINISH_REASONS:
            self._success.labels(finished_reason=reason, **labels)
        self._ttft = histogram(TIME_TO_FIRST_TOKEN, "Time from arrival to the first token.", TTFT_BUCKETS)
        self._itl = histogram(INTER_TOKEN_LATENCY, "Time between two tokens of one request.", ITL_BUCKETS)
        self._e2e = histogram(E2E_REQUEST_LATENCY, "Time from arrival to the last token.", REQUEST_BUCKETS)
        self._queue = histogram(REQUEST_QUEUE_TIME, "Time from arrival to first scheduling.", REQUEST_BUCKETS)
        self._spec_drafts = counter(SPEC_DECODE_NUM_DRAFTS, "Speculative decoding: proposals verified.")
        self._spec_draft_tokens = counter(SPEC_DECODE_NUM_DRAFT_TOKENS, "Speculative decoding: tokens proposed.")
        self._spec_accepted = counter(SPEC_DECODE_NUM_ACCEPTED_TOKENS, "Speculative decoding: proposed tokens accepted.")
        self._spec_accepted_per_pos = Counter(
            _family(SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS),
            "Speculative decoding: proposed tokens accepted, by position in the proposal (0 first).",
            _ENGINE_LABELS + ("position",), registry=reg,
        )
        self._structured = counter(STRUCTURED_OUTPUT_REQUESTS, "Admitted requests with a structured-output constraint.")
        self._grammar_hits = counter(GRAMMAR_CACHE_HITS, "Constrained requests whose grammar was compiled or compiling already.")
        self._compile = histogram(GRAMMAR_COMPILE_SECONDS, "Time to compile one grammar against the vocabulary.",
                                  COMPILE_BUCKETS)
        self._expert_tokens = histogram(MOE_EXPERT_TOKENS, "Mixture-of-experts load: tokens one expert of one "
                                        "layer received in one step (one sample per expert and layer).",
                                        EXPERT_TOKEN_BUCKETS)
        self._labels = labels

    def on_expert_load(self, tokens_per_expert: Iterable[int]) -> None:
        """Record one step's expert load: the tokens each (layer, expert) pair received."""
        for n in tokens_per_expert:
            _check_delta("tokens_per_expert", n)
            self._expert_tokens.observe(n)

    def on_step(self, num_running: int, num_waiting: int, kv_usage: float,
                prefix_queries_delta: int = 0, prefix_hits_delta: int = 0,
                preemptions_delta: int = 0) -> None:
        """Record the scheduler's state after a step and what the step added to the counters."""
        if not -1e-6 <= kv_usage <= 1.0 + 1e-6:
            raise ValueError(f"kv_usage is a fraction in [0, 1], got {kv_usage}")
        kv_usage = min(max(kv_usage, 0.0), 1.0)  # float noise from a blocks ratio must not crash a step
        _check_delta("prefix_queries_delta", prefix_queries_delta)
        _check_delta("prefix_hits_delta", prefix_hits_delta)
        _check_delta("preemptions_delta", preemptions_delta)
        if prefix_hits_delta > prefix_queries_delta:
            raise ValueError(
                f"prefix_hits_delta ({prefix_hits_delta}) exceeds prefix_queries_delta ({prefix_queries_delta})"
            )
        self._running.set(num_running)
        self._waiting.set(num_waiting)
        self._kv_usage.set(kv_usage)
        if prefix_queries_delta:
            self._prefix_queries.inc(prefix_queries_delta)
        if prefix_hits_delta:
            self._prefix_hits.inc(prefix_hits_delta)
        if preemptions_delta:
            self._preemptions.inc(preemptions_delta)

    def on_spec_decode(self, delta: "SpecDecodeDelta") -> None:
        """Add what speculative decoding's counters gained (worker/spec_decode/stats.py SpecDecodeDelta)."""
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            _check_delta(name, getattr(delta, name))
        if delta.num_accepted_tokens > delta.num_draft_tokens:
            raise ValueError(f"num_accepted_tokens ({delta.num_accepted_tokens}) exceeds num_draft_tokens "
                             f"({delta.num_draft_tokens})")
        if delta.num_drafts:
            self._spec_drafts.inc(delta.num_drafts)
            self._spec_draft_tokens.inc(delta.num_draft_tokens)
        if delta.num_accepted_tokens:
            self._spec_accepted.inc(delta.num_accepted_tokens)
        for pos, n in enumerate(delta.accepted_per_pos):
            if n:
                self._spec_accepted_per_pos.labels(position=str(pos), **self._labels).inc(n)

    def on_first_token(self, ttft_s: float, queue_time_s: float) -> None:
        """Record a request's first token: its time to first token and how long it queued."""
        self._ttft.observe(ttft_s)
        self._queue.observe(queue_time_s)

    def on_token(self, itl_s: float) -> None:
        """Record the gap between two consecutive tokens of one request."""
        self._itl.observe(itl_s)

    def on_finish(self, reason: str, prompt_tokens: int, generation_tokens: int, e2e_s: float) -> None:
        """Record a finished request: its finish reason, its token counts and its whole latency."""
        _check_delta("prompt_tokens", prompt_tokens)
        _check_delta("generation_tokens", generation_tokens)
        self._success.labels(finished_reason=reason, **self._labels).inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(generation_tokens)
        self._e2e.observe(e2e_s)

    def on_reject(self, reason: str) -> None:
        """Record a request refused before it ran (overloaded, invalid, draining, ...)."""
        self._rejected.labels(reason=reason, **self._labels).inc()

    def on_structured_request(self, cache_hit: bool) -> None:
        """Record an admitted constrained request and whether its grammar came from the cache."""
        self._structured.inc()
        if cache_hit:
            self._grammar_hits.inc()

    def on_grammar_compiled(self, seconds: float) -> None:
        """Record one grammar compile's duration (called from the compile thread)."""
        self._compile.observe(seconds)

    def exposition(self) -> bytes:
        """These metrics in the Prometheus text format (version 0.0.4)."""
        return generate_latest(_WithoutCreated(self.registry))


class RouterMetrics:
    """The ingress's own metrics: how the KV-aware router placed requests and what it refused."""

    def __init__(self, model_name: str, replica_group: str = "ingress") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name, "replica_group": replica_group}
        self._decisions = Counter(
            _family(ROUTER_DECISIONS), "Routing decisions: prefix_hit (cached prefix won) or fallback.",
            _ENGINE_LABELS + ("decision",), registry=self.registry,
        )
        # Same family as the engine's, so the merged /metrics has one rejection family.
        self._rejected = Counter(
            _family(REQUEST_REJECTED), "Requests refused before they ran, by reason.",
            _ENGINE_LABELS + ("reason",), registry=self.registry,
        )
        for decision in ROUTER_DECISION_VALUES:
            self._decisions.labels(decision=decision, **labels)
        self._labels = labels

    def on_decision(self, decision: str) -> None:
        """Record one routing decision, `prefix_hit` or `fallback`."""
        if decision not in ROUTER_DECISION_VALUES:
            raise ValueError(f"decision must be one of {ROUTER_DECISION_VALUES}, got {decision!r}")
        self._decisions.labels(decision=decision, **self._labels).inc()

    def on_reject(self, reason: str) -> None:
        """Record a request the ingress refused (invalid request, overloaded, draining)."""
        self._rejected.labels(reason=reason, **self._labels).inc()

    def exposition(self) -> bytes:
        """These metrics in the Prometheus text format (version 0.0.4)."""
        return generate_latest(_WithoutCreated(self.registry))


class _Families:
    """A collector over already-parsed families, so generate_latest can write them back."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_expositions(texts: list[bytes]) -> bytes:
    """Merge several text expositions into one valid exposition: each family once (HELP and TYPE
    from its first appearance), with the samples of every input.

    Inputs are expected to be prometheus_client output, told apart by their labels (replica_group).
    A series (name and labels) present in several inputs keeps the value of the last one, so a
    newer snapshot listed later wins; a family whose type differs from its first appearance is
    dropped from the later input rather than producing an exposition Prometheus would reject.
    """
    merged: dict[str, Metric] = {}
    series: dict[str, dict[tuple, int]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            first = merged.get(family.name)
            if first is None:
                first = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = first
                series[family.name] = {}
            elif first.type != family.type:
                continue
            index = series[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in index:
                    first.samples[index[key]] = sample
                else:
                    index[key] = len(first.samples)
                    first.samples.append(sample)
    return generate_latest(_Families(merged.values()))
