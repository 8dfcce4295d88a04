"""llama.cpp on the same GGUF file, in the same process, as the baseline of `shardline bench latency
--compare-llama-cpp` and `bench offline --compare-llama-cpp` (issue 16: the CPU target is >= 1.0x
llama.cpp at batch 1). It runs through `llama-cpp-python` when that package is installed; it is
optional and never a dependency of shardline or its tests (it compiles llama.cpp from source:
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`).

Both sides get the same token ids (random ids or the chat prompt's encoding: the GGUF's vocabulary
is the engine's), greedy decoding, no stop on end-of-sequence, and the same thread count
(torch.get_num_threads() unless given)."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = ('pip install llama-cpp-python (it compiles llama.cpp from source, several minutes; '
                'CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU\'s instructions)')


class LlamaCppUnavailable(RuntimeError):
    """--compare-llama-cpp cannot run: the package is missing, or the model is not a GGUF file."""


@dataclass(frozen=True)
class LlamaCppTiming:
    """One prompt through llama.cpp: time to the first sampled token (the prompt's evaluation) and
    the whole run, in seconds, and the tokens produced (the ids, to compare with the engine's)."""

    ttft_s: float
    elapsed_s: float
    token_ids: list[int]

    def seconds_per_decode_token(self) -> float:
        """Seconds per output token after the first (the same definition as StreamTiming's)."""
        decode = len(self.token_ids) - 1
        return (self.elapsed_s - self.ttft_s) / decode if decode > 0 else self.elapsed_s


class LlamaCppRunner:
    """A llama.cpp context over one GGUF file (llama_cpp.Llama), for batch-1 greedy runs."""

    def __init__(self, gguf_path: Path, n_ctx: int, n_threads: int) -> None:
        try:
            llama_cpp = importlib.import_module("llama_cpp")  # optional: not a dependency, no stubs
        except ImportError as exc:
            raise LlamaCppUnavailable(
                f"--compare-llama-cpp needs the llama-cpp-python package, which is not installed: {INSTALL_HINT}"
            ) from exc
        self.version = str(getattr(llama_cpp, "__version__", "?"))
        self.n_threads = n_threads
        self.llm: Any = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads,
                                        n_threads_batch=n_threads, n_batch=min(512, n_ctx), verbose=False)

    def run(self, prompt: list[int], output_len: int) -> LlamaCppTiming:
        """Evaluate `prompt` from an empty context, then sample `output_len` tokens greedily (the
        end-of-sequence token does not stop it, as the engine's ignore_eos)."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = int(llm.sample(top_k=1, temp=0.0))
        ttft = time.perf_counter() - t0
        tokens = [token]
        for _ in range(output_len - 1):
            llm.eval([token])
            token = int(llm.sample(top_k=1, temp=0.0))
            tokens.append(token)
        return LlamaCppTiming(ttft, time.perf_counter() - t0, tokens)

    def close(self) -> None:
        """Free the llama.cpp context and weights."""
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def llama_cpp_runner(model_spec: str, n_ctx: int, n_threads: int) -> LlamaCppRunner:
    """A runner over the GGUF file `model_spec` resolves to. Raises LlamaCppUnavailable naming the
    flag when the model is not a GGUF file or llama-cpp-python is missing."""
    from shardline.worker.loader.source import resolve_model

    source = resolve_model(model_spec, weights_required=True)
    if source.kind != "gguf":
        raise LlamaCppUnavailable(f"--compare-llama-cpp runs llama.cpp on the model's GGUF file, but {model_spec!r} "
                                  f"is a {source.kind} checkpoint; pass a .gguf file or smollm2-135m")
    return LlamaCppRunner(source.path, n_ctx, n_threads)
