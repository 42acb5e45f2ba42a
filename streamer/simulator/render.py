"""Rows -> response bytes in each format and variant, streamed in batches (or prerendered)."""

from __future__ import annotations

import array
import csv
import io
import itertools
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from streamer.records import FIELDS
from streamer.simulator.config import (
    DELIMITERS,
    DIAERESIS,
    NO_RECORDS_TEXT,
    NUMERIC_FIELDS,
    SimulatorConfig,
)
from streamer.simulator.data import CdrGenerator
from streamer.simulator.store import FeedQuery, FeedStore

logger = logging.getLogger("streamer.simulator")  # one name for the whole simulator

# --- rendering -------------------------------------------------------------------------------

_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?")
_UNQUOTED = "\x00broken\x00"  # stands in for the field whose quote is left open


def _php_json_string(text: str) -> str:
    """A JSON string as PHP's json_encode writes it: non-ASCII as \\uXXXX, '/' as '\\/'."""
    return json.dumps(text).replace("/", "\\/")


def _styled(row: Mapping[str, str], date_style: str, datetime_style: str) -> dict[str, str]:
    """The row's dates and UTCDateTime rewritten in the configured layout (by position, so a
    malformed date keeps its broken digits)."""
    out = dict(row)
    if date_style == "nz":
        for name in ("BillDate", "Date"):
            if name in out:
                d = out[name]
                out[name] = f"{d[8:10]}/{d[5:7]}/{d[:4]}"
    if datetime_style != "space" and "UTCDateTime" in out:
        day, _, clock = out["UTCDateTime"].partition(" ")
        out["UTCDateTime"] = {
            "iso_t": f"{day}T{clock}",
            "iso_z": f"{day}T{clock}Z",
            "offset": f"{day}T{clock}+00:00",
            "nz": f"{day[8:10]}/{day[5:7]}/{day[:4]} {clock}",
        }[datetime_style]
    return out


class Renderer:
    """Rows -> bytes for one response in one format and one set of variants."""

    def __init__(self, fmt: str, config: SimulatorConfig) -> None:
        self._fmt = fmt
        self._config = config
        self._le = config.line_ending
        self._bom = "\ufeff" if config.bom else ""
        self._encoding = config.encoding
        self._broken = frozenset(str(i) for i in config.broken_row_ids)
        self._long = frozenset(str(i) for i in config.long_row_ids)
        self._buffer = io.StringIO()
        self._writer = csv.writer(
            self._buffer,
            delimiter=DELIMITERS.get(fmt, ","),
            lineterminator=config.line_ending,
            quoting=csv.QUOTE_ALL if config.quote_all else csv.QUOTE_MINIMAL,
        )

    def _line(self, values: Iterable[str]) -> str:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(values)
        return self._buffer.getvalue()

    def _bytes(self, text: str) -> bytes:
        if self._encoding == "utf-8":
            return text.encode()
        return text.translate(DIAERESIS).encode(self._encoding, "replace")

    def preamble(self) -> bytes:
        if self._fmt == "json":
            return (self._bom + "[").encode()
        header = self._line(FIELDS) if self._config.header else ""
        return (self._bom + header).encode()

    def trailer(self) -> bytes:
        if self._fmt != "json":
            return b""
        return (self._le + "]").encode() if self._config.json_pretty else b"]"

    def empty(self) -> bytes:
        """The body without rows (HTTP 204 is the server's: then this is never sent)."""
        style = self._config.empty_style
        if style == "text":
            return NO_RECORDS_TEXT.encode()
        if self._fmt == "json":
            return b"null" if style == "null" else (self._bom + "[]").encode()
        if style == "header" and self._config.header:
            return self.preamble()
        return b""

    def row(self, row: Mapping[str, str], first: bool) -> bytes:
        cfg = self._config
        values = _styled(row, cfg.date_style, cfg.datetime_style)
        cdr_id = values.get("ID")
        if cdr_id in self._long:
            values["TextDesc1"] = "x" * cfg.long_row_chars
        broken = cdr_id in self._broken
        if self._fmt != "json":
            if not broken:
                return self._bytes(self._line([values[name] for name in FIELDS if name in values]))
            # A quote opened and never closed: the text after it has no quote, delimiter or
            # line end of its own, so the break is that quote alone.
            text = re.sub(
                r"[\"\r\n" + re.escape(DELIMITERS[self._fmt]) + "]", " ", values["TextDesc2"]
            )
            values["TextDesc2"] = _UNQUOTED
            line = self._line([values[name] for name in FIELDS if name in values])
            line = line.replace(f'"{_UNQUOTED}"', _UNQUOTED).replace(_UNQUOTED, '"' + text)
            return self._bytes(line)
        if self._encoding != "utf-8":
            values = {name: value.translate(DIAERESIS) for name, value in values.items()}
        members = [
            (
                _php_json_string(name),
                value
                if cfg.json_numbers and name in NUMERIC_FIELDS and _JSON_NUMBER.fullmatch(value)
                else _php_json_string(value),
            )
            for name, value in values.items()
        ]
        le = self._le
        if cfg.json_pretty:
            body = f",{le}".join(f"        {k}: {v}" for k, v in members)
            text = f"{le}    {{{le}{body}{le}    }}"
        else:
            text = "{" + ",".join(f"{k}:{v}" for k, v in members) + "}"
        if broken:  # the comma after the first member left out
            text = text.replace(",", " ", 1)
        separator = "" if first else ("," if cfg.json_pretty else "," + le)
        return (separator + text).encode()


