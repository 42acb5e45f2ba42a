"""Bytes -> rows for the Billing Feed's four formats (csv, txt, pipe, json); no I/O.

`parse_rows` takes the response body as an iterable of byte chunks, split anywhere
(even inside a UTF-8 character or a quoted field), and yields one `Row` or
`Rejection` per record while it reads: it never holds more than about one record,
so memory does not grow with the size of the response, nor with the size of a row.

Decisions the provider's spec leaves open:

* No records: an empty body, a body of whitespace only, a header row only (with
  or without trailing blank lines), an empty JSON array (``[]``, any whitespace)
  and JSON ``null`` (what PHP's json_encode makes of an empty result) yield
  nothing and raise nothing.
* Header: the first record of a delimited body is a header when more than half
  of its cells are documented field names (trimmed, any case, BOM removed).  A
  header must then name all 26 fields exactly once, in any order (else
  ``bad_header``); extra columns are ignored.  Without a header every row must
  have the 26 fields in the documented order, and a first record that has not
  is no feed response at all (``not_feed``), while a later one is a row
  rejection (``wrong_field_count``).
* Truncation: the body is ``truncated`` when it ends inside a quoted field that
  started on a line which is not a whole row, or when its last line has no line
  end and fewer fields than the header (a header cut short is truncated too).  A
  last line without a line end that has the full field count is accepted as a
  row: it is indistinguishable from a body whose writer left off the final
  newline (a cut inside the last field goes unnoticed; the typing stage still
  checks that field).  A JSON array must be closed with ``]``.
* Resynchronising: one broken record costs one rejection, never the response.
  A delimited line whose opening quote never closes (the next line is a row of
  its own: read alone, it has the row's fields, an ID, and quotes only around
  quoted fields; or the body ends after this line, which has every field) is
  ``unclosed_quote`` and reading resumes at the next line; quoted fields that
  legitimately hold line ends (csv.writer and PHP's fputcsv write them, in every
  dialect) read as before: the line after such a line end holds the field's
  closing quote inside a cell.  A JSON array element that is not valid JSON, or junk
  between elements, is ``bad_json_element`` and reading resumes at the next
  element: the next ``}`` followed by ``,`` and ``{`` (or by the closing ``]``).
  If there is none, the whole body fails (``bad_json``).
* Line ends: LF, CRLF and lone CR, as the csv module's documentation asks
  (``newline=''``).  Blank and whitespace-only lines between rows are skipped;
  a line of whitespace with the full field count (say 25 tabs) is a row.
* Encoding (`ENCODINGS`): ``utf-8`` (the default; an optional BOM), ``cp1252``,
  ``latin-1``, or ``auto``: UTF-8, and a row (JSON element) that is not UTF-8
  is read as cp1252, that row alone.  Bytes that do not decode are kept with
  ``surrogateescape``, so decoding never raises and the line and quote
  structure around them survives; a record containing them becomes a
  ``bad_encoding`` rejection.  A rejection's ``raw`` is always valid Unicode
  (undecodable bytes as U+FFFD) and its ``raw_bytes`` (or, for a row, ``raw``
  encoded with its ``codec``) are the original bytes, so a dead letter can be
  replayed exactly.  A JSON ``\\u`` escape that yields a lone surrogate is
  ``bad_encoding`` too, since it cannot be written as text.
* Limits: a record of `MAX_RECORD_CHARS` characters or more, or a delimited
  field longer than ``csv.field_size_limit()``, is one ``row_too_long``
  rejection holding the record's first `records.MAX_ROW_CHARS` characters and
  its length; the parser skips the rest while counting it (to the line end, or
  to the end of the JSON element as above), so memory stays bounded however
  long it is.  Only a first delimited record without a readable ID is
  ``not_feed`` instead: that is no feed response.
* JSON values: strings as they are, numbers as their exact source text, null as
  "", true and false as "1" and "0" (NaN and Infinity as their text).  Keys are
  matched by name, then case-insensitively; unknown keys are ignored; a missing
  documented key is ``missing_field``; an element that is not an object, or a
  field holding an object or array, is ``bad_json``.  A comma before the
  closing ``]``, data after it, or nesting too deep fail the whole body
  (``bad_json``).  A first element that is an object with keys but none of the
  documented ones (``[{"error": ...}]``) is no feed response at all
  (``not_feed``): an error object, which may echo the request.

`BadResponseError` is raised when the problem is detected, so rows before it
have already been yielded; the caller must not advance its cursor past a body
that raised.  Its ``reason`` is one of ``not_feed``, ``truncated``,
``bad_header`` or ``bad_json``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import json.scanner
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from operator import itemgetter
from typing import Any, cast

from streamer.errors import BadResponseError
from streamer.records import FIELDS, MAX_ROW_CHARS, Rejection, Row, row_class
from streamer.redact import excerpt

FORMATS: dict[str, str] = {"csv": ",", "txt": "\t", "pipe": "|"}
FORMAT_NAMES: tuple[str, ...] = ("csv", "txt", "pipe", "json")
ENCODINGS: tuple[str, ...] = ("utf-8", "cp1252", "latin-1", "auto")

# Far above any billing row (a few hundred characters), far below trouble.
MAX_RECORD_CHARS = 1 << 20

# How each encoding setting decodes a body, and the codec a row's raw text encodes back with.
_BODY_CODECS = {"utf-8": "utf-8-sig", "cp1252": "cp1252", "latin-1": "latin-1", "auto": "utf-8-sig"}
_ROW_CODECS = {"utf-8": "utf-8", "cp1252": "cp1252", "latin-1": "latin-1", "auto": "utf-8"}
_FALLBACK_CODEC = "cp1252"  # `auto`: a row that is not UTF-8 is read as Windows-1252
_FallbackRow = row_class(_FALLBACK_CODEC)
_ROW_TYPES = {encoding: row_class(codec) for encoding, codec in _ROW_CODECS.items()}
_NOT_TEXT = {
    "utf-8": "not valid UTF-8",
    "cp1252": "not valid cp1252",
    "latin-1": "not valid Latin-1",  # cannot happen: Latin-1 decodes every byte
    "auto": "neither UTF-8 nor cp1252",
}

_EXCERPT_CHARS = 80  # error messages show this much of a body; streamer.redact knows the cut
# surrogateescape turns each undecodable byte into U+DC80..U+DCFF; a JSON \u escape
# can give any lone surrogate.
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_WS = re.compile(r"[ \t\n\r]*")
# Where the next JSON array element starts, as far as it can be told without parsing
# the one before it: a "}" followed by "," and "{" (or by the closing "]").
_JSON_BOUNDARY = re.compile(r"\}[ \t\n\r]*(?:,[ \t\n\r]*(?=\{)|(?=\]))")
_JSON_ID = re.compile(r'"ID"[ \t\n\r]*:[ \t\n\r]*"?[ \t]*([0-9]{1,18})[ \t]*[",}\s]')
_BY_LOWER_NAME: dict[str, str] = {name.lower(): name for name in FIELDS}
_FIELD_SET = frozenset(FIELDS)
_DECODER = json.JSONDecoder(parse_float=str, parse_int=str, parse_constant=str, strict=False)
# One JSON value at a position: what _DECODER.raw_decode calls, without its Python wrapper.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(cast(Any, _DECODER))
# What a JSON element cut short at the end of the buffer can look like, beyond
# "Expecting ..." at the very end and "Unterminated string".
_JSON_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_JSON_NUMBER_TAILS = frozenset({".", "e", "E", "e+", "e-", "E+", "E-"})
_JSON_NUMBER_GOES_ON = _JSON_NUMBER_TAILS | {""}
_JSON_UNICODE_TAIL = re.compile(r"u[0-9a-fA-F]{0,4}\Z")


def parse_rows(
    chunks: Iterable[bytes], fmt: str, encoding: str = "utf-8"
) -> Iterator[Row | Rejection]:
    """Yield a `Row` or `Rejection` per record of a feed body in format `fmt`.

    `encoding` is one of `ENCODINGS`. Raises `BadResponseError` (when it is detected)
    if the body is not a feed response, and `ValueError` at once for a format not in
    `FORMAT_NAMES` or an encoding not in `ENCODINGS`.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    if fmt == "json":
        return _parse_json(chunks, encoding)
    try:
        delimiter = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown feed format {fmt!r}; expected one of {FORMAT_NAMES}") from None
    return _parse_delimited(chunks, delimiter, encoding)


