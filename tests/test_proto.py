"""The public gRPC API: committed stubs match proto/generation.proto and messages round-trip."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from shardline.proto import generate, generation_pb2 as pb, generation_pb2_grpc as pb_grpc

PROTO_DIR = Path(generate.__file__).resolve().parent


def _embedded_descriptor(pb2_source: str) -> descriptor_pb2.FileDescriptorProto:
    """Parse the serialized FileDescriptorProto a generated _pb2.py embeds, without importing it."""
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source, re.S)
    assert match, "no AddSerializedFile(...) in generated module"
    return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(match.group(1)))


def _method_paths(grpc_source: str) -> list[str]:
    return sorted(set(re.findall(r"'(/shardline\.v1\.[A-Za-z]+/[A-Za-z]+)'", grpc_source)))


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    # The committed stubs come from a pinned, older grpcio-tools (see proto/generate.py), so the
    # comparison is on what they describe (the descriptor, the rpc paths), not on their bytes.
    generate.generate(tmp_path)
    fresh = _embedded_descriptor((tmp_path / "generation_pb2.py").read_text())
    committed = _embedded_descriptor((PROTO_DIR / "generation_pb2.py").read_text())
    assert committed == fresh, "proto/generation_pb2.py is stale: run python proto/generate.py"
    assert _method_paths((PROTO_DIR / "generation_pb2_grpc.py").read_text()) == _method_paths(
        (tmp_path / "generation_pb2_grpc.py").read_text()
    ), "proto/generation_pb2_grpc.py is stale: run python proto/generate.py"
    # The .pyi only serves type checkers; check it names every message.
    pyi = (PROTO_DIR / "generation_pb2.pyi").read_text()
    for message in fresh.message_type:
        assert f"class {message.name}(" in pyi


def test_committed_stubs_load_on_the_oldest_supported_protobuf() -> None:
    source = (PROTO_DIR / "generation_pb2.py").read_text()
    gencode = re.search(r"# Protobuf Python Version: (\d+)\.(\d+)", source)
    assert gencode and (int(gencode.group(1)), int(gencode.group(2))) <= (4, 25)
    assert "ValidateProtobufRuntimeVersion" not in source
    assert "GRPC_GENERATED_VERSION" not in (PROTO_DIR / "generation_pb2_grpc.py").read_text()


def test_grpc_module_imports_its_messages_from_the_package() -> None:
    source = (PROTO_DIR / "generation_pb2_grpc.py").read_text()
    assert "from shardline.proto import generation_pb2" in source
    assert pb.DESCRIPTOR.package == "shardline.v1"
    assert pb_grpc.GenerationStub is not None and pb_grpc.GenerationServicer is not None


def test_service_has_streaming_generate_and_unary_helpers() -> None:
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Tokenize", "GetModelInfo", "Health"}
    assert methods["Generate"].output_type.name == "GenerateResponse"
    # server streaming, client unary
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    generate_rpc = next(m for m in file_proto.service[0].method if m.name == "Generate")
    assert generate_rpc.server_streaming and not generate_rpc.client_streaming


@pytest.mark.parametrize(
    "request_",
    [
        pb.GenerateRequest(text="Hello"),
        pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Hi é")])),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 4_000_000_000])),
    ],
    ids=["text", "chat", "token_ids"],
)
def test_generate_request_round_trips_each_input_kind(request_: pb.GenerateRequest) -> None:
    request_.request_id = "r-1"
    request_.priority = -3
    request_.cache_salt = "tenant-a"
    request_.sampling.stop.extend(["\n\n", "END"])
    decoded = pb.GenerateRequest.FromString(request_.SerializeToString())
    assert decoded == request_
    assert decoded.WhichOneof("input") == request_.WhichOneof("input")


def test_sampling_params_distinguish_unset_from_zero() -> None:
    params = pb.SamplingParams(temperature=0.0, top_k=0)
    decoded = pb.SamplingParams.FromString(params.SerializeToString())
    assert decoded.HasField("temperature") and decoded.temperature == 0.0
    assert decoded.HasField("top_k")
    assert not decoded.HasField("top_p") and not decoded.HasField("max_tokens")
    assert not decoded.HasField("seed") and not decoded.HasField("skip_special_tokens")


def test_sampling_params_has_every_engine_field() -> None:
    from shardline.worker.engine.params import SamplingParams

    descriptor = pb.SamplingParams.DESCRIPTOR
    constraint = descriptor.oneofs_by_name["structured_output"]  # the engine's one structured_output field
    proto_fields = {f.name for f in descriptor.fields if f.containing_oneof is not constraint}
    assert proto_fields | {constraint.name} == set(SamplingParams.__dataclass_fields__)
    assert {f.name for f in constraint.fields} == {"json_object", "json_schema", "regex", "choice", "grammar"}


def test_last_generate_response_carries_finish_reason_usage_and_logprobs() -> None:
    response = pb.GenerateResponse(
        request_id="r-1",
        token_ids=[5, 6],
        text="ab",
        logprobs=[
            pb.TokenLogprob(token_id=5, logprob=-0.5, top=[pb.TopLogprob(token_id=7, logprob=-1.25)]),
            pb.TokenLogprob(token_id=6, logprob=-0.25),
        ],
        finish_reason=pb.FINISH_REASON_STOP_STRING,
        usage=pb.Usage(prompt_tokens=10, completion_tokens=2, cached_prompt_tokens=8),
    )
    decoded = pb.GenerateResponse.FromString(response.SerializeToString())
    assert decoded == response
    assert pb.FinishReason.Name(decoded.finish_reason) == "FINISH_REASON_STOP_STRING"
    assert decoded.logprobs[0].top[0].logprob == -1.25
    assert decoded.usage.cached_prompt_tokens == 8
    # a delta that is not the last one leaves both unset
    delta = pb.GenerateResponse.FromString(pb.GenerateResponse(token_ids=[1]).SerializeToString())
    assert delta.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not delta.HasField("usage")


def test_finish_reasons_cover_the_engine_reasons() -> None:
    from shardline.worker.engine import outputs

    engine_reasons = {
        outputs.FINISH_STOP,
        outputs.FINISH_LENGTH,
        outputs.FINISH_STOP_STRING,
        outputs.FINISH_ABORT,
        outputs.FINISH_ERROR,
    }
    proto_reasons = {name.removeprefix("FINISH_REASON_").lower() for name in pb.FinishReason.keys()}
    assert engine_reasons <= proto_reasons


def test_tokenize_and_model_info_round_trip() -> None:
    tokenize = pb.TokenizeRequest(text="hi", add_special_tokens=False)
    decoded = pb.TokenizeRequest.FromString(tokenize.SerializeToString())
    assert decoded.HasField("add_special_tokens") and decoded.add_special_tokens is False
    assert not pb.TokenizeRequest(text="hi").HasField("add_special_tokens")
    info = pb.ModelInfo(
        model="SmolLM2-135M-Instruct",
        max_model_len=2048,
        vocab_size=49152,
        tensor_parallel_size=2,
        replica_groups=1,
        block_size=16,
        replicas=[pb.ReplicaStats(replica_id="a", free_blocks=3, num_blocks=8, running=1, waiting=0,
                                  prefix_cache_hit_tokens=32, prefix_cache_query_tokens=64)],
    )
    assert pb.ModelInfo.FromString(info.SerializeToString()) == info