@dataclass(slots=True)
class Part:
    """A piece of a response body: rendered rows (the first part opens with the preamble)."""

    pieces: list[bytes]
    trailer: bytes
    last: bool
    rows: int  # rows rendered in this part

    def data(self) -> bytes:
        return b"".join(self.pieces) + self.trailer

    def cut(self, line_ending: bytes) -> bytes:
        """Everything but the trailer, the last line's terminator and the end of the last line."""
        last = self.pieces[-1].removesuffix(line_ending)
        return b"".join(self.pieces[:-1]) + last[: len(last) // 2]


@dataclass(slots=True)
class RowCount:
    rows: int = 0


class Prerendered:
    """The backlog's rows rendered once in one format, served as slices of one buffer.

    `body` holds every row of IDs 1..high_id in order, each as the feed writes it after
    another row (in JSON with its leading separator, which the first row of a response
    leaves out); `starts[n - 1]` is where the row of ID n begins.
    """

    __slots__ = ("body", "fmt", "high_id", "renderer", "skip", "starts")

    def __init__(self, fmt: str, config: SimulatorConfig, generator: CdrGenerator) -> None:
        self.fmt = fmt
        self.high_id = config.backlog
        self.renderer = Renderer(fmt, config)
        if fmt != "json":
            self.skip = 0
        else:
            self.skip = len(b"," if config.json_pretty else ("," + config.line_ending).encode())
        body = bytearray()
        starts = array.array("q")
        row, wire_row = self.renderer.row, generator.wire_row
        for cdr_id in range(1, self.high_id + 1):
            starts.append(len(body))
            body += row(wire_row(cdr_id), False)
        starts.append(len(body))
        self.body = bytes(body)
        self.starts = starts

    def serves(self, fmt: str, query: FeedQuery, store: FeedStore, config: SimulatorConfig) -> bool:
        """True when this request's answer is a slice of the prerendered rows."""
        plain = query.date is None and not (query.calls_only or query.services_only)
        return (
            fmt == self.fmt
            and plain
            and not config.unsorted
            and store.high_id == self.high_id
            and query.from_id < self.high_id
        )

    def response(self, from_id: int, max_rows: int | None) -> tuple[bytes, memoryview, bytes, int]:
        """(preamble, rows, trailer, row count) of the answer to `fromid=from_id`."""
        last = self.high_id if max_rows is None else min(self.high_id, from_id + max_rows)
        begin = self.starts[from_id] + self.skip
        rows = memoryview(self.body)[begin : self.starts[last]]
        return self.renderer.preamble(), rows, self.renderer.trailer(), last - from_id


_Selected = tuple[int, dict[str, str]]


def batched(items: Iterator[_Selected], n: int) -> Iterator[list[_Selected]]:
    while batch := list(itertools.islice(items, n)):
        yield batch
