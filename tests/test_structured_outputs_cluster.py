"""Structured outputs through the front doors of a real local cluster serving the default model
(SmolLM2-135M-Instruct): the official openai client's `.parse()` with a pydantic model,
response_format json_schema (plain and streamed), vLLM's structured_outputs extra (regex, choice),
and the gRPC `structured_output` oneof; bad constraints are 400 / INVALID_ARGUMENT naming the
body's own field."""

from __future__ import annotations

import json
import re

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
openai = pytest.importorskip("openai")

from pydantic import BaseModel, Field  # noqa: E402

from cluster_fixtures import collect, free_port, generation_stub, running_cluster  # noqa: E402
from shardline.proto import generation_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENGINE = dict(num_kv_blocks=96, block_size=16, max_num_seqs=8, max_num_batched_tokens=512, device="cpu",
              max_model_len=512)
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer as JSON."}]


class Capital(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


@pytest.fixture(scope="module")
def cluster():
    grpc_port, http_port = free_port(), free_port()
    args = dict(model="smollm2-135m", engine=ENGINE, replicas=1, cpus_per_rank=0.5,
                routing_stats_period_s=0.5, metrics_period_s=0.5, enable_auto_tool_choice=True)
    with running_cluster(args, grpc_port, http_port):
        yield {"grpc_port": grpc_port, "url": f"http://127.0.0.1:{http_port}"}


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_sdks_parse_returns_a_validated_pydantic_object(client) -> None:
    completion = client.chat.completions.parse(model="smollm2-135m", messages=CAPITAL, response_format=Capital,
                                               temperature=0, max_tokens=60)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Capital) and "Paris" in message.parsed.city


def test_response_format_json_schema_streamed_equals_unstreamed_and_validates(client) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30},
                                               "confident": {"type": "boolean"}},
              "required": ["answer", "confident"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    whole = client.chat.completions.create(model="smollm2-135m", messages=CAPITAL, response_format=fmt,
                                           temperature=0, max_tokens=60)
    chunks = client.chat.completions.create(model="smollm2-135m", messages=CAPITAL, response_format=fmt,
                                            temperature=0, max_tokens=60, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    jsonschema.validate(json.loads(streamed), schema)
    obj = client.chat.completions.create(model="smollm2-135m", messages=CAPITAL, temperature=0, max_tokens=60,
                                         response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason != "stop" or isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllms_structured_outputs_extra_on_completions_and_chat(client) -> None:
    dated = client.completions.create(model="smollm2-135m", prompt="The Berlin Wall fell on", temperature=0,
                                      max_tokens=20, extra_body={"structured_outputs": {"regex": r" \d{4}-\d{2}-\d{2}"}})
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", dated.choices[0].text)
    yes_no = client.chat.completions.create(
        model="smollm2-135m", temperature=0, max_tokens=5,
        messages=[{"role": "user", "content": "Is Paris in France? yes or no"}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert yes_no.choices[0].message.content in ("yes", "no")


def test_a_bad_constraint_is_a_400_naming_the_bodys_field(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=CAPITAL, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m", prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": "a("}, "guided_choice": ["a"]})
    assert e.value.body["param"] == "guided_choice"  # two constraints in one body


def test_grpc_structured_output_oneof(cluster) -> None:
    import jsonschema

    schema = json.dumps(Capital.model_json_schema())
    chat = pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in CAPITAL])
    with generation_stub(cluster["grpc_port"]) as stub:
        request = pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(
            temperature=0.0, max_tokens=60, json_schema=pb.JsonSchema(schema=schema, strict=True)))
        out = collect(stub.Generate(request, metadata=(("application", "shardline"),), timeout=300))
        assert out["finish"] == pb.FINISH_REASON_STOP
        jsonschema.validate(json.loads(out["text"]), json.loads(schema))
        with pytest.raises(grpc.RpcError) as e:
            collect(stub.Generate(pb.GenerateRequest(text="x", sampling=pb.SamplingParams(regex="a(")),
                                  metadata=(("application", "shardline"),), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("sampling.regex")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def test_tool_choice_required_and_named_return_calls_whose_arguments_validate(client) -> None:
    import jsonschema

    required = client.chat.completions.create(model="smollm2-135m", messages=ASK_WEATHER, tools=[WEATHER],
                                              tool_choice="required", temperature=0, max_tokens=80)
    named = client.chat.completions.create(model="smollm2-135m", messages=ASK_WEATHER, tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=80)
    for reply in (required, named):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_calls_reassemble_to_the_same_call_and_a_tool_result_continues(client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model="smollm2-135m", messages=ASK_WEATHER, tools=[WEATHER],
                                           tool_choice=named, temperature=0, max_tokens=80).choices[0].message
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=ASK_WEATHER, tools=[WEATHER],
                                                 tool_choice=named, temperature=0, max_tokens=80, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) > 1  # the arguments arrive in pieces, as OpenAI streams them
    assert deltas[0].tool_calls[0].function.name == "get_weather" and deltas[0].tool_calls[0].id
    arguments = "".join(d.tool_calls[0].function.arguments or "" for d in deltas)
    assert arguments == whole.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    call = whole.tool_calls[0]
    follow_up = client.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=30, tools=[WEATHER], messages=[
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}])
    answer = follow_up.choices[0]
    assert answer.message.content and not answer.message.tool_calls and answer.finish_reason in ("stop", "length")


def reassembled(chunks) -> tuple[list[dict], list]:
    """The tool calls a stream's deltas add up to (name and arguments per index), and the deltas."""
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    calls: dict[int, dict] = {}
    for d in deltas:
        for part in d.tool_calls:
            slot = calls.setdefault(part.index, {"name": "", "arguments": ""})
            slot["name"] += (part.function.name or "") if part.function else ""
            slot["arguments"] += (part.function.arguments or "") if part.function else ""
    return [calls[i] for i in sorted(calls)], deltas


def test_streamed_required_calls_arrive_as_incremental_argument_deltas(client) -> None:
    """As OpenAI streams a call: a first delta with index, id, type, name and empty arguments,
    then argument fragments; they reassemble to the non-streamed call."""
    kwargs = dict(model="smollm2-135m", messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                  temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kwargs).choices[0].message
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    calls, deltas = reassembled(chunks)
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.tool_calls]
    head = deltas[0].tool_calls[0]
    assert head.id and head.type == "function" and head.function.name == "get_weather" and head.function.arguments == ""
    fragments = [p for d in deltas[1:] for p in d.tool_calls]
    assert len(fragments) > 1 and all(p.id is None and p.function.name is None for p in fragments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_auto_tool_choice_streams_like_the_whole_answer(client) -> None:
    """With --enable-auto-tool-choice, tool_choice "auto" (the default with tools) parses the
    model's own choice with the template's parser (hermes here); streamed equals whole."""
    kwargs = dict(model="smollm2-135m", messages=ASK_WEATHER, tools=[WEATHER], temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    calls, _ = reassembled(chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls or []]
    assert (content or None) == whole.message.content
