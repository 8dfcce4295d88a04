"""The front door end to end: the official openai client (and grpcio) against one real local
cluster of a tiny model, every answer compared with what the offline engine gives for the same
request: n choices, logit_bias, streamed logprobs, batched prompts, chat without max_tokens,
echo, API keys on both fronts, served model names, unknown fields, the extra routes, and the typed
request arriving at the engine as the edge built it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from cluster_fixtures import collect, free_port, generation_stub, running_cluster, write_tiny_model_with_tokenizer  # noqa: E402
from shardline.proto import generation_pb2 as pb  # noqa: E402
from shardline.router import openai_api, openai_protocol  # noqa: E402
from shardline.worker.config import EngineConfig  # noqa: E402
from shardline.worker.engine.engine import LLMEngine  # noqa: E402
from shardline.worker.engine.params import SamplingParams  # noqa: E402
from tiny_models import prompts  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "sk-front-door-test-4242"
ENGINE = dict(num_kv_blocks=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=256, device="cpu",
              max_model_len=96)
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-front-model")
    write_tiny_model_with_tokenizer(model_dir)
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), engine=ENGINE, replicas=1, cpus_per_rank=0.5, served_model_names=["tiny", "alias"],
                api_keys=[KEY], routing_stats_period_s=0.5, metrics_period_s=0.5)
    with running_cluster(args, grpc_port, http_port):
        yield {"grpc_port": grpc_port, "http_port": http_port, "model_dir": model_dir,
               "url": f"http://127.0.0.1:{http_port}"}


@pytest.fixture(scope="module")
def offline(cluster):
    """The offline engine on the same model and engine config: the reference for every answer."""
    engine = LLMEngine(EngineConfig(model=str(cluster["model_dir"]), **ENGINE), show_progress=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


PROMPT = prompts(1, seed=77, min_len=20, max_len=20)[0]  # 2.5 blocks: choices share two cached blocks


def test_n_choices_equal_the_seeded_single_runs_and_count_the_prompt_once(client, offline) -> None:
    reply = client.completions.create(model="tiny", prompt=PROMPT, n=2, seed=123, temperature=1.0, max_tokens=8,
                                      extra_body={"ignore_eos": True})
    singles = offline.generate([PROMPT, PROMPT], [SamplingParams(seed=123, max_tokens=8, ignore_eos=True),
                                                  SamplingParams(seed=124, max_tokens=8, ignore_eos=True)])
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [r.text for r in singles]
    assert reply.choices[0].text != reply.choices[1].text  # two seed streams, not one answer twice
    assert reply.usage.prompt_tokens == len(PROMPT) and reply.usage.completion_tokens == 16


def test_n_choices_stream_interleaved_by_index(client, offline) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello world"}], n=3, seed=5, max_tokens=6,
        stream=True, extra_body={"ignore_eos": True}))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    ids = offline.encode_prompt({"messages": [{"role": "user", "content": "hello world"}]})
    singles = offline.generate([ids] * 3, [SamplingParams(seed=5 + i, max_tokens=6, ignore_eos=True) for i in range(3)])
    assert texts == {i: r.text for i, r in enumerate(singles)}
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.index for c in finishes) == [0, 1, 2] and all(c.delta.content is None for c in finishes)


def test_a_logit_bias_ban_removes_the_greedy_token(client, offline) -> None:
    plain = offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    banned = plain.token_ids[0]
    reply = client.completions.create(model="tiny", prompt=PROMPT, temperature=0.0, max_tokens=6,
                                      logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    expected = offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                         logit_bias={banned: -100.0}))[0]
    assert banned not in expected.token_ids
    assert reply.choices[0].text == expected.text != plain.text
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, logit_bias={"99999": 5})
    assert error.value.body["param"] == "logit_bias" and "99999" in error.value.body["message"]


def test_streamed_logprobs_equal_the_whole_answers_and_the_engines(client, offline) -> None:
    expected = offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                         logprobs=2))[0]
    kwargs = dict(model="tiny", prompt=PROMPT, temperature=0.0, max_tokens=5, logprobs=2,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)
              if c.choices and c.choices[0].logprobs]
    streamed = [lp for chunk in chunks for lp in chunk.token_logprobs]
    assert streamed == pytest.approx(whole.token_logprobs, abs=1e-5)
    assert whole.token_logprobs == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-4)
    assert [t for chunk in chunks for t in chunk.tokens] == whole.tokens
    assert [o for chunk in chunks for o in chunk.text_offset] == whole.text_offset
    assert whole.text_offset == [sum(len(t) for t in whole.tokens[:i]) for i in range(len(whole.tokens))]
    messages = [{"role": "user", "content": "what is the capital of france"}]
    chat = dict(model="tiny", messages=messages, temperature=0.0, max_tokens=4, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    whole_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed_chat = [e for c in client.chat.completions.create(stream=True, **chat)
                     if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed_chat] == [(e.token, round(e.logprob, 4)) for e in whole_chat]
    assert all(len(e.top_logprobs) == 2 for e in whole_chat)


def test_batched_prompts_equal_single_prompts_in_index_order(client) -> None:
    batch = prompts(3, seed=8, min_len=4, max_len=12)
    kwargs = dict(model="tiny", temperature=0.0, max_tokens=4, extra_body={"ignore_eos": True})
    reply = client.completions.create(prompt=batch, **kwargs)
    singles = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in batch]
    assert [c.index for c in reply.choices] == [0, 1, 2] and [c.text for c in reply.choices] == singles
    assert reply.usage.prompt_tokens == sum(map(len, batch))
    words = ["hello world", "the capital of france is"]
    reply = client.completions.create(prompt=words, n=2, **kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [client.completions.create(prompt=w, **kwargs).choices[0].text
                                               for w in words for _ in range(2)]


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(client, offline) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    ids = offline.encode_prompt({"messages": messages})
    for extra in ({}, {"max_tokens": None}):
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0.0,
                                               extra_body={"ignore_eos": True, **extra})
        assert reply.usage.completion_tokens == ENGINE["max_model_len"] - len(ids) > 16
        assert reply.choices[0].finish_reason == "length"
    completion = client.completions.create(model="tiny", prompt=PROMPT, temperature=0.0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16  # completions keep OpenAI's default


def test_echo_prepends_the_prompt_and_fim_and_best_of_are_refused(client) -> None:
    reply = client.completions.create(model="tiny", prompt="hello world", echo=True, max_tokens=3, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny", prompt="hello world", max_tokens=3, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == "hello world" + plain.choices[0].text
    for kwargs, param in (({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                          ({"stream": True, "extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs")):
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model="tiny", prompt="hello", max_tokens=2, **kwargs)
        assert error.value.body["param"] == param


def test_auto_tool_choice_needs_the_flag_as_in_vllm(client) -> None:
    """This cluster runs without --enable-auto-tool-choice: tools with tool_choice "auto" (the
    default with tools) are a 400 naming the flag; "none" is served."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    for choice in (None, "auto"):
        extra = {} if choice is None else {"tool_choice": choice}
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           tools=[weather], **extra)
        assert error.value.body["param"] == "tool_choice"
        assert "--enable-auto-tool-choice" in error.value.body["message"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           tools=[weather], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None


def test_echo_with_logprobs_and_prompt_logprobs_equal_the_engines(cluster, client, offline) -> None:
    """Echo with logprobs lists the prompt's tokens first (the first one null) then the generated
    ones, streamed or not; vLLM's prompt_logprobs carries the same numbers; both equal the offline
    engine's prompt logprobs (tests/test_prompt_logprobs.py checks those against transformers)."""
    expected = offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2,
                                                         prompt_logprobs=2))[0]
    kwargs = dict(model="tiny", prompt=PROMPT, echo=True, logprobs=2, temperature=0.0, max_tokens=3,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    lps = whole.logprobs
    engine_prompt = [None] + [e.logprob for e in expected.prompt_logprobs[1:]]
    assert len(lps.tokens) == len(PROMPT) + 3
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert lps.token_logprobs[1:] == pytest.approx(engine_prompt[1:] + [e.logprob for e in expected.logprobs], abs=1e-4)
    assert all(top for top in lps.top_logprobs[1:])  # keyed by decoded text (this tokenizer's collide)
    assert lps.text_offset[0] == 0 and whole.text.endswith(expected.text)
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert chunks[0].text == whole.text[: len(whole.text) - len(expected.text)]  # the echo comes first
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lps.token_logprobs[1:], abs=1e-5)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0.0,
                                      extra_body={"prompt_logprobs": 2})
    field = reply.choices[0].model_extra["prompt_logprobs"]
    assert field[0] is None and len(field) == len(PROMPT)
    assert all(2 <= len(entry) <= 3 for entry in field[1:])  # the prompt token and the top 2, by id
    assert [entry[str(token)]["logprob"] for entry, token in zip(field[1:], PROMPT[1:])] == pytest.approx(
        engine_prompt[1:], abs=1e-4)
    with generation_stub(cluster["grpc_port"]) as stub:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=2))
        replies = list(stub.Generate(request, metadata=tuple(AUTH.items()), timeout=60))
    over_grpc = [lp for r in replies for lp in r.prompt_logprobs]
    assert [lp.token_id for lp in over_grpc] == PROMPT[1:]
    assert [lp.logprob for lp in over_grpc] == pytest.approx(engine_prompt[1:], abs=1e-4)
    assert all(len(lp.top) == 2 for lp in over_grpc)


