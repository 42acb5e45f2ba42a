"""Parse, type and encode a delimited feed body in worker processes, in feed order.

`WorkerPool.parse(chunks, fmt, encoding, encoder)` stands in for `formats.parse_rows`
followed by `encoder.encode` of every row: it yields the same rows' events and
rejections, in the same order, as `Encoded` items (`Rejection`s from the parser as
they are). The main process only splits the streamed body into record-aligned blocks
(`BLOCK_BYTES`, split at a line end) and sends them to the workers, at most
`IN_FLIGHT_PER_WORKER` blocks per worker at a time, so memory stays flat; ordering,
dead letters, checkpoints and the cursor stay with the caller (`pipeline.Drive`).
A body no longer than `IN_PROCESS_BLOCKS` blocks (1 MiB) is parsed in-process: for a
poll's few rows the round trip costs more than it saves, and an idle streamer starts no
worker at all.

One pool serves every feed and file source of the process (`app.run` makes it, from
`[processing] workers`): it is thread-safe, and the workers start on first use. A
worker that dies fails every poll waiting on the pool at that moment, each retried
from its committed cursor.

Why a block gives exactly what the whole body gives (`_encode_block`):

* Each block after the first is parsed behind the body's first line (the header, or
  the first row, whose output is dropped), so the layout is the body's own.
* A block is cut at a line end, but a line end may sit inside a quoted field. So the
  worker parses the block with a sentinel row after it (every cell ``1``): the block
  ended between records exactly when the sentinel comes out as a row of its own and
  the record before it is no `unclosed_quote` (whose resynchronising depends on the
  line after it). Otherwise, or when a block that is not the body's last raises, the
  block's results are discarded and the rest of the body, from that block on, is
  parsed in the main process, the in-process way. By induction every block a worker's
  results are used for starts between records.
* The last block ends where the body ends: its truncation checks are the body's.

A JSON body (a ``[`` first) is cut where the parser itself resynchronises after a
broken element: a ``}``, a comma, then the ``{`` the next block starts with (the
parser's `_JSON_BOUNDARY`). Each block after the first is parsed as ``[`` + its
elements (with no `not_feed` check of its first element, which is not the body's),
and each block but the last with a sentinel element and ``]`` after it. A cut inside
an element always shows: in a string, the sentinel's first key right after it breaks
the element, which is skipped to the next boundary, the cut (so the block's last
record is a `bad_json_element`, and a block that ends in a skipped record is never
used); between objects nested in a field, the sentinel's ``]`` closes the nested
array instead of the body's and the block is truncated. Either way the rest goes
in-process, as above.

A first line that is blank, too long or unreadable, a line (JSON element) longer than
`MAX_PENDING_BYTES`, and encoders other than `events.RowEncoder` take the in-process
path. The pool starts with the ``forkserver`` method: librdkafka's threads are never
forked. A worker that dies or does not answer within `BLOCK_TIMEOUT_S` fails the poll
(`WorkerError`, retriable: the cursor stays where it is) and the pool is rebuilt on
the next poll that uses it. A body that breaks off (a connection error from the
chunks) gives the rows the in-process parser would have given before the break: the
blocks already sent are still handled by the workers, then what is left after them
goes through the in-process parser, which meets the same error at the same place.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import chain, islice
from typing import Any, NamedTuple, cast

from streamer.errors import BadResponseError, RetriableError
from streamer.events import Event, RowEncoder, _new_event
from streamer.formats import _BODY_CODECS, FORMATS, _cells_of, _parse_json, parse_rows
from streamer.records import FIELDS, Rejection, Row

log = logging.getLogger(__name__)

BLOCK_BYTES = 256 << 10  # a block is cut at the last line end once this many bytes are in
# A body of at most this many blocks (1 MiB, some 4,500 CDRs) is parsed in-process: for
# a poll's few rows the round trip costs more than it saves.
IN_PROCESS_BLOCKS = 4
IN_FLIGHT_PER_WORKER = 2  # blocks queued per worker: one parsing, one waiting
MAX_PENDING_BYTES = 16 << 20  # no line end in this much: the rest goes in-process
MAX_FIRST_LINE_BYTES = 64 << 10
BLOCK_TIMEOUT_S = 120.0  # a worker silent this long on one block is taken as hung


class WorkerError(RetriableError):
    """A worker process died or hung: the poll fails, the cursor stays where it is."""


class Encoded(NamedTuple):
    """A row a worker typed and encoded: its event or rejection, and the row's raw text."""

    item: Event | Rejection
    raw: str


