"""Tool calling on the chat route, without a cluster (tests/test_structured_outputs_cluster.py runs
it end to end): tool_choice becomes the right constraint, the generated text the right tool_calls,
whole or streamed, and bad tools / tool_choice are errors naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from shardline.router.tool_calls import ToolPlan, plan
from shardline.router.tool_parsers import make_parser, parser_for_template
from shardline.worker.engine.params import RequestError, SamplingParams

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def test_a_named_choice_constrains_the_output_to_that_functions_parameters():
    plan, constraint = ToolPlan.from_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert plan.mode == "named" and constraint.kind == "json_schema" and constraint.strict
    assert json.loads(constraint.value) == TIME["function"]["parameters"]
    message, finish = plan.message('{"zone": "UTC"}', "stop")
    assert finish == "tool_calls" and message["content"] is None
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'} and call["id"].startswith("call_")


def test_required_is_an_array_of_calls_one_unless_parallel():
    plan, constraint = ToolPlan.from_request([WEATHER, TIME], "required", False)
    schema = json.loads(constraint.value)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    calls = [{"name": "get_weather", "parameters": {"city": "Paris"}}]
    jsonschema.validate(calls, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"zone": "UTC"}}], schema)
    message, finish = plan.message(json.dumps(calls), "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    _, parallel = ToolPlan.from_request([WEATHER, TIME], "required", None)
    assert "maxItems" not in json.loads(parallel.value)


def test_auto_parses_hermes_tool_calls_and_keeps_plain_answers_as_content():
    plan, constraint = ToolPlan.from_request([WEATHER], None, None)
    assert plan.mode == "auto" and constraint is None
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    message, finish = plan.message(text, "stop")
    assert message["content"] == "Let me check.\n" and finish == "tool_calls"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert plan.message("It is sunny.", "stop") == ({"role": "assistant", "content": "It is sunny."}, "stop")
    assert ToolPlan.from_request([WEATHER], "none", None) == (None, None)


def stream(plan: ToolPlan, text: str, size: int) -> tuple[list[dict], str | None]:
    """Feed `text` to plan.delta in pieces of `size` characters; the deltas and the finish reason."""
    deltas = [plan.delta(0, text[i:i + size]) for i in range(0, len(text), size)]
    owed, finish = plan.final_delta(0, "stop")
    deltas.append(owed)
    return [d for d in deltas if d], finish


def reassemble(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            slot = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            slot["name"] += c.get("function", {}).get("name") or ""
            slot["arguments"] += c.get("function", {}).get("arguments") or ""
    return content or None, [calls[i] for i in sorted(calls)]


def plan_for(choice, parser: str = "hermes", tools=(WEATHER, TIME)) -> ToolPlan:
    plan, _ = ToolPlan.from_request(list(tools), choice, None)
    plan.parser = make_parser(parser)
    return plan


TWO_CALLS_HERMES = ('Checking both. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo, \\"NO\\" {x}"}}\n'
                    '</tool_call>\n<tool_call>\n{"arguments": {"zone": "UTC"}, "name": "get_time"}\n</tool_call>')
TWO_CALLS_LLAMA = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": [1, {"n": 2}]}}; '
                   '{"name": "get_time", "parameters": {"zone": "UTC"}}')


@pytest.mark.parametrize("choice, parser, text", [
    ("auto", "hermes", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'),
    ("auto", "hermes", "No tools needed: <tool is a word>"),
    ("auto", "hermes", TWO_CALLS_HERMES),
    ("auto", "llama3_json", TWO_CALLS_LLAMA),
    ("auto", "llama3_json", '  {"name": "get_time", "parameters": {"zone": "CET"}}'),
    ("auto", "llama3_json", "The weather is fine {really}."),
    ("required", "hermes", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'),
    ("required", "hermes", '[{"name": "get_weather", "parameters": {"city": "]}"}}, {"name": "get_time", '
                           '"parameters": {"zone": "UTC"}}]'),
    ({"type": "function", "function": {"name": "get_weather"}}, "hermes", '{"city": "Oslo"}'),
])
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_streamed_deltas_reassemble_to_the_whole_message(choice, parser, text, size):
    whole, whole_finish = plan_for(choice, parser).message(text, "stop")
    deltas, finish = stream(plan_for(choice, parser), text, size)
    content, calls = reassemble(deltas)
    assert finish == whole_finish
    assert content == whole["content"]
    assert calls == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in whole.get("tool_calls", [])]
    for call in whole.get("tool_calls", []):
        json.loads(call["function"]["arguments"])


@pytest.mark.parametrize("choice, parser, text", [
    ("auto", "hermes", TWO_CALLS_HERMES),
    ("auto", "llama3_json", TWO_CALLS_LLAMA),
    ("required", "hermes", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", '
                           '"parameters": {"zone": "UTC"}}]'),
])
def test_streamed_calls_are_announced_then_their_arguments_grow_as_openai_sends_them(choice, parser, text):
    deltas, _ = stream(plan_for(choice, parser), text, 2)
    parts = [c for d in deltas for c in d.get("tool_calls", [])]
    for index in (0, 1):
        mine = [p for p in parts if p["index"] == index]
        head, rest = mine[0], mine[1:]
        assert head["id"].startswith("call_") and head["type"] == "function" and head["function"]["arguments"] == ""
        assert head["function"]["name"] in ("get_weather", "get_time")
        assert rest and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
        # Fragments, not the whole arguments at once (Hermes' second call writes its arguments before
        # its name: they wait for the name, since the first delta must carry it).
        assert len(rest) > 3 or (parser == "hermes" and index == 1)
    whole, _ = plan_for(choice, parser).message(text, "stop")
    assert [c["function"]["name"] for c in whole["tool_calls"]] == ["get_weather", "get_time"]


def test_llama3_json_calls_parse_with_or_without_the_python_tag():
    parser = make_parser("llama3_json")
    assert parser.parse('{"name": "get_time", "parameters": {"zone": "UTC"}}') == (None, [("get_time", '{"zone": "UTC"}')])
    content, calls = parser.parse(TWO_CALLS_LLAMA)
    assert content is None and [name for name, _ in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0][1]) == {"city": "Oslo", "days": [1, {"n": 2}]}
    assert parser.parse("It is sunny in Oslo.") == ("It is sunny in Oslo.", [])
    assert parser.parse('{"not": "a call"}') == ('{"not": "a call"}', [])  # no name: content
    assert parser.parse('{"name": "get_time", "parameters": {"zone": ') == ('{"name": "get_time", "parameters": {"zone": ', [])


def test_the_parser_follows_the_chat_template_unless_named():
    assert parser_for_template("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    llama = '<|start_header_id|>ipython<|end_header_id|> {"name": function name, "parameters": ...} <|python_tag|>'
    assert parser_for_template(llama) == "llama3_json"
    assert parser_for_template(None) == "hermes"
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        make_parser("mistral")


def test_auto_needs_the_servers_flag():
    class Body:
        tools, tool_choice, parallel_tool_calls = [WEATHER], None, None

    with pytest.raises(RequestError) as e:
        plan(Body(), SamplingParams(), make_parser("llama3_json"), auto_tool_choice=False)
    assert e.value.field == "tool_choice" and "--enable-auto-tool-choice" in str(e.value)
    tool_plan, _ = plan(Body(), SamplingParams(), make_parser("llama3_json"), auto_tool_choice=True)
    assert tool_plan.mode == "auto" and tool_plan.parser.name == "llama3_json"
    Body.tool_choice = "required"
    assert plan(Body(), SamplingParams(), None, auto_tool_choice=False)[0].mode == "required"


@pytest.mark.parametrize("tools, choice, field", [
    ([{"type": "function", "function": {"description": "no name"}}], None, "tools"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_and_tool_choice_name_the_field(tools, choice, field):
    with pytest.raises(RequestError) as e:
        ToolPlan.from_request(tools, choice, None)
    assert e.value.field == field


@pytest.mark.parametrize("tools, message", [
    ("x", "tools: Input should be a valid list (got 'x')"),
    ([{"type": "function", "function": {"name": 5}}], "tools: tools[0].function.name: Input should be a valid string (got 5)"),
])
def test_bad_tools_say_the_path_to_the_value_once(tools, message):
    with pytest.raises(RequestError) as e:
        ToolPlan.from_request(tools, None, None)
    assert str(e.value) == message


def test_assistant_tool_call_arguments_reach_the_template_as_a_mapping():
    from shardline.router.tool_calls import for_template

    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    out = for_template(messages)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[1]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert out[0] == messages[0] and out[2] == messages[2]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the input is not changed


def test_a_qwen_style_template_renders_tools_calls_and_results(tmp_path):
    """A template in Qwen2.5's shape (tools in the system turn, <tool_call> JSON for calls,
    <tool_response> for results) renders what the chat route passes it."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from shardline.router.tool_calls import for_template

    raw = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    hf.chat_template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t.function | tojson }}{% endfor %}</tools>{% endif %}"
        "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
        '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
        "{% endfor %}{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>"
        "{% else %}[{{ m.role }}] {{ m.content }}{% endif %}{% endfor %}")
    messages = for_template([{"role": "user", "content": "weather?"},
                             {"role": "assistant", "content": "", "tool_calls": [
                                 {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                             {"role": "tool", "tool_call_id": "c", "content": "sunny"}])
    text = hf.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>sunny</tool_response>" in text and '"name": "get_weather"' in text.split("</tools>")[0]
