"""Bytes -> rows for the Billing Feed's four formats (csv, txt, pipe, json); no I/O.

`parse_rows` takes the response body as an iterable of byte chunks, split anywhere
(even inside a UTF-8 character or a quoted field), and yields one `Row` or
`Rejection` per record while it reads: it never holds more than about one record,
so memory does not grow with the size of the response.

Decisions the provider's spec leaves open:

* No records: an empty body, a body of whitespace only, a header row only (with
  or without trailing blank lines) and an empty JSON array (``[]``, any
  whitespace) yield nothing and raise nothing.
* Header: the first record of a delimited body is a header when more than half
  of its cells are documented field names (trimmed, any case, BOM removed).  A
  header must then name all 26 fields exactly once, in any order (else
  ``bad_header``); extra columns are ignored.  Without a header every row must
  have the 26 fields in the documented order, and a first record that has not
  is no feed response at all (``not_feed``), while a later one is a row
  rejection (``wrong_field_count``).
* Truncation: the body is ``truncated`` when it ends inside a quoted field, or
  when its last line has no line end and fewer fields than the header (a header
  cut short is truncated too).  A last line without a line end that has the
  full field count is accepted as a row: it is indistinguishable from a body
  whose writer left off the final newline (a cut inside the last field goes
  unnoticed; the typing stage still checks that field).  A JSON array must be
  closed with ``]``.
* Line ends: LF, CRLF and lone CR, as the csv module's documentation asks
  (``newline=''``).  Blank and whitespace-only lines between rows are skipped;
  a line of whitespace with the full field count (say 25 tabs) is a row.
* Encoding: UTF-8 with an optional BOM.  Bytes that are not UTF-8 are decoded
  with ``surrogateescape``, so decoding never raises and the line and quote
  structure around them survives; a record containing them becomes a
  ``bad_encoding`` rejection whose raw text is those bytes decoded with
  ``errors="replace"``, so raw text is always valid Unicode.  A JSON ``\\u``
  escape that yields a lone surrogate is ``bad_encoding`` too, since it cannot
  be written as UTF-8.
* Limits: a record or JSON element of `MAX_RECORD_CHARS` characters or more,
  or a delimited field longer than ``csv.field_size_limit()`` (an unclosed
  quote, usually), is ``not_feed``: no billing row is that long, and the limit
  is what keeps memory bounded.
* JSON values: strings as they are, numbers as their exact source text, null as
  "", true and false as "1" and "0" (NaN and Infinity as their text).  Keys are
  matched by name, then case-insensitively; unknown keys are ignored; a missing
  documented key is ``missing_field``; an element that is not an object, or a
  field holding an object or array, is ``bad_json``.  A syntax error inside the
  array, or data after its ``]``, fails the whole body (``bad_json``): there is
  no way to find the next element again.  A first element that is an object
  with keys but none of the documented ones (``[{"error": ...}]``) is no feed
  response at all (``not_feed``): an error object, which may echo the request.

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
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from streamer.errors import BadResponseError
from streamer.records import FIELDS, Rejection, Row
from streamer.redact import excerpt

FORMATS: dict[str, str] = {"csv": ",", "txt": "\t", "pipe": "|"}
FORMAT_NAMES: tuple[str, ...] = ("csv", "txt", "pipe", "json")

# Far above any billing row (a few hundred characters), far below trouble.
MAX_RECORD_CHARS = 1 << 20

_EXCERPT_CHARS = 80  # error messages show this much of a body; streamer.redact knows the cut
# surrogateescape turns each undecodable byte into U+DC80..U+DCFF; a JSON \u escape
# can give any lone surrogate.
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_WS = re.compile(r"[ \t\n\r]*")
_BY_LOWER_NAME: dict[str, str] = {name.lower(): name for name in FIELDS}
_FIELD_SET = frozenset(FIELDS)
_DECODER = json.JSONDecoder(parse_float=str, parse_int=str, parse_constant=str, strict=False)
# What a JSON element cut short at the end of the buffer can look like, beyond
# "Expecting ..." at the very end and "Unterminated string".
_JSON_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_JSON_NUMBER_TAILS = frozenset({".", "e", "E", "e+", "e-", "E+", "E-"})
_JSON_NUMBER_GOES_ON = _JSON_NUMBER_TAILS | {""}
_JSON_UNICODE_TAIL = re.compile(r"u[0-9a-fA-F]{0,4}\Z")


def parse_rows(chunks: Iterable[bytes], fmt: str) -> Iterator[Row | Rejection]:
    """Yield a `Row` or `Rejection` per record of a feed body in format `fmt`.

    Raises `BadResponseError` (when it is detected) if the body is not a feed
    response, and `ValueError` at once for a format not in `FORMAT_NAMES`.
    """
    if fmt == "json":
        return _parse_json(chunks)
    try:
        delimiter = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown feed format {fmt!r}; expected one of {FORMAT_NAMES}") from None
    return _parse_delimited(chunks, delimiter)


def _excerpt(text: str, start: int = 0) -> str:
    """`text` from `start`, quoted, escaped and cut short for a message (`...` marks a cut)."""
    return excerpt(text, start, _EXCERPT_CHARS)


def _replaced(text: str) -> str:
    """Text decoded with surrogateescape, as errors="replace" would have decoded it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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


