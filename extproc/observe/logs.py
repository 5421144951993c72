"""Logging: JSON lines (or text) on stderr, with the stream id as a field of its own.

Owns the handler, the two formats and the per-stream binding: ``bind_stream`` sets a context
variable once when a stream starts (``extproc.transport.server``); every record logged in that
context, including from the stream's background tasks and timers (asyncio copies the context
when it creates them), carries ``stream``. Must not log anything itself, and must not add prompts,
answers or matched text to a record: callers never pass them, and boto3/botocore, which would
log request bodies at DEBUG, are capped at INFO.

A JSON line::

    {"timestamp": "2025-06-01T12:00:00.123Z", "level": "INFO", "logger": "extproc.stream.guard",
     "message": "answer ended by the guardrail (block) after 76 released characters",
     "stream": "s12"}

Audit records (``extproc.observe.audit``, logger ``extproc.audit``) carry their fields under
``audit``; in the text format the record's JSON is the message.
"""

from __future__ import annotations

import contextvars
import enum
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

#: The id of the ext_proc stream the current task works for (None outside a stream).
STREAM_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "extproc_stream_id", default=None)

#: Loggers that would log request bodies (prompts, answers) below INFO.
QUIET_LOGGERS: Final = ("boto3", "botocore", "urllib3")
#: The audit trail's logger (``extproc.audit``): INFO whatever the log level.
AUDIT_LOGGER: Final = "extproc.audit"

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFormat(enum.Enum):
    JSON = "json"
    TEXT = "text"


def bind_stream(stream_id: str) -> contextvars.Token[str | None]:
    """Bind ``stream_id`` to the current context (once, when the stream starts)."""
    return STREAM_ID.set(stream_id)


def unbind_stream(token: contextvars.Token[str | None]) -> None:
    STREAM_ID.reset(token)


def iso_timestamp(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 UTC with milliseconds, e.g. ``…T12:00:00.123Z``."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StreamFilter(logging.Filter):
    """Copies the bound stream id onto each record, in the context that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "stream", None) is None:
            record.stream = STREAM_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, stream, [audit],
    [exception]."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": iso_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        stream = getattr(record, "stream", None)
        if stream is not None:
            out["stream"] = stream
        audit = getattr(record, "audit", None)
        if audit is not None:
            out["audit"] = audit
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then ``stream=…`` when bound; audit records as JSON."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        audit = getattr(record, "audit", None)
        if audit is not None:
            record.message = json.dumps(audit, ensure_ascii=False, default=str)
        text = super().formatMessage(record)
        stream = getattr(record, "stream", None)
        return f"{text} stream={stream}" if stream is not None else text


def make_handler(fmt: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing ``fmt`` lines to ``stream`` (stderr), with the stream id filter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    handler.addFilter(StreamFilter())
    return handler


def configure_logging(level: str, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """The process's logging: one handler on the root logger; boto3 and friends at INFO or
    quieter whatever ``level`` says (at DEBUG they would log request bodies); the audit trail
    at INFO even when ``level`` is quieter."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt, stream))
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)
