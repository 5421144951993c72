"""``extproc.logs``: JSON lines with the stream id as a field, the text format, boto3 capped at
INFO; and what a ``StreamProcessor`` logs while it blocks and masks: no prompt, answer or
matched text, every record tagged with its stream, nothing per chunk at INFO."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.domain.values import InputCheck, StreamMode
from extproc.observe.audit import AuditLog
from extproc.observe.logs import (
    AUDIT_LOGGER,
    QUIET_LOGGERS,
    LogFormat,
    bind_stream,
    configure_logging,
    make_handler,
    unbind_stream,
)
from tests.support import FakeGuardrail
from tests.unit.test_metrics import run_stream


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in (*QUIET_LOGGERS, AUDIT_LOGGER)}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def logger_to(buffer: io.StringIO, fmt: LogFormat = LogFormat.JSON) -> logging.Logger:
    logger = logging.getLogger(f"test.logs.{fmt.value}.{id(buffer)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(make_handler(fmt, buffer))
    return logger


# --------------------------------------------------------------------------- formats


def test_json_lines_have_timestamp_level_logger_message() -> None:
    buffer = io.StringIO()
    log = logger_to(buffer)
    log.info("checked %d windows", 3)
    (line,) = lines(buffer)
    assert set(line) == {"timestamp", "level", "logger", "message"}
    assert line["level"] == "INFO" and line["logger"] == log.name
    assert line["message"] == "checked 3 windows"
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]


def test_the_bound_stream_id_is_a_field() -> None:
    buffer = io.StringIO()
    log = logger_to(buffer)
    token = bind_stream("s12")
    try:
        log.warning("inside")
    finally:
        unbind_stream(token)
    log.warning("outside")
    inside, outside = lines(buffer)
    assert inside["stream"] == "s12" and "s12" not in inside["message"]
    assert "stream" not in outside


async def test_tasks_started_in_a_stream_inherit_its_id() -> None:
    import asyncio

    buffer = io.StringIO()
    log = logger_to(buffer)

    async def background() -> None:
        await asyncio.sleep(0)
        log.info("from a task")

    token = bind_stream("s3")
    try:
        task = asyncio.get_running_loop().create_task(background())
    finally:
        unbind_stream(token)
    await task
    assert lines(buffer)[0]["stream"] == "s3"


def test_exceptions_are_a_field() -> None:
    buffer = io.StringIO()
    log = logger_to(buffer)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (line,) = lines(buffer)
    assert line["message"] == "failed"
    assert "ValueError: boom" in line["exception"]


def test_text_format() -> None:
    buffer = io.StringIO()
    log = logger_to(buffer, LogFormat.TEXT)
    token = bind_stream("s4")
    try:
        log.info("ended (%s)", "block")
        log.info("guardrail block", extra={"audit": {"outcome": "block", "chars_released": 3}})
    finally:
        unbind_stream(token)
    first, second = buffer.getvalue().splitlines()
    assert first.endswith(f" INFO {log.name}: ended (block) stream=s4")
    assert second.endswith(
        f' INFO {log.name}: {{"outcome": "block", "chars_released": 3}} stream=s4')


@pytest.mark.parametrize(("level", "quiet"), [("DEBUG", logging.INFO),
                                              ("INFO", logging.INFO),
                                              ("WARNING", logging.WARNING)])
def test_configure_logging_caps_boto_at_info(restore_logging: None, level: str,
                                             quiet: int) -> None:
    buffer = io.StringIO()
    configure_logging(level, LogFormat.JSON, buffer)
    root = logging.getLogger()
    assert len(root.handlers) == 1 and root.level == logging.getLevelName(level)
    for name in ("boto3", "botocore", "urllib3"):
        assert logging.getLogger(name).level == quiet
    logging.getLogger("botocore.endpoint").debug("Making request ... body=secret prompt")
    logging.getLogger("extproc.test").log(logging.getLevelName(level), "kept")
    assert [line["message"] for line in lines(buffer)] == ["kept"]


def test_the_audit_trail_is_kept_at_warning_level(restore_logging: None) -> None:
    buffer = io.StringIO()
    configure_logging("WARNING", LogFormat.JSON, buffer)
    logging.getLogger("extproc.guard").info("dropped")
    logging.getLogger(AUDIT_LOGGER).info("guardrail block", extra={"audit": {"x": 1}})
    assert [line["logger"] for line in lines(buffer)] == [AUDIT_LOGGER]


# --------------------------------------------------------------------------- a stream


PROMPT = "Tell me about quebec"
MASKED = ["Alpha bravo ", "a secret ", "charlie delta"]
BLOCKED = ["Echo foxtrot ", "now forbidden ", "golf hotel"]
SECRETS = ("quebec", "Alpha", "bravo", "secret", "charlie", "delta", "Echo", "foxtrot",
           "forbidden", "golf", "hotel", "a@b.c")


@pytest.mark.parametrize("overrides", [
    {},
    {"input_check": InputCheck.PARALLEL},
    {"stream_mode": StreamMode.ASYNC},
    {"shadow": True},
    {"soft_block": True},
], ids=["sync", "parallel", "async", "shadow", "soft-block"])
async def test_blocked_and_masked_streams_log_no_text(restore_logging: None,
                                                      overrides: dict[str, Any]) -> None:
    buffer = io.StringIO()
    configure_logging("DEBUG", LogFormat.JSON, buffer)
    outcomes = []
    for stream_id, answer in (("t1", MASKED), ("t2", BLOCKED)):
        token = bind_stream(stream_id)
        try:
            run = await run_stream(FakeGuardrail(masked=("secret",), detected=("charlie",)),
                                   answer, prompt=PROMPT, audit=AuditLog(), **overrides)
        finally:
            unbind_stream(token)
        outcomes.append(run.processor.record.to_metadata().get("outcome"))
    text = buffer.getvalue()
    records = lines(buffer)
    audits = [r["audit"]["outcome"] for r in records if r["logger"] == "extproc.audit"]
    assert outcomes[0] == "pass" and outcomes[1] in ("pass", "block", "soft_block")
    assert any("mask" in outcome for outcome in audits), audits
    assert any("block" in outcome for outcome in audits), audits
    for secret in SECRETS:
        assert secret not in text, secret
    for record in records:
        if record["logger"].startswith("extproc"):
            assert record["stream"] in ("t1", "t2"), record


async def test_a_long_clean_stream_logs_nothing_at_info(restore_logging: None) -> None:
    buffer = io.StringIO()
    configure_logging("INFO", LogFormat.JSON, buffer)
    pieces = [f"word{i} " for i in range(400)]
    run = await run_stream(FakeGuardrail(), pieces)
    assert run.processor.record.to_metadata()["outcome"] == "pass"
    assert run.processor.record.to_metadata()["checks"] > 1
    assert [r for r in lines(buffer) if r["logger"].startswith("extproc")] == []