# Chunks, format, encoding -> rows: `formats.parse_rows`, or a `WorkerPool`'s.
BodyParser = Callable[[Iterable[bytes], str, str], Iterator[Row | Rejection | Encoded]]


class _Task(NamedTuple):
    prefix: bytes  # the body's first line (b"" for the first block)
    drop: int  # outputs of `prefix` to drop: 1 when it is a row, 0 for a header
    block: bytes
    sentinel: bytes  # b"" for the body's last block
    fmt: str
    encoding: str
    header: bytes  # RowEncoder's framing


# A typed row as it comes back from a worker: the Event's fields, then the row's raw text,
# in a plain tuple. Pickle rebuilds a NamedTuple through its Python constructor: about
# 12 µs per row to dump and 3 to load, against 2 and 1.6 for a plain tuple (measured).
_Flat = tuple[Any, ...]

# (items, None) or (items, (message, reason)) of a BadResponseError in the last block;
# None: the block did not end between records, parse it in-process.
_Result = tuple[list[_Flat | Encoded | Rejection], tuple[str, str] | None] | None
_new_encoded = cast(Callable[[type[Encoded], tuple[Event, str]], Encoded], tuple.__new__)

_encoders: dict[bytes, RowEncoder] = {}  # per worker process, by framing

# Where a JSON block may end: after "}," and whitespace, before the next element's "{"
# (formats._JSON_BOUNDARY, where the parser resumes after a broken element).
_JSON_CUT = re.compile(rb"\}[ \t\n\r]*,[ \t\n\r]*(?=\{)")
_JSON_SENTINEL = json.dumps(dict.fromkeys(FIELDS, "1"), separators=(",", ":"))


_RESYNCED = frozenset({"unclosed_quote", "bad_json_element", "row_too_long"})


def _rows_of(
    parts: Iterable[bytes], fmt: str, encoding: str, *, continued: bool
) -> Iterator[Row | Rejection]:
    """`formats.parse_rows`; `continued`: `parts` are a later block behind its prefix."""
    if fmt == "json":
        return _parse_json(parts, encoding, continued=continued)
    return parse_rows(parts, fmt, encoding)


def _sentinel_raw(fmt: str, sentinel: bytes) -> str:
    """The raw text of the row the sentinel must come out as."""
    text = sentinel.decode("ascii")
    return text[:-1] if fmt == "json" else text.rstrip("\n")  # json: the "]" after it


def _encode_block(task: _Task) -> _Result:
    """In a worker: parse, type and encode one block (see the module docstring)."""
    encoder = _encoders.get(task.header)
    if encoder is None:
        encoder = _encoders[task.header] = RowEncoder(task.header)
    parts = [p for p in (task.prefix, task.block, task.sentinel) if p]
    rows: list[Row | Rejection] = []
    error: tuple[str, str] | None = None
    try:
        rows.extend(_rows_of(parts, task.fmt, task.encoding, continued=bool(task.prefix)))
    except BadResponseError as exc:
        if task.sentinel:
            return None
        error = (str(exc), exc.reason)
    if task.sentinel:
        sentinel = _sentinel_raw(task.fmt, task.sentinel)
        if len(rows) <= task.drop or not isinstance(rows[-1], Row) or rows[-1].raw != sentinel:
            return None
        rows.pop()
        # The record before the sentinel was resynchronised on what follows it (csv: the
        # next line; json: the next boundary, which may be the cut itself when it lay in
        # that element's string): only the whole body says where it really ends.
        if rows and isinstance(rows[-1], Rejection) and rows[-1].reason in _RESYNCED:
            return None
    del rows[: task.drop]
    items: list[_Flat | Encoded | Rejection] = []
    add = items.append
    encode = encoder.encode
    for r in rows:
        if isinstance(r, Rejection):
            add(r)
            continue
        item = encode(r)
        add((*item, r.raw) if isinstance(item, Event) else Encoded(item, r.raw))
    return items, error


