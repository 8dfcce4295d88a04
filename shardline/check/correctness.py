"""The check's correctness steps: each Triton kernel against its torch reference at the model's own
shapes (on a GPU: the Llama-3-8B head layout and matrix sizes), one graph-replayed decode step
against the same step run eagerly, and a real engine run against transformers' greedy tokens.

The batch builders, the attention comparison and the paged prefill/decode helpers are the test
suite's own (tests/kernel_cases.py, tests/tiny_models.py), imported from the checkout, so the check
and the tests compare against the same references. The references themselves are the kernels'
torch implementations (impl="torch", TorchAttentionBackend) and transformers.

Each step returns its figures (max_abs_err, the tolerance, passed) or raises StepFailed with them.
On CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1 before triton's import)
on shorter sequences."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardline.check.runner import Deadline, StepFailed
from shardline.check.step_profile import profile_step
from shardline.worker.config import EngineConfig, ModelConfig

REPO = Path(__file__).resolve().parents[2]


def import_test_helpers() -> None:
    """Put the checkout's tests/ on sys.path (kernel_cases, tiny_models); a clear error without it."""
    tests = REPO / "tests"
    if not (tests / "kernel_cases.py").is_file():
        raise RuntimeError(f"the correctness steps need the repository's tests/ folder (looked in {tests})")
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))


@dataclass(frozen=True)
class Tolerance:
    """allclose bounds: |out - ref| <= atol + rtol * |ref|, elementwise."""

    atol: float
    rtol: float


# As the kernel tests use them: fp32 nearly exact; half precision to two decimals.
TOLERANCE = {torch.float32: Tolerance(1e-4, 1e-3), torch.bfloat16: Tolerance(3e-2, 3e-2),
             torch.float16: Tolerance(2e-2, 2e-2)}


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> dict[str, Any]:
    """Max absolute error of out against ref and whether every element is within tol."""
    out, ref = out.float(), ref.float()
    err = (out - ref).abs()
    return {f"{name}_max_abs_err": float(err.max()) if err.numel() else 0.0,
            f"{name}_passed": bool(torch.allclose(out, ref, atol=tol.atol, rtol=tol.rtol))}


def verdict(metrics: dict[str, Any], tol: Tolerance | None = None) -> dict[str, Any]:
    """metrics with the tolerance and `passed` (every *_passed); raises StepFailed when one failed."""
    checks = {k: v for k, v in metrics.items() if k.endswith("_passed")}
    metrics = {**metrics, "passed": all(checks.values())}
    if tol is not None:
        metrics.update(atol=tol.atol, rtol=tol.rtol)
    if not metrics["passed"]:
        failed = ", ".join(k.removesuffix("_passed") for k, v in checks.items() if not v)
        raise StepFailed(f"outside tolerance: {failed}", metrics)
    return metrics


