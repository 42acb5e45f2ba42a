"""The only place that orders the stages.

cursor -> fetch -> parse -> type -> encode -> publish -> confirm -> commit.

A poll of one feed:

1. Load the committed cursor: every CDR with an ID at or below it is confirmed in Kafka.
2. Fetch the feed from that cursor; the body is parsed as it arrives.
3. Each row becomes a record or a rejection (a bad row never stops the page).
4. Records are encoded to Avro and produced keyed by AccountCode; rejections go to
   the dead-letter topic. Rows at or below the cursor, or repeated, are skipped and counted.
5. At each checkpoint and at the end: flush and check every delivery report,
   and only then commit the cursor (the highest ID handled so far).

Mid-response checkpoints are taken only for a feed configured with `ids_ascending`
(its provider sends each response in ID order), and only while the response keeps to
it: if a lower ID could still follow, committing the highest ID so far could skip it
for good should the response then break off. Otherwise the cursor is committed once,
at the end of each response, and a crash mid-response publishes that response again.

Steps 4 and 5 are shared with the SFTP collector (streamer/sftp.py) through
`EventSink`; a feed and the SFTP source paired with it run in one thread
(`run_together`) and share one producer (`PublisherSlot`).
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, cast

from streamer.avro import timestamp_ms
from streamer.cursor import CursorStore
from streamer.deadletter import encode_dead_letter
from streamer.errors import DeliveryError, FatalError, RetriableError, StreamerError
from streamer.feed import Backoff, FeedClient
from streamer.metrics import FeedMetrics
from streamer.publisher import Publisher
from streamer.records import CallRecord, Rejection, to_record

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


class IdRanges:
    """The set of IDs handled in one response, as sorted closed ranges.

    Feed IDs are nearly contiguous, so a million IDs are usually one range: memory
    stays flat where a Python set would take tens of megabytes.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, n: int) -> bool:
        """Add `n`; False if it was already there."""
        starts, ends = self._starts, self._ends
        if not ends or n > ends[-1] + 1:
            starts.append(n)
            ends.append(n)
            return True
        if n == ends[-1] + 1:
            ends[-1] = n
            return True
        i = bisect.bisect_right(starts, n) - 1
        if i >= 0 and n <= ends[i]:
            return False
        # A new ID below the highest one: join the neighbouring ranges where they touch.
        joins_left = i >= 0 and ends[i] + 1 == n
        joins_right = i + 1 < len(starts) and starts[i + 1] - 1 == n
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = n
        elif joins_right:
            starts[i + 1] = n
        else:
            starts.insert(i + 1, n)
            ends.insert(i + 1, n)
        return True

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int):
            return False
        i = bisect.bisect_right(self._starts, n) - 1
        return i >= 0 and n <= self._ends[i]

    def __len__(self) -> int:
        """The number of ranges (not of IDs)."""
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The ranges, as (first, last) pairs in ascending order."""
        return zip(self._starts, self._ends, strict=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdRanges) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def copy(self) -> IdRanges:
        ranges = IdRanges()
        ranges._starts, ranges._ends = list(self._starts), list(self._ends)
        return ranges

    def discard_through(self, n: int) -> None:
        """Forget every ID at or below `n`."""
        i = bisect.bisect_right(self._ends, n)
        del self._starts[:i], self._ends[:i]
        if self._starts and self._starts[0] <= n:
            self._starts[0] = n + 1

    @classmethod
    def of(cls, pairs: Sequence[Sequence[int]]) -> IdRanges:
        """IdRanges from (first, last) pairs, in any order; ValueError if one is not a pair."""
        checked: list[tuple[int, int]] = []
        for pair in pairs:
            first, last = pair
            if not (type(first) is int and type(last) is int and 0 <= first <= last):
                raise ValueError(f"not an ID range: {pair!r}")
            checked.append((first, last))
        ranges = cls()
        for first, last in sorted(checked):
            if ranges._ends and first <= ranges._ends[-1] + 1:
                ranges._ends[-1] = max(ranges._ends[-1], last)
            else:
                ranges._starts.append(first)
                ranges._ends.append(last)
        return ranges


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
    seconds: float = 0.0


@dataclass
class Batch:
    """What was produced since the last checkpoint; becomes metrics once confirmed."""

    published: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    newest_event_ms: int = 0
    size: int = 0


class Encoder(Protocol):
    """CallRecord -> the event's value bytes (single-object Avro, or registry framing)."""

    def encode(self, record: CallRecord) -> bytes: ...


