"""Structured outputs in the engine: every constrained output matches its constraint (JSON schema,
regex, choice, EBNF), greedy and sampled, beside unconstrained requests whose tokens do not change;
the grammar's state survives preemption, chunked prefill and overlapped scheduling; compiles run off
the engine thread; bad constraints are RequestErrors naming the field. The tiny model has a real
byte-level BPE tokenizer (tests/structured_fixtures.py); two slow tests use the default model."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading

import jsonschema
import pytest
import torch

from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import RequestError, SamplingParams, StructuredOutput
from structured_fixtures import write_tiny_model_with_bpe_tokenizer

PROMPTS = ["hello", "The capital of France is", '{"name": "', "yes no maybe", "0123", "abc"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bpe")
    return d, write_tiny_model_with_bpe_tokenizer(d)


def make_engine(directory, **kw) -> LLMEngine:
    cfg = dict(model=str(directory), num_kv_blocks=256, block_size=8, max_num_batched_tokens=512, max_num_seqs=32)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


@pytest.fixture(scope="module")
def engine(tiny):
    return make_engine(tiny[0])


def schema_of(value: dict, strict: bool = True) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(value), strict=strict)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema mixing the kinds the field's callers use: bounded strings (some with a
    pattern), bounded integers and numbers, booleans, enums, bounded arrays, nested objects,
    required and optional properties. Every kind is bounded, so a complete output is short."""
    kinds = ["string", "pattern", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    properties = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        if kind == "string":
            prop = {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
        elif kind == "pattern":
            prop = {"type": "string", "pattern": rng.choice(["^[a-z]{1,5}$", "^[0-9]{2}-[A-Z]{2}$", "^(ab|cd)+$"])}
        elif kind == "integer":
            low = rng.randint(-50, 50)
            prop = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
        elif kind == "number":
            prop = {"type": "number", "minimum": -10, "maximum": rng.choice([1, 10, 1000])}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", "blue", "Paris", "x y", 3, None], rng.randint(1, 4))}
        elif kind == "array":
            prop = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
        else:
            prop = random_schema(rng, depth + 1)
        properties[f"p{depth}{i}_{kind}"] = prop
    required = [k for k in properties if rng.random() < 0.6]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def test_random_json_schemas_parse_and_validate_greedy_and_sampled_beside_unchanged_neighbours(engine):
    """A mixed batch: 12 random schemas, each greedy and at temperature 1, beside unconstrained
    requests. Every constrained output is complete (finish 'stop'), parses and validates; the
    unconstrained rows' tokens equal a run of them alone."""
    rng = random.Random(1234)
    schemas = [random_schema(rng) for _ in range(12)]
    constrained = [SamplingParams(max_tokens=200, temperature=t, seed=i, structured_output=schema_of(s))
                   for i, s in enumerate(schemas) for t in (0.0, 1.0)]
    plain = [SamplingParams(max_tokens=24, temperature=t, seed=100 + i, ignore_eos=True)
             for i, t in enumerate([0.0, 1.0, 0.7, 1.0])]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(constrained) + len(plain))]
    # Interleaved, so constrained and unconstrained rows alternate within the steps.
    order = list(range(len(prompts)))
    rng.shuffle(order)
    params = (constrained + plain)
    results = engine.generate([prompts[i] for i in order], [params[i] for i in order])
    by_index = {i: r for i, r in zip(order, results)}
    for i, sp in enumerate(constrained):
        r = by_index[i]
        assert r.finish_reason == "stop", (r.text, schemas[i // 2])
        jsonschema.validate(json.loads(r.text), schemas[i // 2])
    alone = engine.generate(prompts[len(constrained):], plain)
    assert [by_index[len(constrained) + j].token_ids for j in range(len(plain))] == [r.token_ids for r in alone]


def test_regex_choice_and_ebnf_outputs_match_their_constraint(engine):
    regex = r"\d{3}-[a-z]{2,4}( [A-Z][a-z]{0,6})?"
    choices = ("yes", "no", "maybe so", "Paris")
    ebnf = 'root ::= "[" item ("," item){0,3} "]"\nitem ::= number | word\nnumber ::= [0-9]{1,3}\nword ::= "(" [a-z]{1,4} ")"'
    cases = [StructuredOutput("regex", regex), StructuredOutput("choice", choices), StructuredOutput("grammar", ebnf),
             StructuredOutput("json_object")]
    params = [SamplingParams(max_tokens=80, temperature=t, seed=s, structured_output=c)
              for c in cases for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    results = engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
    for r in results[:3]:
        assert re.fullmatch(regex, r.text), r.text
    for r in results[3:6]:
        assert r.text in choices
    for r in results[6:9]:
        assert re.fullmatch(r"\[([0-9]{1,3}|\([a-z]{1,4}\))(,([0-9]{1,3}|\([a-z]{1,4}\))){0,3}\]", r.text), r.text
    for r in results[9:]:
        if r.finish_reason == "stop":  # an unbounded object may run out of tokens; a finished one parses
            assert isinstance(json.loads(r.text), dict)
        else:
            assert r.text.startswith("{")
    assert [r.finish_reason for r in results[:9]] == ["stop"] * 9


def test_eos_only_where_the_grammar_is_complete_even_under_ignore_eos(engine):
    """ignore_eos cannot run a constrained request past its grammar: the end is the grammar's."""
    so = StructuredOutput("choice", ("alpha", "beta"))
    results = engine.generate(["x", "y"], [SamplingParams(max_tokens=50, temperature=1.0, seed=s, ignore_eos=True,
                                                          min_tokens=3, structured_output=so) for s in (5, 6)])
    for r in results:
        assert r.text in ("alpha", "beta") and r.finish_reason == "stop"
        assert r.token_ids[-1] in engine.eos_token_ids


def test_logprobs_see_the_masked_logits(engine):
    """Top-n logprobs of a constrained row include only tokens the grammar allows (masked ones are
    impossible, so not listed), and they are normalized over the allowed tokens."""
    so = StructuredOutput("choice", ("yes", "no"))
    [r] = engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, structured_output=so))
    first = r.logprobs[0]
    hf = engine.tokenizer.hf
    finite = first.top
    assert len(finite) < 5 and all(lp > float("-inf") for lp in finite.values())
    assert finite and all("yes".startswith(hf.decode([t])) or "no".startswith(hf.decode([t])) for t in finite)
    assert sum(torch.tensor(list(finite.values())).exp()) == pytest.approx(1.0, abs=1e-5)


def test_greedy_constrained_tokens_equal_transformers_with_xgrammars_logits_processor(tiny, engine):
    """The reference: transformers' generate on the same weights with xgrammar's own HF logits
    processor gives the same greedy tokens as the engine's batched device-side mask."""
    import xgrammar as xgr
    from xgrammar.contrib.hf import LogitsProcessor

    d, hf_model = tiny
    schema = random_schema(random.Random(7))
    so = schema_of(schema)
    prompt_ids = engine.encode_prompt("hello")
    [ours] = engine.generate([prompt_ids], SamplingParams(max_tokens=60, temperature=0.0, structured_output=so))
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer.hf, vocab_size=engine.model_config.vocab_size,
                                              stop_token_ids=engine.eos_token_ids)
    from shardline.worker.structured.grammar import parse_grammar

    compiled = xgr.GrammarCompiler(info).compile_grammar(parse_grammar(so))
    out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=60, do_sample=False,
                            logits_processor=[LogitsProcessor(compiled)], eos_token_id=engine.eos_token_ids,
                            pad_token_id=0)
    assert ours.token_ids == out[0, len(prompt_ids):].tolist()
    jsonschema.validate(json.loads(ours.text), schema)


def _mixed_batch():
    rng = random.Random(99)
    params, prompts = [], []
    for i in range(10):
        so = schema_of(random_schema(rng)) if i % 2 == 0 else None
        params.append(SamplingParams(max_tokens=100 if so else 30, temperature=1.0 if i % 3 else 0.0, seed=i,
                                     structured_output=so, ignore_eos=so is None))
        prompts.append(PROMPTS[i % len(PROMPTS)] * (1 + i % 4))
    return prompts, params


@pytest.mark.parametrize("regime", [
    dict(num_kv_blocks=20),  # preemption by recompute
    dict(max_num_batched_tokens=16),  # chunked prefill, a few tokens per step
    dict(async_scheduling=True),  # overlapped scheduling: the previous step's token is pending
    dict(async_scheduling=True, num_kv_blocks=20, max_num_batched_tokens=16),
], ids=["preemption", "chunked-prefill", "overlap", "overlap+preemption+chunked"])
def test_grammar_state_survives_preemption_chunked_prefill_and_overlap(tiny, regime):
    """Outputs equal a roomy synchronous run, token for token, for constrained and plain rows."""
    prompts, params = _mixed_batch()
    roomy = make_engine(tiny[0]).generate(prompts, params)
    engine = make_engine(tiny[0], **regime)
    got = engine.generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in roomy]
    if "num_kv_blocks" in regime:
        assert engine.scheduler.num_preemptions_total > 0
    if regime.get("async_scheduling"):
        assert engine.num_overlapped_steps > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_speculative_decoding_leaves_constrained_and_plain_greedy_rows_unchanged(tiny):
    """ngram proposals for the plain rows and none for the constrained ones (a grammar masks one
    position a step), in the same verification steps: a greedy mixed batch gives exactly the
    tokens of a run without speculation, and every constrained output still validates."""
    prompts, params = _mixed_batch()
    params = [dataclasses.replace(p, temperature=0.0) for p in params]
    plain = make_engine(tiny[0]).generate(prompts, params)
    engine = make_engine(tiny[0], speculative_method="ngram", num_speculative_tokens=3, prompt_lookup_min=1)
    got = engine.generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    assert engine.spec_stats.totals()["spec_decode_num_drafts"] > 0
    for r, p in zip(got, params):
        if p.structured_output is not None:
            json.loads(r.text)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_compiling_request_waits_while_the_batch_runs_and_can_be_aborted(tiny):
    """The compile thread is held busy: the unconstrained request runs to the end meanwhile, the
    constrained one waits outside the scheduler; released, it completes; an abort while compiling
    leaves nothing behind."""
    engine = make_engine(tiny[0])
    so = StructuredOutput("regex", "[a-c]{4}")
    engine.add_request("abc", SamplingParams(max_tokens=4, temperature=0.0, structured_output=StructuredOutput("choice", ("z",))))
    while engine.has_unfinished_requests():  # warm: the tokenizer info is built by the first compile
        engine.step()
    gate = threading.Event()
    engine._grammars._pool.submit(gate.wait)  # the one compile thread is now busy
    engine.add_request("hello", SamplingParams(max_tokens=40, temperature=0.0, structured_output=so), request_id="c")
    engine.add_request("hello", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), request_id="p")
    engine.add_request("abc", SamplingParams(max_tokens=5, temperature=0.0, structured_output=StructuredOutput("regex", "x+")),
                       request_id="aborted")
    done = {}
    for _ in range(8):
        for out in engine.step():
            done.setdefault(out.request_id, []).append(out)
    assert done["p"][-1].finished and "c" not in done
    assert engine.stats()["num_grammars_compiling"] == 2 and engine.scheduler.num_waiting == 0
    assert engine.abort_request("aborted").finish_reason == "abort"
    gate.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            done.setdefault(out.request_id, []).append(out)
    text = "".join(o.text_delta for o in done["c"])
    assert re.fullmatch("[a-c]{4}", text) and done["c"][-1].finish_reason == "stop"
    assert "aborted" not in done
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_compiled_grammar_cache_hits_for_the_same_constraint_and_the_metrics_count_it(tiny):
    from prometheus_client.parser import text_string_to_metric_families

    from shardline.metrics import EngineMetrics

    metrics = EngineMetrics("tiny")
    engine = LLMEngine(EngineConfig(model=str(tiny[0]), num_kv_blocks=64, block_size=8), show_progress=False,
                       metrics=metrics)
    so = StructuredOutput("regex", "[0-9]{2}")
    engine.generate(["a", "b", "c"], SamplingParams(max_tokens=5, temperature=0.0, structured_output=so))
    engine.generate(["d", "e"], [SamplingParams(max_tokens=5, temperature=0.0, structured_output=StructuredOutput("regex", "[0-9]{2}")),
                                 SamplingParams(max_tokens=5, temperature=0.0)])
    stats = engine.stats()
    assert stats["grammar_compiles"] == 1 and stats["grammar_cache_hits"] == 3
    assert stats["grammar_compile_seconds"] > 0
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}
    assert samples["shardline:structured_output_requests_total"] == 4
    assert samples["shardline:grammar_cache_hits_total"] == 3
    assert samples["shardline:grammar_compile_seconds_count"] == 1


