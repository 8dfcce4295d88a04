"""Overlapped scheduling only overlaps if launching a step reads nothing back from the device: one
.tolist(), .item() or blocking host-to-device copy (torch.tensor(..., device=cuda) is one) makes
the host wait for the forward just queued, silently serializing every step. These tests run the
launch path on the "meta" device, which stands in for an accelerator here: any read of a value
raises, and the modes below record every blocking copy onto it."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.sampler import Sampler, SamplingBatch

META = torch.device("meta")
VOCAB = 64


class BlockingCopies(TorchDispatchMode):
    """Records host-to-device copies queued without non_blocking (they synchronize the stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            src, dst = args[0].device, torch.device(kwargs["device"])
            if src.type == "cpu" and dst.type != "cpu" and not kwargs.get("non_blocking", False):
                self.seen.append(f"{func}: {src} -> {dst}")
        if func is torch.ops.aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            if not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                self.seen.append(f"{func}: cpu -> {args[0].device}")
        return func(*args, **kwargs)


class TensorsBuiltOnDevice(TorchFunctionMode):
    """Records torch.tensor(data, device=<not cpu>): built on the host, then copied blocking."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            self.seen.append(f"torch.tensor(..., device={kwargs['device']})")
        return func(*args, **kwargs)


def launch_sampling(params: list[SamplingParams]):
    """Build the batch and sample on the meta device under both recorders (what _launch does)."""
    n = len(params)
    copies, built = BlockingCopies(), TensorsBuiltOnDevice()
    with built, copies:
        batch = SamplingBatch.build(
            params, [None] * n, [[1, 2, 3]] * n, [[4, 5]] + [[]] * (n - 1), VOCAB, META,
            min_tokens_block=[[0, 7]] * n, pending_token_ids=torch.full((n,), 9, dtype=torch.int64, device=META))
        out = Sampler()(torch.empty(n, VOCAB, device=META), batch)
    return out, copies.seen + built.seen


def test_sampling_a_mixed_batch_with_penalties_and_logprobs_reads_nothing_from_the_device():
    """Greedy beside temperature rows, penalties (with a pending token), min_tokens and logprobs:
    the serving mix. Sampling only queues device work; the logprobs stay tensors until the step's
    results are read."""
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                       frequency_penalty=0.2, presence_penalty=0.1, min_tokens=4),
        SamplingParams(temperature=1.0, logprobs=0),
    ]
    out, blocking = launch_sampling(params)
    assert blocking == []
    assert out.token_ids.device == META and out.token_ids.shape == (3,)
    lp = out.logprob_tensors
    assert lp is not None and lp.sampled.device == META and lp.top_ids.shape == (3, 3)
    assert lp.num_logprobs == [3, None, 0]


def test_logprob_tensors_become_the_same_token_logprobs_on_the_host():
    """The deferred read gives what the sampler used to return at once (CPU, values checked)."""
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)]
    batch = SamplingBatch.build(params, [None, None], [[1], [2]], [[], []], VOCAB, torch.device("cpu"))
    out = Sampler()(logits, batch)
    host = out.logprob_tensors.to_host().tolist()
    assert host == out.logprobs
    ref = torch.log_softmax(logits[0], -1)
    assert host[0].token_id == int(ref.argmax())
    assert host[0].logprob == pytest.approx(float(ref.max()), abs=1e-6)
    assert list(host[0].top) == ref.topk(2).indices.tolist()
    assert host[1] is None


# ---- on a GPU: the engine's whole launch path, and a GPU that is not the thread's current one ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny-llama-nosync")
    return d, write_tiny_checkpoint("llama", d, seed=7)


def _overlapped_engine(directory, device: str, **kw):
    from shardline.worker.config import EngineConfig
    from shardline.worker.engine.engine import LLMEngine

    cfg = dict(model=str(directory), device=device, num_kv_blocks=128, block_size=8, max_num_batched_tokens=256,
               max_num_seqs=8, async_scheduling=True)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


@cuda
def test_launching_a_step_on_cuda_never_synchronizes(tiny_dir, monkeypatch):
    """torch's sync debug mode turns every synchronizing call inside _launch into an error."""
    from tiny_models import prompts

    # No prefix caching: the second run then has the warm-up's step shapes (nothing left to measure).
    engine = _overlapped_engine(tiny_dir[0], "cuda", enable_prefix_caching=False)
    batch = prompts(6, seed=3, max_len=30)
    params = [SamplingParams(max_tokens=8, temperature=0.0 if i % 2 else 0.8, seed=i, logprobs=2 if i % 3 == 0 else None,
                             repetition_penalty=1.2 if i % 2 else 1.0, ignore_eos=True) for i in range(len(batch))]
    expected = engine.generate(batch, params)  # warm-up: kernels compiled, linear choices measured
    launch = engine._launch

    def strict_launch(sched):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(sched)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(engine, "_launch", strict_launch)
    got = engine.generate(batch, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert engine.num_overlapped_steps > 0


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_overlap_on_a_second_gpu_driven_from_a_fresh_thread_reads_the_right_tokens(tiny_dir):
    """The step thread's current device is cuda:0; the tokens' ready event must still follow cuda:1."""
    import threading

    from tiny_models import hf_greedy, prompts

    d, hf = tiny_dir
    engine = _overlapped_engine(d, "cuda:1", enforce_eager=True, dtype="float32")
    batch = prompts(4, seed=5, max_len=30)
    box: dict = {}
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    thread = threading.Thread(target=lambda: box.update(r=engine.generate(batch, params)))
    thread.start()
    thread.join()
    assert [r.token_ids for r in box["r"]] == [hf_greedy(hf, p, 10) for p in batch]


def test_host_data_reaches_the_device_through_pinned_memory_and_back():
    """to_device / host_copy: the same values either way; on the host no copy at all."""
    from shardline.worker.engine.transfer import host_copy, to_device

    on_host = to_device([3, 1, 2], torch.int32, torch.device("cpu"))
    assert on_host.dtype == torch.int32 and on_host.tolist() == [3, 1, 2]
    t = torch.arange(5)
    assert host_copy(t) is t
    if torch.cuda.is_available():
        dev = to_device([3, 1, 2], torch.int64, torch.device("cuda"))
        back = host_copy(dev)
        torch.cuda.synchronize()
        assert back.is_pinned() and back.tolist() == [3, 1, 2]