class TransactionalCursorStore(CursorStore, Protocol):
    """A cursor store whose record can ride in the events' own Kafka transaction."""

    def message(self, cursor: int) -> tuple[str, bytes, bytes]: ...

    def committed(self, cursor: int) -> None: ...


class PublisherSlot:
    """The producer of one thread's sources: built on first use, again after a fatal error.

    A feed and the SFTP source paired with it share one slot, so in exactly-once
    mode both write through one transactional producer, one transaction at a time.
    """

    def __init__(self, factory: Callable[[], Publisher]) -> None:
        self._factory = factory
        self._publisher: Publisher | None = None

    def get(self) -> Publisher:
        if self._publisher is None:
            self._publisher = self._factory()
        return self._publisher

    def discard(self, publisher: Publisher) -> None:
        """Drop a producer a fatal error made useless; the next `get()` builds another."""
        if self._publisher is publisher:
            publisher.close(0)
            self._publisher = None

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None


class EventSink:
    """Steps 4 and 5 for any source: produce events and dead letters, confirm, then commit.

    One instance per source (its name, `source` header and metrics), over the
    producer of its `PublisherSlot`.
    """

    def __init__(
        self,
        *,
        name: str,
        source: str,
        slot: PublisherSlot,
        encoder: Encoder,
        topic: str,
        dead_letter_topic: str,
        metrics: FeedMetrics,
        flush_timeout_s: float,
    ) -> None:
        self.name = name
        self.source = source
        self.slot = slot
        self.encoder = encoder
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.metrics = metrics
        self.flush_timeout_s = flush_timeout_s
        self._headers_base: list[tuple[str, str | bytes | None]] = [
            ("source", source.encode()),
            ("feed", name.encode()),
        ]

    def publish(
        self,
        publisher: Publisher,
        record: CallRecord,
        batch: Batch,
        headers: Sequence[tuple[str, str | bytes | None]] = (),
    ) -> None:
        """Produce the record's event, keyed by AccountCode, stamped with the call's time."""
        ts = timestamp_ms(record)
        publisher.produce(
            self.topic,
            record.account_code.encode("utf-8"),
            self.encoder.encode(record),
            timestamp_ms=ts,
            headers=[("cdr_id", str(record.id).encode()), *self._headers_base, *headers],
        )
        batch.published[(record.status, record.direction, record.call_type)] += 1
        if ts > batch.newest_event_ms:
            batch.newest_event_ms = ts
        batch.size += 1

    def dead_letter(
        self,
        publisher: Publisher,
        rejection: Rejection,
        batch: Batch,
        *,
        fromid: int,
        file: str | None = None,
    ) -> None:
        """Produce the rejection to the dead-letter topic, keyed by the source's name."""
        headers: list[tuple[str, str | bytes | None]] = [
            ("reason", rejection.reason.encode()),
            *self._headers_base,
        ]
        if file is not None:
            headers.append(("file", file.encode("utf-8")))
        publisher.produce(
            self.dead_letter_topic,
            self.name.encode("utf-8"),
            encode_dead_letter(
                rejection, feed=self.name, source=self.source, fromid=fromid, file=file
            ),
            headers=headers,
        )
        batch.rejected[rejection.reason] += 1
        batch.size += 1

    def confirm(
        self,
        publisher: Publisher,
        batch: Batch,
        *,
        cursor_messages: Sequence[tuple[str, bytes, bytes]] = (),
        on_confirmed: Callable[[], None] | None = None,
    ) -> None:
        """Step 5: flush and check every delivery report, then commit the cursor.

        Exactly-once: `cursor_messages` join the open transaction and the flush commits
        it; `on_confirmed` then tells the store. At-least-once: `on_confirmed` commits
        the cursor to its store, after the flush.
        """
        self.metrics.in_flight.set(publisher.in_flight)
        try:
            for topic, key, value in cursor_messages:
                publisher.produce(topic, key, value)
            publisher.flush(self.flush_timeout_s)  # in a transaction: commits it
            if on_confirmed is not None:
                on_confirmed()
        except DeliveryError:
            self.metrics.delivery_errors.inc(max(1, publisher.in_flight))
            raise
        self.metrics.confirmed(batch.published, batch.rejected, batch.newest_event_ms / 1000)
        self.metrics.in_flight.set(0)

    def recover(self, publisher: Publisher, exc: BaseException) -> None:
        """After a failed poll: nothing of an open transaction may become visible."""
        publisher.abort()
        self.metrics.in_flight.set(publisher.in_flight)
        needs_new = isinstance(exc, DeliveryError) and exc.needs_new_producer
        if needs_new or not publisher.usable:
            log.warning(
                "%s %s: replacing the Kafka producer after a fatal error", self.source, self.name
            )
            self.slot.discard(publisher)