@pytest.mark.parametrize("constraint, field, words", [
    (StructuredOutput("json_schema", '{"type": "nope"}'), "structured_output.json_schema", "Unsupported type"),
    (StructuredOutput("json_schema", "{not json"), "structured_output.json_schema", "Failed to parse JSON"),
    (StructuredOutput("regex", "a(b"), "structured_output.regex", "parenthesis"),
    (StructuredOutput("grammar", 'root ::= "a" |'), "structured_output.grammar", "EBNF"),
    (StructuredOutput("choice", ()), "structured_output.choice", "non-empty"),
    (StructuredOutput("choice", ("a", "")), "structured_output.choice", "choice[1]"),
    (StructuredOutput("json_object", "x"), "structured_output.json_object", "no value"),
    (StructuredOutput("xml", "x"), "structured_output.kind", "json_schema"),  # type: ignore[arg-type]
    (StructuredOutput("regex", "a" * 70000), "structured_output.regex", "65536"),
])
def test_a_bad_constraint_is_a_request_error_naming_the_field(engine, constraint, field, words):
    with pytest.raises(RequestError) as e:
        engine.add_request("hello", SamplingParams(max_tokens=4, structured_output=constraint))
    assert e.value.field == field and e.value.code == "invalid_argument"
    assert words in str(e.value)
    assert not engine.has_unfinished_requests()