def _excerpt(text: str, start: int = 0) -> str:
    """`text` from `start`, quoted, escaped and cut short for a message (`...` marks a cut)."""
    return excerpt(text, start, _EXCERPT_CHARS)


def _rejection(
    reason: str,
    detail: str,
    text: str,
    cdr_id: int | None,
    encoding: str,
    raw_chars: int | None = None,
) -> Rejection:
    """A rejection of source `text` (decoded with surrogateescape): valid Unicode, bytes kept."""
    codec = _ROW_CODECS[encoding]
    if text.isascii():
        return Rejection(reason, detail, text, cdr_id, None, raw_chars)
    undecodable = _SURROGATE.search(text) is not None
    if codec == "utf-8" and not undecodable:
        return Rejection(reason, detail, text, cdr_id, None, raw_chars)
    data = text.encode(codec, "surrogateescape")
    if undecodable:
        # The best effort for people; the bytes themselves go along for a replay.
        text = data.decode(_FALLBACK_CODEC if encoding == "auto" else codec, "replace")
    return Rejection(reason, detail, text, cdr_id, data, raw_chars)


def _id_of(text: object) -> int | None:
    """The CDR ID of a rejected row when it is readable, so dead letters can be traced."""
    if isinstance(text, str):
        s = text.strip()
        # The length cap keeps int() clear of its digit limit (a ValueError) on junk.
        if s.isascii() and s.isdigit() and len(s) < 20 and int(s) > 0:
            return int(s)
    return None


