"""Logging set-up shared by the CLI and worker processes: text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, pid, plus any ``extra`` fields."""

    _RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in self._RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger[pid]: message`` and, for session events, ``key=value`` fields."""

    def __init__(self) -> None:
        super().__init__(f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in JsonFormatter._RESERVED and not key.startswith("_")
        ]
        return f"{text} {' '.join(fields)}" if fields else text


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the ``stunturn`` loggers to stderr at ``level`` in ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger("stunturn")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