def test_sampling_params_from_a_dict_carry_the_constraint():
    p = SamplingParams.from_dict({"max_tokens": 3, "structured_output": {"kind": "choice", "value": ["a", "b"]}})
    assert p.structured_output == StructuredOutput("choice", ("a", "b"))


# ---- the default model (SmolLM2-135M-Instruct, its real BPE vocabulary and chat template) ----

@pytest.fixture(scope="module")
def smollm2_engine():
    return LLMEngine(EngineConfig(model="smollm2-135m", num_kv_blocks=208, block_size=16, max_num_seqs=8,
                                  max_num_batched_tokens=512), show_progress=False)


@pytest.mark.slow
def test_default_model_answers_a_json_schema_that_validates(smollm2_engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20},
                                               "population_millions": {"type": "number", "minimum": 0, "maximum": 100}},
              "required": ["city", "country"], "additionalProperties": False}
    msg = {"messages": [{"role": "user", "content": "Give the capital of France as JSON."}]}
    results = smollm2_engine.generate([msg, msg], [
        SamplingParams(max_tokens=80, temperature=0.0, structured_output=schema_of(schema, strict=True)),
        SamplingParams(max_tokens=80, temperature=0.8, seed=1, structured_output=schema_of(schema, strict=True))])
    for r in results:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)
    assert "Paris" in json.loads(results[0].text)["city"]


