"""The cluster's pure parts, without Ray running: config to Serve options, the router's reading of
requests and stats (and that it never raises), the OpenAI request/response mapping, the gRPC
deadline and sampling conversions."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

pytest.importorskip("ray")

from shardline.cluster.config import CORES_PER_INGRESS, REPLICA_ENV, ROUTER_LOOP_ENV, ClusterConfig  # noqa: E402
from shardline.proto import generation_pb2 as pb  # noqa: E402
from shardline.router import openai_api, openai_protocol  # noqa: E402
from shardline.router.ingress import deadline_from_metadata, sampling_from_proto  # noqa: E402
from shardline.router.prefix_scoring import pack_summary  # noqa: E402
from shardline.router.request_router import KVAwareRouter, load_from_stats, prompt_of  # noqa: E402
from shardline.worker.config import ConfigError  # noqa: E402
from shardline.worker.engine.block_manager import hash_prompt_blocks  # noqa: E402
from shardline.worker.engine.generation import GenerationRequest  # noqa: E402
from shardline.worker.engine.params import RequestError, SamplingParams  # noqa: E402
from shardline.worker.engine.validation import Limits  # noqa: E402


def test_tp_bundles_are_one_per_rank_with_gpus_only_when_asked() -> None:
    gpu = ClusterConfig(tensor_parallel_size=4, use_gpu=True).replica_group_deployment_options()
    assert gpu["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1}] * 4
    assert gpu["placement_group_strategy"] == "STRICT_PACK"
    assert gpu["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1, "runtime_env": {"env_vars": REPLICA_ENV}}
    cpu = ClusterConfig(tensor_parallel_size=2, use_gpu=False, cpus_per_rank=0.5, replicas=3)
    options = cpu.replica_group_deployment_options()
    assert options["placement_group_bundles"] == [{"CPU": 0.5}] * 2 and options["num_replicas"] == 3


def test_the_engine_section_takes_vllms_speculative_config_object() -> None:
    config = ClusterConfig.from_dict({"engine": {"speculative_config": {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}}})
    engine = config.engine_config()
    assert (engine.speculative_method, engine.num_speculative_tokens, engine.prompt_lookup_max) == ("ngram", 3, 4)


def test_serve_defaults_fit_continuous_batching_and_the_nodes_cores(monkeypatch) -> None:
    # Serve's default of 5 ongoing requests per replica would cap the engine's batch at 5
    options = ClusterConfig(use_gpu=False, engine={"max_num_seqs": 64}).replica_group_deployment_options()
    assert options["max_ongoing_requests"] == 64 + 32  # batching_defaults: max_num_seqs + half of it
    override = ClusterConfig(use_gpu=False, replica_group_options={"max_ongoing_requests": 7})
    assert override.replica_group_deployment_options()["max_ongoing_requests"] == 7
    assert ClusterConfig(router="prefix_affinity").replica_env()[ROUTER_LOOP_ENV] == "1"  # it blocks its loop
    assert ClusterConfig().replica_env() == REPLICA_ENV
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert ClusterConfig().resolved_ingress_replicas() == 16 // CORES_PER_INGRESS
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert ClusterConfig().resolved_ingress_replicas() == 1
    assert ClusterConfig(ingress_replicas=3).resolved_ingress_replicas() == 3
    with pytest.raises(ConfigError, match="ingress_replicas"):
        ClusterConfig(ingress_replicas=0)


def test_autoscaling_replaces_a_fixed_replica_count() -> None:
    options = ClusterConfig(use_gpu=False, autoscaling={"min_replicas": 1, "max_replicas": 3}).replica_group_deployment_options()
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 3


@pytest.mark.parametrize("data, message", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"engine": {"model": "x"}}, "engine.model"),
    ({"engine": {"block_size": 3}}, "block_size"),
    ({"grpc_port": 70000}, "grpc_port"),
    ({"engine": {"speculative_config": {"method": "ngram"}}}, "num_speculative_tokens"),
    ({"engine": {"speculative_config": '{"method": "ngram", "k": 2}'}}, "speculative_config"),
])
def test_bad_config_values_are_named(data, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_dict(data)


@dataclass
class _Pending:
    args: list
    kwargs: dict = field(default_factory=dict)


def _typed(token_ids: list[int], salt: str | None = None) -> GenerationRequest:
    return GenerationRequest.validated(token_ids, SamplingParams(), Limits(max_model_len=4096, vocab_size=10**6),
                                       "r", cache_salt=salt)


def test_router_reads_token_ids_and_salt_of_the_typed_request_by_attribute() -> None:
    assert prompt_of(_Pending([_typed([5, 6, 7], "tenant")])) == ([5, 6, 7], "tenant")
    assert prompt_of(_Pending([_typed([5, 6, 7]), "hint"])) == ([5, 6, 7], None)
    assert prompt_of(_Pending([], {"request": _typed([9])})) == ([9], None)
    assert prompt_of(_Pending([[5, 6, 7], {}])) is None  # the old positional call is not a generate call
    assert prompt_of(_Pending([])) is None and prompt_of(_Pending(["text"])) is None and prompt_of(None) is None


def test_routing_stats_unpack_into_the_engines_hashes() -> None:
    hashes = hash_prompt_blocks(list(range(32)), 8, None)
    load = load_from_stats({"free_blocks": 3, "num_blocks": 10, "running": 1, "waiting": 0,
                            "summary": pack_summary(hashes, 100)})
    assert load is not None and len(load.summary) == 4
    assert load_from_stats({}) is None


@dataclass
class _ReplicaId:
    unique_id: str


@dataclass
class _Replica:
    replica_id: _ReplicaId
    routing_stats: dict


def _router() -> KVAwareRouter:
    router = KVAwareRouter.__new__(KVAwareRouter)  # Serve's constructor needs a running deployment
    router.initialize_state()
    return router


def test_router_prefers_the_replica_holding_the_prefix() -> None:
    prompt = list(range(40))
    holder = _Replica(_ReplicaId("b"), {"free_blocks": 50, "num_blocks": 64, "running": 0, "waiting": 0,
                                        "block_size": 8, "summary": pack_summary(hash_prompt_blocks(prompt, 8), 10)})
    other = _Replica(_ReplicaId("a"), {"free_blocks": 64, "num_blocks": 64, "running": 0, "waiting": 0,
                                       "block_size": 8, "summary": b""})
    ranks = asyncio.run(_router().choose_replicas([other, holder], _Pending([_typed(prompt + [1, 2])])))
    assert ranks == [[holder], [other]]


def _idle(name: str) -> _Replica:
    return _Replica(_ReplicaId(name), {"free_blocks": 64, "num_blocks": 64, "running": 0, "waiting": 0,
                                       "block_size": 8, "summary": b""})


def test_router_sends_a_burst_of_one_new_prefix_after_its_first_request() -> None:
    # No report shows the prefix yet: the first request goes to either replica, and the router's
    # own memory of what it routed sends the rest of the burst after it.
    router, replicas = _router(), [_idle("a"), _idle("b")]
    prefix = list(range(100, 140))
    chosen = [asyncio.run(router.choose_replicas(replicas, _Pending([_typed(prefix + [i])])))[0][0] for i in range(6)]
    assert all(c is chosen[0] for c in chosen)


def test_router_memory_expires_so_reports_stay_the_truth() -> None:
    router, replicas = _router(), [_idle("a"), _idle("b")]
    router._routed_ttl_s = 0.0  # nothing is remembered past its own decision
    prefixes = [list(range(1000 * g, 1000 * g + 40)) for g in range(40)]
    chosen = {asyncio.run(router.choose_replicas(replicas, _Pending([_typed(p)])))[0][0].replica_id.unique_id for p in prefixes}
    assert chosen == {"a", "b"}  # equal loads are broken at random, never always the same replica


def test_router_falls_back_instead_of_raising_on_broken_stats() -> None:
    broken = [_Replica(_ReplicaId("a"), {"free_blocks": "x", "num_blocks": 1, "running": 0, "waiting": 0}),
              _Replica(_ReplicaId("b"), {"free_blocks": 1, "summary": b"123"})]
    ranks = asyncio.run(_router().choose_replicas(broken, _Pending([_typed([1, 2, 3])])))
    assert len(ranks) == 1 and set(map(id, ranks[0])) <= set(map(id, broken)) and ranks[0]


def test_openai_completion_body_maps_onto_sampling_params() -> None:
    req = openai_protocol.parse(openai_protocol.CompletionRequest, {
        "model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "stop": "x", "top_k": 3, "stream": True,
        "stream_options": {"include_usage": True}, "cache_salt": "t", "logit_bias": {"7": -100}, "n": 2})
    assert req.prompt == "hi" and req.stream and req.stream_options.include_usage and req.cache_salt == "t"
    assert openai_api.sampling_params(req, chat=False, defaults={"top_p": 0.9}) == SamplingParams(
        max_tokens=5, temperature=0.5, stop=["x"], top_k=3, top_p=0.9, logit_bias={7: -100.0}, n=2)


def test_max_tokens_unset_or_null_is_the_rest_of_the_context_for_chat_and_16_for_completions() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for extra in ({}, {"max_tokens": None}, {"max_completion_tokens": None}):
        req = openai_protocol.parse(openai_protocol.ChatCompletionRequest, {**chat, **extra})
        assert openai_api.sampling_params(req, chat=True, defaults={}).max_tokens is None
    req = openai_protocol.parse(openai_protocol.ChatCompletionRequest, {**chat, "max_completion_tokens": 7})
    assert openai_api.sampling_params(req, chat=True, defaults={}).max_tokens == 7
    req = openai_protocol.parse(openai_protocol.CompletionRequest, {"prompt": "hi", "max_tokens": None})
    assert openai_api.sampling_params(req, chat=False, defaults={}).max_tokens == 16


def test_unknown_openai_fields_are_kept_aside_not_rejected() -> None:
    req = openai_protocol.parse(openai_protocol.ChatCompletionRequest, {
        "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low", "store": False,
        "parallel_tool_calls": False})  # read by the tool-call plan (router/tool_calls.py)
    assert req.unknown_fields() == ["reasoning_effort", "store"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "best_of": 3, "n": 2}, "best_of"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [1.9, 2]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": [1, "7"]}, "prompt"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "echo": [1]}, "echo"),  # echo with logprobs is served (prompt logprobs)
    ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
])
def test_bad_openai_fields_are_named(body, param) -> None:
    with pytest.raises(RequestError) as error:
        req = openai_protocol.parse(openai_protocol.CompletionRequest, body)
        openai_api.sampling_params(req, chat=False, defaults={})
        openai_api.completion_prompts(req)
    assert error.value.field == param


@pytest.mark.parametrize("request_class, body, message", [
    ("CompletionRequest", {"prompt": "hi", "temperature": "hot"},
     "temperature: Input should be a valid integer or a valid number (got 'hot')"),
    ("CompletionRequest", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens: Input should be a valid integer (got 'ten')"),
    ("CompletionRequest", {"prompt": "hi", "stop": ["a", 3]}, "stop: stop[1]: Input should be a valid string (got 3)"),
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages: messages[0].content[0].text: Input should be a valid string (got 3)"),
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": 5}]},
     "messages: messages[0].content: Input should be a valid string or a valid list (got 5)"),
])
def test_type_errors_name_the_path_to_the_value_not_pydantics_union_members(request_class, body, message) -> None:
    with pytest.raises(RequestError) as error:
        openai_protocol.parse(getattr(openai_protocol, request_class), body)
    assert str(error.value) == message


def test_batched_prompts_are_one_prompt_each() -> None:
    def prompts(prompt):
        return openai_api.completion_prompts(openai_protocol.parse(openai_protocol.CompletionRequest,
                                                                   {"prompt": prompt}))

    assert prompts("a") == ["a"] and prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]] and prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_chat_content_parts_are_joined_null_content_allowed_and_other_parts_refused() -> None:
    req = openai_protocol.parse(openai_protocol.ChatCompletionRequest, {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []}]})
    assert [m.template_dict() for m in req.messages] == [
        {"role": "user", "content": "ab"}, {"role": "assistant", "content": "", "tool_calls": []}]
    with pytest.raises(RequestError, match=r"messages\[0\]\.content"):
        openai_protocol.parse(openai_protocol.ChatCompletionRequest,
                              {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})


def test_error_bodies_have_the_openai_shape_and_status() -> None:
    assert openai_api.error_body("invalid_argument", "top_p: bad", "top_p") == (
        400, {"error": {"message": "top_p: bad", "type": "invalid_request_error", "param": "top_p",
                        "code": "invalid_argument"}})
    assert openai_api.error_body("resource_exhausted", "full", "")[0] == 429
    assert openai_api.error_body("unavailable", "down", "")[0] == 503


def test_grpc_deadline_metadata_is_read_in_seconds() -> None:
    assert deadline_from_metadata([("grpc-timeout", "250m")]) == pytest.approx(0.25)
    assert deadline_from_metadata([("timeout-ms", "1500")]) == pytest.approx(1.5)
    assert deadline_from_metadata([("other", "1")]) is None and deadline_from_metadata(None) is None
    with pytest.raises(RequestError, match="timeout-ms"):
        deadline_from_metadata([("timeout-ms", "soon")])


def test_only_set_proto_sampling_fields_are_sent_over_the_defaults() -> None:
    msg = pb.SamplingParams(max_tokens=4, temperature=0.0, stop=["a"], n=2, logit_bias={5: -100.0})
    assert sampling_from_proto(msg, {"top_p": 0.8}, chat=False) == SamplingParams(
        max_tokens=4, temperature=0.0, stop=["a"], top_p=0.8, n=2, logit_bias={5: -100.0})
    assert sampling_from_proto(pb.SamplingParams(), {}, chat=False) == SamplingParams(max_tokens=16)
    assert sampling_from_proto(pb.SamplingParams(), {}, chat=True) == SamplingParams(max_tokens=None)


@pytest.mark.parametrize("pickler", ["cloudpickle", "pickle"])  # Ray's objects ("actor"), Serve's gRPC transport
def test_stream_items_and_their_request_errors_survive_ray_pickling(pickler) -> None:
    import pickle

    from ray import cloudpickle

    from shardline.cluster.replica_group import StreamOwner
    from shardline.worker.engine.generation import StreamItem, Usage
    from shardline.worker.engine.outputs import TokenLogprob

    module = cloudpickle if pickler == "cloudpickle" else pickle
    failure = module.loads(module.dumps(StreamItem.failure(RequestError("n", "too many", "invalid_argument"))))
    assert isinstance(failure.error, RequestError) and failure.finished
    assert (failure.error.field, failure.error.code, str(failure.error)) == ("n", "invalid_argument", "n: too many")
    item = StreamItem(1, [5], "x", Usage(3, 1, 2), [TokenLogprob(5, -0.5, {5: -0.5, 6: -1.0})], "length")
    assert module.loads(module.dumps(item)) == item
    typed = _typed([1, 2, 3], "salt")
    assert module.loads(module.dumps(typed)) == typed
    owner = StreamOwner("serve", "SERVE_REPLICA::shardline#Ingress#abc")
    assert module.loads(module.dumps(owner)) == owner


def test_serve_transport_sets_the_ingress_handle_and_the_proxies_environment() -> None:
    from shardline.cluster.config import PROXY_GRPC_ENV
    from shardline.cluster.proxies import proxy_environment

    grpc = ClusterConfig()  # the default: Serve's gRPC transport on both hops
    assert grpc.stream_handle_options() == {"stream": True, "_by_reference": False, "request_serialization": "pickle",
                                            "response_serialization": "pickle"}
    assert proxy_environment(grpc)[PROXY_GRPC_ENV] == "1"
    actor = ClusterConfig(serve_transport="actor")
    assert actor.stream_handle_options() == {"stream": True} and proxy_environment(actor)[PROXY_GRPC_ENV] == "0"
    with pytest.raises(ConfigError, match="serve_transport"):
        ClusterConfig(serve_transport="http")


def test_direct_ingress_switches_every_serve_process_and_refuses_tls(tmp_path) -> None:
    from shardline.cluster.direct_ingress import DIRECT_INGRESS_DRAIN_ENV, DIRECT_INGRESS_ENV
    from shardline.cluster.proxies import proxy_environment

    on = ClusterConfig(direct_ingress=True)
    for env in (proxy_environment(on), on.replica_env()):  # the controller and proxies, and the replicas
        assert env[DIRECT_INGRESS_ENV] == "1" and float(env[DIRECT_INGRESS_DRAIN_ENV]) < 30  # not Serve's 30 s
    off = ClusterConfig()
    assert DIRECT_INGRESS_ENV not in proxy_environment(off) and DIRECT_INGRESS_ENV not in off.replica_env()
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    for prefix in ("ssl", "grpc_ssl"):
        with pytest.raises(ConfigError, match="direct_ingress.*TLS"):
            ClusterConfig(direct_ingress=True, **{f"{prefix}_certfile": str(cert), f"{prefix}_keyfile": str(key)})


def test_choices_of_a_request_have_their_own_ids_and_seed_streams() -> None:
    request = GenerationRequest.validated([1, 2, 3], SamplingParams(n=3, seed=7), Limits(64, 100), "r")
    choices = [request.choice(i) for i in range(3)]
    assert [c.request_id for c in choices] == ["r-0", "r-1", "r-2"]
    assert [(c.params.n, c.params.seed) for c in choices] == [(1, 7), (1, 8), (1, 9)]
    assert all(c.prompt_token_ids == [1, 2, 3] and c.max_tokens == request.max_tokens for c in choices)
    single = GenerationRequest.validated([1, 2, 3], SamplingParams(), Limits(64, 100), "s")
    assert single.choice(0) is single
