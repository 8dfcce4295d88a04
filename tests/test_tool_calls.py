"""Tool calling on the chat route, without a cluster (tests/test_structured_outputs_cluster.py runs
it end to end): tool_choice becomes the right constraint, the generated text the right tool_calls,
whole or streamed, and bad tools / tool_choice are errors naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from shardline.router.tool_calls import ToolPlan
from shardline.worker.engine.params import RequestError

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


@pytest.mark.parametrize("choice, text", [
    ("auto", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'),
    ("auto", "No tools needed: <tool is a word>"),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Oslo"}'),
])
def test_streamed_deltas_reassemble_to_the_whole_message(choice, text):
    whole_plan, _ = ToolPlan.from_request([WEATHER], choice, None)
    whole, whole_finish = whole_plan.message(text, "stop")
    plan, _ = ToolPlan.from_request([WEATHER], choice, None)
    deltas = [plan.delta(0, text[i:i + 3]) for i in range(0, len(text), 3)]
    owed, finish = plan.final_delta(0, "stop")
    deltas.append(owed)
    content = "".join(d.get("content", "") for d in deltas if d)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in (d or {}).get("tool_calls", []):
            slot = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            slot["name"] += c.get("function", {}).get("name") or ""
            slot["arguments"] += c.get("function", {}).get("arguments") or ""
    assert finish == whole_finish
    assert (content or None) == whole["content"]
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in whole.get("tool_calls", [])]


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
