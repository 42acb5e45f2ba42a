"""How the process logs: text or JSON lines, each naming its feed, librdkafka's repeats folded.

- Every line logged while a source polls names it: `Runner.step` sets the source for
  its thread (`polling`), and `SourceFilter` puts it on the record (`record.feed`,
  `record.source_kind`). The text format adds "feed NAME: " in front of a message
  that does not already say so; the JSON format has a `feed` field.
- `--log-format json`: one JSON object per line, with `time`, `level`, `logger`,
  `feed`, `event` (a short stable name where the code gives one, else "log"),
  `message` and `fields` (the line's structured values). Built on python-json-logger,
  whose formatter is a plain `logging.Formatter`, so filters on the handler (such as
  one that removes secrets) apply to it as to the text format.
- librdkafka's own lines (through the "librdkafka" logger, from every client we make)
  are folded: one line per distinct condition per `FOLD_INTERVAL_S`, the next one of
  the same kind saying how many were left out. A broker outage is a line a minute, not
  twenty a second.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from streamer import redact

LIBRDKAFKA = logging.getLogger("librdkafka")
FOLD_INTERVAL_S = 60.0
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (kind, name) of the source the current thread is polling, e.g. ("feed", "main").
_SOURCE: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "cdr_streamer_source", default=None
)


@contextmanager
def polling(kind: str, name: str) -> Iterator[None]:
    """Lines logged in this block (this thread) belong to source `kind` `name`."""
    token = _SOURCE.set((kind, name))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def fields(event: str, **values: Any) -> dict[str, Any]:
    """`extra=` for a log call: a stable event name and the line's structured values."""
    return {"event": event, "fields": values}


class SourceFilter(logging.Filter):
    """Puts the polling source on each record: `record.feed`, `record.source_kind`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "feed"):
            source = _SOURCE.get()
            record.source_kind, record.feed = source if source else (None, None)
        return True


class TextFormatter(logging.Formatter):
    """The plain format; a line of a source that does not name it gets "kind NAME: " first."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        feed, kind = getattr(record, "feed", None), getattr(record, "source_kind", None)
        if feed and kind and f"{kind} {feed}" not in record.message:
            record.message = f"{kind} {feed}: {record.message}"
        return super().formatMessage(record)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, feed, event, message, fields."""

    def __init__(self) -> None:
        super().__init__(timestamp=False, json_ensure_ascii=False)

    def format(self, record: logging.LogRecord) -> str:
        # The record factory (redact.py) cleans the message; the `fields` given as `extra`
        # are set on the record after it, and JSON escapes text: clean the finished line too.
        return redact.redact(super().format(record))

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + (
            f".{int(record.msecs):03d}" + time.strftime("%z", time.localtime(record.created))
        )
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["feed"] = getattr(record, "feed", None)
        kind = getattr(record, "source_kind", None)
        if kind:
            log_data["source"] = kind
        log_data["event"] = getattr(record, "event", None) or "log"
        log_data["message"] = record.getMessage()
        values = getattr(record, "fields", None)
        log_data["fields"] = dict(values) if isinstance(values, Mapping) else {}
        if record.exc_info:
            log_data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            log_data["exception"] = record.exc_text


# "after 12ms", "3 identical error(s) suppressed": what differs between two lines of one condition.
# And "rdkafka#producer-7": each client's instance name, where every client says the same.
_VARYING = re.compile(
    r"\(after \d+ms[^)]*\)|, \d+ identical error\(s\) suppressed|\d+ms|#(producer|consumer)-\d+"
)


class FoldRepeats(logging.Filter):
    """Lets through one record per distinct condition per `interval_s`; counts the rest.

    The next record of a condition after its interval says how many were folded into it.
    """

    def __init__(
        self, interval_s: float = FOLD_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, str], tuple[float, int]] = {}  # key -> (shown at, folded)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, _VARYING.sub("", record.getMessage()))
        now = self._clock()
        with self._lock:
            shown_at, folded = self._seen.get(key, (None, 0))
            if shown_at is not None and now - shown_at < self.interval_s:
                self._seen[key] = (shown_at, folded + 1)
                return False
            if len(self._seen) > 1000:  # many distinct conditions: start the count afresh
                self._seen.clear()
            self._seen[key] = (now, 0)
        if folded and shown_at is not None:
            since = now - shown_at
            record.msg = f"{record.getMessage()} ({folded} more like it in the last {since:.0f} s)"
            record.args = ()
        return True


_fold = FoldRepeats()
if _fold not in LIBRDKAFKA.filters:
    LIBRDKAFKA.addFilter(_fold)


def setup(level: str, log_format: str = "text") -> None:
    """The root handler on stderr, in the text or JSON format; quieter third parties."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SourceFilter())
    formatter: logging.Formatter = (
        JsonLineFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Replace only a handler of ours (setup called twice in one process, as tests do);
    # others attached to the root (pytest's log capture, an embedding app's) stay.
    for old in list(root.handlers):
        if getattr(old, "_cdr_streamer", False):
            root.removeHandler(old)
    handler._cdr_streamer = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    if level != "DEBUG":
        # paramiko logs every connection and failed login at INFO, httpx every request:
        # our own lines say what matters. Both show with --log-level DEBUG.
        for name in ("paramiko", "httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
