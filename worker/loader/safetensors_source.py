"""Weights from a Hugging Face safetensors directory (one model.safetensors, or shards listed in
model.safetensors.index.json). Tensors stay memory-mapped: a LazyWeight reads only the slice a
tensor-parallel rank asks for."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .source import ModelLoadError
from .weights import LazyWeight, WeightStream

INDEX_FILE = "model.safetensors.index.json"
# FP8 checkpoints (HF `fp8`, compressed-tensors float8) store each quantized weight's scales beside
# it; input_scale (a static activation scale) is not used: activations are scaled per token.
_FP8_COMPANIONS = (".weight_scale", ".input_scale")
# AWQ / GPTQ: a linear's `qweight` is read with these (worker/layers/quantization/int4_checkpoints.py).
INT4_COMPANIONS = (".qzeros", ".scales", ".g_idx")
# Below this many bytes a load is instant and a progress bar is noise.
_PROGRESS_MIN_BYTES = 50 * 1024 * 1024


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint files of `directory`: the shards named by the index, else every *.safetensors."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{directory}: no *.safetensors files")
        return files
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object): {e}") from None
    files = [directory / name for name in shard_names]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ModelLoadError(
            f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}; re-download the checkpoint"
        )
    return files


def iter_safetensors_weights(directory: Path, show_progress: bool = True) -> WeightStream:
    """Yield (name, LazyWeight) for every tensor of every file; raises ModelLoadError naming a bad file."""
    files = safetensors_files(Path(directory))
    handles = [(path, _open(path)) for path in files]
    total = sum(len(handle.keys()) for _, handle in handles)
    total_bytes = sum(path.stat().st_size for path in files)
    # Files are opened (and validated) now, so a bad checkpoint fails at the call, not mid-load.
    return _stream(handles, total, show_progress and total_bytes >= _PROGRESS_MIN_BYTES)


def _stream(handles: list, total: int, show_progress: bool) -> WeightStream:
    with tqdm(
        total=total,
        desc="Loading safetensors",
        unit="tensor",
        disable=not show_progress,
    ) as bar:
        for path, handle in handles:
            names = set(handle.keys())
            for name in handle.keys():
                if name.endswith(_FP8_COMPANIONS) or (  # read together with their weight
                        name.endswith(INT4_COMPANIONS) and name.rsplit(".", 1)[0] + ".qweight" in names):
                    bar.update(1)
                    continue
                if name.endswith(".qweight"):
                    yield name.removesuffix("qweight") + "weight", _int4_lazy(path, handle, name.removesuffix(".qweight"))
                    bar.update(1)
                    continue
                scale_name = name.removesuffix("weight") + "weight_scale" if name.endswith(".weight") else None
                if scale_name is not None and scale_name in names:
                    yield name, _fp8_lazy(path, handle, name, scale_name)
                else:
                    yield name, _lazy(path, handle, name)
                bar.update(1)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e}); the file may be truncated or corrupt") from None


def _lazy(path: Path, handle, name: str) -> LazyWeight:
    try:
        shape = tuple(handle.get_slice(name).get_shape())
    except SafetensorError as e:
        raise ModelLoadError(f"{path}: tensor {name!r} cannot be read ({e})") from None

    def reader(dim: int | None, start: int, length: int | None) -> torch.Tensor:
        try:
            if dim is None:
                return handle.get_tensor(name)
            if not -len(shape) <= dim < len(shape):
                raise ValueError(f"{name}: dim {dim} out of range for shape {shape}")
            dim = dim % len(shape)
            stop = shape[dim] if length is None else start + length
            if start < 0 or stop > shape[dim] or stop < start:
                raise ValueError(f"{name}: slice [{start}, {stop}) out of range for dim {dim} of shape {shape}")
            # Only the requested slice is copied out of the memory map.
            index = (slice(None),) * dim + (slice(start, stop),)
            return handle.get_slice(name)[index]
        except SafetensorError as e:
            raise ModelLoadError(f"{path}: tensor {name!r} cannot be read ({e})") from None

    return LazyWeight(shape, reader)


def _fp8_lazy(path: Path, handle, name: str, scale_name: str) -> LazyWeight:
    """An FP8 weight and its weight_scale (one per tensor, or one per output row): read_quantized
    gives the e4m3 codes with their row scales, read() the dequantized float32 values."""
    from shardline.worker.layers.quantization.fp8 import fp8_checkpoint_rows

    codes = _lazy(path, handle, name)
    scale = _lazy(path, handle, scale_name)
    per_row = int(torch.tensor(scale.shape).prod().item()) == codes.shape[0] and codes.shape[0] > 1

    def quantized(dim: int | None, start: int, length: int | None):
        weight = codes.read(dim, start, length)
        s = scale.read()
        if per_row and dim == 0:
            s = s.reshape(-1)[start : start + weight.shape[0]]
        return fp8_checkpoint_rows(weight, s)

    def reader(dim: int | None, start: int, length: int | None) -> torch.Tensor:
        return quantized(dim, start, length).dequantize()

    return LazyWeight(codes.shape, reader, quantized)


def _int4_lazy(path: Path, handle, prefix: str) -> LazyWeight:
    """An AWQ or GPTQ linear (`prefix`.qweight, .qzeros, .scales and GPTQ's .g_idx, in the same file)
    as one weight [out, in]: read_quantized gives its 4-bit codes with per-group scales and offsets,
    read() the dequantized float32 values. The packed tensors (half a byte per weight) are read whole
    and the codes sliced after unpacking: packing runs along different axes in the two formats."""
    from shardline.worker.layers.quantization.int4_checkpoints import unpack_int4_checkpoint

    names = set(handle.keys())
    missing = [s for s in (".qzeros", ".scales") if prefix + s not in names]
    if missing:
        raise ModelLoadError(f"{path}: {prefix}.qweight comes without {', '.join(prefix + s for s in missing)} "
                             "(AWQ/GPTQ tensors of one layer must be in one file)")
    parts = {s: _lazy(path, handle, prefix + s) for s in (".qweight", ".qzeros", ".scales", ".g_idx")
             if prefix + s in names}
    qweight_shape, scales_shape = parts[".qweight"].shape, parts[".scales"].shape
    gptq = qweight_shape[1] == scales_shape[1]
    shape = (scales_shape[1], qweight_shape[0] * 8 if gptq else qweight_shape[0])

    def quantized(dim: int | None, start: int, length: int | None):
        g_idx = parts[".g_idx"].read() if ".g_idx" in parts else None
        try:
            codes = unpack_int4_checkpoint(parts[".qweight"].read(), parts[".qzeros"].read(), parts[".scales"].read(),
                                           g_idx, prefix)
        except ValueError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        if dim is None:
            return codes
        return codes.narrow(dim % 2, start, shape[dim % 2] - start if length is None else length)

    def reader(dim: int | None, start: int, length: int | None) -> torch.Tensor:
        return quantized(dim, start, length).dequantize()

    return LazyWeight(shape, reader, quantized)
