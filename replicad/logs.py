"""Process logging for the daemons: JSON lines or plain text, to stderr.

Theory of operation
-------------------
:func:`setup_logging` installs one handler on the root logger (replacing the
one it installed before, so calling it twice is harmless). Modules log through
``logging.getLogger(__name__)`` and pass structured fields with ``extra=``:

    log.info("request", extra={"method": "GET", "route": "/healthz", "status": 200})

The JSON format writes one object per line: ``ts`` (ISO 8601, UTC), ``level``,
``logger``, ``msg``, then every ``extra`` field, then ``exc`` (the formatted
traceback) when the record carries an exception. The text format writes the
same fields as ``key=value`` pairs after the message. Nothing here knows about
secrets: callers never put tokens or request bodies in a log record.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    moment = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields).
    Values that are not JSON-serializable are written with ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TS LEVEL logger: msg key=value ...`` plus the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts += [f"{k}={v}" for k, v in _extras(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_INSTALLED: list[logging.Handler] = []  # the handler setup_logging installed, if any


def setup_logging(fmt: str, level: int = logging.INFO, *, stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr by
    default) in ``fmt`` (``"json"`` or ``"text"``).

    Raises ValueError for another ``fmt``, before changing anything. Replaces
    the handler installed by an earlier call; other handlers are left alone.
    """
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    elif fmt == "text":
        formatter = TextFormatter()
    else:
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    root = logging.getLogger()
    while _INSTALLED:
        root.removeHandler(_INSTALLED.pop())
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
    _INSTALLED.append(handler)
