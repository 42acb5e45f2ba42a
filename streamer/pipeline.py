"""The only place that orders the stages.

cursor -> fetch -> parse -> type -> encode -> publish -> confirm -> commit.

A poll of one feed:

1. Load the committed cursor: every CDR with an ID at or below it is confirmed in Kafka.
2. Fetch the feed from that cursor; the body is parsed as it arrives.
3. Each row becomes an event or a rejection (a bad row never stops the page): typed
   and Avro-encoded in one pass (`events.RowEncoder`; fastavro is its reference).
4. Events are produced keyed by AccountCode; rejections go to
   the dead-letter topic. Rows at or below the cursor, or repeated, are skipped and counted.
5. At each checkpoint and at the end: flush and check every delivery report,
   and only then commit the cursor (the highest ID handled so far).

Mid-response checkpoints are taken only for a feed configured with `ids_ascending`
(its provider sends each response in ID order), and only while the response keeps to
it: if a lower ID could still follow, committing the highest ID so far could skip it
for good should the response then break off. Otherwise the cursor is committed once,
at the end of each response, and a crash mid-response publishes that response again.

Steps 4 and 5 are shared with the SFTP collector (streamer/sources/sftp.py) through
`EventSink`; a feed and the SFTP source paired with it run in one thread
(`run_together`) and share one producer (`PublisherSlot`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Protocol, cast
from zoneinfo import ZoneInfo

from streamer.cursor import (
    CursorStore,
    FeedCursor,
    IdRanges,
    PublishedHours,
    TransactionalCursorStore,
    is_transactional_store,
)
from streamer.errors import (
    BadResponseError,
    DeliveryError,
    EventsRejectedError,
    FeedUnavailableError,
    MessagesRejectedError,
    StoppedError,
    StreamerError,
)
from streamer.events import Event
from streamer.metrics import FeedMetrics
from streamer.publisher import Publisher, TimestampLimits
from streamer.records import Rejection, Row
from streamer.sink import Batch, Encoder, EventSink, PublisherSlot
from streamer.sources.feed import FeedClient
from streamer.workers import BodyParser, Encoded, WorkerPool

if TYPE_CHECKING:  # reconcile.py builds on this module's Drive
    from streamer.reconcile import Notes, PublishedRecord, Reconciler

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
REPEATED_FAILURES_WARN = 3  # same cursor, same failure, this many times: say so loudly
MAX_WITHOUT_ID_KEPT = 1000  # digests of rows without an ID, kept in the cursor
# Skipped rows that are published all the same (by the paired SFTP source, or by an
# earlier try of this cursor): reconciliation must know them as published.
_PUBLISHED_SKIPS = frozenset({"covered_by_sftp", "confirmed_before"})


@dataclass(frozen=True, slots=True)
class Commit:
    """What a checkpoint commits once its batch is confirmed.

    Exactly-once: `messages` (the cursor record) join the batch's transaction and
    `on_confirmed` tells the store it landed. At-least-once: no messages;
    `on_confirmed` writes the cursor to its store, after the flush.
    """

    messages: tuple[tuple[str, bytes, bytes], ...]
    on_confirmed: Callable[[], None]


class Position(Protocol):
    """A source's progress through one poll, as the drive loop sees it, row by row."""

    def admit(self, cdr_id: int | None, raw: str) -> str | None:
        """Called for every row, in order: None to handle it, else why it is skipped."""
        ...

    def checkpoint_safe(self) -> bool:
        """May a checkpoint be taken now, mid-stream, without risking a skipped row?"""
        ...

    def commit(self, *, broken: bool = False) -> Commit | None:
        """What a checkpoint now commits (`broken`: after the rows broke off); None: nothing."""
        ...


@dataclass
class Tally:
    """What one drive did, row by row."""

    rows: int = 0  # rows given to the loop, skipped ones included
    published: int = 0
    dead_lettered: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


