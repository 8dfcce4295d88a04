"""Weights and config from a GGUF file (llama.cpp's format), dequantized to float32 with the `gguf`
package one tensor at a time, renamed to Hugging Face names and laid out as transformers expects."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .gguf_gemma import GEMMA_BLOCK_NAMES, GEMMA_GGUF_ARCHITECTURES, gemma_config_fields, stored_norm_offset
from .source import ModelLoadError, cache_dir
from .weights import LazyWeight, WeightStream

# general.architecture -> (HF architecture, HF model_type)
SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    **GEMMA_GGUF_ARCHITECTURES,
}
# A `llama` file with {arch}.expert_count > 0 is a Mixtral (llama.cpp writes Mixtral as llama).
_MIXTRAL = "MixtralForCausalLM"
# llama.cpp's converter interleaves the two rotary halves of each Q/K head for these architectures.
_PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # Mixture of experts: the router, and each part of all experts stacked [E, ...] (no `.weight`
    # in the model's name for those, see worker/loader/expert_names.py).
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Tensors llama.cpp adds that have no Hugging Face parameter (llama3 rope frequency divisors: read
# into the config's rope_scaling instead, see _read_gguf_hf_config).
_IGNORED = ("rope_freqs.weight",)
# Below this file size a load is instant and a progress bar is noise.
_PROGRESS_MIN_BYTES = 50 * 1024 * 1024


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Map a llama.cpp tensor name of architecture `arch` to its Hugging Face name (None when it has none)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_TENSOR.match(gguf_name)
    names = {**_BLOCK_NAMES, **GEMMA_BLOCK_NAMES} if arch in GEMMA_GGUF_ARCHITECTURES else _BLOCK_NAMES
    if m and m.group(2) in names:
        part = names[m.group(2)]
        suffix = "" if part.startswith("mlp.experts.") else f".{m.group(3)}"
        return f"model.layers.{m.group(1)}.{part}{suffix}"
    return None


def open_gguf(path: Path):
    """Open a GGUF file (memory-mapped), raising ModelLoadError naming it when it is not one."""
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: GGUF file does not exist") from None
    except Exception as e:  # the reader raises ValueError/struct/IndexError on truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or corrupt") from None


def _field(reader, key: str, default: Any = None) -> Any:
    """A metadata value: str, int, float, bool, or a list for arrays."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return default
    types = field.types
    if not types:
        return default
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if types[0] == gguf.GGUFValueType.BOOL else value


