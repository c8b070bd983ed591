"""The server's log lines: text (the default) or JSON, one object per line, with the trace and span ids of the
call a line is about (when tracing is on), and the level and format changeable at run time (LogSettings).

What a line may hold: never a token (the refusal audit line names the caller's peer and the reason, not the
credential) and never image bytes (errors name sizes and shapes); tests/server/test_logs.py checks both.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

from .tracing import trace_ids

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """The classic line, with ` trace_id=... span_id=...` appended on lines about a traced call."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = getattr(record, "trace_ids", None)
        return f"{line} trace_id={ids[0]} span_id={ids[1]}" if ids else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, trace_id and span_id on lines
    about a traced call, exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = getattr(record, "trace_ids", None)
        if ids:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _TraceIds(logging.Filter):
    """Stamps each record with the ids of the call it is logged in (read where the line is made: on the event
    loop, inside the call's task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_ids = trace_ids()
        return True


def _formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: choose {' or '.join(FORMATS)}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


class LogControl:
    """The server's logging: set up once (`configure`), read and changed by LogSettings."""

    def __init__(self) -> None:
        self.format = "text"

    @property
    def level(self) -> int:
        return logging.getLogger().level

    def configure(self, level: str = "INFO", fmt: str = "text", stream=None) -> None:
        """One handler on the root logger (to stderr), in `fmt`, at `level`."""
        root = logging.getLogger()
        handler = next((h for h in root.handlers if getattr(h, "_serving", False)), None)
        if handler is None:
            handler = logging.StreamHandler(stream or sys.stderr)
            handler._serving = True
            handler.addFilter(_TraceIds())
            root.addHandler(handler)
        self.set_format(fmt)
        self.set_level(level)

    def set_level(self, level: str | int) -> None:
        if isinstance(level, str):
            if level.upper() not in LEVELS:
                raise ValueError(f"log level {level!r}: choose one of {', '.join(LEVELS)}")
            level = getattr(logging, level.upper())
        logging.getLogger().setLevel(level)

    def set_format(self, fmt: str) -> None:
        formatter = _formatter(fmt)
        for h in logging.getLogger().handlers:
            if getattr(h, "_serving", False):
                h.setFormatter(formatter)
        self.format = fmt


CONTROL = LogControl()  # the process's logging is one per process, as is the root logger
