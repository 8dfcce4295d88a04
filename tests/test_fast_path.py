"""The GPU fast path, checked wherever it can run: the fused Triton model path against transformers
(on CPU through the Triton interpreter), the padded decode path of the CUDA graph runner (eagerly on
CPU), and graph replay against eager execution (on a GPU only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from kernel_cases import BLOCK, BLOCKS_PER_SEQ, decode_inputs, interpreter, prefill, table  # noqa: F401  (fixture first)
from shardline.worker.attention.metadata import get_attention_backend
from shardline.worker.config import EngineConfig, ModelConfig
from shardline.worker.engine.cuda_graphs import DecodeGraphRunner, capture_batch_sizes
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.model_runner import ModelRunner, SeqSlice, allocate_kv_caches, build_step_inputs
from shardline.worker.engine.params import SamplingParams
from shardline.worker.loader.weights import LazyWeight
from shardline.worker.model import LlamaForCausalLM
from shardline.worker.parallel.context import SINGLE
from tiny_models import hf_greedy, prompts, write_tiny_checkpoint

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-fast")
    hf = write_tiny_checkpoint("llama", d, seed=3)
    return d, hf


def load(directory, backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf_config(json.loads((directory / "config.json").read_text()))
    model = LlamaForCausalLM(cfg, SINGLE, get_attention_backend(backend, torch.device(device)), dtype, device)
    with safe_open(directory / "model.safetensors", "pt") as f:
        model.load_weights((n, LazyWeight.from_tensor(f.get_tensor(n))) for n in f.keys())
    return model.eval()


def runner_for(model, num_seqs: int, device: str = "cpu") -> ModelRunner:
    caches = allocate_kv_caches(model.config, model.num_kv_heads_per_rank, 1 + num_seqs * BLOCKS_PER_SEQ, BLOCK,
                                model.embed_tokens.weight.dtype, torch.device(device))
    return ModelRunner(model, caches, BLOCK, torch.device(device))


# ---- the fused Triton path, end to end against transformers (CPU, interpreter) -------------------


def test_fused_triton_model_logits_match_transformers_within_1e3(tiny, interpreter):
    d, hf = tiny
    model = load(d, "triton")
    model.set_fused_kernels("triton")
    batch = prompts(2, seed=5, min_len=5, max_len=7)  # <= 16 tokens: the linears take the matvec kernel
    runner = runner_for(model, len(batch))
    slices = [SeqSlice(p, 0, table(i), True) for i, p in enumerate(batch)]
    inputs = build_step_inputs(slices, BLOCK, torch.device("cpu"))
    inputs.sample_rows = torch.arange(inputs.input_ids.shape[0])  # every position
    logits = runner.execute(inputs)
    row = 0
    for p in batch:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (logits[row : row + len(p)] - ref).abs().max().item() <= 1e-3
        row += len(p)


def test_fused_triton_gemma2_with_sandwich_norms_matches_transformers(tmp_path, interpreter):
    # Gemma's MLP pre-norm is pre_feedforward_layernorm (after post_attention_layernorm): the one
    # folded into gate/up must be that one.
    hf = write_tiny_checkpoint("gemma2", tmp_path, seed=1)
    model = load(tmp_path, "triton")
    model.set_fused_kernels("triton")
    prompt = prompts(1, seed=3, min_len=6, max_len=6)[0]
    inputs = build_step_inputs([SeqSlice(prompt, 0, table(0), True)], BLOCK, torch.device("cpu"))
    inputs.sample_rows = torch.arange(len(prompt))
    logits = runner_for(model, 1).execute(inputs)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-3


def test_fused_triton_engine_greedy_tokens_equal_transformers(tiny, interpreter):
    d, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=64, block_size=BLOCK, max_num_batched_tokens=64,
                                    attention_backend="triton", extra={"fused_kernels": "triton"}),
                       show_progress=False)
    assert engine.executor.model.layers[0].mlp.impl == "triton"
    batch = prompts(2, seed=9, min_len=4, max_len=12)
    results = engine.generate(batch, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 5) for p in batch]


def test_auto_kernels_on_cpu_take_the_torch_path_bit_for_bit(tiny):
    d, _ = tiny
    batch = prompts(3, seed=2)
    out = {}
    for mode in ("auto", "torch"):
        model = load(d, "torch")
        model.set_fused_kernels(mode)
        out[mode] = runner_for(model, len(batch)).execute(
            build_step_inputs([SeqSlice(p, 0, table(i), True) for i, p in enumerate(batch)], BLOCK, torch.device("cpu")))
    assert torch.equal(out["auto"], out["torch"])


def test_unknown_fused_kernels_mode_is_rejected(tiny):
    model = load(tiny[0], "torch")
    with pytest.raises(ValueError, match="fused_kernels"):
        model.set_fused_kernels("cuda")


def test_step_inputs_carry_host_lengths_so_metadata_reads_no_device_tensor():
    inputs = build_step_inputs([SeqSlice([5, 6, 7], 0, [1], True), SeqSlice([8], 4, [2, 3], True)], 4, torch.device("cpu"))
    meta = inputs.metadata()
    assert (meta.query_lens_cpu, meta.seq_lens_cpu, meta.max_query_len, meta.max_seq_len) == ([3, 1], [3, 5], 3, 5)
    assert len(inputs.tensors()) == 7 and not inputs.is_pure_decode
    assert decode_inputs([[1, 2], [3, 4, 5]]).is_pure_decode


# ---- the CUDA graph runner's padded path (eager, CPU) ---------------------------------------------


def test_capture_sizes_are_powers_of_two_to_eight_then_steps_of_sixteen():
    assert capture_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert capture_batch_sizes(5) == [1, 2, 4, 5]
    assert capture_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-split"])
def test_padded_decode_matches_eager_and_padding_rows_write_nothing(tiny, backend, request):
    if backend != "torch":
        request.getfixturevalue("interpreter")
    model = load(tiny[0], backend.removesuffix("-split"))
    if backend == "triton-split":
        # The padded path launches split slots for max_model_len, eager ones for the real longest
        # context; each row still splits by its own length on the device (4..21 tokens: 1..4 splits).
        attention = model.layers[0].self_attn.backend
        attention.num_splits, attention.tokens_per_split = 4, 4
    batch = prompts(3, seed=4, min_len=3, max_len=20)
    runner = runner_for(model, len(batch))
    seqs = prefill(runner, batch)
    inputs = decode_inputs(seqs)
    graphs = DecodeGraphRunner(model, runner.kv_caches, BLOCK, 64, [1, 2, 4, 8], torch.device("cpu"), use_graphs=False)
    assert graphs.can_run(inputs) and graphs.padded_size(3) == 4
    before = [c.clone() for c in runner.kv_caches]
    padded = graphs.run(inputs)
    written = {int(s) for s in inputs.slot_mapping}
    for old, new in zip(before, runner.kv_caches):
        changed = (old != new).reshape(2, -1, old.shape[3] * old.shape[4]).any(-1).any(0).nonzero().flatten().tolist()
        assert set(changed) <= written  # padding rows (slot -1) stored nothing
    eager = runner.execute(inputs)  # writes the same K/V at the same slots again
    assert padded.shape == eager.shape == (3, model.config.vocab_size)
    assert (padded - eager).abs().max().item() <= 1e-4


def test_runner_with_graph_path_enabled_generates_like_eager(tiny):
    d, hf = tiny
    model = load(d, "torch")
    batch = prompts(3, seed=6, min_len=3, max_len=10)
    runner = runner_for(model, len(batch))
    assert runner.enable_cuda_graphs(max_batch=4, max_model_len=64, use_graphs=False)
    seqs = prefill(runner, batch)
    for _ in range(4):
        logits = runner.execute(decode_inputs(seqs))
        seqs = [s + [t] for s, t in zip(seqs, logits.argmax(-1).tolist())]
    assert [s[len(p):] for s, p in zip(seqs, batch)] == [hf_greedy(hf, p, 5) for p in batch]


# ---- graphs on a GPU --------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("n", [1, 3, 8])
def test_graph_replay_logits_match_eager_on_gpu(tiny, n):
    model = load(tiny[0], "triton", device="cuda")
    runner = runner_for(model, 8, device="cuda")
    assert runner.enable_cuda_graphs(max_batch=8, max_model_len=BLOCK * BLOCKS_PER_SEQ)
    batch = prompts(n, seed=10 + n, min_len=3, max_len=40)
    seqs = prefill(runner, batch, device="cuda")
    inputs = decode_inputs(seqs, device="cuda")
    assert runner.graphs.can_run(inputs)
    replayed = runner.execute(inputs).clone()
    graphs, runner.graphs = runner.graphs, None
    eager = runner.execute(inputs)
    runner.graphs = graphs
    assert (replayed - eager).abs().max().item() <= 1e-3
    assert replayed.argmax(-1).tolist() == eager.argmax(-1).tolist()


@cuda
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_engine_on_gpu_uses_graphs_and_matches_transformers(tiny, overlap):
    """Graphs, pinned copies, the tokens' event and the device-side pending ids, on a real GPU."""
    d, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(d), dtype="float32", num_kv_blocks=64, block_size=BLOCK,
                                    max_num_seqs=8, max_num_batched_tokens=64, async_scheduling=overlap),
                       show_progress=False)
    assert engine.executor.cuda_graphs
    batch = prompts(3, seed=12)
    results = engine.generate(batch, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 6) for p in batch]
    assert (engine.num_overlapped_steps > 0) == overlap
    assert not engine.has_unfinished_requests()


