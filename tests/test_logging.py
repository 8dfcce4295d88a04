"""Structured logs: one JSON object per line with request fields; prompts stay out by default."""

from __future__ import annotations

import io
import json
import logging

import pytest

from shardline.logging import configure_logging


@pytest.fixture
def restore_shardline_logger():
    logger = logging.getLogger("shardline")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_line_has_ts_level_logger_msg_and_request_fields(restore_shardline_logger) -> None:
    out = io.StringIO()
    configure_logging(json=True, level="INFO", stream=out)
    logging.getLogger("shardline.worker.engine").info(
        "finished %s", "r1",
        extra={"request_id": "r1", "replica_group": "g0", "finish_reason": "stop",
               "prompt_tokens": 12, "completion_tokens": 3},
    )
    [entry] = lines(out)
    assert entry["msg"] == "finished r1" and entry["level"] == "INFO"
    assert entry["logger"] == "shardline.worker.engine"
    assert entry["ts"].endswith("+00:00") and "T" in entry["ts"]
    assert {k: entry[k] for k in ("request_id", "replica_group", "finish_reason", "prompt_tokens",
                                  "completion_tokens")} == {
        "request_id": "r1", "replica_group": "g0", "finish_reason": "stop",
        "prompt_tokens": 12, "completion_tokens": 3}


def test_prompts_are_dropped_unless_log_prompts_is_set(restore_shardline_logger) -> None:
    out = io.StringIO()
    configure_logging(json=True, level="INFO", stream=out)
    log = logging.getLogger("shardline.router")
    log.info("admitted", extra={"request_id": "r2", "prompt": "my secret", "messages": [{"content": "x"}]})
    configure_logging(json=True, level="INFO", log_prompts=True, stream=out)
    log.info("admitted", extra={"request_id": "r3", "prompt": "my secret"})
    hidden, shown = lines(out)
    assert "prompt" not in hidden and "messages" not in hidden and "my secret" not in json.dumps(hidden)
    assert shown["prompt"] == "my secret"


def test_text_mode_also_keeps_prompts_out(restore_shardline_logger) -> None:
    out = io.StringIO()
    configure_logging(json=False, level="DEBUG", stream=out)
    logging.getLogger("shardline.x").debug("hello", extra={"request_id": "r4", "prompt": "secret"})
    text = out.getvalue()
    assert "hello" in text and "request_id=r4" in text and "secret" not in text


def test_level_filters_and_reconfiguring_replaces_the_handler(restore_shardline_logger) -> None:
    out = io.StringIO()
    configure_logging(json=True, level="warning", stream=out)
    configure_logging(json=True, level="WARNING", stream=out)
    log = logging.getLogger("shardline.x")
    log.info("quiet")
    log.warning("loud")
    assert [e["msg"] for e in lines(out)] == ["loud"]


def test_exceptions_and_odd_values_still_give_one_json_line(restore_shardline_logger) -> None:
    out = io.StringIO()
    configure_logging(json=True, level="INFO", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("shardline.x").exception("failed", extra={"where": object()})
    [entry] = lines(out)
    assert "RuntimeError: boom" in entry["exc"] and entry["level"] == "ERROR"
    assert entry["where"].startswith("<object object")


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging(json=True, level="LOUD")


def test_engine_logs_one_json_line_per_finished_request(tmp_path):
    import io

    from shardline.worker.config import EngineConfig
    from shardline.worker.engine.engine import LLMEngine
    from shardline.worker.engine.params import SamplingParams
    from tiny_models import write_tiny_checkpoint

    write_tiny_checkpoint("llama", tmp_path)
    stream = io.StringIO()
    configure_logging(json=True, stream=stream, static_fields={"replica_group": "g1"})
    try:
        engine = LLMEngine(EngineConfig(model=str(tmp_path), num_kv_blocks=64), show_progress=False)
        engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finally:
        configure_logging(json=False)
    finished = [json.loads(line) for line in stream.getvalue().splitlines() if '"request finished"' in line]
    assert len(finished) == 2
    for entry in finished:
        assert entry["replica_group"] == "g1" and entry["finish_reason"] == "length"
        assert entry["completion_tokens"] == 3 and entry["prompt_tokens"] in (2, 3)
        assert entry["request_id"].startswith("req-")
        assert not {"prompt", "prompt_token_ids", "text"} & set(entry)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_client_values_cannot_forge_or_flood_log_lines(restore_shardline_logger, as_json: bool) -> None:
    out = io.StringIO()
    configure_logging(json=as_json, level="INFO", stream=out)
    forged = "x\n2026-11-30 00:00:00 ERROR shardline: forged" + "y" * 1_000_000
    logging.getLogger("shardline.router").info("request %s refused", forged, extra={"request_id": forged})
    text = out.getvalue()
    assert text.count("\n") == 1  # one record, one line
    assert len(text) < 3000  # a 1 MB value is cut (the cut says how long it was)
    assert "(1000045 chars)" in text
