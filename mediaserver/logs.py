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
import math
import re
import sys
import time
from collections.abc import Callable
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


class OncePer(logging.Filter):
    """Let one record through every ``interval_s`` (the first at once), without its traceback, counting the rest.

    For Trio's ``accept returned EMFILE ...; retrying in 0.1 seconds``, which
    a server out of file descriptors logs with a traceback ten times a second.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._next_s = -math.inf
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now < self._next_s:
            self._held += 1
            return False
        self._next_s = now + self.interval_s
        record.exc_info = record.exc_text = None
        if self._held:
            record.msg = f"{record.msg} ({self._held} more like it in the last {self.interval_s:g} s)"
            self._held = 0
        return True


def quiet_accept_errors(interval_s: float = 10.0) -> None:
    """Rate-limit Trio's accept-error lines (logger ``trio.serve_listeners``); idempotent."""
    logger = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, OncePer) for f in logger.filters):
        logger.addFilter(OncePer(interval_s))


def configure(level: str, fmt: str) -> None:
    """Send every log record at ``level`` or above to stderr, as text or JSON lines (values from Settings.validated)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt.lower() == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