class FeedPipeline:
    """Moves one feed's CDRs into Kafka, one poll at a time.

    At-least-once (the default): each checkpoint flushes, checks every delivery report,
    then commits the cursor to its store. Exactly-once (a publisher with a
    transactional id and a Kafka cursor store): each checkpoint's events, dead letters
    and cursor record are one Kafka transaction.

    `covered_by`, for a feed paired with an SFTP source: called once per poll, it gives
    the IDs that source already published above this feed's cursor; they are skipped
    (counted as covered_by_sftp) and the cursor moves over them.
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
    ) -> None:
        if exactly_once and not _is_transactional_store(cursor_store):
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
        self.last_cursor: int | None = None  # as of the last poll; for log lines only
        self.sink = EventSink(
            name=name,
            source=source,
            slot=publisher_slot,
            encoder=encoder,
            topic=topic,
            dead_letter_topic=dead_letter_topic,
            metrics=metrics,
            flush_timeout_s=flush_timeout_s,
        )

    @property
    def publisher(self) -> Publisher:
        """The current producer; built on first use and again after a fatal error."""
        return self.slot.get()

    def close(self) -> None:
        self.slot.close()
        self.client.close()

    def poll(self) -> PollResult:
        """Fetch everything after the committed cursor once; commit as it is confirmed."""
        started = time.monotonic()
        # A transactional producer fences older instances and aborts their open
        # transaction before we read the cursor, so the cursor we read is final.
        publisher = self.publisher
        # Step 1: the committed cursor is where this poll starts.
        fromid = self.cursor_store.load()
        self.last_cursor = fromid
        covered = self.covered_by() if self.covered_by is not None else None
        self.metrics.cursor.set(fromid)
        log.debug("feed %s: polling from cursor %d", self.name, fromid)
        result = PollResult(cursor_before=fromid, cursor_after=fromid)
        try:
            self._poll(publisher, fromid, covered, result, started)
        except BaseException as exc:
            self.sink.recover(publisher, exc)
            forget = getattr(self.cursor_store, "forget", None)
            if self.exactly_once and forget is not None:
                # Did a failed commit land or not? Only Kafka knows: read it back next time.
                forget()
            raise
        self.last_cursor = result.cursor_after
        self.metrics.skip("below_cursor", result.skipped)
        self.metrics.skip("duplicate", result.duplicates)
        self.metrics.skip("covered_by_sftp", result.covered)
        self.metrics.poll_succeeded()
        result.seconds = time.monotonic() - started
        return result

    def _poll(
        self,
        publisher: Publisher,
        fromid: int,
        covered: Container[int] | None,
        result: PollResult,
        started: float,
    ) -> None:
        seen = IdRanges()
        high = fromid  # the highest ID handled (published or dead-lettered) in this poll
        ascending = self.ids_ascending  # mid-response checkpoints are safe while this holds
        batch = Batch()
        next_progress = started + PROGRESS_EVERY_S
        # Step 2: fetch; the rows arrive parsed as the body streams in.
        with self.client.fetch(fromid) as rows:
            for row in rows:
                result.rows += 1
                # Step 3: type the row; a row that cannot be typed becomes a rejection.
                item = row if isinstance(row, Rejection) else to_record(row)
                cdr_id = item.id if isinstance(item, CallRecord) else item.cdr_id
                if cdr_id is not None:
                    if cdr_id <= fromid:
                        result.skipped += 1
                        continue
                    if not seen.add(cdr_id):
                        result.duplicates += 1
                        continue
                    if cdr_id > high:
                        high = cdr_id
                    elif ascending:
                        ascending = False
                        log.warning(
                            "feed %s: ID %d came after ID %d although ids_ascending is set; "
                            "no more checkpoints until this response ends",
                            self.name, cdr_id, high,
                        )  # fmt: skip
                    if covered is not None and cdr_id in covered:
                        # The paired SFTP source published it: handled, not published again.
                        result.covered += 1
                        continue
                # Step 4: produce the event or the dead letter.
                if isinstance(item, CallRecord):
                    self.sink.publish(publisher, item, batch)
                    result.published += 1
                else:
                    self.sink.dead_letter(publisher, item, batch, fromid=fromid)
                    result.dead_lettered += 1
                if ascending and batch.size >= self.checkpoint_every:
                    # Step 5 (mid-response): everything up to `high` came before any higher ID.
                    self._checkpoint(publisher, batch, high, result)
                    batch = Batch()
                if time.monotonic() >= next_progress:
                    next_progress += PROGRESS_EVERY_S
                    self._log_progress(result, high, started)
        # Step 5: every event and dead letter of the response confirmed -> commit.
        self._checkpoint(publisher, batch, high, result)

    def _checkpoint(
        self, publisher: Publisher, batch: Batch, high: int, result: PollResult
    ) -> None:
        advance = high > result.cursor_after
        messages: tuple[tuple[str, bytes, bytes], ...] = ()
        on_confirmed: Callable[[], None] | None = None
        if advance and self.exactly_once:
            store = cast(TransactionalCursorStore, self.cursor_store)
            messages = (store.message(high),)
            on_confirmed = partial(store.committed, high)
        elif advance:
            on_confirmed = partial(self.cursor_store.commit, high)
        self.sink.confirm(publisher, batch, cursor_messages=messages, on_confirmed=on_confirmed)
        if advance:
            result.cursor_after = high
            self.metrics.cursor.set(high)

    def _log_progress(self, result: PollResult, high: int, started: float) -> None:
        elapsed = time.monotonic() - started
        log.info(
            "feed %s: %d rows so far (%.0f rows/s), %d published, %d dead letters, "
            "cursor %d committed, highest ID %d",
            self.name, result.rows, result.rows / elapsed if elapsed else 0.0,
            result.published, result.dead_lettered, result.cursor_after, high,
        )  # fmt: skip


def _is_transactional_store(store: object) -> bool:
    return callable(getattr(store, "message", None)) and callable(getattr(store, "committed", None))


class Runner(ABC):
    """Polls one source until stopped: retriable errors back off, fatal ones stop it."""

    kind = "source"  # the first word of its log lines: "feed", "sftp"

    def __init__(self, name: str, metrics: FeedMetrics, backoff: Backoff) -> None:
        self.name = name
        self.metrics = metrics
        self.backoff = backoff
        self.error: Exception | None = None
        self._failures = 0

    @abstractmethod
    def _poll(self, *, once: bool) -> float | None:
        """Poll once and log it; the seconds until the next poll, or None when done (once)."""

    @abstractmethod
    def _position(self) -> str:
        """Where the source's committed cursor stands, for the log of a failed poll."""

    @abstractmethod
    def close(self) -> None:
        """Release the source's connections and producer."""

    def step(self, *, once: bool = False, max_failures: int = 5) -> float | None:
        """One poll with its error handling: the seconds to wait, or None once this runner ends.

        With `once`, `max_failures` retriable errors in a row end the run (recorded in `error`).
        """
        label = f"{self.kind} {self.name}"
        self.metrics.poll_began()
        try:
            delay = self._poll(once=once)
        except FatalError as exc:
            log.error("%s stopped: %s", label, exc)
            self.metrics.poll_error(type(exc).__name__)
            self.metrics.feed_up.set(0)
            self.error = exc
            return None
        except RetriableError as exc:
            self.metrics.poll_error(type(exc).__name__)
            self._failures += 1
            if once and self._failures >= max_failures:
                log.error("%s: giving up after %d failures: %s", label, self._failures, exc)
                self.error = exc
                return None
            delay = self.backoff.next_delay(getattr(exc, "retry_after_s", None) or 0.0)
            try:
                position = self._position()
            except StreamerError as error:  # e.g. Kafka down: the cursor cannot be read now
                position = f"cursor unknown ({error})"
            log.warning("%s: %s; %s, next try in %.1f s", label, exc, position, delay)
            return delay
        except Exception as exc:
            # A bug or an unforeseen error: this source stops, loudly, and the process
            # reports it in its exit code, instead of a thread dying unnoticed.
            log.exception("%s stopped on an unexpected error: %s", label, exc)
            self.metrics.poll_error(type(exc).__name__)
            self.metrics.feed_up.set(0)
            self.error = exc
            return None
        finally:
            self.metrics.poll_ended()
        self.backoff.reset()
        self._failures = 0
        return delay

    def run(self, stop: threading.Event, *, once: bool = False, max_failures: int = 5) -> None:
        """Poll until `stop` is set; with `once`, until the source has nothing more."""
        while not stop.is_set():
            delay = self.step(once=once, max_failures=max_failures)
            if delay is None:
                return
            if delay > 0:
                stop.wait(delay)