def _unflattened(items: list[_Flat | Encoded | Rejection]) -> Iterator[Encoded | Rejection]:
    """A worker's block of items as `parse` yields them (see `_Flat`)."""
    event_type, new_event, new_encoded = Event, _new_event, _new_encoded
    for item in items:
        if type(item) is tuple:
            yield new_encoded(Encoded, (new_event(event_type, item[:-1]), item[-1]))
        else:
            yield cast(Encoded | Rejection, item)


def _exit_with(pid: int) -> None:
    """In a worker: exit as soon as the streamer process `pid` has, even by kill -9.

    A worker's parent is the forkserver, and every worker holds the write end of the
    pool's task queue, so none of them ever sees the streamer go: without this, a
    killed streamer's workers (and so its forkserver) would live on, idle, for ever.
    """
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: readable once the process has exited
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):
        fd = -1  # no pidfd here: look every second instead

    def watch() -> None:
        if fd >= 0:
            select.select([fd], [], [])
        else:
            while os.getppid() != 1:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-streamer", daemon=True).start()


def _raising(exc: Exception) -> Iterator[bytes]:
    """Chunks that break off at once with `exc`: a broken body's end, for the parser."""
    raise exc
    yield b""  # a generator: the error comes where the parser asks for the next chunk


def _sentinel(fmt: str, width: int) -> bytes:
    """A row of `width` cells ``1`` (ID 1 wherever the ID is): clean, unquoted, one line."""
    return (FORMATS[fmt].join(["1"] * width) + "\n").encode("ascii")


def _line_end(buf: bytes | bytearray, start: int) -> int:
    """The index after the first line end at or after `start`; -1 if none is known yet."""
    lf = buf.find(b"\n", start)
    cr = buf.find(b"\r", start, lf if lf >= 0 else len(buf))
    if cr < 0:
        return lf + 1 if lf >= 0 else -1
    if cr + 1 == len(buf):
        return -1  # a CR last: an LF may follow in the next chunk
    return cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1


def _last_element_start(buf: bytearray, start: int) -> int:
    """The index of the last JSON element start after a boundary (`_JSON_CUT`) at or
    after `start`; -1 if none. The last 64 KiB first: a block's end is almost always there.
    """
    tail = max(start, len(buf) - (1 << 16))
    for begin in (tail, start) if tail > start else (start,):
        found = -1
        for match in _JSON_CUT.finditer(buf, begin):
            found = match.end()
        if found >= 0:
            return found
    return -1


def _last_line_end(buf: bytearray, start: int) -> int:
    """The index after the last line end at or after `start` (not a CR last); -1 if none."""
    lf = buf.rfind(b"\n", start)
    cr = buf.rfind(b"\r", max(start, lf + 1), len(buf) - 1)
    end = max(lf, cr)
    return end + 1 if end >= 0 else -1


