"""The worker path (streamer/workers.py) gives exactly what the in-process path gives."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from cdr_samples import _ROWS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import workers
from streamer.errors import BadResponseError
from streamer.events import RowEncoder
from streamer.formats import FORMATS, parse_rows
from streamer.records import FIELDS, Rejection, Row
from streamer.workers import Encoded, WorkerError, WorkerPool

ENCODER = RowEncoder()


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(2)
    yield p
    p.close()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many blocks per body: every cut, the sentinel and the fallback get exercised.
    monkeypatch.setattr(workers, "BLOCK_BYTES", 300)
    monkeypatch.setattr(workers, "IN_PROCESS_BLOCKS", 1)


def _line(cells: list[str], delimiter: str, end: str = "\n") -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator=end).writerow(cells)
    return out.getvalue()


def _rows(n: int, start: int = 1) -> list[list[str]]:
    rows = []
    for i in range(n):
        cells = list(_ROWS[i % len(_ROWS)])
        cells[0] = str(start + i)
        rows.append(cells)
    return rows


class _BrokeOffError(Exception):
    """The connection broke mid-body (what httpx's read errors are to the parser)."""


def _chunks(body: bytes, size: int, broken_at: int | None = None) -> Iterator[bytes]:
    """`body` in chunks of `size`; `broken_at`: only that many bytes, then _BrokeOffError."""
    end = len(body) if broken_at is None else broken_at
    for i in range(0, end, size):
        yield body[i : min(i + size, end)]
    if broken_at is not None:
        raise _BrokeOffError(f"broke off after {broken_at} bytes")


def _reference(
    body: bytes, fmt: str, encoding: str = "utf-8", broken_at: int | None = None
) -> list[Any]:
    """In-process: parse_rows, then RowEncoder.encode (what Drive does), and the error."""
    out: list[Any] = []
    try:
        for r in parse_rows(_chunks(body, 4096, broken_at), fmt, encoding):
            out.append((ENCODER.encode(r), r.raw) if isinstance(r, Row) else r)
    except BadResponseError as exc:
        out.append(("error", exc.reason, str(exc)))
    except _BrokeOffError as exc:
        out.append(("broke off", str(exc)))
    return out


def _by_workers(
    pool: WorkerPool,
    body: bytes,
    fmt: str,
    encoding: str = "utf-8",
    chunk: int = 97,
    broken_at: int | None = None,
) -> tuple[list[Any], int]:
    out: list[Any] = []
    encoded = 0
    try:
        for r in pool.parse(_chunks(body, chunk, broken_at), fmt, encoding, ENCODER.header):
            if isinstance(r, Encoded):
                encoded += 1
                out.append((r.item, r.raw))
            elif isinstance(r, Row):  # the in-process fallback
                out.append((ENCODER.encode(r), r.raw))
            else:
                out.append(r)
    except BadResponseError as exc:
        out.append(("error", exc.reason, str(exc)))
    except _BrokeOffError as exc:
        out.append(("broke off", str(exc)))
    return out, encoded


@pytest.mark.parametrize("fmt", ["csv", "txt", "pipe"])
@pytest.mark.parametrize("header", [True, False])
def test_clean_body_goes_to_the_workers_and_matches(
    pool: WorkerPool, small_blocks: None, fmt: str, header: bool
) -> None:
    d = FORMATS[fmt]
    lines = [_line(list(FIELDS), d)] if header else []
    lines += [_line(cells, d) for cells in _rows(200)]
    body = "".join(lines).encode()
    expected = _reference(body, fmt)
    got, encoded = _by_workers(pool, body, fmt)
    assert got == expected
    assert len(expected) == 200
    assert encoded == 200  # every row typed and encoded in a worker


def test_bad_rows_and_dead_letters_match(pool: WorkerPool, small_blocks: None) -> None:
    # A header in another order with an extra column, bad values, short rows, bytes that
    # are not UTF-8, blank lines, CRLF, and a last line cut short (truncated).
    names = [*reversed(FIELDS), "Extra"]
    lines = [_line(names, ",", "\r\n")]
    for i, cells in enumerate(_rows(120)):
        row = [*reversed(cells), "x"]
        if i % 7 == 3:
            row[-2] = "not-an-id"  # the ID is last in this header's order
        if i % 11 == 5:
            row = row[:10]
        if i % 13 == 2:
            row[3] = "bad\x00date"
        lines.append(_line(row, ",", "\r\n"))
        if i % 17 == 0:
            lines.append("\r\n")
    cut = _line(_rows(1, 900)[0][:5], ",", "")  # the last line, cut short
    body = "".join(lines).encode() + b"\xff\xfe,1\r\n" + cut.encode()
    expected = _reference(body, "csv")
    assert any(isinstance(r, Rejection) for r in expected)
    assert expected[-1][:2] == ("error", "truncated")
    got, encoded = _by_workers(pool, body, "csv")
    assert got == expected
    assert encoded > 0


def test_quoted_line_ends_and_unclosed_quotes_match(pool: WorkerPool, small_blocks: None) -> None:
    lines = [_line(list(FIELDS), ",")]
    for i, cells in enumerate(_rows(80)):
        if i % 9 == 4:
            cells[19] = "two\nlines, quoted"  # a quoted field across a line end
        line = _line(cells, ",")
        if i % 23 == 7:
            line = line.replace(",Ok,", ',"Ok,', 1)  # an opening quote never closed
        lines.append(line)
    body = "".join(lines).encode()
    expected = _reference(body, "csv")
    assert any(isinstance(r, Rejection) and r.reason == "unclosed_quote" for r in expected)
    got, _ = _by_workers(pool, body, "csv")
    assert got == expected


def test_a_body_of_one_block_stays_in_process_and_starts_no_worker() -> None:
    body = "".join(_line(cells, ",") for cells in _rows(20)).encode()
    assert workers.BLOCK_BYTES < len(body) * 100 < workers.BLOCK_BYTES * workers.IN_PROCESS_BLOCKS
    body *= 100  # more than one block, no more than IN_PROCESS_BLOCKS
    fresh = WorkerPool(2)
    try:
        assert _by_workers(fresh, body, "csv") == (_reference(body, "csv"), 0)
        assert fresh.pids() == []  # an idle streamer, or one of small polls, forks nothing
    finally:
        fresh.close()


def _element(cells: list[str], separators: tuple[str, str] = (", ", ": ")) -> str:
    return json.dumps(dict(zip(FIELDS, cells, strict=True)), separators=separators)


def test_a_short_json_body_stays_in_process(pool: WorkerPool) -> None:
    body = b'[{"ID": "1"}, 7]'
    assert _by_workers(pool, body, "json") == (_reference(body, "json"), 0)


@pytest.mark.parametrize("separator", [",", ", ", ",\n", "\r\n,\r\n"])
def test_a_json_body_goes_to_the_workers_and_matches(
    pool: WorkerPool, small_blocks: None, separator: str
) -> None:
    elements = [_element(cells) for cells in _rows(200)]
    elements[40] = elements[40][:-30]  # broken: one rejection, reading resumes after it
    elements[90] = elements[90].replace('"Ok"', '"O},{k"')  # a boundary inside a string
    elements[120] = '{"ID": "121", "X": [{"a": 1}, {"b": 2}]}'  # objects nested in a field
    elements[150] = "7"  # not an object
    body = ("[" + separator.join(elements) + "]\n").encode()
    expected = _reference(body, "json")
    got, encoded = _by_workers(pool, body, "json")
    assert got == expected
    # Blocks of 300 bytes hold one element each here, so the broken element 40 ends its
    # block, which sends the rest of the body in-process: the 40 before it were the workers'.
    assert encoded >= 40
    assert {r.reason for r in expected if isinstance(r, Rejection)} >= {"bad_json_element"}


# Pieces of a JSON body, clean and broken, each as the in-process path must take them.
_good_elements = [_element(cells) for cells in _rows(6)]
_JSON_FRAGMENTS = [
    *_good_elements,
    _element(_rows(1)[0], (",", ":")),
    _good_elements[0].replace('"Ok"', '"O},{k"'),
    _good_elements[1].replace('"Ok"', '"O}, {\\"k"'),
    '{"ID": "9", "X": [{"a": 1}, {"b": 2}]}',
    '{"ID": "8", "X": [[{"a": 1}, {"b": 2}]]}',
    _good_elements[2][:-20],
    '{"error": "no"}',
    "7",
    "null",
    '{"ID": 12.50, "Status": true}',
    _good_elements[3].replace("Mobile", "Mob\udcffile"),
]
_JSON_SEPARATORS = [",", ", ", ",\n", "\n,", " , ", ",,", "", " junk ,"]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parts=st.lists(
        st.tuples(st.sampled_from(_JSON_FRAGMENTS), st.sampled_from(_JSON_SEPARATORS)),
        min_size=1, max_size=60,
    ),
    end=st.sampled_from(["]", "]\n", ",]", "", "] x", "]]"]),
    block=st.integers(50, 2000),
    chunk=st.integers(1, 500),
    encoding=st.sampled_from(["utf-8", "auto", "latin-1"]),
    broken=st.none() | st.floats(0.0, 1.0),
)  # fmt: skip
def test_any_json_body_matches(
    pool: WorkerPool,
    monkeypatch: pytest.MonkeyPatch,
    parts: list[tuple[str, str]],
    end: str,
    block: int,
    chunk: int,
    encoding: str,
    broken: float | None,
) -> None:
    monkeypatch.setattr(workers, "BLOCK_BYTES", block)
    monkeypatch.setattr(workers, "IN_PROCESS_BLOCKS", 1)
    text = "[" + "".join(e + sep for e, sep in parts[:-1]) + parts[-1][0] + end
    body = text.encode("utf-8", "surrogateescape")
    at = None if broken is None else int(len(body) * broken)  # the connection breaks there
    got, _ = _by_workers(pool, body, "json", encoding, chunk, at)
    assert _stable(got) == _stable(_reference(body, "json", encoding, at))