# ---- what one decode step launches (issue 18: the count per layer, toward ~6) --------------------


class _CountAtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that do work (each a kernel launch on CUDA): views, allocations and
    metadata queries launch nothing and are left out."""

    FREE = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "reshape", "split", "split_with_sizes",
            "slice", "select", "unsqueeze", "squeeze", "expand", "permute", "t", "transpose", "alias", "as_strided",
            "detach", "lift_fresh", "size", "stride", "sym_size", "sym_stride", "is_same_size"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.in_triton = False  # the interpreter's own tensor traffic inside a launch is not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and name not in self.FREE and not getattr(func, "is_view", False):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_a_decode_step_on_the_graph_path_launches_six_kernels_a_layer(tiny, interpreter, monkeypatch):
    # Counted on the padded graph path, run eagerly through the interpreter: every Triton launch
    # (hooked on the launcher) and every torch op that does work. Per layer: QKV with its RMSNorm
    # (+ residual add) in its loads, RoPE with the KV write, attention (one kernel, here with its
    # 7-token context in 3 splits combined in the launch), O, gate/up with its RMSNorm, down with
    # SiLU-and-mul in its loads. Before issue 18: the norms, RoPE, the KV write, SiLU-and-mul and
    # the attention reduce were kernels of their own and a split matvec added a sum kernel (14 a
    # layer at Llama-3-8B, batch 1).
    from shardline.worker.kernels import runtime

    model = load(tiny[0], "triton")
    model.set_fused_kernels("triton")
    attention = model.layers[0].self_attn.backend
    attention.num_splits, attention.tokens_per_split = 4, 2
    runner = runner_for(model, 1)
    seqs = prefill(runner, prompts(1, seed=4, min_len=6, max_len=6))
    inputs = decode_inputs(seqs)
    graphs = DecodeGraphRunner(model, runner.kv_caches, BLOCK, 64, [1], torch.device("cpu"), use_graphs=False)
    graphs.run(inputs)  # compiles nothing on CPU; fills the static buffers once
    launches: list[str] = []
    original = runtime.Kernel.__getitem__
    aten = _CountAtenOps()

    def counted(self, grid):
        launches.append(self.fn.__name__)
        launch = original(self, grid)

        def run(*args, **kwargs):
            aten.in_triton = True
            try:
                return launch(*args, **kwargs)
            finally:
                aten.in_triton = False

        return run

    monkeypatch.setattr(runtime.Kernel, "__getitem__", counted)
    meta = graphs._metadata(1)
    with torch.inference_mode(), aten:
        graphs._forward(1, meta)
    layers = model.config.num_hidden_layers
    per_layer = {name: launches.count(name) / layers for name in set(launches)}
    # the final norm and the LM head are the two launches outside the layers
    assert len(launches) == 6 * layers + 2, per_layer
    assert launches.count("_rms_norm_kernel") == 1  # the final norm only
    assert launches.count("_rope_kernel") == layers and "_write_kv_kernel" not in launches
    assert "_silu_and_mul_kernel" not in launches
    assert launches.count("_matvec_kernel") == 4 * layers + 1 and "_sum_splits_kernel" not in launches
    assert aten.ops == ["embedding"], aten.ops  # the only torch kernel: everything else is a Triton launch
