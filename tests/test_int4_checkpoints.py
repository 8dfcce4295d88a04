"""AWQ and GPTQ int4 checkpoints: a tiny checkpoint written here in each format's Hugging Face layout
(the packing below is written from the formats' descriptions, independently of the loader's
unpacking) loads, holds exactly the file's weights (q - z) * s, and runs within the int4 kernels'
bounds of its dequantized float twin; the Triton int4 matmul (interpreter) matches a float64
reference; TP=2 equals TP=1; unsupported variants fail naming the format and the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel_cases import interpreter  # noqa: F401  (fixture)
from quant_checks import CPU, agreement, assert_tp2_equals_tp1, engine_config, spec_for
from shardline.worker.engine.executor import LocalExecutor
from shardline.worker.layers.quantization import QuantizationError, resolve_quantization
from shardline.worker.layers.quantization.int4_checkpoints import unpack_awq, unpack_gptq
from shardline.worker.layers.quantization.block_cpu import Q4BlockCPU
from shardline.worker.layers.quantization.cpu_extension import block_kernels
from shardline.worker.layers.quantization.int4_cpu import Int4WeightOnlyCPU
from shardline.worker.layers.quantization.int4_triton import Int4TritonLinear
from shardline.worker.loader.source import ModelLoadError
from tiny_models import write_tiny_checkpoint

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: nibble p holds column 8c + AWQ_ORDER[p]


def _quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit per-group quantization as AWQ/GPTQ checkpoints hold it: codes q [N, K] in
    0..15, zeros z [N, G] in 0..15, fp16 scales s [N, G]; the weight is (q - z) * s."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.min(-1), g.max(-1)
    s = np.maximum((hi - lo) / 15, 1e-6).astype(np.float16)
    z = np.clip(np.round(-lo / s.astype(np.float32)), 0, 15).astype(np.int64)
    q = np.clip(np.round(g / s.astype(np.float32)[..., None]) + z[..., None], 0, 15).astype(np.int64)
    return q.reshape(n, k), z, s


def _dequant(q: np.ndarray, z: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    return ((q - np.repeat(z, group, 1)) * np.repeat(s.astype(np.float64), group, 1)).astype(np.float32)


def _pack8(nibbles: np.ndarray) -> np.ndarray:
    """[..., 8] values 0..15 -> int32 [...]: element j in bits 4j..4j+3."""
    word = np.zeros(nibbles.shape[:-1], dtype=np.uint32)
    for j in range(8):
        word |= (nibbles[..., j].astype(np.uint32) & 0xF) << np.uint32(4 * j)
    return word.view(np.int32)


def pack_gptq(w: np.ndarray, group: int = GROUP) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """GPTQ tensors of a float weight [N, K] (qweight [K/8, N], qzeros [G, N/8] holding z - 1,
    scales [G, N], g_idx [K]) and the float weights they stand for."""
    n, k = w.shape
    q, z, s = _quantize(w, group)
    tensors = {
        "qweight": _pack8(q.T.reshape(k // 8, 8, n).transpose(0, 2, 1)),
        "qzeros": _pack8((z.T - 1).reshape(k // group, n // 8, 8)),
        "scales": s.T.copy(),
        "g_idx": (np.arange(k) // group).astype(np.int32),
    }
    return tensors, _dequant(q, z, s, group)


def pack_awq(w: np.ndarray, group: int = GROUP) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """AWQ (GEMM) tensors of a float weight [N, K] (qweight [K, N/8], qzeros [G, N/8] in AWQ's
    interleaved order, scales [G, N]) and the float weights they stand for."""
    n, k = w.shape
    q, z, s = _quantize(w, group)
    order = np.array(AWQ_ORDER)
    qk = q.T.reshape(k, n // 8, 8)[..., order]  # nibble p <- column 8c + order[p]
    zg = z.T.reshape(k // group, n // 8, 8)[..., order]
    return {"qweight": _pack8(qk), "qzeros": _pack8(zg), "scales": s.T.copy()}, _dequant(q, z, s, group)


PACKERS = {"awq": pack_awq, "gptq": pack_gptq}


def _weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_unpacked_codes_are_exactly_the_checkpoints_weights(fmt):
    tensors, ref = PACKERS[fmt](_weight(48, 96))
    t = {name: torch.from_numpy(a) for name, a in tensors.items()}
    codes = unpack_awq(t["qweight"], t["qzeros"], t["scales"]) if fmt == "awq" else \
        unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    assert codes.shape == (48, 96) and codes.group_size == GROUP and codes.bits == 4
    assert torch.equal(codes.dequantize(), torch.from_numpy(ref))


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2.0 ** -6)])
@pytest.mark.parametrize("m", [1, 5, 20])
def test_triton_int4_matmul_matches_a_float64_reference(interpreter, dtype, rel, m):
    tensors, ref = pack_gptq(_weight(40, 96, seed=1))  # N = 40: not a multiple of the 64-column tile
    t = {name: torch.from_numpy(a) for name, a in tensors.items()}
    method = Int4TritonLinear(unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"]))
    w = torch.from_numpy(ref).double()
    assert torch.equal(method.dequantized(), w.float())
    assert method.weight_bytes() < 40 * 96  # half a byte per weight plus per-group float32 scale and offset
    x = torch.randn(m, 96).to(dtype)
    y = method(x)
    assert y.dtype == dtype
    ref_y = x.double() @ w.T
    # fp32: summation order only; bf16: the tile rounded to bf16 (2^-8) and the output (2^-8), doubled
    bound = rel * (x.double().abs() @ w.abs().T) + 1e-6
    err = (y.double() - ref_y).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def _write_int4_checkpoint(directory: Path, fmt: str, float_twin: Path | None = None) -> None:
    """A tiny llama with every projection in `fmt`'s layout; with float_twin, also a float checkpoint
    holding exactly the dequantized weights (the reference)."""
    from safetensors.torch import load_file, save_file

    write_tiny_checkpoint("llama", directory, seed=6)
    tensors = load_file(str(directory / "model.safetensors"))
    out, twin = {}, {}
    for name, t in tensors.items():
        if name.endswith("proj.weight"):
            packed, ref = PACKERS[fmt](t.float().numpy())
            prefix = name.removesuffix("weight")
            out.update({prefix + k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in packed.items()})
            twin[name] = torch.from_numpy(ref)
        else:
            out[name] = twin[name] = t
    cfg = json.loads((directory / "config.json").read_text())
    if float_twin is not None:
        float_twin.mkdir(exist_ok=True)
        save_file(twin, str(float_twin / "model.safetensors"))
        (float_twin / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(directory / "model.safetensors"))
    cfg["quantization_config"] = {"awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                          "version": "gemm"},
                                  "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
                                           "sym": False, "checkpoint_format": "gptq"}}[fmt]
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=["awq", "gptq"])
def int4_checkpoint(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    _write_int4_checkpoint(root / "q", request.param, float_twin=root / "twin")
    return request.param, root / "q", root / "twin"


def test_int4_checkpoint_loads_on_the_cpu_kernel_and_matches_its_dequantized_twin(int4_checkpoint):
    fmt, path, twin = int4_checkpoint
    spec = spec_for(path, "safetensors", None)
    assert spec.quantization.name == fmt and spec.quantization.group_size == GROUP
    quant = LocalExecutor(spec, engine_config(), show_progress=False)
    dense = LocalExecutor(spec_for(twin, "safetensors", None), engine_config(), show_progress=False)
    method = quant.model.layers[0].mlp.gate_up_proj.quant_method
    # group 32: repacked for shardline's block kernel, or torch's int4 CPU kernel where it cannot be built
    assert isinstance(method, Q4BlockCPU if block_kernels() is not None else Int4WeightOnlyCPU)
    want = dense.model.layers[0].mlp.gate_up_proj.float_weight().float()
    # the kernels hold scale and zero in fp16 (block) or bf16 (torch): each weight within
    # 2^-8 (8 |s| + |zero|) of the file's
    assert (method.dequantized() - want).abs().max() <= 2.0 ** -8 * 24 * want.abs().max()
    rel, agree, worst_margin = agreement(quant, dense, 384, steps=4)
    print(f"{fmt}: vs its dequantized float twin {rel:.2%} of the largest logit, greedy agreement {agree:.0%}")
    # bf16 activations and scales (torch's kernel), int8 activations per 32-block (the block kernel),
    # as the int4 / gguf schemes (tests/test_quantization.py)
    assert rel <= (0.08 if isinstance(method, Q4BlockCPU) else 0.03)
    assert agree >= 0.9 and worst_margin <= 2 * rel


@pytest.mark.slow
def test_tp2_of_an_int4_checkpoint_equals_one_rank(int4_checkpoint):
    fmt, path, _ = int4_checkpoint
    assert_tp2_equals_tp1(spec_for(path, "safetensors", None), steps=3)


@pytest.mark.parametrize("qcfg,match", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True},
     "quantization_config.desc_act true: GPTQ act-order"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "quantization_config.bits 3: GPTQ checkpoints load with 4-bit"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "quantization_config.checkpoint_format 'gptq_v2'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "quantization_config.version 'gemv': only AWQ's 'gemm'"),
    ({"quant_method": "awq", "w_bit": 8}, "quantization_config.bits 8: AWQ checkpoints load with 4-bit"),
    ({"quant_method": "awq_marlin", "bits": 4}, "'awq_marlin': AWQ \\(Marlin\\) int4 checkpoints are not supported"),
])
def test_unsupported_int4_variants_fail_naming_the_field(qcfg, match):
    with pytest.raises(QuantizationError, match=match):
        resolve_quantization(None, "safetensors", {"quantization_config": qcfg}, CPU)


def test_schemes_that_need_a_checkpoint_are_refused_for_float_weights():
    with pytest.raises(QuantizationError, match="quantization: 'awq' reads AWQ checkpoints"):
        resolve_quantization("awq", "safetensors", {}, CPU)
    with pytest.raises(QuantizationError, match="conflicts with the checkpoint's quantization_config"):
        resolve_quantization("int8", "safetensors", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, CPU)


def test_act_order_g_idx_in_the_tensors_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _write_int4_checkpoint(tmp_path, "gptq")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="q_proj.g_idx: GPTQ act-order"):
        LocalExecutor(spec_for(tmp_path, "safetensors", None), engine_config(), show_progress=False)