def _architecture(reader, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    return arch


def _torch_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first; torch outermost first.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


# Bump when what is derived from a GGUF changes, so that caches written by older versions are not read.
_DERIVED_VERSION = 2  # 2: rope_freqs factors in config.json


def derived_dir(path: Path) -> Path:
    """Where files derived from a GGUF (its config.json, the converted tokenizer) are cached, keyed
    by name, size and mtime: parsing GGUF metadata takes seconds, reading these files milliseconds."""
    st = path.stat()
    return cache_dir() / "gguf-derived" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-v{_DERIVED_VERSION}"


def write_derived(path: Path, fill) -> None:
    """Fill a fresh temporary directory with `fill(tmp_dir)` and move it into place as
    derived_dir(path); best effort: a read-only cache only costs speed."""
    target = derived_dir(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        fill(tmp)
        for item in tmp.iterdir():
            target.mkdir(exist_ok=True)
            os.replace(item, target / item.name)
        tmp.rmdir()
    except OSError:
        pass


def gguf_hf_config(path: Path) -> dict[str, Any]:
    """A Hugging Face style config dict from the GGUF file's metadata (cached beside the tokenizer)."""
    cached = derived_dir(path) / "config.json" if path.exists() else None
    if cached is not None and cached.exists():
        return json.loads(cached.read_text())
    cfg = _read_gguf_hf_config(path)
    write_derived(path, lambda d: (d / "config.json").write_text(json.dumps(cfg, indent=1)))
    return cfg


def _read_gguf_hf_config(path: Path) -> dict[str, Any]:
    reader = open_gguf(path)
    arch = _architecture(reader, path)

    def key(suffix: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{suffix}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = key("embedding_length")
    heads = key("attention.head_count")
    layers = key("block_count")
    ffn = key("feed_forward_length")
    experts = key("expert_count")
    if ffn is None and experts:  # a MoE file may give only the experts' width
        ffn = key("expert_feed_forward_length")
    for name, value in (("embedding_length", hidden), ("attention.head_count", heads), ("block_count", layers),
                        ("feed_forward_length", ffn)):
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata key {arch}.{name} is missing")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if "token_embd.weight" in tensors:
        vocab = _torch_shape(tensors["token_embd.weight"])[0]  # the weights' shape is what the model must match
    elif tokens is not None:
        vocab = len(tokens.data)
    else:
        vocab = key("vocab_size")
    if vocab is None:
        raise ModelLoadError(f"{path}: cannot tell the vocabulary size (no tokenizer.ggml.tokens, no token_embd.weight)")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts: only uniform ones are meaningful here
        kv_heads = max(kv_heads)
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(key("attention.key_length") or hidden // heads),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "qwen2" or any(name.endswith("attn_q.bias") for name in tensors):
        cfg["attention_bias"] = True
    if experts:
        cfg["num_experts"] = int(experts)
        cfg["num_experts_per_tok"] = int(key("expert_used_count", 1))
        if arch == "llama":
            cfg.update(architectures=[_MIXTRAL], model_type="mixtral")
        else:  # qwen3moe: llama.cpp renormalises the top-k weights unless the file says otherwise
            cfg["moe_intermediate_size"] = int(key("expert_feed_forward_length", ffn))
            cfg["norm_topk_prob"] = bool(key("expert_weights_norm", True))
            # Layers without a router hold a dense MLP (Qwen3-MoE's mlp_only_layers).
            cfg["mlp_only_layers"] = [i for i in range(int(layers)) if f"blk.{i}.ffn_gate_inp.weight" not in tensors]
    if arch in GEMMA_GGUF_ARCHITECTURES:
        tokens_list = _field(reader, "tokenizer.ggml.tokens") if tokens is not None else None
        cfg.update(gemma_config_fields(arch, key, cfg, tokens_list))
    scaling_type = key("rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
        original = key("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        cfg["rope_scaling"] = scaling
    if "rope_freqs.weight" in tensors:
        # llama.cpp's converters store Llama 3.1-style rope scaling as per-frequency divisors rather
        # than as metadata; they are what llama.cpp applies, so they win over any scaling metadata.
        factors = _dequantize(path, tensors["rope_freqs.weight"]).reshape(-1)
        cfg["rope_scaling"] = {"rope_type": "freq_factors", "freq_factors": [float(f) for f in factors]}
    return cfg


def iter_gguf_weights(path: Path, show_progress: bool = True) -> WeightStream:
    """Yield (HF name, LazyWeight) per tensor; each LazyWeight dequantizes its tensor when read."""
    reader = open_gguf(path)
    arch = _architecture(reader, path)
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    kv_heads = int(max(kv_heads) if isinstance(kv_heads, list) else kv_heads)
    permute = arch in _PERMUTED_QK_ARCHITECTURES
    mixtral = bool(_field(reader, f"{arch}.expert_count")) and arch == "llama"
    entries = []
    for tensor in reader.tensors:
        if tensor.name in _IGNORED:
            continue
        name = hf_tensor_name(tensor.name, arch)
        if name is None:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} has no counterpart in the supported {arch} models "
                "(variants beyond the supported families are not supported)"
            )
        if mixtral and name.endswith(".mlp.gate.weight"):
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")  # Mixtral's spelling of the router
        _check_type(path, tensor)
        rope_heads = None
        if permute and ".attn_q." in tensor.name:
            rope_heads = heads
        elif permute and ".attn_k." in tensor.name:
            rope_heads = kv_heads
        entries.append((name, tensor, rope_heads, stored_norm_offset(arch, tensor.name)))
    show = show_progress and Path(path).stat().st_size >= _PROGRESS_MIN_BYTES
    return _stream(path, entries, show)


def _stream(path: Path, entries: list, show_progress: bool) -> WeightStream:
    with tqdm(total=len(entries), desc="Loading GGUF", unit="tensor", disable=not show_progress) as bar:
        for name, tensor, rope_heads, offset in entries:
            yield name, _lazy(path, tensor, rope_heads, offset)
            bar.update(1)


def _check_type(path: Path, tensor) -> None:
    import gguf

    qtype = tensor.tensor_type
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    traits = getattr(gguf.quants, "_type_traits", None)  # absent in some gguf versions: checked on read then
    if qtype not in plain and traits is not None and qtype not in traits:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which the gguf package cannot dequantize; "
            "use a file quantized as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a K-quant"
        )


def _dequantize(path: Path, tensor, rows: slice | None = None) -> torch.Tensor:
    """Dequantize the tensor (or a range of its outermost rows) to a float32 torch tensor."""
    import gguf

    data = tensor.data if rows is None else tensor.data[rows]
    try:
        values = gguf.quants.dequantize(data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf package cannot dequantize"
        ) from None
    shape = _torch_shape(tensor)
    if rows is not None:
        shape = (values.shape[0],) + shape[1:]
    # F32 data is a read-only view of the memory map: copy so the caller owns a writable tensor.
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(shape))


def _unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head it interleaves the rotary pairs
    (rows 0, d/2, 1, d/2+1, ...) where Hugging Face keeps the two halves apart."""
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def _lazy(path: Path, tensor, rope_heads: int | None, offset: float = 0.0) -> LazyWeight:
    """A tensor read on demand in Hugging Face's layout: Q/K rows unpermuted (rope_heads), and
    `offset` (what the converter added: Gemma's norms hold 1 + w) taken off again."""
    shape = _torch_shape(tensor)

    def reader(dim: int | None, start: int, length: int | None) -> torch.Tensor:
        if dim is None:
            out = _dequantize(path, tensor)
            if offset:
                out -= offset
            return out if rope_heads is None else _unpermute_rope(out, rope_heads)
        dim = dim % len(shape)
        stop = shape[dim] if length is None else start + length
        if start < 0 or stop > shape[dim] or stop < start:
            raise ValueError(f"{tensor.name}: slice [{start}, {stop}) out of range for dim {dim} of shape {shape}")
        if dim != 0 or len(shape) < 2:
            whole = reader(None, 0, None)
            return whole.narrow(dim, start, stop - start)
        # Rows are quantized independently, so a row range dequantizes on its own; for Q/K the range is
        # widened to whole heads because the rope permutation moves rows only within a head.
        unit = shape[0] // rope_heads if rope_heads is not None else 1
        lo, hi = (start // unit) * unit, -(-stop // unit) * unit
        out = _dequantize(path, tensor, slice(lo, hi))
        if rope_heads is not None:
            out = _unpermute_rope(out, (hi - lo) // unit)
        return out[start - lo : stop - lo]

    return LazyWeight(shape, reader, _quantized_reader(path, tensor, rope_heads, shape))


def _quantized_reader(path: Path, tensor, rope_heads: int | None, shape: tuple[int, ...]):
    """For Q4_0 / Q4_1 / Q8_0 matrices: read a slice as codes and scales, rows restored to Hugging
    Face order like the float reader (the rope permutation moves whole rows, scales with them)."""
    from shardline.worker.layers.quantization.gguf_blocks import KEPT_GGUF_TYPES, decode_gguf_blocks

    type_name = tensor.tensor_type.name
    if type_name not in KEPT_GGUF_TYPES or len(shape) != 2:
        return None

    def read(dim: int | None, start: int, length: int | None):
        whole = decode_gguf_blocks(np.asarray(tensor.data).reshape(shape[0], -1), type_name)
        if rope_heads is not None:
            whole = whole.map_rows(lambda t: _unpermute_rope(t, rope_heads))
        if dim is None:
            return whole
        dim = dim % 2
        n = shape[dim] - start if length is None else length
        if start < 0 or start + n > shape[dim] or n < 0:
            raise ValueError(f"{tensor.name}: slice [{start}, {start + n}) out of range for dim {dim} of shape {shape}")
        try:
            return whole.narrow(dim, start, n)
        except ValueError as e:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r}: {e}") from None

    return read