class Drive:
    """The one drive loop: type -> admit -> publish or dead-letter -> checkpoint.

    Every source feeds it rows (the feed a response, the file collector a file), with
    a `Position` that decides which rows count and what a checkpoint commits. The
    caller runs `run()` and then `checkpoint()`; after an error it may still
    `checkpoint()` what was confirmed so far, where its source says that is safe.
    """

    def __init__(
        self,
        sink: EventSink,
        publisher: Publisher,
        position: Position,
        *,
        checkpoint_every: int,
        headers: Sequence[tuple[str, str | bytes | None]] = (),
        fromid: int = 0,
        file: str | None = None,
        on_checkpoint: Callable[[], None] | None = None,
        progress: Callable[[Tally], None] | None = None,
        published: Notes | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.sink = sink
        self.publisher = publisher
        self.position = position
        self.checkpoint_every = checkpoint_every
        self.headers = headers
        self.fromid = fromid
        self.file = file
        self.on_checkpoint = on_checkpoint
        self.progress = progress
        # Told of every CDR handled, for reconciliation's record of what was published.
        self.published = published
        # Set (cluster mode: the unit moves to another replica): the poll is abandoned at
        # the next row, its open batch not committed (StoppedError), whatever its length.
        self.stop = stop
        self.batch = Batch()
        self.tally = Tally()
        # The earliest local date of the rows handled, when asked (`track_days`): where a
        # catch-up by date windows starts (FeedPipeline).
        self.track_days = False
        self.first_day: date | None = None

    def run(self, rows: Iterable[Row | Rejection | Encoded]) -> None:
        """Handle every row; may raise from the rows' iterator (the batch stays open)."""
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        try:
            self._run(rows, next_progress)
        except MessagesRejectedError as exc:
            # Exactly-once: a refusal aborted the transaction mid-batch. Find the culprits
            # and replay (raises EventsRejectedError).
            self._dead_letter_refused(exc)
            raise

    def _run(self, rows: Iterable[Row | Rejection | Encoded], next_progress: float) -> None:
        sink, publisher, position, tally = self.sink, self.publisher, self.position, self.tally
        refused = sink.refused
        published = self.published
        note = published.add if published is not None else None
        encode, publish, admit = sink.rows.encode, sink.publish, position.admit
        tail = sink.header_tail(self.headers)  # precomputed: the same for every event
        stopping = self.stop.is_set if self.stop is not None else None
        checkpoint_every, progress, monotonic = self.checkpoint_every, self.progress, time.monotonic
        for row in rows:
            if stopping is not None and stopping():
                raise StoppedError(
                    f"stopped after {tally.rows} rows; the batch since the last checkpoint "
                    "is not committed"
                )
            tally.rows += 1
            # Step 3: type and encode the row in one pass (events.RowEncoder); a row that
            # cannot be typed becomes a rejection. Rows from the workers come encoded.
            if isinstance(row, Row):
                item: Event | Rejection = encode(row)
            elif isinstance(row, Encoded):
                item = row.item
            else:
                item = row
            cdr_id = item.cdr_id
            if (
                self.track_days
                and isinstance(item, Event)
                and (self.first_day is None or item.day < self.first_day)
            ):
                self.first_day = item.day
            skip = admit(cdr_id, row.raw)
            if skip is not None:
                tally.skipped[skip] += 1
                if note is not None and skip in _PUBLISHED_SKIPS and isinstance(item, Event):
                    note(item)
                continue
            # Step 4: produce the event or the dead letter.
            if refused and isinstance(item, Event) and item.cdr_id in refused:
                # Exactly-once replay of a transaction Kafka refused this event in.
                raw = row.raw if isinstance(row, Row | Encoded) else ""
                item = Rejection("kafka_rejected", refused[item.cdr_id], raw, item.cdr_id)
            if isinstance(item, Event):
                publish(publisher, item, self.batch, tail, row.raw)
                tally.published += 1
                if note is not None:
                    note(item)
            else:
                sink.dead_letter(publisher, item, self.batch, fromid=self.fromid, file=self.file)
                tally.dead_lettered += 1
                if published is not None and item.cdr_id is not None:
                    published.add_id(item.cdr_id)
            if self.batch.size >= checkpoint_every and position.checkpoint_safe():
                # Step 5 (mid-stream): the rows so far, confirmed, then the cursor.
                self.checkpoint()
            if progress is not None and monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                progress(tally)

    def checkpoint(self, *, broken: bool = False) -> None:
        """Step 5: flush and check every delivery report, then commit the cursor.

        `broken`: the rows broke off (a cut body); the source commits what it safely can.

        Kafka may refuse some events for what they are (a timestamp, a size, a policy):
        those go to the dead-letter topic with the broker's reason, and the rest of the
        batch is committed. At least once, at once; exactly once, the transaction is
        aborted and the poll replayed with them dead-lettered (EventsRejectedError).
        """
        commit = self.position.commit(broken=broken)
        messages = commit.messages if commit is not None else ()
        on_confirmed = commit.on_confirmed if commit is not None else None
        try:
            self.sink.confirm(
                self.publisher, self.batch, cursor_messages=messages, on_confirmed=on_confirmed
            )
        except MessagesRejectedError as exc:
            self._dead_letter_refused(exc)
            self.sink.confirm(
                self.publisher, self.batch, cursor_messages=(), on_confirmed=on_confirmed
            )
        self.batch = Batch()
        if self.on_checkpoint is not None:
            self.on_checkpoint()

    def _dead_letter_refused(self, exc: MessagesRejectedError) -> None:
        sink, publisher = self.sink, self.publisher
        refused = sink.isolate(publisher, exc.rejected)
        events = [r for r in refused if r.topic == sink.topic and r.cdr_id is not None]
        others = [r for r in refused if r not in events]
        for r in events:
            log.warning(
                "%s %s: Kafka refused the event of CDR %s (%s); it goes to the dead-letter "
                "topic", sink.source, sink.name, r.cdr_id, r.reason,
            )  # fmt: skip
        if others:
            # A dead letter or cursor record Kafka refuses on its own: nothing to fall back to.
            raise DeliveryError(
                f"Kafka refused {len(others)} dead letters or cursor records: {others[0].reason}"
            ) from exc
        if publisher.transactional_id:
            sink.refuse(events)
            raise EventsRejectedError(
                f"Kafka refused {len(events)} events (CDR "
                f"{', '.join(str(r.cdr_id) for r in events[:5])}"
                f"{' ...' if len(events) > 5 else ''}): the transaction is aborted and the "
                "poll replayed with them dead-lettered"
            ) from exc
        for r in events:
            assert r.cdr_id is not None
            rejection = Rejection(
                "kafka_rejected", f"Kafka refused the event: {r.reason}", sink.sent(r).raw,
                r.cdr_id,
            )  # fmt: skip
            sink.dead_letter(publisher, rejection, self.batch, fromid=self.fromid, file=self.file)
            self.tally.published -= 1
            self.tally.dead_lettered += 1


class FeedPosition:
    """A feed's position within one response: the committed cursor, and what was handled.

    Rows at or below the cursor are skipped (`below_cursor`), repeated IDs too
    (`duplicate`), IDs confirmed in an earlier try of this cursor (`confirmed_before`),
    rows without an ID already dead-lettered at this cursor (`dead_lettered_before`),
    and IDs the paired SFTP source published (`covered_by_sftp`; the cursor moves over
    them). Mid-response checkpoints are safe only while the response keeps to ID order
    (with `ids_ascending`).
    """

    def __init__(
        self,
        name: str,
        start: FeedCursor,
        store: CursorStore,
        *,
        exactly_once: bool,
        ascending: bool,
        covered: Container[int] | None,
        record: PublishedRecord | None = None,
    ) -> None:
        self.name = name
        self.start = start
        self.record = record  # reconciliation's record of what was published, if on
        self.committed = start.cursor
        self.high = start.cursor  # the highest ID handled (published or dead-lettered) so far
        self.store = store
        self.exactly_once = exactly_once
        self.ascending = ascending
        self.covered = covered
        self._fromid = start.cursor
        self._confirmed_before = IdRanges.of(start.confirmed)
        self._any_confirmed_before = bool(start.confirmed)  # mostly not: a test per row saved
        self._without_id_before = frozenset(start.without_id)
        self._without_id: list[str] = []  # digests of this response's rows without an ID
        self._seen = IdRanges()  # every ID of this response handled so far

    def admit(self, cdr_id: int | None, raw: str) -> str | None:
        if cdr_id is None:
            digest = hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=12)
            key = digest.hexdigest()
            if len(self._without_id) < MAX_WITHOUT_ID_KEPT:
                self._without_id.append(key)
            return "dead_lettered_before" if key in self._without_id_before else None
        if cdr_id <= self._fromid:
            return "below_cursor"
        if not self._seen.add(cdr_id):
            return "duplicate"
        if cdr_id > self.high:
            self.high = cdr_id
        elif self.ascending:
            self.ascending = False
            log.warning(
                "feed %s: ID %d came after ID %d although ids_ascending is set; "
                "no more checkpoints until this response ends",
                self.name, cdr_id, self.high,
            )  # fmt: skip
        if self._any_confirmed_before and cdr_id in self._confirmed_before:
            return "confirmed_before"  # a try of this cursor that broke off confirmed it
        if self.covered is not None and cdr_id in self.covered:
            # The paired SFTP source published it: handled, not published again.
            return "covered_by_sftp"
        return None

    def checkpoint_safe(self) -> bool:
        # Everything up to `high` came before any higher ID.
        return self.ascending

    def commit(self, *, broken: bool = False) -> Commit | None:
        """The cursor the checkpoint commits.

        Normally `high`: every ID up to it came in this response. `broken`, after the
        response broke off: the cursor moves only over IDs handled without a gap from
        it, and every other ID handled is kept as confirmed above it.
        """
        published = self.record.snapshot() if self.record is not None else None
        if broken:
            state = self._partial_state(published)
        else:
            confirmed = self._confirmed_before.copy()
            confirmed.discard_through(self.high)
            state = FeedCursor(self.high, tuple(confirmed), tuple(self._without_id), published)
        if state == self.start and self.committed == state.cursor:
            return None
        if self.exactly_once:
            store = cast(TransactionalCursorStore, self.store)
            on_confirmed = partial(self._committed, store.committed_state, state)
            return Commit((store.message_state(state),), on_confirmed)
        return Commit((), partial(self._committed, self.store.commit_state, state))

    def _partial_state(self, published: PublishedHours | None) -> FeedCursor:
        handled = IdRanges.of([*self._confirmed_before, *self._seen])
        cursor = self._fromid
        ranges = list(handled)
        if ranges and ranges[0][0] <= cursor + 1:
            cursor = max(cursor, ranges[0][1])
        handled.discard_through(cursor)
        without_id = tuple(dict.fromkeys((*self.start.without_id, *self._without_id)))
        return FeedCursor(cursor, tuple(handled), without_id[-MAX_WITHOUT_ID_KEPT:], published)

    def _committed(self, commit: Callable[[FeedCursor], None], state: FeedCursor) -> None:
        commit(state)
        self.committed = state.cursor
        self.start = state
        if self.record is not None:
            self.record.committed = state.published