class FeedRunner(Runner):
    """Polls one feed until stopped: retriable errors back off, fatal ones stop it."""

    kind = "feed"

    def __init__(
        self,
        pipeline: FeedPipeline,
        *,
        poll_interval_s: float,
        poll_jitter_ratio: float = 0.0,
        page_size: int = 0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            pipeline.name,
            pipeline.metrics,
            backoff or Backoff(1.0, min(300.0, max(1.0, poll_interval_s))),
        )
        self.pipeline = pipeline
        self.poll_interval_s = poll_interval_s
        self.poll_jitter_ratio = poll_jitter_ratio
        self.page_size = page_size
        self._rng = rng or random.Random()

    def close(self) -> None:
        self.pipeline.close()

    def _position(self) -> str:
        # No I/O here: this runs while Kafka (maybe holding the cursor) is failing.
        cursor = self.pipeline.last_cursor
        return "cursor not read yet" if cursor is None else f"cursor stays at {cursor}"

    def _poll(self, *, once: bool) -> float | None:
        result = self.pipeline.poll()
        log.info(
            "feed %s: %d rows in %.1f s: %d published, %d dead letters, %d skipped, "
            "%d duplicates%s; cursor %d -> %d",
            self.name,
            result.rows,
            result.seconds,
            result.published,
            result.dead_lettered,
            result.skipped,
            result.duplicates,
            f", {result.covered} published by SFTP" if result.covered else "",
            result.cursor_before,
            result.cursor_after,
        )
        # A full page that moved the cursor: the provider has more, fetch it now. (One
        # that did not move it would be fetched again as it is: wait the interval.)
        if (
            self.page_size
            and result.rows >= self.page_size
            and result.cursor_after > result.cursor_before
        ):
            return 0.0
        if once:
            return None
        return self.poll_interval_s * (1 + self._rng.uniform(0, self.poll_jitter_ratio))


def run_together(
    runners: Sequence[Runner],
    stop: threading.Event,
    *,
    once: bool = False,
    max_failures: int = 5,
) -> None:
    """Run several sources in this thread, each on its own schedule, one poll at a time.

    For a feed and its paired SFTP source: one poll never overlaps the other's, so
    each reads the other's committed progress, never a half-done one.
    """
    due = [0.0] * len(runners)
    active = list(range(len(runners)))
    while active and not stop.is_set():
        index = min(active, key=lambda i: due[i])
        wait = due[index] - time.monotonic()
        if wait > 0:
            stop.wait(wait)
            continue
        delay = runners[index].step(once=once, max_failures=max_failures)
        if delay is None:
            active.remove(index)
        else:
            due[index] = time.monotonic() + delay
