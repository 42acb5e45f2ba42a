"""File collection: the provider's CDR files, from a file server (SFTP, FTP) into the same pipeline.

The provider can also deliver CDRs as files over SFTP (CSV, tab, pipe or JSON; daily,
hourly or every 20 minutes; the web feed's fields). A poll of one SFTP source:

1. Load the committed cursor: which files are done (or quarantined), and how many
   rows of the file being read are confirmed in Kafka.
2. List the directory (files matching `pattern`). A file is taken only once it is
   complete: its size and mtime unchanged across listings for `settle_s` (measured
   between listings, never by sleeping), so a file still being written is not read.
3. Read each complete file in name order, streamed in windows of pipelined reads,
   inflated on the way if compressed (`.gz`, `.zip`: `sources/compression.py`),
   parsed by `formats.parse_rows` (format configured, or from the extension beneath
   any `.gz`), typed and encoded by `events.RowEncoder` in the drive loop; rows
   already confirmed are skipped.
4. Publish through the feed's own `EventSink`: the same Avro events keyed by
   AccountCode, dead letters, headers with source="sftp" (and `file`).
5. Every `checkpoint_every` rows and at the end of a file: flush and check every
   delivery report, then commit the cursor (in exactly-once mode the cursor record
   is in the same Kafka transaction). Only then is the file moved or deleted
   (`after = "move:DIR"` or `"delete"`; the default `"keep"` leaves it).

A crash mid-file resumes at the last committed row count: at-least-once publishes at
most the last unconfirmed batch again, exactly-once nothing. A file that cannot be read
as a feed file at all (not a header nor a row first, unclosed JSON, unreadable) is
quarantined: the rows before the fault stay published, one dead letter (reason
`bad_file`) describes the file, the cursor marks it done-with-error, and it is moved
to `quarantine_dir` if one is set. The other files go on.

Pairing with a web feed (`pairs_with_feed`), for one account delivered both ways:

- The feed and its SFTP source run in ONE thread, taking turns (`pipeline.run_together`),
  through ONE producer (one transactional id in exactly-once mode). So neither ever
  sees the other half-way through a batch.
- The SFTP source skips every ID at or below the feed's committed cursor (counted as
  `covered_by_feed`): the feed has confirmed it.
- The SFTP cursor also holds the IDs it published above the feed's cursor (compact
  ranges, pruned as the feed's cursor passes them). The feed skips those (counted as
  `covered_by_sftp`) and moves its cursor over them.
- At-least-once: each source commits its own cursor after its flush. A crash between
  a flush and the commit publishes that batch again; every ID is published at least
  once (the feed alone would see to that: it skips only IDs confirmed in Kafka).
- Exactly-once: each batch's events, dead letters and cursor record (the feed's, or
  the SFTP one with its published IDs) are one Kafka transaction, and the other source
  reads only what was committed; so every ID is published exactly once, across both
  sources, crashes included.

Limits: the paired feed must fetch every CDR (neither `callsonly` nor `servicesonly`),
or the SFTP rows it never fetches would be skipped below its cursor. The IDs within
one source are not compared across files when unpaired (the provider puts each CDR in
one file). A file is known by its name: a done file that changes is not read again,
and the names of done files are kept while they stay on the server (use `after =
"move:DIR"` or `"delete"` where thousands of files stay). Sources that take turns
delay each other by one poll at most.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from streamer.config import parse_after
from streamer.cursor import IdRanges, JsonCursorStore, JsonKafkaCursorStore
from streamer.errors import (
    AuthError,
    BadResponseError,
    ConfigError,
    HostKeyError,
    SftpUnavailableError,
)
from streamer.formats import parse_rows
from streamer.limits import DEFAULT_MAX_BYTES, capped
from streamer.metrics import SftpSourceMetrics
from streamer.pipeline import Commit, Drive
from streamer.publisher import Publisher
from streamer.records import Rejection
from streamer.sink import EventSink
from streamer.sources.base import FileServer, FileSession, RemoteFile
from streamer.sources.compression import MAX_DECOMPRESSED_BYTES, compression_of, decompressed
from streamer.workers import WorkerPool

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
EXTENSION_FORMATS: Mapping[str, str] = {
    ".csv": "csv",
    ".txt": "txt",
    ".tsv": "txt",
    ".tab": "txt",
    ".pipe": "pipe",
    ".psv": "pipe",
    ".json": "json",
}
FileState = Literal["done", "quarantined"]


# --- the server ------------------------------------------------------------------------------


# --- when a file is complete -----------------------------------------------------------------


@dataclass(slots=True)
class _Sighting:
    size: int
    mtime: int
    since: float  # when this size and mtime were first listed


@dataclass(slots=True)
class Settled:
    """What one listing tells: files complete now, files still waiting, and what changed."""

    ready: list[RemoteFile] = field(default_factory=list)
    waiting: list[RemoteFile] = field(default_factory=list)
    new: list[RemoteFile] = field(default_factory=list)
    changed: list[RemoteFile] = field(default_factory=list)


class SettleTracker:
    """A file is complete once its size and mtime stay the same across listings for settle_s.

    Measured between listings, by the clock: nothing sleeps. With settle_s = 0 a file is
    taken as soon as it is listed (for a provider that writes to a temporary name and
    renames, or for tests).
    """

    def __init__(self, settle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_s = settle_s
        self._clock = clock
        self._seen: dict[str, _Sighting] = {}

    def observe(self, files: list[RemoteFile]) -> Settled:
        now = self._clock()
        out = Settled()
        seen: dict[str, _Sighting] = {}
        for f in files:
            before = self._seen.get(f.name)
            if before is None:
                sighting = _Sighting(f.size, f.mtime, now)
                out.new.append(f)
            elif (before.size, before.mtime) != (f.size, f.mtime):
                sighting = _Sighting(f.size, f.mtime, now)
                out.changed.append(f)
            else:
                sighting = before
            seen[f.name] = sighting
            ready = now - sighting.since >= self.settle_s
            (out.ready if ready else out.waiting).append(f)
        self._seen = seen  # a file gone from the listing is forgotten
        return out


# --- the cursor ------------------------------------------------------------------------------


@dataclass(slots=True)
class FileCursor:
    """Which files are done, how far the current one is confirmed, and (paired) which IDs.

    `rows` counts the parser's items (rows and rejections) of `current` whose events or
    dead letters are confirmed. `covered` holds the IDs this source published above the
    paired feed's cursor.
    """

    files: dict[str, FileState] = field(default_factory=dict)
    current: str | None = None
    rows: int = 0
    covered: IdRanges = field(default_factory=IdRanges)

    def copy(self) -> FileCursor:
        return FileCursor(dict(self.files), self.current, self.rows, self.covered.copy())

    def to_json(self) -> dict[str, Any]:
        return {
            "files": dict(sorted(self.files.items())),
            "current": self.current,
            "rows": self.rows,
            "covered": [list(pair) for pair in self.covered],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None, where: str) -> FileCursor:
        if data is None:
            return cls()
        try:
            files = data.get("files", {})
            current = data.get("current")
            rows = data.get("rows", 0)
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and v in ("done", "quarantined") for k, v in files.items()
            ):
                raise ValueError("files must map names to 'done' or 'quarantined'")
            if current is not None and not isinstance(current, str):
                raise ValueError("current must be a file name or null")
            if type(rows) is not int or rows < 0:
                raise ValueError("rows must be a whole number >= 0")
            covered = IdRanges.of(data.get("covered", []))
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{where} holds an unreadable SFTP cursor ({exc}); fix or remove it"
            ) from None
        return cls(files, current, rows, covered)


# --- the collector ---------------------------------------------------------------------------


@dataclass
class FilePollResult:
    """What one poll of an SFTP source did."""

    listed: int = 0
    waiting: int = 0
    files_done: int = 0
    files_quarantined: int = 0
    rows: int = 0  # rows read past the committed position, skipped ones included
    published: int = 0
    dead_lettered: int = 0
    covered: int = 0  # at or below the paired feed's cursor
    duplicates: int = 0  # IDs this source had already published (paired only)
    read_bytes: int = 0
    seconds: float = 0.0


def format_of(name: str, configured: str) -> str | None:
    """The file's format: the configured one, or (auto) its extension's; None if unknown.

    A compression suffix is looked through: `cdr_1.csv.gz` is csv.
    """
    if configured != "auto":
        return configured
    return EXTENSION_FORMATS.get(posixpath.splitext(compression_of(name)[0])[1].lower())


class FilePosition:
    """A file source's position within one file: its row count, and (paired) the IDs it published.

    Paired with a feed, rows at or below the feed's committed cursor are skipped
    (`covered_by_feed`), and so are IDs this source published already (`duplicate`).
    Every row may be a checkpoint: the position is a row count, in file order.
    """

    def __init__(
        self, collector: FileCollector, state: FileCursor, feed_cursor: int | None
    ) -> None:
        self.collector = collector
        self.state = state
        self.feed_cursor = feed_cursor

    def admit(self, cdr_id: int | None, raw: str) -> str | None:
        state = self.state
        state.rows += 1
        if self.feed_cursor is not None and cdr_id is not None:
            if cdr_id <= self.feed_cursor:
                return "covered_by_feed"
            if cdr_id in state.covered:
                return "duplicate"
            state.covered.add(cdr_id)
        return None

    def checkpoint_safe(self) -> bool:
        return True

    def commit(self, *, broken: bool = False) -> Commit:
        # A file's position is a row count: what was read is committed, broken or not.
        return self.collector.commit_for(self.state, self.feed_cursor)


class FileCollector:
    """Moves one SFTP source's files into Kafka, one poll (listing) at a time.

    `feed_cursor`, when paired with a feed: the feed's committed cursor. Exactly-once:
    `cursor_store` is a `JsonKafkaCursorStore` and the sink's producer transactional.
    """

    def __init__(
        self,
        *,
        name: str,
        server: FileServer,
        directory: str,
        sink: EventSink,
        cursor_store: JsonCursorStore,
        sftp_metrics: SftpSourceMetrics,
        pattern: str = "*",
        fmt: str = "auto",
        encoding: str = "utf-8",
        settle_s: float = 60.0,
        after: str = "keep",
        quarantine_dir: str = "",
        checkpoint_every: int = 10_000,
        max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES,
        exactly_once: bool = False,
        feed_cursor: Callable[[], int] | None = None,
        stop: threading.Event | None = None,
        abort_on_stop: bool = False,
        clock: Callable[[], float] = time.monotonic,
        max_file_bytes: int = DEFAULT_MAX_BYTES,
        pool: WorkerPool | None = None,
    ) -> None:
        if exactly_once and not isinstance(cursor_store, JsonKafkaCursorStore):
            raise TypeError("exactly-once needs the cursor in Kafka")
        self.name = name
        self.server = server
        self.directory = directory
        self.pattern = pattern
        self.fmt = fmt
        self.encoding = encoding  # of the files: one of formats.ENCODINGS
        self.after, self.after_dir = parse_after(after)
        self.quarantine_dir = quarantine_dir
        self.sink = sink
        self.kind = sink.source  # "sftp" (or "ftp"): the first word of its log lines
        self.metrics = sink.metrics
        self.sftp_metrics = sftp_metrics
        self.cursor_store = cursor_store
        self.checkpoint_every = checkpoint_every
        self.max_decompressed_bytes = max_decompressed_bytes
        self.exactly_once = exactly_once
        self.feed_cursor = feed_cursor
        self.stop = stop or threading.Event()
        # Cluster mode: `stop` abandons a file mid-read too (else only between files).
        self.abort_on_stop = abort_on_stop
        self.tracker = SettleTracker(settle_s, clock)
        self.max_file_bytes = max_file_bytes
        self.pool = pool  # the process's workers (streamer/workers.py); None: in-process
        self._committed: FileCursor | None = None

    def close(self) -> None:
        self.sink.slot.close()

    def cursor(self) -> FileCursor:
        """The committed cursor (read from its store on first use)."""
        if self._committed is None:
            self._committed = FileCursor.from_json(
                self.cursor_store.load(), repr(self.cursor_store)
            )
        return self._committed

    @property
    def loaded_cursor(self) -> FileCursor | None:
        """The committed cursor if it was read already, without reading it."""
        return self._committed

    def published_ids(self) -> IdRanges:
        """The IDs this source published above the paired feed's cursor (committed ones)."""
        self.sink.slot.get()  # exactly-once: fence older instances before reading the cursor
        return self.cursor().covered

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.directory, *parts)

    def poll(self) -> FilePollResult:
        """List the directory once and read every complete file not done yet."""
        started = time.monotonic()
        # A transactional producer fences older instances first: the cursor read is final.
        publisher = self.sink.slot.get()
        # Step 1: the committed cursor.
        self.cursor()
        result = FilePollResult()
        try:
            with self._counting_errors(), self.server.connect() as session:
                self._poll(session, publisher, result)
        except BaseException as exc:
            self.sink.recover(publisher, exc)
            raise
        self.metrics.skip("covered_by_feed", result.covered)
        self.metrics.skip("duplicate", result.duplicates)
        self.metrics.poll_succeeded()
        result.seconds = time.monotonic() - started
        return result

    @contextmanager
    def _counting_errors(self) -> Iterator[None]:
        try:
            yield
        except SftpUnavailableError as exc:
            self.sftp_metrics.error(exc.kind)
            raise
        except AuthError:
            self.sftp_metrics.error("auth_error")
            raise
        except HostKeyError:
            self.sftp_metrics.error("host_key")
            raise

    def _poll(self, session: FileSession, publisher: Publisher, result: FilePollResult) -> None:
        # Step 2: list; only files unchanged for settle_s are complete.
        files = session.list(self.directory, self.pattern)
        result.listed = len(files)
        settled = self.tracker.observe(files)
        committed = self.cursor()
        new = [f for f in settled.new if f.name not in committed.files]
        waiting = [f for f in settled.waiting if f.name not in committed.files]
        self.sftp_metrics.files_seen.inc(len(new))
        self.sftp_metrics.files_waiting.set(len(waiting))
        result.waiting = len(waiting)
        for f in new:
            log.info(
                "%s %s: new file %s (%d bytes)%s", self.kind, self.name, f.name, f.size,
                f", waiting {self.tracker.settle_s:g} s for it to settle"
                if self.tracker.settle_s else "",
            )  # fmt: skip
        for f in settled.changed:
            if f.name in committed.files:
                continue
            log.info(
                "%s %s: %s is still being written (%d bytes now)", self.kind, self.name, f.name,
                f.size,
            )  # fmt: skip
        listed = {f.name for f in files}
        # The file a crash left half-read comes first: starting another would drop its
        # position (one `current` file at a time). If it is listed but not settled, wait.
        ready = sorted(settled.ready, key=lambda f: (f.name != committed.current, f.name))
        half_read = committed.current in listed and committed.current not in committed.files
        if half_read and (not ready or ready[0].name != committed.current):
            return
        for f in ready:
            if self.stop.is_set():
                return
            state = committed.files.get(f.name)
            if state is not None:
                self._after(session, f.name, state)  # again, if it failed or a crash came first
                continue
            # Step 3: read the file from the committed position.
            self._read(session, publisher, f, listed, result)
            committed = self.cursor()

    def _read(
        self,
        session: FileSession,
        publisher: Publisher,
        f: RemoteFile,
        listed: set[str],
        result: FilePollResult,
    ) -> None:
        # The working cursor: committed at each checkpoint, dropped if the poll fails.
        state = self.cursor().copy()
        # Files gone from the server need no memory any more.
        state.files = {name: s for name, s in state.files.items() if name in listed}
        start = state.rows if state.current == f.name else 0
        state.current, state.rows = f.name, start
        if start:
            log.info("%s %s: resuming %s after row %d", self.kind, self.name, f.name, start)
        feed_cursor = self.feed_cursor() if self.feed_cursor is not None else None
        position = FilePosition(self, state, feed_cursor)
        drive = Drive(
            self.sink, publisher, position, checkpoint_every=self.checkpoint_every,
            headers=[("file", f.name.encode("utf-8"))], file=f.name,
            stop=self.stop if self.abort_on_stop else None,
        )  # fmt: skip

        def count_bytes(n: int) -> None:
            result.read_bytes += n
            self.sftp_metrics.read_bytes.inc(n)

        fmt = format_of(f.name, self.fmt)
        try:
            try:
                if fmt is None:
                    raise BadResponseError(
                        f"cannot tell the format of {f.name} from its extension: set format",
                        reason="unknown_format",
                    )
                # A file over max_file_bytes is not a feed file: quarantined like any other.
                data = capped(
                    session.read(self._path(f.name), count_bytes), self.max_file_bytes,
                    where=f.name, setting="max_file_bytes",
                )  # fmt: skip
                content = decompressed(data, f.name, max_bytes=self.max_decompressed_bytes)
                parse = self.pool.parser(fmt, self.sink.rows) if self.pool else None
                rows = (parse or parse_rows)(content, fmt, self.encoding)
                # Rows confirmed before a restart are not handed on again.
                drive.run(itertools.islice(rows, start, None))
            except FileNotFoundError:
                log.warning("%s %s: %s went away while being read", self.kind, self.name, f.name)
                drive.checkpoint()
                return
            except (BadResponseError, PermissionError) as exc:
                self._quarantine(session, drive, state, f, exc, result)
                return
        finally:
            tally = drive.tally
            result.rows += tally.rows
            result.published += tally.published
            result.dead_lettered += tally.dead_lettered
            result.covered += tally.skipped["covered_by_feed"]
            result.duplicates += tally.skipped["duplicate"]
        # Step 5: the whole file is confirmed -> done.
        state.files[f.name] = "done"
        state.current, state.rows = None, 0
        drive.checkpoint()
        self.sftp_metrics.files_done.inc()
        result.files_done += 1
        log.info(
            "%s %s: %s done: %d published, %d dead letters",
            self.kind, self.name, f.name, drive.tally.published, drive.tally.dead_lettered,
        )  # fmt: skip
        self._after(session, f.name, "done")

    def _quarantine(
        self,
        session: FileSession,
        drive: Drive,
        state: FileCursor,
        f: RemoteFile,
        exc: Exception,
        result: FilePollResult,
    ) -> None:
        """A file that is not a feed file: one dead letter for it, marked, set aside."""
        detail = str(exc) if isinstance(exc, BadResponseError) else f"cannot read it: {exc}"
        log.error(
            "%s %s: quarantining %s after %d rows: %s",
            self.kind, self.name, f.name, state.rows, detail,
        )  # fmt: skip
        self.sftp_metrics.error("unreadable_file")
        rejection = Rejection("bad_file", f"{f.name}: {detail}"[:2000], f.name)
        self.sink.dead_letter(drive.publisher, rejection, drive.batch, fromid=0, file=f.name)
        result.dead_lettered += 1
        state.files[f.name] = "quarantined"
        state.current, state.rows = None, 0
        drive.checkpoint()
        self.sftp_metrics.files_quarantined.inc()
        result.files_quarantined += 1
        self._after(session, f.name, "quarantined")

    def commit_for(self, state: FileCursor, feed_cursor: int | None) -> Commit:
        """What a checkpoint of `state` commits (see FilePosition.commit)."""
        if feed_cursor is not None:
            state.covered.discard_through(feed_cursor)  # the feed's cursor covers those
        value = state.to_json()
        snapshot = state.copy()
        store = self.cursor_store
        if self.exactly_once:
            assert isinstance(store, JsonKafkaCursorStore)
            return Commit(
                (store.message(value),),
                partial(self._committed_as, store.committed, value, snapshot),
            )
        return Commit((), partial(self._committed_as, store.commit, value, snapshot))

    def _committed_as(
        self, commit: Callable[[dict[str, Any]], None], value: dict[str, Any], state: FileCursor
    ) -> None:
        commit(value)
        self._committed = state

    def _after(self, session: FileSession, name: str, state: FileState) -> None:
        """Move or delete a file once its cursor is committed; a failure is retried next poll."""
        if state == "quarantined":
            if not self.quarantine_dir:
                return
            action, target = "move", self.quarantine_dir
        else:
            action, target = self.after, self.after_dir
        if action == "keep":
            return
        path = self._path(name)
        try:
            if action == "delete":
                session.remove(path)
            else:
                session.move(path, self._path(target))
        except (SftpUnavailableError, OSError) as exc:
            self.sftp_metrics.error("after_action")
            log.warning(
                "%s %s: could not %s %s (%s); trying again next poll", self.kind, self.name, action,
                name, exc,
            )  # fmt: skip
            if isinstance(exc, SftpUnavailableError):
                raise
            return
        done = "deleted" if action == "delete" else "moved"
        log.info("%s %s: %s %s", self.kind, self.name, done, name)