class KernelChecks:
    """Kernel-against-reference comparisons at one model's shapes, on one device."""

    def __init__(self, model: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        import_test_helpers()
        self.cfg = model
        self.device = device
        self.dtype = dtype
        self.tol = TOLERANCE[dtype]
        self.compiled = device.type == "cuda"  # else the interpreter: short sequences

    def _attention(self, seqs: list[tuple[int, int]], pad_tokens: int = 0):
        from kernel_cases import run_both  # type: ignore[import-not-found]  # tests/, put on sys.path by import_test_helpers

        from shardline.worker.attention.triton_backend import TritonAttentionBackend

        c = self.cfg
        backend = TritonAttentionBackend() if self.compiled else TritonAttentionBackend(block_n=16)
        return run_both(seqs, c.num_attention_heads, c.num_key_value_heads, c.head_dim, 16, self.dtype,
                        backend=backend, pad_tokens=pad_tokens, device=str(self.device))

    def attention_decode(self, deadline: Deadline) -> dict[str, Any]:
        """Pure decode: one long context and a batch of ~1k-token ones (split-K and plain tiles)."""
        seqs = [(1, 4096)] + [(1, 1000 - 7 * i) for i in range(31)] if self.compiled else [(1, 70), (1, 17), (1, 33), (1, 1)]
        out, ref, _, _ = self._attention(seqs)
        return verdict({"num_seqs": len(seqs), **compare("attention", out, ref, self.tol)}, self.tol)

    def mixed_batch(self) -> list[tuple[int, int]]:
        """(query_len, seq_len): prefills, prefix-cached chunks and decodes in one step."""
        if self.compiled:
            return [(512, 512), (1, 3000), (200, 1700), (1, 17), (64, 64)]
        return [(1, 50), (24, 24), (1, 9), (13, 13), (10, 45)]

    def attention_mixed(self, deadline: Deadline) -> dict[str, Any]:
        out, ref, _, _ = self._attention(self.mixed_batch())
        return verdict({"num_tokens": out.shape[0], **compare("attention", out, ref, self.tol)}, self.tol)

    def kv_write(self, deadline: Deadline) -> dict[str, Any]:
        """The KV-write kernel stores exactly what the reference stores; padding rows store nothing."""
        _, _, cache, cache_ref = self._attention(self.mixed_batch(), pad_tokens=3)
        return verdict(compare("kv_cache", cache, cache_ref, Tolerance(0.0, 0.0)), Tolerance(0.0, 0.0))

    def matvec(self, deadline: Deadline) -> dict[str, Any]:
        """The skinny-GEMM kernel at the model's QKV, O, gate/up and down shapes, M = 1, 4, 16; QKV
        and gate/up also with their pre-norm and residual add folded in (normed_matvec)."""
        from shardline.worker.kernels.matvec import PreNorm, matvec, normed_matvec
        from shardline.worker.kernels.rmsnorm import rms_norm

        c = self.cfg
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        shapes = {"qkv": (c.hidden_size, q + 2 * kv), "o": (q, c.hidden_size),
                  "gate_up": (c.hidden_size, 2 * c.intermediate_size), "down": (c.intermediate_size, c.hidden_size)}
        tol = Tolerance(3e-2, 3e-2) if self.dtype != torch.float32 else Tolerance(1e-4, 1e-4)
        g = torch.Generator(device=self.device).manual_seed(0)
        metrics: dict[str, Any] = {}
        for name, (K, N) in shapes.items():
            w = (torch.randn(N, K, device=self.device, generator=g) / K**0.5).to(self.dtype)
            errors, passed = [], True
            for M in (1, 4, 16):
                deadline.check()
                x = torch.randn(M, K, device=self.device, generator=g).to(self.dtype)
                r = compare(name, matvec(x, w, impl="triton"), x.float() @ w.float().T, tol)
                errors.append(r[f"{name}_max_abs_err"])
                passed = passed and r[f"{name}_passed"]
            metrics.update({f"{name}_max_abs_err": max(errors), f"{name}_passed": passed})
            if name not in ("qkv", "gate_up"):
                continue
            errors, passed = [], True
            gamma = (1 + 0.1 * torch.randn(K, device=self.device, generator=g)).to(self.dtype)
            for M in (1, 4, 16):
                deadline.check()
                x, res = (torch.randn(M, K, device=self.device, generator=g).to(self.dtype) for _ in range(2))
                fused, summed = normed_matvec(x, w, PreNorm(gamma, c.rms_norm_eps, res), impl="triton")
                h, expected_sum = rms_norm(x, gamma, c.rms_norm_eps, residual=res, impl="torch")
                r = compare(f"normed_{name}", fused, h.float() @ w.float().T, tol)
                errors.append(r[f"normed_{name}_max_abs_err"])
                passed = passed and r[f"normed_{name}_passed"] and torch.equal(summed, expected_sum)
            metrics.update({f"normed_{name}_max_abs_err": max(errors), f"normed_{name}_passed": passed})
        return verdict(metrics, tol)

    def fused(self, deadline: Deadline) -> dict[str, Any]:
        """RMSNorm with residual, SiLU-and-mul and RoPE (in place on q and k) at the model's sizes."""
        from shardline.worker.kernels.activation import silu_and_mul
        from shardline.worker.kernels.rmsnorm import rms_norm
        from shardline.worker.kernels.rope import apply_rope, cos_sin_cache, rope_inv_freq

        c, dev, dt, rows = self.cfg, self.device, self.dtype, 16
        g = torch.Generator(device=dev).manual_seed(1)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=dev, generator=g).to(dt)

        x, res, w = rand(rows, c.hidden_size), rand(rows, c.hidden_size), rand(c.hidden_size).abs()
        out, new_res = rms_norm(x, w, c.rms_norm_eps, residual=res, impl="triton")
        ref_out, ref_res = rms_norm(x, w, c.rms_norm_eps, residual=res, impl="torch")
        metrics = {**compare("rms_norm", out, ref_out, self.tol), **compare("residual", new_res, ref_res, self.tol)}
        gu = rand(rows, 2 * c.intermediate_size)
        metrics.update(compare("silu_and_mul", silu_and_mul(gu, impl="triton"), silu_and_mul(gu, impl="torch"), self.tol))
        cache = cos_sin_cache(rope_inv_freq(c.head_dim, c.rope_theta), c.max_position_embeddings, device=dev)
        q, k = rand(rows, c.num_attention_heads, c.head_dim), rand(rows, c.num_key_value_heads, c.head_dim)
        pos = torch.randint(0, c.max_position_embeddings, (rows,), device=dev, generator=g)
        q_ref, k_ref = q.clone(), k.clone()
        apply_rope(q, k, pos, cache, impl="triton")
        apply_rope(q_ref, k_ref, pos, cache, impl="torch")
        metrics.update({**compare("rope_q", q, q_ref, self.tol), **compare("rope_k", k, k_ref, self.tol)})
        return verdict(metrics, self.tol)