def test_streams_end_like_openai_with_usage_on_every_chunk_when_asked(cluster) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", cluster["url"] + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    assert "content" in chunks[-3]["choices"][0]["delta"] and chunks[-3]["choices"][0]["finish_reason"] is None
    assert all("usage" in c for c in chunks)
    assert [c["usage"]["completion_tokens"] for c in chunks[1:-2]] == [1, 2, 3]


def test_unknown_fields_are_ignored_and_chat_template_options_apply(client, offline) -> None:
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the capital"}]
    reply = client.chat.completions.create(
        model="alias", messages=messages, max_tokens=3, temperature=0.0,
        extra_body={"ignore_eos": True, "reasoning_effort": "low", "parallel_tool_calls": False,
                    "continue_final_message": True, "add_generation_prompt": False,
                    "chat_template_kwargs": {"unused": 1}})
    ids = offline.tokenizer.encode(offline.tokenizer.chat_prompt_text(messages, False, True), add_special_tokens=False)
    expected = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.model == "alias"  # the name the request used, as vLLM echoes it
    null_content = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                    {"role": "user", "content": "hello"}]
    assert client.chat.completions.create(model="tiny", messages=null_content, max_tokens=2).choices


def test_float_or_bool_token_ids_are_400_naming_the_prompt(cluster) -> None:
    for prompt in ([1.9, 5], [True, 5], [5, "7"]):
        r = httpx.post(cluster["url"] + "/v1/completions", json={"model": "tiny", "prompt": prompt}, headers=AUTH,
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_served_names_models_routes_and_errors_in_the_openai_shape(cluster, client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny", "alias"]
    assert client.models.retrieve("alias").id == "alias"
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4")
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-4", prompt="hello", max_tokens=2)
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"
    url = cluster["url"]
    missing = httpx.get(url + "/v1/nothing", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong_method = httpx.get(url + "/v1/completions", headers=AUTH, timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong_method.headers["allow"]
    tokens = httpx.post(url + "/tokenize", json={"prompt": "hello world"}, headers=AUTH, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == ENGINE["max_model_len"]
    text = httpx.post(url + "/detokenize", json={"tokens": tokens["tokens"]}, headers=AUTH, timeout=30).json()
    assert "hello world" in text["prompt"]
    assert httpx.get(url + "/version", timeout=30).json()["version"]


def test_api_keys_on_both_fronts_and_never_in_the_logs(cluster) -> None:
    url = cluster["url"]
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": KEY}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    assert httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(url + "/health", timeout=30).status_code == 200  # open: probes carry no key
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200
    request = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=2))
    with generation_stub(cluster["grpc_port"]) as stub:
        for metadata in ((), (("authorization", "Bearer sk-wrong"),)):
            with pytest.raises(grpc.RpcError) as error:
                collect(stub.Generate(request, metadata=metadata, timeout=60))
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = collect(stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60))
        assert out["finish"] == pb.FINISH_REASON_LENGTH and len(out["ids"]) == 2
        assert stub.Health(pb.HealthRequest(), timeout=30).status == pb.HealthResponse.SERVING
    logs = Path("/tmp/ray/session_latest/logs")
    assert logs.is_dir()
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked


def test_grpc_n_and_logit_bias_match_http(cluster, client) -> None:
    plain = client.completions.create(model="tiny", prompt=PROMPT, temperature=0.0, max_tokens=4,
                                      extra_body={"ignore_eos": True})
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, n=2, logit_bias={PROMPT[0]: 0.0}))
    with generation_stub(cluster["grpc_port"]) as stub:
        replies = list(stub.Generate(request, metadata=tuple(AUTH.items()), timeout=60))
    texts = {i: "".join(r.text for r in replies if r.index == i) for i in (0, 1)}
    assert texts == {0: plain.choices[0].text, 1: plain.choices[0].text}  # greedy: both choices agree
    assert sorted(r.index for r in replies if r.finish_reason) == [0, 1]


