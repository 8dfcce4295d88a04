"""Coalesced streaming through a real local cluster (Serve gRPC proxy and HTTP proxy -> Ingress ->
ReplicaGroup): gRPC and SSE streams carry exactly the tokens, text, logprobs, finish reason and
usage the offline engine produces for the same request, in fewer items than tokens, with the
first token alone in the first item; a stop string inside a merged item ends the stream exactly;
a deadline that passes while tokens are held ends the call and frees the request's blocks.

The engine is the stand-in (`load_format="stand-in"`: the real scheduler, sampler, detokenizer
and stop checks without a model; token t+1 follows t, so a prompt ending in "the" continues with
the word tokenizer's words), one step every 5 ms, and every stream holds its later tokens 200 ms
(stream_items_per_s=1), so merging is certain whatever the machine's load."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from cluster_fixtures import WORDS, free_port, generation_stub, running_cluster, write_tiny_model_with_tokenizer  # noqa: E402
from shardline.proto import generation_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ENGINE = dict(load_format="stand-in", num_kv_blocks=96, block_size=8, max_num_seqs=8, max_num_batched_tokens=256,
              device="cpu", stream_interval_ms=200.0, stream_items_per_s=1.0, extra={"stand_in_step_ms": 5.0})
STOP = " ".join(WORDS[5:7])  # "is paris": tokens 4 and 5 after a prompt ending in "the"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-streaming-model")
    write_tiny_model_with_tokenizer(model_dir)
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), engine=ENGINE, replicas=1, cpus_per_rank=0.5, served_model_names=["tiny"],
                metrics_period_s=0.2, replica_group_options={"graceful_shutdown_timeout_s": 5})
    with running_cluster(args, grpc_port, http_port):
        yield {"grpc_port": grpc_port, "http_port": http_port, "model_dir": model_dir}


@pytest.fixture(scope="module")
def offline(cluster):
    """The same engine in this process, uncoalesced: the reference."""
    from shardline.worker.config import EngineConfig
    from shardline.worker.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(cluster["model_dir"]), **ENGINE), show_progress=False)
    yield engine
    engine.shutdown()


def reference(offline, prompt: str, **sampling):
    from shardline.worker.engine.params import SamplingParams

    [result] = offline.generate([prompt], SamplingParams(**sampling))
    return result


def test_grpc_items_merge_yet_carry_exactly_the_offline_stream(cluster, offline) -> None:
    sampling = dict(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
    want = reference(offline, "hello the", **sampling)
    with generation_stub(cluster["grpc_port"]) as stub:
        items = list(stub.Generate(pb.GenerateRequest(text="hello the", sampling=pb.SamplingParams(**sampling)), timeout=60))
    ids = [t for m in items for t in m.token_ids]
    assert ids == want.token_ids
    assert "".join(m.text for m in items) == want.text and "capital of france" in want.text
    logprobs = [(lp.token_id, lp.logprob, {t.token_id: t.logprob for t in lp.top}) for m in items for lp in m.logprobs]
    assert logprobs == [(lp.token_id, pytest.approx(lp.logprob), pytest.approx(lp.top)) for lp in want.logprobs]
    last = items[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and not any(m.finish_reason for m in items[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert len(items[0].token_ids) == 1  # the first token alone, never held
    assert len(items) < len(ids)  # merged


def test_grpc_stop_string_inside_a_merged_item(cluster, offline) -> None:
    sampling = dict(max_tokens=30, temperature=0.0, stop=[STOP])
    want = reference(offline, "the", **sampling)
    with generation_stub(cluster["grpc_port"]) as stub:
        items = list(stub.Generate(pb.GenerateRequest(text="the", sampling=pb.SamplingParams(**sampling)), timeout=60))
    assert [t for m in items for t in m.token_ids] == want.token_ids
    assert "".join(m.text for m in items) == want.text and STOP not in want.text and "france" in want.text
    assert items[-1].finish_reason == pb.FINISH_REASON_STOP_STRING
    assert items[-1].usage.completion_tokens == want.completion_tokens
    assert len(items[-1].token_ids) > 1  # the stop landed in a merged item


def test_sse_stream_carries_exactly_the_offline_text_finish_and_usage(cluster, offline) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{cluster['http_port']}/v1", api_key="unused", timeout=60)
    for stop in (None, [STOP]):
        sampling = dict(max_tokens=30, temperature=0.0, **({"stop": stop} if stop else {"ignore_eos": True}))
        want = reference(offline, "the", **sampling)
        extra = {} if stop else {"ignore_eos": True}
        chunks = list(client.completions.create(model="tiny", prompt="the", max_tokens=30, temperature=0.0, stop=stop,
                                                stream=True, stream_options={"include_usage": True}, extra_body=extra))
        texts = [c.choices[0].text for c in chunks if c.choices]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert "".join(texts) == want.text
        assert finishes[-1] == ("stop" if stop else "length") and not any(finishes[:-1])
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
        assert len(texts) < want.completion_tokens  # merged


def test_a_deadline_inside_an_interval_ends_the_call_and_frees_blocks(cluster) -> None:
    sampling = pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    with generation_stub(cluster["grpc_port"]) as stub:
        t0 = time.monotonic()
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for m in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=sampling),
                                   metadata=[("timeout-ms", "700")], timeout=60):
                got.append(m)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 30  # ended by the deadline, not by 400 tokens at 5 ms
        assert got and len(got[0].token_ids) == 1
        for _ in range(100):  # the replica reports its pool every 0.2 s
            info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
            if info.replicas and info.replicas[0].free_blocks == info.replicas[0].num_blocks:
                break
            time.sleep(0.2)
        assert info.replicas[0].free_blocks == info.replicas[0].num_blocks