def _stable(out: list[Any]) -> list[Any]:
    """`out` with a failing body's message cut before its excerpt: an excerpt that shows
    text before the problem ("a comma before the closing ]") shows what the parser still
    holds, which depends on the chunks in-process too, and on the block in a worker."""
    if out and isinstance(out[-1], tuple) and out[-1][0] == "error":
        _, reason, message = out[-1]
        return [*out[:-1], ("error", reason, message.split(", ", 1)[0])]
    return out


# Lines a body is made of, clean and broken, each as the in-process path must take them.
_good = [_line(cells, ",") for cells in _rows(6)]
_FRAGMENTS = [
    *_good,
    _good[0].replace("\n", "\r\n"),
    _good[1].replace("\n", "\r"),
    _line([*_rows(1)[0][:19], "quoted\nline end", *_rows(1)[0][20:]], ","),
    _good[2].replace(",Ok,", ',"Ok,', 1),  # unclosed
    _good[3].replace(",Ok,", ',O"k,', 1),  # a quote inside an unquoted field
    '"',
    "\n",
    "   \n",
    "1,2,3\n",
    _good[4][:-1],  # no line end
    _good[5].replace("Mobile", "Mob\udcffile").encode("utf-8", "surrogateescape").decode("latin-1"),
]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.booleans(),
    parts=st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=60),
    block=st.integers(50, 2000),
    chunk=st.integers(1, 500),
    encoding=st.sampled_from(["utf-8", "auto", "latin-1"]),
    broken=st.none() | st.floats(0.0, 1.0),
)
def test_any_body_matches(
    pool: WorkerPool,
    monkeypatch: pytest.MonkeyPatch,
    header: bool,
    parts: list[str],
    block: int,
    chunk: int,
    encoding: str,
    broken: float | None,
) -> None:
    monkeypatch.setattr(workers, "BLOCK_BYTES", block)
    monkeypatch.setattr(workers, "IN_PROCESS_BLOCKS", 1)
    text = (_line(list(FIELDS), ",") if header else "") + "".join(parts)
    body = text.encode("utf-8", "surrogateescape")
    at = None if broken is None else int(len(body) * broken)  # the connection breaks there
    got, _ = _by_workers(pool, body, "csv", encoding, chunk, at)
    assert got == _reference(body, "csv", encoding, at)