class _LineSource:
    """Decoded lines for csv.reader, keeping the ones the current record is made of.

    csv.reader pulls lines lazily and never reads ahead, so the lines pulled since
    the last record are exactly the source text of the next one.
    """

    __slots__ = ("_chunks", "ended", "taken")

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.taken: list[str] = []
        # Set when csv.reader asks for a line past the end: only inside a quoted field.
        self.ended = False

    def lines(self) -> Iterator[str]:
        text = io.TextIOWrapper(
            _ChunkStream(self._chunks),
            encoding="utf-8-sig",
            errors="surrogateescape",
            newline="",
        )
        readline = text.readline
        taken = self.taken
        size = 0
        while line := readline(MAX_RECORD_CHARS):
            size = size + len(line) if taken else len(line)
            if size >= MAX_RECORD_CHARS:
                raise _too_long("".join(taken) + line)
            taken.append(line)
            yield line
        self.ended = True


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


def _misfit(cells: list[str], raw: str, terminated: bool, layout: _Layout) -> Rejection | None:
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
    if not raw.isascii() and _SURROGATE.search(raw):
        return Rejection("bad_encoding", "the row is not valid UTF-8", _replaced(raw), cdr_id)
    return Rejection(
        "wrong_field_count",
        f"{len(cells)} fields, expected {layout.width}",
        raw,
        cdr_id,
    )


def _parse_delimited(chunks: Iterable[bytes], delimiter: str) -> Iterator[Row | Rejection]:
    source = _LineSource(chunks)
    taken = source.taken
    reader = csv.reader(source.lines(), delimiter=delimiter)
    layout: _Layout | None = None
    try:
        for cells in reader:
            text = taken[0] if len(taken) == 1 else "".join(taken)
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
                if first is not None:
                    layout = first
                    continue
                layout = _DOCUMENTED
            if source.ended:
                raise _ends_in_quotes(raw)
            if len(cells) != layout.width:
                rejection = _misfit(cells, raw, len(raw) != len(text), layout)
                if rejection is not None:
                    yield rejection
                continue
            if not raw.isascii() and _SURROGATE.search(raw):
                cdr_id = _id_of(cells[layout.id_index])
                yield Rejection(
                    "bad_encoding", "the row is not valid UTF-8", _replaced(raw), cdr_id
                )
                continue
            if layout.pick is None:
                yield Row(dict(zip(layout.names, cells, strict=True)), raw)
            else:
                yield Row(dict(zip(layout.names, layout.pick(cells), strict=True)), raw)
    except csv.Error as exc:
        # Only a field over csv.field_size_limit() gets here: the reader is not strict.
        raise BadResponseError(
            f"not a billing feed response: {exc} (an unclosed quote?) after "
            f"{_excerpt(''.join(taken))}",
            reason="not_feed",
        ) from exc


# --- JSON -------------------------------------------------------------------------


class _JsonText:
    """The decoded JSON body: `buf[pos:]` is the text not yet consumed, about one element."""

    __slots__ = ("_chunks", "_decode", "buf", "eof", "pos")

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._decode = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape").decode
        self.buf = ""
        self.pos = 0
        self.eof = False

    def pull(self, at_least: int = 1) -> bool:
        """Append `at_least` more characters (fewer at the end), dropping `buf[:pos]`.

        False when the body has no more text.
        """
        if len(self.buf) - self.pos >= MAX_RECORD_CHARS:
            raise _too_long(self.buf[self.pos :])
        parts = [self.buf[self.pos :]]
        added = 0
        while added < at_least and not self.eof:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                text = self._decode(b"", True)
            else:
                text = self._decode(chunk)
            parts.append(text)
            added += len(text)
        if not added:
            return False
        self.buf = "".join(parts)
        self.pos = 0
        return True

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

    def excerpt(self, before: int = 0) -> str:
        """The text from `before` characters ahead of `pos`, for a message."""
        return _excerpt(self.buf, max(0, self.pos - before))


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