def _too_long(text: str) -> BadResponseError:
    return BadResponseError(
        f"not a billing feed response: a record of {MAX_RECORD_CHARS} characters or more, "
        f"starting {_excerpt(text)}",
        reason="not_feed",
    )


def _too_long_detail(chars: int) -> str:
    return f"row of {chars} characters (at most {MAX_ROW_CHARS}); reading resumed after it"


# --- delimited formats ------------------------------------------------------------


class _ChunkStream(io.BufferedIOBase):
    """The body's chunks as a read-only binary stream, for io.TextIOWrapper to decode."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._rest = memoryview(b"")

    @property
    def name(self) -> str:  # io.TextIOWrapper's buffer protocol has one
        return "<billing feed body>"

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1, /) -> bytes:
        data = self._rest
        while not data:  # an empty chunk must not read as the end of the body
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            data = memoryview(chunk)
        if 0 <= size < len(data):
            self._rest = data[size:]
            return bytes(data[:size])
        self._rest = memoryview(b"")
        return bytes(data)

    def read(self, size: int | None = -1, /) -> bytes:
        return self.read1(-1 if size is None else size)


class _ResyncError(Exception):
    """Internal: the record being read is `rejection`; reading resumes at `pushback`, then on."""

    def __init__(self, rejection: Rejection, pushback: list[str]) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection
        self.pushback = pushback


def _cells_of(text: str, delimiter: str) -> list[str]:
    """The cells of the first record of `text` read on its own (the rare paths only)."""
    try:
        return next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error:
        return []


class _LineSource:
    """Decoded lines for csv.reader, keeping the ones the current record is made of.

    csv.reader pulls lines lazily and never reads ahead, so the lines pulled since
    the last record are exactly the source text of the next one. A line pulled while
    `taken` holds lines is a quoted field's continuation; if it is a row of its own (or
    starts one), the quote was never closed, and the record is cut short there
    (`_ResyncError`). A record reaching MAX_RECORD_CHARS is cut short too, the rest of
    its line skipped. After either, `lines()` starts again with a new csv.reader.
    """

    __slots__ = (
        "_readline", "codec", "delimiter", "encoding", "ended", "id_index", "pushback",
        "started", "taken", "width",
    )  # fmt: skip

    def __init__(self, chunks: Iterable[bytes], delimiter: str, encoding: str) -> None:
        text = io.TextIOWrapper(
            _ChunkStream(chunks),
            encoding=_BODY_CODECS[encoding],
            errors="surrogateescape",
            newline="",
        )
        self._readline = partial(text.readline, MAX_RECORD_CHARS)
        self.delimiter = delimiter
        self.encoding = encoding
        self.codec = _ROW_CODECS[encoding]
        self.taken: list[str] = []
        self.pushback: list[str] = []  # lines to read again before the body's next ones
        # Set when csv.reader asks for a line past the end: only inside a quoted field.
        self.ended = False
        # The layout's, once known (`started`): what a whole row is.
        self.started = False
        self.width = len(FIELDS)
        self.id_index = 0

    def lines(self) -> Iterator[str]:
        readline = iter(self._readline, "")
        pending, self.pushback = self.pushback, []
        taken = self.taken
        size = 0
        for line in chain(pending, readline) if pending else readline:
            if taken:
                size += len(line)
                if size >= MAX_RECORD_CHARS:
                    raise self.cut_long(line)
                if self._starts_row(line):
                    raise _ResyncError(self._unclosed(), [line])
            else:
                size = len(line)
                if size >= MAX_RECORD_CHARS:
                    raise self.cut_long(line)
            taken.append(line)
            yield line
        self.ended = True

    def _starts_row(self, line: str) -> bool:
        """Whether `line` read on its own is a clean row, or most of one cut in quotes.

        Clean: an ID where the layout has it, and a quote only around a quoted field (a
        quoted field's continuation holds its closing quote in the middle of a cell).
        Cut in quotes: a later field holds a line end; half the row must come before it.
        """
        cells = _cells_of(line, self.delimiter)
        if len(cells) <= self.id_index or _id_of(cells[self.id_index]) is None:
            return False
        # Read alone, a line that ends inside quotes keeps its line end in its last cell.
        if cells[-1].endswith(("\n", "\r")):
            whole = self.width // 2 <= len(cells) < self.width
            cells = cells[:-1]
        else:
            whole = len(cells) == self.width
        return whole and all(
            '"' not in cell or '"' + cell.replace('"', '""') + '"' in line for cell in cells
        )

    def cdr_id_of(self, text: str) -> int | None:
        """The ID of the record `text` starts with, read on its own, if it is readable."""
        cells = _cells_of(text, self.delimiter)
        return _id_of(cells[self.id_index]) if self.id_index < len(cells) else None

    def _unclosed(self) -> Rejection:
        return _rejection(
            "unclosed_quote",
            "a quoted field is not closed before the next row; reading resumed there",
            "".join(self.taken).rstrip("\r\n"),
            self.cdr_id_of(self.taken[0]),
            self.encoding,
        )

    def cut_long(self, line: str = "") -> _ResyncError:
        """The record so far (`taken` and `line`) is too long: skip to its end, counting.

        Its end is a line end outside quotes (an even count of quotes so far: csv
        doubles a quote inside a field), or a line that starts a row of its own.
        """
        text = "".join(self.taken) + line
        chars = len(text)
        head = text[:MAX_ROW_CHARS]
        quotes = text.count('"')
        del text
        cdr_id = self.cdr_id_of(head)
        if cdr_id is None and not self.started:
            raise _too_long(head)  # a first record without an ID: this is no feed response
        pushback = []
        last = line or self.taken[-1]
        while last[-1] not in "\r\n" or quotes % 2:
            more = self._readline()
            if not more:
                break
            if last[-1] in "\r\n" and self._starts_row(more):
                pushback.append(more)
                break
            quotes += more.count('"')
            chars += len(more)
            last = more
        chars -= len(last) - len(last.rstrip("\r\n"))
        rejection = _rejection(
            "row_too_long", _too_long_detail(chars), head.rstrip("\r\n"), cdr_id, self.encoding,
            raw_chars=chars,
        )  # fmt: skip
        return _ResyncError(rejection, pushback)

    def unclosed_at_end(self) -> Rejection | None:
        """At the body's end inside quotes: a rejection if the quote's line is a whole row.

        Such a line has its line end and at least the row's field count when its quote
        is taken literally; a body cut short inside a quoted field has not. The lines
        after it are read again.
        """
        first = self.taken[0]
        line = first.rstrip("\r\n")
        if len(line) == len(first) or line.count(self.delimiter) + 1 < self.width:
            return None
        self.pushback = self.taken[1:]
        self.ended = False
        return _rejection(
            "unclosed_quote",
            "a quoted field is not closed before the end of the body",
            line,
            self.cdr_id_of(first),
            self.encoding,
        )


@dataclass(frozen=True, slots=True)
class _Layout:
    """How the cells of a delimited row map to the documented fields."""

    names: tuple[str, ...]  # the documented name of each kept column, in column order
    width: int  # cells in every row
    pick: Callable[[list[str]], tuple[str, ...]] | None  # the kept columns, if not all
    id_index: int


_DOCUMENTED = _Layout(FIELDS, len(FIELDS), None, 0)


def _header_layout(cells: list[str], raw: str, cut_short: bool) -> _Layout | None:
    """The layout a header row gives, or None if the record is not a header."""
    names = [_BY_LOWER_NAME.get(cell.replace("\ufeff", "").strip().lower()) for cell in cells]
    known = [name for name in names if name is not None]
    if len(known) * 2 <= len(cells):
        return None
    missing = [name for name in FIELDS if name not in known]
    if missing and cut_short:
        raise BadResponseError(
            f"truncated response: the body ends inside the header row {_excerpt(raw)}",
            reason="truncated",
        )
    if missing or len(set(known)) != len(known):
        twice = sorted({name for name in known if known.count(name) > 1})
        raise BadResponseError(
            f"bad header row: missing {missing}, repeated {twice}: {_excerpt(raw)}",
            reason="bad_header",
        )
    kept = [i for i, name in enumerate(names) if name is not None]
    pick = None if len(kept) == len(cells) else itemgetter(*kept)
    return _Layout(tuple(known), len(cells), pick, names.index("ID"))


def _first_layout(cells: list[str], raw: str, terminated: bool, ended: bool) -> _Layout | None:
    """The layout the first record sets: a header's (returned) or the documented order (None)."""
    layout = _header_layout(cells, raw, cut_short=ended or not terminated)
    if layout is None and len(cells) != len(FIELDS):
        raise BadResponseError(
            f"not a billing feed response: the first record is neither a header nor a row of "
            f"{len(FIELDS)} fields ({len(cells)} field(s)): {_excerpt(raw)}",
            reason="not_feed",
        )
    if layout is not None and ended:
        raise _ends_in_quotes(raw)
    return layout


def _ends_in_quotes(raw: str) -> BadResponseError:
    return BadResponseError(
        f"truncated response: the body ends inside a quoted field of {_excerpt(raw)}",
        reason="truncated",
    )


def _fallback_text(raw: str, encoding: str) -> str | None:
    """`auto`: a row that is not UTF-8 read as cp1252 instead; None if that fails too."""
    if encoding != "auto":
        return None
    text = raw.encode("utf-8", "surrogateescape").decode(_FALLBACK_CODEC, "surrogateescape")
    return None if _SURROGATE.search(text) else text


def _misfit(
    cells: list[str], raw: str, terminated: bool, layout: _Layout, encoding: str
) -> Rejection | None:
    """A row with the wrong number of cells (the rare path); None for a whitespace line."""
    if raw.isspace():
        return None
    cdr_id = _id_of(cells[layout.id_index]) if layout.id_index < len(cells) else None
    if not terminated and len(cells) < layout.width:
        raise BadResponseError(
            f"truncated response: the last line has no line end and {len(cells)} of "
            f"{layout.width} fields: {_excerpt(raw)}",
            reason="truncated",
        )
    if not raw.isascii() and _SURROGATE.search(raw) and _fallback_text(raw, encoding) is None:
        detail = f"the row is {_NOT_TEXT[encoding]}"
        return _rejection("bad_encoding", detail, raw, cdr_id, encoding)
    detail = f"{len(cells)} fields, expected {layout.width}"
    return _rejection("wrong_field_count", detail, raw, cdr_id, encoding)


def _undecodable(cells: list[str], raw: str, layout: _Layout, encoding: str) -> Row | Rejection:
    """A whole row with bytes that did not decode: `auto` reads it as cp1252, else rejected."""
    text = _fallback_text(raw, encoding)
    if text is not None:
        # The same cells: every byte that can be a delimiter, quote or line end is ASCII,
        # which both codecs decode alike, so only the non-ASCII text in cells changes.
        fixed = [c.encode("utf-8", "surrogateescape").decode(_FALLBACK_CODEC) for c in cells]
        kept = fixed if layout.pick is None else layout.pick(fixed)
        return _FallbackRow(dict(zip(layout.names, kept, strict=True)), text)
    cdr_id = _id_of(cells[layout.id_index])
    return _rejection("bad_encoding", f"the row is {_NOT_TEXT[encoding]}", raw, cdr_id, encoding)


def _parse_delimited(
    chunks: Iterable[bytes], delimiter: str, encoding: str
) -> Iterator[Row | Rejection]:
    source = _LineSource(chunks, delimiter, encoding)
    taken = source.taken
    make_row = row_class(source.codec)
    layout: _Layout | None = None
    while True:
        reader = csv.reader(source.lines(), delimiter=delimiter)
        try:
            for cells in reader:
                text = taken[0] if len(taken) == 1 else "".join(taken)
                if source.ended:
                    # The body ends inside a quoted field: a quote never closed, or a cut.
                    unclosed = source.unclosed_at_end()
                    taken.clear()
                    if unclosed is not None:
                        yield unclosed
                        break  # read the lines after it again, with a new reader
                    if layout is not None:
                        raise _ends_in_quotes(text.rstrip("\r\n"))
                else:
                    taken.clear()
                if not cells:  # a blank line
                    continue
                # A line can hold CR or LF only at its end, and a record's last line ends
                # with its line end (or nothing), so this strips exactly the line end.
                raw = text.rstrip("\r\n")
                if layout is None:
                    if raw.isspace():
                        continue
                    first = _first_layout(cells, raw, len(raw) != len(text), source.ended)
                    source.started = True
                    if first is not None:
                        layout = first
                        source.width, source.id_index = layout.width, layout.id_index
                        continue
                    if source.ended:
                        raise _ends_in_quotes(raw)
                    layout = _DOCUMENTED
                if len(cells) != layout.width:
                    rejection = _misfit(cells, raw, len(raw) != len(text), layout, encoding)
                    if rejection is not None:
                        yield rejection
                    continue
                if not raw.isascii() and _SURROGATE.search(raw):
                    yield _undecodable(cells, raw, layout, encoding)
                    continue
                if layout.pick is None:
                    yield make_row(dict(zip(layout.names, cells, strict=True)), raw)
                else:
                    yield make_row(dict(zip(layout.names, layout.pick(cells), strict=True)), raw)
            else:
                return
        except _ResyncError as resync:
            taken.clear()
            source.pushback = resync.pushback
            yield resync.rejection
        except csv.Error as exc:
            # Only a field over csv.field_size_limit() gets here: the reader is not strict.
            # Its line was read whole already; the record is skipped to its end.
            head = "".join(taken)[:MAX_ROW_CHARS]
            if not source.started and source.cdr_id_of(head) is None:
                raise BadResponseError(
                    f"not a billing feed response: {exc} (an unclosed quote?) after "
                    f"{_excerpt(head)}",
                    reason="not_feed",
                ) from exc
            cut = source.cut_long()
            taken.clear()
            source.pushback = cut.pushback
            yield cut.rejection


# --- JSON -------------------------------------------------------------------------


class _TooLongError(Exception):
    """Internal: the element being read reached MAX_RECORD_CHARS."""


class _JsonText:
    """The decoded JSON body: `buf[pos:]` is the text not yet consumed, about one element."""

    __slots__ = ("_broken", "_chunks", "_decode", "buf", "dropped", "eof", "pos")

    def __init__(self, chunks: Iterable[bytes], encoding: str) -> None:
        self._chunks = iter(chunks)
        decoder = codecs.getincrementaldecoder(_BODY_CODECS[encoding])
        self._decode = decoder(errors="surrogateescape").decode
        self.buf = ""
        self.pos = 0
        self.dropped = 0  # characters of the body before buf[0]
        self.eof = False
        # The chunks' error (the body broke off), held until the text before it is used:
        # which elements come out before a break must not depend on the chunks' sizes.
        self._broken: Exception | None = None

    def pull(self, at_least: int = 1) -> bool:
        """Append `at_least` more characters (fewer at the end), dropping `buf[:pos]`.

        False when the body has no more text; `_TooLongError` when `buf[pos:]` is
        MAX_RECORD_CHARS long already.
        """
        if len(self.buf) - self.pos >= MAX_RECORD_CHARS:
            raise _TooLongError
        return self._read(at_least)

    def _read(self, at_least: int) -> bool:
        parts = [self.buf[self.pos :]]
        added = 0
        while added < at_least and not self.eof:
            if self._broken is not None:
                if added:
                    break  # the text before the break first; the error at the next read
                raise self._broken
            text = self._next_text()
            if text is None:
                continue
            parts.append(text)
            added += len(text)
        if not added:
            return False
        self.buf = "".join(parts)
        self.dropped += self.pos
        self.pos = 0
        return True

    def _next_text(self) -> str | None:
        """The next chunk's text (`eof` set at the end); None when the chunks broke off,
        their error held in `_broken` for the next read."""
        try:
            chunk = next(self._chunks, None)
        except Exception as exc:
            self._broken = exc
            return None
        if chunk is None:
            self.eof = True
            return self._decode(b"", True)
        return self._decode(chunk)

    def next_char(self) -> str | None:
        """Skip whitespace; the character now at `pos`, or None at the end of the body."""
        while True:
            buf, pos = self.buf, self.pos
            if pos < len(buf) and buf[pos] not in " \t\n\r":
                return buf[pos]
            match = _JSON_WS.match(buf, pos)
            self.pos = match.end() if match else pos
            if self.pos < len(buf):
                return buf[self.pos]
            if not self.pull():
                return None

    def excerpt(self, before: int = 0, at: int | None = None) -> str:
        """The text from `at` in `buf` (or `before` characters ahead of `pos`), for a message.

        Enough of the body is read for a whole excerpt first, and the `...` before it
        says whether the body has text before it (not `buf`), so that a message never
        depends on where the chunks happened to end.
        """
        start = max(0, self.pos - before) if at is None else at
        while len(self.buf) - start <= _EXCERPT_CHARS and not self.eof and self._broken is None:
            text = self._next_text()  # a break is raised at the next read, after this message
            if text is not None:
                self.buf += text
        return excerpt(self.buf, start, _EXCERPT_CHARS, cut_before=self.dropped + start > 0)

    def skip(self) -> tuple[str, int] | None:
        """Skip from `pos` to the next element boundary (`_JSON_BOUNDARY`), holding little.

        Returns the start of the skipped text (at most MAX_ROW_CHARS) and its length,
        with `pos` at the next element or the closing `]`; None (all skipped) if the
        body ends first.
        """
        head: list[str] = []
        kept = skipped = 0
        start = self.pos
        while True:
            buf = self.buf
            match = _JSON_BOUNDARY.search(buf, start)
            if match:
                end = match.start() + 1
            else:
                # A boundary can still begin at the last "}": kept for the next search.
                end = buf.rfind("}", start)
                if end < 0 or len(buf) - end > MAX_RECORD_CHARS:
                    end = len(buf)
            if kept < MAX_ROW_CHARS:
                head.append(buf[self.pos : min(end, self.pos + MAX_ROW_CHARS - kept)])
                kept += len(head[-1])
            skipped += end - self.pos
            self.pos = end
            if match:
                self.pos = match.end()
                return "".join(head), skipped
            if not self._read(1):
                return None
            start = 0

    def after_skip(self) -> str | None:
        """The next element's first character after `skip`, consuming a closing `]`."""
        char = self.next_char()
        if char == "]":
            self.pos += 1
        return char


def _cut_short(exc: json.JSONDecodeError, buf: str) -> bool:
    """Whether a decoding error is just the element running past the end of `buf`."""
    rest = len(buf) - exc.pos
    if rest == 0 or exc.msg.startswith("Unterminated string"):
        return True
    if rest > len("-Infinity"):
        return False
    tail = buf[exc.pos :]
    if exc.msg == "Expecting value":
        return any(literal.startswith(tail) for literal in _JSON_LITERALS)
    if exc.msg == "Expecting ',' delimiter":
        return tail in _JSON_NUMBER_TAILS
    if exc.msg.startswith("Invalid \\uXXXX escape"):
        return _JSON_UNICODE_TAIL.match(tail) is not None
    return False


def _json_kind(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string or number"  # numbers arrive as their text
    if value is None:
        return "null"
    return "boolean"


class _NotAValueError(Exception):
    """Internal: a JSON field holds an object or an array."""


def _json_text(value: object) -> str:
    """A non-string JSON value as field text (numbers are already their source text)."""
    if value is None:
        return ""
    if value is True:
        return "1"
    if value is False:
        return "0"
    raise _NotAValueError(_json_kind(value))


def _has_a_field(obj: dict[str, Any]) -> bool:
    """Whether a JSON object has any documented key (matched as `_json_row` matches)."""
    return any(key.strip().lower() in _BY_LOWER_NAME for key in obj)


def _json_id(text: str) -> int | None:
    """The ID in the text of an element that could not be parsed, if it can be seen."""
    match = _JSON_ID.search(text)
    return _id_of(match[1]) if match else None


def _json_fallback(raw: str) -> Row | Rejection:
    """`auto`: an element that is not UTF-8, read again as cp1252."""
    text = raw.encode("utf-8", "surrogateescape").decode(_FALLBACK_CODEC, "surrogateescape")
    if _SURROGATE.search(text):
        detail = f"the element is {_NOT_TEXT['auto']}"
        return _rejection("bad_encoding", detail, raw, _json_id(raw), "auto")
    # The same structure: JSON's syntax is ASCII, which both codecs decode alike.
    element, _ = _DECODER.raw_decode(text)
    return _json_row(element, text, _FALLBACK_CODEC)


def _json_row(element: object, raw: str, encoding: str) -> Row | Rejection:
    # The usual element: the 26 keys in order, every value a string without a lone
    # surrogate. Such values are the whole row (a surrogate, from a byte that was not
    # text or from a \\uD800-\\uDFFF escape, can only be in a value: the keys are the
    # documented names, and anything outside strings would not have decoded).
    if type(element) is dict and tuple(element) == FIELDS:
        try:
            text = "".join(element.values())  # TypeError unless every value is a string
        except TypeError:
            return _json_row_checked(element, raw, encoding)
        if text.isascii() or not _SURROGATE.search(text):
            return _ROW_TYPES[encoding](element, raw)
    return _json_row_checked(element, raw, encoding)


def _json_row_checked(element: object, raw: str, encoding: str) -> Row | Rejection:
    if not raw.isascii() and _SURROGATE.search(raw):
        if encoding == "auto":
            return _json_fallback(raw)
        cdr_id = _id_of(element.get("ID")) if isinstance(element, dict) else None
        detail = f"the element is {_NOT_TEXT[encoding]}"
        return _rejection("bad_encoding", detail, raw, cdr_id, encoding)
    if not isinstance(element, dict):
        detail = f"an array element is a JSON {_json_kind(element)}"
        return _rejection("bad_json", detail, raw, None, encoding)
    obj: dict[str, Any] = element
    cdr_id = _id_of(obj.get("ID"))
    if not obj.keys() >= _FIELD_SET:
        obj = {key.strip().lower(): value for key, value in obj.items()}
        missing = [name for name in FIELDS if name.lower() not in obj]
        if missing:
            detail = f"missing field(s) {', '.join(missing)}"
            return _rejection("missing_field", detail, raw, cdr_id, encoding)
        obj = {name: obj[name.lower()] for name in FIELDS}
    try:
        values = {
            name: value if type(value := obj[name]) is str else _json_text(value) for name in FIELDS
        }
    except _NotAValueError as exc:
        detail = f"a field holds a JSON {exc}, not a value"
        return _rejection("bad_json", detail, raw, cdr_id, encoding)
    # Only a \uD800-\uDFFF escape can put a surrogate in text that decoded without one.
    if ("\\ud" in raw or "\\uD" in raw) and _SURROGATE.search("".join(values.values())):
        detail = "a \\u escape gives a lone surrogate, which is not a character"
        return _rejection("bad_encoding", detail, raw, cdr_id, encoding)
    return _ROW_TYPES[encoding](values, raw)


def _skipped(text: _JsonText, reason: str, detail: str, encoding: str) -> Rejection | None:
    """The element at `pos` skipped to the next boundary, as a rejection; None at the end."""
    skip = text.skip()
    if skip is None:
        return None
    head, chars = skip
    raw_chars = chars if chars > len(head) else None
    if reason == "row_too_long":
        detail = _too_long_detail(chars)
    return _rejection(reason, detail, head, _json_id(head), encoding, raw_chars)


def _parse_json(
    chunks: Iterable[bytes], encoding: str, *, continued: bool = False
) -> Iterator[Row | Rejection]:
    """`continued`: the array's first element is not the body's (streamer/workers.py
    parses a block of a body as ``[`` + its elements): no `not_feed` check for it."""
    text = _JsonText(chunks, encoding)
    scan = _SCAN
    first = text.next_char()
    if first is None:
        return
    if first != "[":
        while len(text.buf) - text.pos < _EXCERPT_CHARS and text.pull():
            pass
        if text.eof and text.buf[text.pos :].rstrip(" \t\n\r") == "null":
            return  # json_encode(null): PHP's answer when a query found nothing
        kind = "a JSON object" if first == "{" else "no JSON array"
        raise BadResponseError(
            f"not a billing feed response: {kind}, {text.excerpt()}", reason="not_feed"
        )
    text.pos += 1
    char = text.next_char()
    if char == "]":
        text.pos += 1
    first_element = not continued
    while char != "]":
        if char is None:
            raise BadResponseError(
                f"truncated response: the JSON array is not closed, the body ends with "
                f"{text.excerpt(at=max(0, len(text.buf) - _EXCERPT_CHARS))}",
                reason="truncated",
            )
        try:
            try:
                try:
                    element, end = scan(text.buf, text.pos)
                except StopIteration as stop:  # what raw_decode turns into this error
                    raise json.JSONDecodeError("Expecting value", text.buf, stop.value) from None
            except json.JSONDecodeError as exc:
                if not _cut_short(exc, text.buf):
                    # A broken element is one rejection; reading resumes after it.
                    failure = BadResponseError(
                        f"bad JSON: {exc.msg} at {text.excerpt(at=max(text.pos, exc.pos - 40))}",
                        reason="bad_json",
                    )
                    detail = f"{exc.msg} at character {exc.pos - text.pos} of the element"
                    broken = _skipped(text, "bad_json_element", detail, encoding)
                    if broken is None:
                        raise failure from exc
                    yield broken
                    char = text.after_skip()
                    continue
                # Each retry decodes the element from its start, so wait for it to double:
                # tiny chunks must not make a long element cost quadratic time.
                if text.pull(at_least=len(text.buf) - text.pos):
                    continue
                char = None
                continue
            except RecursionError as exc:  # the C scanner recurses once per nesting level
                raise BadResponseError(
                    f"bad JSON: arrays or objects nested too deep at {text.excerpt()}",
                    reason="bad_json",
                ) from exc
            # A number that reaches the end of the text ("12", "1.", "1e+") may go on in
            # the next chunk: only the next chunk, or the end of the body, tells.
            if (
                type(element) is str
                and text.buf[text.pos] != '"'
                and len(text.buf) - end <= 2
                and text.buf[end:] in _JSON_NUMBER_GOES_ON
            ):
                if text.pull():
                    continue
                if end < len(text.buf):
                    char = None
                    continue
        except _TooLongError:
            # An element too long to hold is skipped to its end, counted.
            long = _skipped(text, "row_too_long", "", encoding)
            if long is None:
                raise BadResponseError(
                    f"truncated response: the body ends inside a JSON element of "
                    f"{MAX_RECORD_CHARS} characters or more",
                    reason="truncated",
                ) from None
            yield long
            char = text.after_skip()
            continue
        if end - text.pos >= MAX_RECORD_CHARS:
            chars = end - text.pos
            head = text.buf[text.pos : text.pos + MAX_ROW_CHARS]
            cdr_id = _id_of(element.get("ID")) if isinstance(element, dict) else None
            text.pos = end
            yield _rejection("row_too_long", _too_long_detail(chars), head, cdr_id, encoding, chars)
        else:
            buf = text.buf
            raw = buf[text.pos : end]
            text.pos = end
            if first_element and type(element) is dict and element and not _has_a_field(element):
                # {"error": ..., "request": {...}}: an error object, often echoing the
                # request (and its password), not a billing row to dead-letter.
                raise BadResponseError(
                    "not a billing feed response: the first element has none of the "
                    f"documented fields: {_excerpt(raw)}",
                    reason="not_feed",
                )
            yield _json_row(element, raw, encoding)
            # The usual separator, a comma then the next element within this buffer, read
            # in place; anything else (the end, "]", a comma before "]") the careful way.
            if buf[end : end + 1] == ",":
                at = end + 1
                if buf[at : at + 1] != "{":
                    at = _JSON_WS.match(buf, at).end()  # type: ignore[union-attr]  # * matches
                char = buf[at : at + 1]
                if char and char != "]":
                    first_element = False
                    text.pos = at
                    continue
        first_element = False
        char = text.next_char()
        if char == ",":
            text.pos += 1
            char = text.next_char()
            if char == "]":
                raise BadResponseError(
                    f"bad JSON: a comma before the closing ], {text.excerpt(before=20)}",
                    reason="bad_json",
                )
        elif char == "]":
            text.pos += 1
        elif char is not None:
            # Junk after an element is one rejection, up to the next element.
            failure = BadResponseError(
                f"bad JSON: expected , or ] after an element, found {text.excerpt()}",
                reason="bad_json",
            )
            junk = _skipped(text, "bad_json_element", "not , or ] after an element", encoding)
            if junk is None:
                raise failure
            yield junk
            char = text.after_skip()
    if text.next_char() is not None:
        raise BadResponseError(
            f"bad JSON: data after the closing ], {text.excerpt()}", reason="bad_json"
        )