class WorkerPool:
    """`workers` processes that parse, type and encode blocks of delimited bodies.

    Shared by every feed and file source of the process: any thread may call `parse`.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                # forkserver: the workers are forked from a clean server process, never
                # from this one, whose librdkafka threads a fork would leave in an
                # unknown state.
                context = multiprocessing.get_context("forkserver")
                # The server imports only what a worker needs, and every worker is forked
                # from it with those modules loaded: not the streamer's whole command line
                # (a console script's module is otherwise the server's preload).
                context.set_forkserver_preload(["streamer.workers"])
                self._executor = ProcessPoolExecutor(
                    self.workers, mp_context=context,
                    initializer=_exit_with, initargs=(os.getpid(),),
                )  # fmt: skip
                log.info(
                    "starting %d worker processes to parse, type and encode large bodies",
                    self.workers,
                )
            return self._executor

    def pids(self) -> list[int]:
        """The worker processes' IDs (started on first use; tests and benchmarks)."""
        executor = self._executor
        if executor is None:
            return []
        processes = getattr(executor, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.pid is not None]

    def close(self, executor: ProcessPoolExecutor | None = None) -> None:
        """Stop the workers (killed: a hung one would never finish its block).

        `executor`: only if it is still the current one (another thread, failing on
        the same dead worker, may have closed it and started the next already).
        """
        with self._lock:
            if executor is not None and executor is not self._executor:
                return
            executor, self._executor = self._executor, None
        if executor is None:
            return
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            if process.is_alive():
                process.kill()
        executor.shutdown(wait=True, cancel_futures=True)

    def parser(self, fmt: str, encoder: object) -> BodyParser | None:
        """This pool's `parse` for bodies of `fmt` typed by `encoder`, if it can take them."""
        if fmt not in FORMATS and fmt != "json":
            return None
        header = getattr(encoder, "header", None)
        if not isinstance(header, bytes):
            return None
        if not isinstance(encoder, RowEncoder) and header[:1] != b"\0":
            return None  # only events._RegistryRows once settled, with the registry's framing
        return partial(self.parse, header=header)

    def parse(
        self, chunks: Iterable[bytes], fmt: str, encoding: str, header: bytes
    ) -> Iterator[Encoded | Row | Rejection]:
        """The body's rows, typed and encoded in the workers where they can be; in order."""
        stream = iter(chunks)
        buf = bytearray()
        whole = True  # the body fits in IN_PROCESS_BLOCKS blocks: in-process (module docstring)
        try:
            for chunk in stream:
                buf += chunk
                if len(buf) > BLOCK_BYTES * IN_PROCESS_BLOCKS:
                    whole = False
                    break
        except Exception as exc:  # the body broke off: its rows so far, as in-process
            stream, whole = _raising(exc), True
        if whole:
            yield from parse_rows(chain([bytes(buf)], stream), fmt, encoding)
            return
        if fmt == "json":
            start = buf[:64].lstrip(b" \t\n\r")
            if encoding in ("utf-8", "auto"):
                start = start.removeprefix(b"\xef\xbb\xbf")
            if start[:1] != b"[":  # null, an error object, ...: in-process says what it is
                yield from parse_rows(chain([bytes(buf)], stream), fmt, encoding)
                return
            sentinel = (_JSON_SENTINEL + "]").encode("ascii")
            yield from self._blocks(stream, buf, b"[", 0, sentinel, fmt, encoding, header)
            return
        first_end = _line_end(buf, 0)
        first = bytes(buf[:first_end]) if 0 <= first_end <= MAX_FIRST_LINE_BYTES else b""
        layout = self._first_line(first, fmt, encoding) if first else None
        if layout is None:
            yield from parse_rows(chain([bytes(buf)], stream), fmt, encoding)
            return
        drop, width = layout
        sentinel = _sentinel(fmt, width)
        yield from self._blocks(stream, buf, first, drop, sentinel, fmt, encoding, header)

    @staticmethod
    def _first_line(first: bytes, fmt: str, encoding: str) -> tuple[int, int] | None:
        """(outputs of the first line, cells of a row), or None: parse in-process."""
        if not first.strip():
            return None
        try:
            outputs = list(parse_rows([first], fmt, encoding))
        except BadResponseError:
            return None
        if len(outputs) > 1:
            return None
        if outputs:
            drop, width = 1, len(FIELDS)
        else:
            text = first.decode(_BODY_CODECS[encoding], "surrogateescape")
            drop, width = 0, len(_cells_of(text, FORMATS[fmt]))
        # The first line must end between records, as every block's cut (a quote left
        # open would take the lines after it): the sentinel after it must come out alone.
        sentinel = _sentinel(fmt, width)
        try:
            again = list(parse_rows([first, sentinel], fmt, encoding))
        except BadResponseError:
            return None
        last = again[-1] if len(again) == drop + 1 else None
        if not isinstance(last, Row) or last.raw != sentinel.decode("ascii").rstrip("\n"):
            return None
        return drop, width

    def _blocks(
        self,
        stream: Iterator[bytes],
        buf: bytearray,
        first: bytes,
        drop: int,
        sentinel: bytes,
        fmt: str,
        encoding: str,
        header: bytes,
    ) -> Iterator[Encoded | Row | Rejection]:
        pool = self._pool()
        cut = _last_element_start if fmt == "json" else _last_line_end
        pending: deque[tuple[Future[_Result], bytes, bool]] = deque()
        limit = self.workers * IN_FLIGHT_PER_WORKER
        ended = False
        broken = False  # the body broke off (`stream` now raises its error)
        sent = 0  # blocks sent so far
        scanned = 0  # no cut in buf[:scanned] (a long record being buffered)

        def submit(block: bytes, last: bool) -> None:
            nonlocal sent
            prefix, dropped = (b"", 0) if sent == 0 else (first, drop)
            task = _Task(prefix, dropped, block, b"" if last else sentinel, fmt, encoding, header)
            try:
                pending.append((pool.submit(_encode_block, task), block, sent == 0))
            except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: shut down
                raise self._broken(pool) from exc
            sent += 1

        try:
            while pending or not ended:
                # Step 1: cut and send blocks while the queue has room.
                while not ended and len(pending) < limit:
                    end = cut(buf, scanned) if len(buf) > BLOCK_BYTES else -1
                    if end > 0:
                        submit(bytes(buf[:end]), last=False)
                        del buf[:end]
                        scanned = 0
                        continue
                    if len(buf) > BLOCK_BYTES:
                        # None up to here: search only what comes next (a boundary may
                        # straddle the next chunk, hence the margin).
                        scanned = max(0, len(buf) - 64)
                    if len(buf) > MAX_PENDING_BYTES:
                        break  # a line longer than this: the rest goes in-process
                    try:
                        chunk = next(stream, None)
                    except Exception as exc:
                        # The body broke off: the blocks sent are still handled (below),
                        # then what is left of the body goes in-process up to the break.
                        stream, broken, ended = _raising(exc), True, True
                        break
                    if chunk is None:
                        ended = True
                        if buf or sent == 0:
                            submit(bytes(buf), last=True)
                        buf.clear()
                    else:
                        buf += chunk
                if not pending:
                    break
                # Step 2: the oldest block's results, in feed order.
                future, block, is_first = pending[0]
                result = self._result(pool, future)
                pending.popleft()
                if result is None:
                    # Not cut between records: this block and the rest, in-process.
                    rest = [b for _, b, _ in pending]
                    for f, _, _ in pending:
                        f.cancel()
                    pending.clear()
                    parts = chain([block], rest, [bytes(buf)], stream)
                    if is_first:
                        yield from parse_rows(parts, fmt, encoding)
                    else:
                        rows = _rows_of(chain([first], parts), fmt, encoding, continued=True)
                        yield from islice(rows, drop, None)
                    return
                items, error = result
                yield from _unflattened(items)
                if error is not None:
                    raise BadResponseError(error[0], reason=error[1])
            if (buf or broken) and sent == 0:
                # No cut at all in MAX_PENDING_BYTES: the whole body in-process.
                yield from parse_rows(chain([bytes(buf)], stream), fmt, encoding)
            elif buf or broken:
                # A line too long to cut at: the rest of the body in-process.
                parts = chain([first, bytes(buf)], stream)
                rows = _rows_of(parts, fmt, encoding, continued=True)
                yield from islice(rows, drop, None)
        finally:
            for f, _, _ in pending:
                f.cancel()

    def _result(self, pool: ProcessPoolExecutor, future: Future[_Result]) -> _Result:
        try:
            return future.result(timeout=BLOCK_TIMEOUT_S)
        except FutureTimeoutError as exc:
            self.close(pool)
            raise WorkerError(
                f"a worker process did not answer within {BLOCK_TIMEOUT_S:.0f} s; the "
                "workers are restarted and the poll is retried from the committed cursor"
            ) from exc
        except (BrokenProcessPool, CancelledError) as exc:  # cancelled: closed meanwhile
            raise self._broken(pool) from exc

    def _broken(self, pool: ProcessPoolExecutor) -> WorkerError:
        self.close(pool)
        return WorkerError(
            "a worker process died (killed, or out of memory?); the workers are restarted "
            "and the poll is retried from the committed cursor"
        )
