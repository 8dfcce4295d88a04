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
                routing_stats_period_s=0.5, metrics_period_s=0.5)
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
