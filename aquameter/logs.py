"""Logging setup for every ``aquameter`` command: text for a terminal, JSON lines for shippers.

Why JSON: a log shipper (journald, Loki, Elastic) otherwise has to parse free text, and a
multi-line traceback becomes many unrelated events. One JSON object per line keeps an exception
with the line that reported it. The format is a setting like any other:
``AQUAMETER_LOG_FORMAT=json`` (``Settings.log_format``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO, cast

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENV = "AQUAMETER_LOG_FORMAT"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
    ``logger``, ``message``, and ``exception`` (the formatted traceback) when there is one.

    The message is formatted (``%`` arguments applied) and any newline in it stays inside the
    JSON string, so one record is always exactly one line. ``tag`` names the process among
    several writing the same stream (an ingest worker's ``w0``): key ``process``."""

    def __init__(self, tag: str | None = None) -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.tag is not None:
            out["process"] = self.tag
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _AquameterHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second setup replaces it (the CLI's
    callback runs once per command, and tests invoke many) without touching handlers others
    attached to the root logger (pytest's capture, an embedding application's)."""


class _StderrHandler(_AquameterHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (as logging's last-resort handler does):
    test runners and ``CliRunner`` swap stderr per test and close the old one, which a handler
    bound once would keep writing to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def resolve_format(fmt: str | None = None) -> LogFormat:
    """``fmt``, else ``AQUAMETER_LOG_FORMAT``, else text; anything else is an error that names
    the choices rather than a silent fallback to text."""
    value = (fmt if fmt is not None else os.environ.get(ENV, "text")).strip().lower() or "text"
    if value not in FORMATS:
        raise ValueError(f"log format {value!r}: expected one of {', '.join(FORMATS)} ({ENV})")
    return cast(LogFormat, value)


def setup_logging(
    verbose: bool = False,
    fmt: str | None = None,
    stream: TextIO | None = None,
    *,
    level: int | None = None,
    tag: str | None = None,
) -> logging.Handler:
    """Configure the root logger: INFO when ``verbose`` else WARNING (``level`` overrides both:
    a spawned worker takes its parent's), text or JSON lines on ``stream`` (default: the current
    stderr, looked up at each record). ``tag`` marks which of several processes sharing one
    stderr wrote a record (``logger[w0]`` in text, ``"process": "w0"`` in JSON). Idempotent:
    replaces only the handler an earlier call installed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _AquameterHandler)]:
        root.removeHandler(old)
    handler = _AquameterHandler(stream) if stream is not None else _StderrHandler()
    if resolve_format(fmt) == "json":
        handler.setFormatter(JsonFormatter(tag))
    else:
        text = TEXT_FORMAT if tag is None else TEXT_FORMAT.replace("%(name)s", f"%(name)s[{tag}]")
        handler.setFormatter(logging.Formatter(text))
    root.addHandler(handler)
    if level is None:
        level = logging.INFO if verbose else logging.WARNING
    root.setLevel(level)
    return handler
