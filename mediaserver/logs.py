"""The server's log output: plain text lines, or one JSON object per line (``MEDIASERVER_LOG_FORMAT=json``).

JSON is for log pipelines (Loki, Datadog, CloudWatch, Elastic): each line
is an object with ``time`` (UTC, ISO 8601, milliseconds), ``level``,
``logger`` and ``message``; ``call_sid`` when the line is about a call
(every call's lines start ``call CA…:`` or ``outbound call CA…:``), and
``exception`` with the traceback when one was logged.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "configure", "shown"]


def shown(value: str, limit: int = 64) -> str:
    """A value from a request, fit for a text log line: at most ``limit`` characters, and quoted (``repr``) when it
    holds anything unprintable -- a newline in a caller's ``From`` must not start a forged log line."""
    cut = value[:limit] + ("…" if len(value) > limit else "")
    return cut if cut.isprintable() else repr(cut)

LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_CALL = re.compile(r"(?:outbound )?call (CA[0-9a-fA-F]{32})\b")  # the call lines: "call CA…: …", "outbound call CA…: …"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        found = _CALL.match(message)
        if found is not None:
            line["call_sid"] = found.group(1)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Send every log record at ``level`` or above to stderr, as text or JSON lines (values from Settings.validated)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt.lower() == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
