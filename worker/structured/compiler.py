"""Compiles constraints against the model's vocabulary off the engine thread, with an LRU cache.

Compiling builds xgrammar's per-state token-mask cache over the whole vocabulary (about 25 ms for
a small JSON schema over SmolLM2's 49,152 tokens, on one CPU core; longer for large schemas), so
it runs on a worker thread: the request waits for its grammar, the batch does not. The cache maps
a StructuredOutput (frozen, hashable) to the future of its CompiledGrammar, so concurrent
requests with the same schema share one compile and later ones hit at once. The xgrammar
TokenizerInfo (about 0.8 s for a 49k vocabulary) is built by the first compile job, on the worker
thread, so engines that never see a constraint never import xgrammar."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardline.worker.engine.params import StructuredOutput
from shardline.worker.structured.grammar import parse_grammar

if TYPE_CHECKING:
    import xgrammar


@dataclass
class CompileStats:
    """Counters since start: lookups served from the cache, compiles run and their total time."""

    cache_hits: int = 0
    compiles: int = 0
    compile_seconds: float = 0.0


class GrammarCompilerPool:
    """Owns xgrammar's compiler for one tokenizer and the thread that runs it.

    `hf_tokenizer`: the transformers tokenizer; `vocab_size`: the model's logits width (the mask
    covers it, padding ids included: xgrammar never allows ids past the tokenizer's vocabulary);
    `stop_token_ids`: the engine's EOS set, the only tokens a grammar allows once it is complete.
    `cache_size`: compiled grammars kept, least recently used evicted first."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = 128,
                 on_compiled: Any = None) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._on_compiled = on_compiled  # called with the seconds of each finished compile (metrics)
        self._cache: OrderedDict[StructuredOutput, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: "xgrammar.GrammarCompiler | None" = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardline-grammar")
        self.stats = CompileStats()

    def submit(self, constraint: StructuredOutput) -> tuple[Future, bool]:
        """The future of the constraint's CompiledGrammar, and whether it came from the cache (a
        compile done or already running) rather than being queued now. The future's exception, if
        any, is a RequestError naming the field (or xgrammar's own error)."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                self.stats.cache_hits += 1
                return future, True
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future, False

    def _compile(self, constraint: StructuredOutput) -> "xgrammar.CompiledGrammar":
        start = time.perf_counter()
        try:
            compiled = self._get_compiler().compile_grammar(parse_grammar(constraint))
        except BaseException:
            with self._lock:  # a failed compile is not cached: the next request tries again
                self._cache.pop(constraint, None)
            raise
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
        if self._on_compiled is not None:
            self._on_compiled(seconds)
        return compiled

    def _get_compiler(self) -> "xgrammar.GrammarCompiler":
        """xgrammar's compiler, built on first use (on the worker thread)."""
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._hf_tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            # Our cache holds the compiled grammars; xgrammar's own would keep a second copy.
            self._compiler = xgr.GrammarCompiler(info, max_threads=max(1, min(8, os.cpu_count() or 1)),
                                                 cache_enabled=False)
        return self._compiler

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