class TinyEngineChecks:
    """A real engine on a tiny random Llama (written by transformers, float32 on both sides, as the
    test suite's parity tests): its greedy tokens against transformers', then one decode step
    through the CUDA graph runner against the same step run eagerly (on CPU: the runner's padded
    static-buffer path, which is what the graphs replay)."""

    def __init__(self, work_dir: Path, device: torch.device) -> None:
        import_test_helpers()
        self.work_dir = Path(work_dir)
        self.device = device
        self.engine: Any = None  # the LLMEngine once engine_vs_transformers has built it

    def engine_vs_transformers(self, deadline: Deadline) -> dict[str, Any]:
        from kernel_cases import BLOCK
        from tiny_models import hf_greedy, prompts, write_tiny_checkpoint  # type: ignore[import-not-found]

        from shardline.worker.engine.engine import LLMEngine
        from shardline.worker.engine.params import SamplingParams

        hf = write_tiny_checkpoint("llama", self.work_dir, seed=3)
        # attention "auto": the Triton kernels and CUDA graphs on a GPU; on CPU the torch path (the
        # kernel steps already ran the kernels in the interpreter; here it would take minutes).
        engine = LLMEngine(EngineConfig(model=str(self.work_dir), dtype="float32", device=self.device.type,
                                        num_kv_blocks=64, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=64),
                           show_progress=False)
        self.engine = engine
        batch = prompts(3, seed=12)
        results = engine.generate(batch, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        ours = [r.token_ids for r in results]
        theirs = [hf_greedy(hf, p, 6) for p in batch]
        mismatched = sum(a != b for a, b in zip(ours, theirs))
        metrics = {"sequences": len(batch), "tokens_each": 6, "mismatched_sequences": mismatched,
                   "tokens_passed": mismatched == 0, "cuda_graphs": bool(getattr(engine.executor, "cuda_graphs", False)),
                   "attention_backend": engine.executor.model.layers[0].self_attn.backend.name}  # type: ignore[attr-defined]  # LocalExecutor
        return verdict(metrics)

    def graph_vs_eager(self, deadline: Deadline) -> dict[str, Any]:
        from kernel_cases import BLOCK, BLOCKS_PER_SEQ, decode_inputs, prefill
        from tiny_models import prompts

        if self.engine is None:
            raise RuntimeError("needs the tiny engine of engine_vs_transformers, which did not start")
        runner = self.engine.executor.runner
        dev = self.device.type
        if runner.graphs is None:  # CPU: the padded path the graphs capture, run eagerly
            runner.enable_cuda_graphs(max_batch=4, max_model_len=BLOCK * BLOCKS_PER_SEQ, use_graphs=False)
        seqs = prefill(runner, prompts(3, seed=13, min_len=3, max_len=20), device=dev)
        inputs = decode_inputs(seqs, device=dev)
        if not runner.graphs.can_run(inputs):
            raise StepFailed("the decode step does not fit the graph runner", {"passed": False})
        replayed = runner.execute(inputs).clone()
        graphs, runner.graphs = runner.graphs, None
        try:
            eager = runner.execute(inputs)
        finally:
            runner.graphs = graphs
        metrics = {"replayed_graphs": bool(graphs.use_graphs), "batch": len(seqs),
                   **compare("logits", replayed, eager, Tolerance(1e-3, 0.0)),
                   "argmax_passed": replayed.argmax(-1).tolist() == eager.argmax(-1).tolist()}
        profile = profile_step(lambda: runner.execute(inputs), len(runner.model.decoder_layers), self.device)
        if profile is not None:  # one graph replay's kernels (CUDA only): count per layer, time per kernel
            metrics.update(profile.to_metrics())
        return verdict(metrics, Tolerance(1e-3, 0.0))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