@pytest.mark.slow
def test_default_model_regex_and_choice(smollm2_engine):
    msg = {"messages": [{"role": "user", "content": "Is Paris the capital of France? Answer yes or no."}]}
    date = {"messages": [{"role": "user", "content": "When did the Berlin Wall fall? Give the date."}]}
    choice, dated = smollm2_engine.generate([msg, date], [
        SamplingParams(max_tokens=10, temperature=0.0, structured_output=StructuredOutput("choice", ("yes", "no"))),
        SamplingParams(max_tokens=20, temperature=0.0, structured_output=StructuredOutput("regex", r"\d{4}-\d{2}-\d{2}"))])
    assert choice.text == "yes"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", dated.text) and dated.finish_reason == "stop"


# ---- the mask itself ----

def test_the_bitmask_masks_exactly_the_cleared_bits_of_the_constrained_rows_only():
    from shardline.worker.structured.bitmask import TokenBitmask

    vocab, n = 70, 5  # 70 tokens: 3 words a row, the last one partly used
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (2, 3), dtype=torch.int32, generator=gen)
    logits = torch.randn(n, vocab + 6, generator=gen)  # a padded LM head: columns past vocab stay as they are
    before = logits.clone()
    TokenBitmask(words, [1, 3], vocab).apply(logits[:, :vocab])
    for row in range(n):
        for token in range(vocab + 6):
            allowed = row not in (1, 3) or token >= vocab or bool((int(words[[1, 3].index(row), token // 32]) >> (token % 32)) & 1)
            assert logits[row, token].item() == (before[row, token].item() if allowed else float("-inf"))


def test_sampling_with_a_token_bitmask_reads_nothing_from_the_device():
    """The mask's copy, scatter and apply only queue device work (the meta device stands in)."""
    from shardline.worker.engine.sampler import Sampler, SamplingBatch
    from shardline.worker.structured.bitmask import TokenBitmask
    from test_no_host_sync import META, VOCAB, BlockingCopies, TensorsBuiltOnDevice

    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.9), SamplingParams(temperature=0.0)]
    copies, built = BlockingCopies(), TensorsBuiltOnDevice()
    with built, copies:
        batch = SamplingBatch.build(params, [None] * 3, [[1]] * 3, [[]] * 3, VOCAB, META)
        batch.token_bitmask = TokenBitmask(torch.full((2, VOCAB // 32), -1, dtype=torch.int32), [0, 2], VOCAB)
        out = Sampler()(torch.empty(3, VOCAB, device=META), batch)
    assert copies.seen + built.seen == []
    assert out.token_ids.device == META and out.token_ids.shape == (3,)


# ---- the front ends' spellings (the cluster test runs them end to end) ----

@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}, "strict": True}}},
     StructuredOutput("json_schema", '{"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}', strict=True)),
    ({"structured_outputs": {"json": {"type": "array"}}}, StructuredOutput("json_schema", '{"type": "array"}')),
    ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutput("regex", "[a-z]+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutput("choice", ("a", "b"))),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredOutput("grammar", 'root ::= "x"')),
    ({"guided_regex": "[0-9]"}, StructuredOutput("regex", "[0-9]")),
    ({"guided_json": '{"type": "object"}'}, StructuredOutput("json_schema", '{"type": "object"}')),
])
def test_http_bodies_become_the_engines_constraint(body, expected):
    from shardline.router import openai_api, openai_protocol

    for model, extra in ((openai_protocol.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}),
                         (openai_protocol.CompletionRequest, {"prompt": "x"})):
        req = openai_protocol.parse(model, {**extra, **body})
        assert openai_api.sampling_params(req, model is openai_protocol.ChatCompletionRequest, {}).structured_output == expected


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "x"}, "guided_regex"),
])
def test_http_constraint_errors_name_the_bodys_field(body, field):
    from shardline.router import openai_api, openai_protocol

    req = openai_protocol.parse(openai_protocol.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], **body})
    with pytest.raises(RequestError) as e:
        openai_api.sampling_params(req, True, {})
    assert e.value.field == field and e.value.code == "invalid_argument"


def test_the_grpc_oneof_becomes_the_engines_constraint_and_errors_name_sampling_kind():
    from shardline.proto import generation_pb2 as pb
    from shardline.router.ingress import sampling_from_proto

    cases = [(pb.SamplingParams(json_object=True), StructuredOutput("json_object")),
             (pb.SamplingParams(json_schema=pb.JsonSchema(schema='{"type": "object"}', strict=True)),
              StructuredOutput("json_schema", '{"type": "object"}', strict=True)),
             (pb.SamplingParams(regex="[a-z]"), StructuredOutput("regex", "[a-z]")),
             (pb.SamplingParams(choice=pb.Choices(choices=["x", "y"])), StructuredOutput("choice", ("x", "y"))),
             (pb.SamplingParams(grammar='root ::= "a"'), StructuredOutput("grammar", 'root ::= "a"')),
             (pb.SamplingParams(temperature=0.5), None)]
    for msg, expected in cases:
        wire = pb.SamplingParams.FromString(msg.SerializeToString())
        assert sampling_from_proto(wire, {}, chat=False).structured_output == expected
    with pytest.raises(RequestError) as e:
        sampling_from_proto(pb.SamplingParams(grammar="root ::="), {}, chat=False)
    assert e.value.field == "sampling.grammar"