def _json_row(element: object, raw: str) -> Row | Rejection:
    if not isinstance(element, dict):
        if not raw.isascii() and _SURROGATE.search(raw):
            return Rejection("bad_encoding", "the element is not valid UTF-8", _replaced(raw))
        return Rejection("bad_json", f"an array element is a JSON {_json_kind(element)}", raw)
    obj: dict[str, Any] = element
    cdr_id = _id_of(obj.get("ID"))
    if not raw.isascii() and _SURROGATE.search(raw):
        return Rejection("bad_encoding", "the element is not valid UTF-8", _replaced(raw), cdr_id)
    if not obj.keys() >= _FIELD_SET:
        obj = {key.strip().lower(): value for key, value in obj.items()}
        missing = [name for name in FIELDS if name.lower() not in obj]
        if missing:
            detail = f"missing field(s) {', '.join(missing)}"
            return Rejection("missing_field", detail, raw, cdr_id)
        obj = {name: obj[name.lower()] for name in FIELDS}
    try:
        values = {
            name: value if type(value := obj[name]) is str else _json_text(value) for name in FIELDS
        }
    except _NotAValueError as exc:
        return Rejection("bad_json", f"a field holds a JSON {exc}, not a value", raw, cdr_id)
    # Only a \uD800-\uDFFF escape can put a surrogate in text that decoded as UTF-8.
    if ("\\ud" in raw or "\\uD" in raw) and _SURROGATE.search("".join(values.values())):
        detail = "a \\u escape gives a lone surrogate, which is not a character"
        return Rejection("bad_encoding", detail, raw, cdr_id)
    return Row(values, raw)


def _parse_json(chunks: Iterable[bytes]) -> Iterator[Row | Rejection]:
    text = _JsonText(chunks)
    decode = _DECODER.raw_decode
    first = text.next_char()
    if first is None:
        return
    if first != "[":
        while len(text.buf) - text.pos < _EXCERPT_CHARS and text.pull():
            pass
        kind = "a JSON object" if first == "{" else "no JSON array"
        raise BadResponseError(
            f"not a billing feed response: {kind}, {text.excerpt()}", reason="not_feed"
        )
    text.pos += 1
    char = text.next_char()
    if char == "]":
        text.pos += 1
    first_element = True
    while char != "]":
        if char is None:
            raise BadResponseError(
                f"truncated response: the JSON array is not closed, the body ends with "
                f"{_excerpt(text.buf, max(0, len(text.buf) - _EXCERPT_CHARS))}",
                reason="truncated",
            )
        try:
            element, end = decode(text.buf, text.pos)
        except json.JSONDecodeError as exc:
            if not _cut_short(exc, text.buf):
                raise BadResponseError(
                    f"bad JSON: {exc.msg} at {_excerpt(text.buf, max(text.pos, exc.pos - 40))}",
                    reason="bad_json",
                ) from exc
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
        # A number that reaches the end of the text ("12", "1.", "1e+") may go on in the
        # next chunk: only the next chunk, or the end of the body, tells.
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
        if end - text.pos >= MAX_RECORD_CHARS:
            raise _too_long(text.buf[text.pos : end])
        raw = text.buf[text.pos : end]
        text.pos = end
        if first_element and type(element) is dict and element and not _has_a_field(element):
            # {"error": ..., "request": {...}}: an error object, often echoing the
            # request (and its password), not a billing row to dead-letter.
            raise BadResponseError(
                "not a billing feed response: the first element has none of the documented "
                f"fields: {_excerpt(raw)}",
                reason="not_feed",
            )
        first_element = False
        yield _json_row(element, raw)
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
            raise BadResponseError(
                f"bad JSON: expected , or ] after an element, found {text.excerpt()}",
                reason="bad_json",
            )
    if text.next_char() is not None:
        raise BadResponseError(
            f"bad JSON: data after the closing ], {text.excerpt()}", reason="bad_json"
        )