def test_n_choices_compute_the_prompt_once(cluster) -> None:
    fresh = prompts(1, seed=4040, min_len=20, max_len=20)[0]  # two full blocks and a partial one
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=fresh), sampling=pb.SamplingParams(
        max_tokens=3, ignore_eos=True, n=3, seed=1))
    with generation_stub(cluster["grpc_port"]) as stub:
        replies = list(stub.Generate(request, metadata=tuple(AUTH.items()), timeout=60))
    cached = {r.index: r.usage.cached_prompt_tokens for r in replies if r.finish_reason}
    assert cached == {0: 0, 1: 16, 2: 16}  # choices 1 and 2 reuse choice 0's two full blocks


def test_the_engine_samples_with_the_params_the_edge_built(cluster) -> None:
    import threading

    from ray import serve

    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 70, "temperature": 0.7, "top_k": 5, "seed": 9,
            "logit_bias": {"5": 2.5}, "stop": ["zzz"], "frequency_penalty": 0.5, "ignore_eos": True,
            "request_id": "typed-path"}
    edge = openai_api.sampling_params(openai_protocol.parse(openai_protocol.CompletionRequest, body), chat=False,
                                      defaults={})
    replica = serve.get_deployment_handle("ReplicaGroup", app_name="shardline")
    sender = threading.Thread(target=httpx.post, args=(cluster["url"] + "/v1/completions",),
                              kwargs={"json": body, "headers": AUTH, "timeout": 60})
    sender.start()
    seen: dict = {}
    while sender.is_alive() and not seen:
        seen = replica.params_in_flight.remote().result(timeout_s=30)
    sender.join()
    # the engine's request id is the server's own (the client's "typed-path" is only a label)
    assert list(seen.values()) == [edge] and all(rid.startswith("cmpl-") for rid in seen)