@dataclass
class CatchUp:
    """A feed asking for one date (or hour) window at a time, oldest first, up to today.

    For a provider whose answer from the cursor breaks at the same place on every try:
    smaller answers get through. `high` is the highest ID handled in the windows so far.
    """

    windows: list[tuple[date, int | None]]
    high: int = 0

    @classmethod
    def from_day(cls, first: date, today: date) -> CatchUp:
        days = max(0, (today - first).days)
        return cls([(first + timedelta(days=n), None) for n in range(days + 1)])


@dataclass
class PollResult:
    """What one poll did."""

    cursor_before: int
    cursor_after: int = 0
    rows: int = 0  # rows the response held, skipped ones included
    published: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    duplicates: int = 0
    covered: int = 0  # rows the paired SFTP source had already published
    confirmed_before: int = 0  # confirmed by an earlier try of this cursor that broke off
    dead_lettered_before: int = 0  # rows without an ID, dead-lettered before
    more: bool = False  # a catch-up by date windows goes on: poll again at once
    seconds: float = 0.0
    late: int = 0  # CDRs found late by this poll's reconciliation check (published or dead)


class FeedPipeline:
    """Moves one feed's CDRs into Kafka, one poll at a time.

    At-least-once (the default): each checkpoint flushes, checks every delivery report,
    then commits the cursor to its store. Exactly-once (a publisher with a
    transactional id and a Kafka cursor store): each checkpoint's events, dead letters
    and cursor record are one Kafka transaction.

    `covered_by`, for a feed paired with an SFTP source: called once per poll, it gives
    the IDs that source already published above this feed's cursor; they are skipped
    (counted as covered_by_sftp) and the cursor moves over them.

    `reconciler` (streamer/reconcile.py; set by app.py once the pipeline's sink
    exists): every CDR handled is noted in its record, which each commit carries,
    and after a successful poll it may check one recent hour for CDRs found late.
    """

    def __init__(
        self,
        *,
        name: str,
        client: FeedClient,
        encoder: Encoder,
        cursor_store: CursorStore,
        topic: str,
        dead_letter_topic: str,
        metrics: FeedMetrics,
        publisher_factory: Callable[[], Publisher] | None = None,
        publisher_slot: PublisherSlot | None = None,
        source: str = "feed",
        checkpoint_every: int = 10_000,
        flush_timeout_s: float = 120.0,
        exactly_once: bool = False,
        ids_ascending: bool = False,
        covered_by: Callable[[], Container[int]] | None = None,
        timestamp_limits: TimestampLimits | None = None,
        timezone: str = "Pacific/Auckland",
        headers: Sequence[tuple[str, str | bytes | None]] = (),
        stop: threading.Event | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        if exactly_once and not is_transactional_store(cursor_store):
            raise TypeError("exactly-once needs a cursor store that can join a transaction")
        if publisher_slot is None:
            if publisher_factory is None:
                raise TypeError("give publisher_factory or publisher_slot")
            publisher_slot = PublisherSlot(publisher_factory)
        self.name = name
        self.client = client
        self.slot = publisher_slot
        self.encoder = encoder
        self.cursor_store = cursor_store
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.metrics = metrics
        self.source = source
        self.checkpoint_every = checkpoint_every
        self.flush_timeout_s = flush_timeout_s
        self.exactly_once = exactly_once
        self.ids_ascending = ids_ascending
        self.covered_by = covered_by
        self.headers = headers  # more headers on every event (a backfill's `replay`)
        self.stop = stop  # set: a poll stops at its next row (Drive.stop)
        # The process's worker processes for parse -> type -> encode (streamer/workers.py;
        # shared, closed by its owner); None: in-process.
        self.pool = pool
        self.last_cursor: int | None = None  # the last committed; for log lines only
        self.timezone = ZoneInfo(timezone)
        self._first_day: date | None = None  # of the rows seen before the last break
        self._catch_up: CatchUp | None = None
        self._last_failure: tuple[int, str, str] | None = None
        self._same_failures = 0
        self.reconciler: Reconciler | None = None
        # The record after the last successful poll: the next poll goes on with it when
        # the committed one is still the same, instead of decoding it again.
        self._record: PublishedRecord | None = None
        self.sink = EventSink(
            name=name,
            source=source,
            slot=publisher_slot,
            encoder=encoder,
            topic=topic,
            dead_letter_topic=dead_letter_topic,
            metrics=metrics,
            flush_timeout_s=flush_timeout_s,
            timestamp_limits=timestamp_limits,
        )

    @property
    def publisher(self) -> Publisher:
        """The current producer; built on first use and again after a fatal error."""
        return self.slot.get()

    def close(self) -> None:
        self.slot.close()
        self.client.close()

    def _parser(self) -> BodyParser | None:
        """The workers' parser for this feed's bodies, when they can take them."""
        return self.pool.parser(self.client.query.format, self.sink.rows) if self.pool else None

    def poll(self) -> PollResult:
        """Fetch everything after the committed cursor once; commit as it is confirmed."""
        started = time.monotonic()
        # A transactional producer fences older instances and aborts their open
        # transaction before we read the cursor, so the cursor we read is final.
        publisher = self.publisher
        # Step 1: the committed cursor is where this poll starts.
        start = self.cursor_store.load_state()
        fromid = start.cursor
        self.last_cursor = fromid
        covered = self.covered_by() if self.covered_by is not None else None
        self.metrics.cursor.set(fromid)
        log.debug("feed %s: polling from cursor %d", self.name, fromid)
        result = PollResult(cursor_before=fromid, cursor_after=fromid)
        record: PublishedRecord | None = None
        try:
            record = self._record_of(start, covered)
            self._poll(publisher, start, covered, result, started, record)
            if record is not None and self._catch_up is None:
                self._reconcile(publisher, covered, record, result)
        except BaseException as exc:
            self._record = None  # it may hold what no commit made durable
            if not isinstance(exc, StoppedError):
                self._count_failure(fromid, exc)
            self.sink.recover(publisher, exc)
            forget = getattr(self.cursor_store, "forget", None)
            if self.exactly_once and forget is not None:
                # Did a failed commit land or not? Only Kafka knows: read it back next time.
                forget()
            raise
        self.last_cursor = result.cursor_after
        self.sink.forget_refused_through(
            result.cursor_after, record.knows if record is not None else None
        )
        self.metrics.skip("below_cursor", result.skipped)
        self.metrics.skip("duplicate", result.duplicates)
        self.metrics.skip("covered_by_sftp", result.covered)
        self.metrics.skip("confirmed_before", result.confirmed_before)
        self.metrics.skip("dead_lettered_before", result.dead_lettered_before)
        if record is not None and self.reconciler is not None:
            self._record = record
            self.reconciler.observe(record)
        self.metrics.poll_succeeded()
        self._same_failures, self._last_failure = 0, None
        self.metrics.repeated_failures.set(0)
        result.seconds = time.monotonic() - started
        return result

    def _record_of(
        self, start: FeedCursor, covered: Container[int] | None
    ) -> PublishedRecord | None:
        """Reconciliation's working record for this poll (None: reconciliation is off)."""
        if self.reconciler is None:
            return None
        record = self._record
        if record is None or record.committed != start.published:
            record = self.reconciler.record(start)
        if isinstance(covered, IdRanges):
            record.add_ranges(covered)  # published by the paired SFTP source
        return record

    def _reconcile(
        self,
        publisher: Publisher,
        covered: Container[int] | None,
        record: PublishedRecord,
        result: PollResult,
    ) -> None:
        """At most one hour's reconciliation check, if one is due and the budget allows."""
        reconciler = self.reconciler
        if reconciler is None or not reconciler.ready():
            return
        # The cursor this poll committed: a check publishes only IDs at or below it.
        check = reconciler.check(publisher, self.cursor_store.load_state(), record, covered)
        if check is not None:
            result.late = check.late + check.late_dead_lettered

    def _count_failure(self, fromid: int, exc: BaseException) -> None:
        """Polls failing the same way from the same cursor: a break that recurs every time."""
        failure = (fromid, type(exc).__name__, getattr(exc, "reason", ""))
        self._same_failures = self._same_failures + 1 if failure == self._last_failure else 1
        self._last_failure = failure
        self.metrics.repeated_failures.set(self._same_failures)
        broke_off = isinstance(exc, BadResponseError | FeedUnavailableError)
        if (
            self._same_failures >= REPEATED_FAILURES_WARN
            and broke_off
            and self._catch_up is None
            and self._first_day is not None
        ):
            # The same answer breaks at the same place every time: ask for less at a time.
            self._catch_up = CatchUp.from_day(
                self._first_day - timedelta(days=1), datetime.now(self.timezone).date()
            )
            log.warning(
                "feed %s: catching up by date windows from %s (%d requests at least), since "
                "the answer from cursor %d breaks at the same place every time",
                self.name, self._catch_up.windows[0][0], len(self._catch_up.windows), fromid,
            )  # fmt: skip
            return
        if self._same_failures == REPEATED_FAILURES_WARN:
            log.error(
                "feed %s: %d polls in a row from cursor %d failed the same way (%s); the rows "
                "before the break are kept and not published again, but the provider's answer "
                "breaks at the same place every time: check the provider, or narrow the "
                "request (page_size, or a backfill by --date)",
                self.name, self._same_failures, fromid, exc,
            )  # fmt: skip

    def _poll(
        self,
        publisher: Publisher,
        start: FeedCursor,
        covered: Container[int] | None,
        result: PollResult,
        started: float,
        record: PublishedRecord | None = None,
    ) -> None:
        if self._catch_up is not None:
            self._poll_window(publisher, start, covered, result, started, self._catch_up, record)
            return
        fromid = start.cursor
        position = FeedPosition(
            self.name, start, self.cursor_store, exactly_once=self.exactly_once,
            ascending=self.ids_ascending, covered=covered, record=record,
        )  # fmt: skip

        def checkpointed() -> None:
            if position.committed > result.cursor_after:
                result.cursor_after = position.committed
                self.last_cursor = position.committed
                self.metrics.cursor.set(position.committed)

        drive = Drive(
            self.sink, publisher, position, checkpoint_every=self.checkpoint_every,
            fromid=fromid, on_checkpoint=checkpointed, headers=self._headers(fromid),
            progress=partial(self._log_progress, position, started), published=record,
            stop=self.stop,
        )  # fmt: skip
        drive.track_days = self._same_failures > 0  # a break may recur: note where it starts
        parse = self._parser()
        try:
            # Step 2: fetch; the rows arrive parsed (and, from the workers, typed and
            # encoded) as the body streams in.
            try:
                with self.client.fetch(fromid, parse=parse) as rows:
                    drive.run(rows)
            except (BadResponseError, FeedUnavailableError) as exc:
                if drive.tally.rows:
                    self._keep_before_break(drive, position, exc)
                if drive.first_day is not None:
                    self._first_day = drive.first_day
                raise
            # Step 5: every event and dead letter of the response confirmed -> commit.
            drive.checkpoint()
        finally:
            tally = drive.tally
            result.rows = tally.rows
            result.published = tally.published
            result.dead_lettered = tally.dead_lettered
            result.skipped = tally.skipped["below_cursor"]
            result.duplicates = tally.skipped["duplicate"]
            result.covered = tally.skipped["covered_by_sftp"]
            result.confirmed_before = tally.skipped["confirmed_before"]
            result.dead_lettered_before = tally.skipped["dead_lettered_before"]

    def _poll_window(
        self,
        publisher: Publisher,
        start: FeedCursor,
        covered: Container[int] | None,
        result: PollResult,
        started: float,
        catch_up: CatchUp,
        record: PublishedRecord | None = None,
    ) -> None:
        """One date (or hour) window of a catch-up; the last one moves the cursor over all."""
        day, hour = catch_up.windows[0]
        position = FeedPosition(
            self.name, start, self.cursor_store, exactly_once=self.exactly_once,
            ascending=False, covered=covered, record=record,
        )  # fmt: skip
        drive = Drive(
            self.sink, publisher, position, checkpoint_every=self.checkpoint_every,
            fromid=start.cursor, headers=self._headers(start.cursor), published=record,
            stop=self.stop,
        )  # fmt: skip
        window = replace(self.client.query, date=day, hour=hour)
        try:
            with self.client.fetch(start.cursor, window) as rows:
                drive.run(rows)
        except (BadResponseError, FeedUnavailableError) as exc:
            if drive.tally.rows:
                self._keep_before_break(drive, position, exc)
            if hour is None:  # a day too large: its hours, one at a time
                catch_up.windows[:1] = [(day, h) for h in range(24)]
                log.info("feed %s: %s breaks off too; trying it hour by hour", self.name, day)
                result.more = True
                return
            raise
        finally:
            result.rows += drive.tally.rows
            result.published += drive.tally.published
            result.dead_lettered += drive.tally.dead_lettered
        catch_up.high = max(catch_up.high, position.high)
        catch_up.windows.pop(0)
        if catch_up.windows:
            drive.checkpoint(broken=True)  # a window is not the whole feed: keep, don't skip
            result.more = True
        else:
            # Every window up to today is in: every ID above the cursor up to the highest
            # one handled has been seen, so the cursor moves over them all.
            position.high = max(position.high, catch_up.high)
            drive.checkpoint()
            self._catch_up, self._first_day = None, None
            log.info("feed %s: caught up by date windows; cursor %d", self.name, position.high)
        result.cursor_after = max(result.cursor_after, position.committed)
        self.last_cursor = result.cursor_after
        self.metrics.cursor.set(result.cursor_after)

    def _headers(self, fromid: int) -> list[tuple[str, str | bytes | None]]:
        """Each event's extra headers: `fromid`, the committed cursor its poll started from.

        So a lost cursor can be recovered from the topic without skipping a CDR (startup.py).
        """
        return [("fromid", str(fromid).encode()), *self.headers]

    def _keep_before_break(self, drive: Drive, position: FeedPosition, exc: Exception) -> None:
        """The body broke off: commit the rows before the break, so no retry repeats them."""
        try:
            drive.checkpoint(broken=True)
        except StreamerError as error:
            log.warning(
                "feed %s: could not keep the rows before the break (%s): %s",
                self.name, exc, error,
            )  # fmt: skip
            return
        state = position.start
        log.info(
            "feed %s: the response broke off after %d rows (%s); they are confirmed: cursor "
            "%d, %d ID ranges above it kept so that no retry publishes them again",
            self.name, drive.tally.rows, getattr(exc, "reason", type(exc).__name__),
            state.cursor, len(state.confirmed),
        )  # fmt: skip

    def _log_progress(self, position: FeedPosition, started: float, tally: Tally) -> None:
        elapsed = time.monotonic() - started
        log.info(
            "feed %s: %d rows so far (%.0f rows/s), %d published, %d dead letters, "
            "cursor %d committed, highest ID %d",
            self.name, tally.rows, tally.rows / elapsed if elapsed else 0.0,
            tally.published, tally.dead_lettered, position.committed, position.high,
        )  # fmt: skip