def _big_body(rows: int) -> bytes:
    return "".join(_line(cells, ",") for cells in _rows(rows)).encode()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_hung_worker_fails_the_parse_and_the_pool_restarts(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    monkeypatch.setattr(workers, "BLOCK_TIMEOUT_S", 3.0)
    body = _big_body(3000)  # about 2000 blocks of 300 bytes: far more than in flight
    pool = WorkerPool(2)
    try:
        parsed = pool.parse(_chunks(body, 4096), "csv", "utf-8", ENCODER.header)
        first = next(parsed)
        assert isinstance(first, Encoded)
        pids = pool.pids()
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, sig)
        with pytest.raises(WorkerError):
            for _ in parsed:
                pass
        assert pool.pids() == []  # closed: every old worker killed
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # reaped, not left stopped
        # The next parse starts a new pool and gives every row.
        got, encoded = _by_workers(pool, body, "csv", chunk=4096)
        assert got == _reference(body, "csv")
        assert encoded == 3000
        assert set(pool.pids()).isdisjoint(pids)
    finally:
        pool.close()


def test_the_drive_publishes_the_same_messages_from_the_workers(
    pool: WorkerPool, small_blocks: None
) -> None:
    """Events (key, value, timestamp, headers), dead letters and the cursor: as in-process."""
    from test_drive import FakePublisher, make_sink

    from streamer.avro import SingleObjectEncoder
    from streamer.cursor import MemoryCursorStore
    from streamer.pipeline import Drive, FeedPosition

    lines = [_line(list(FIELDS), ",")]
    for i, cells in enumerate(_rows(300)):
        if i % 10 == 3:
            cells[6] = "25:61:00"  # a time of day that is none: dead-lettered
        lines.append(_line(cells, ","))
    lines.append("1,2,3\n")
    body = "".join(lines).encode()

    def publish(parsed: Iterator[Any]) -> tuple[list[Any], int]:
        publisher, store = FakePublisher(), MemoryCursorStore(0)
        sink = make_sink(publisher, SingleObjectEncoder())
        position = FeedPosition(
            "main", store.load_state(), store, exactly_once=False, ascending=True, covered=None
        )
        drive = Drive(sink, publisher, position, checkpoint_every=50)  # type: ignore[arg-type]
        drive.run(parsed)
        drive.checkpoint()
        messages = []
        for m in publisher.delivered:
            value: Any = m.value
            if m.topic == "dead":
                value = json.loads(m.value)
                del value["rejected_at"]  # the clock
            messages.append((m.topic, m.key, value, m.timestamp_ms, m.headers))
        return messages, store.load()

    in_process = publish(parse_rows(_chunks(body, 4096), "csv", "utf-8"))
    by_workers = publish(pool.parse(_chunks(body, 4096), "csv", "utf-8", ENCODER.header))
    assert by_workers == in_process
    messages, cursor = in_process
    assert cursor == 300
    # 30 bad times; the short row's ID 1 came before, so it is skipped as a duplicate.
    assert sum(1 for m in messages if m[0] == "dead") == 30