def test_langchain_chat_openai_invoke_stream_and_batch_unchanged(cluster, client) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")

    chat = langchain_openai.ChatOpenAI(base_url=cluster["url"] + "/v1", api_key=KEY, model="tiny", temperature=0.0,
                                       max_tokens=4, max_retries=0, extra_body={"ignore_eos": True})
    questions = ["hello world", "what is the capital of france"]
    expected = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                               temperature=0.0, max_tokens=4, extra_body={"ignore_eos": True})
                .choices[0].message.content for q in questions]
    assert chat.invoke(questions[0]).content == expected[0]
    assert "".join(str(part.content) for part in chat.stream(questions[0])) == expected[0]
    assert [m.content for m in chat.batch(questions)] == expected


def test_guidellm_benchmarks_the_cluster_unchanged(cluster, tmp_path) -> None:
    """guidellm (0.8.x; not a dependency: `pip install guidellm` into any environment, then put its
    `guidellm` on PATH or in $GUIDELLM) runs its benchmark against the OpenAI API as it would
    against vLLM, offline: the tokenizer it needs for synthetic prompts is the model directory's own
    (README, "Benchmarking with guidellm")."""
    import os
    import shutil
    import subprocess

    exe = os.environ.get("GUIDELLM") or shutil.which("guidellm")
    if exe is None:
        pytest.skip("guidellm is not installed (set $GUIDELLM or put it on PATH)")
    report = tmp_path / "guidellm.json"
    command = [exe, "run", "--backend", f"kind=openai_http,target={cluster['url']},model=tiny,api_key={KEY}",
               "--tokenizer", f"kind=hf_auto,model={cluster['model_dir']}",
               "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
               "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=3",
               "--output", f"kind=json,path={report}", "--disable-console-interactive"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [benchmark] = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert (totals["successful"], totals["errored"]) == (3, 0), totals
