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

Mid-response checkpoints are taken only while the response has come in ascending ID
order: if a lower ID could still follow, committing the highest ID so far could skip it.
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from streamer.avro import SingleObjectEncoder, timestamp_ms
from streamer.cursor import CursorStore
from streamer.deadletter import encode_dead_letter
from streamer.errors import FatalError, RetriableError, StreamerError
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

    def __len__(self) -> int:
        return len(self._starts)


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
    seconds: float = 0.0


@dataclass
class _Batch:
    """What was produced since the last checkpoint; becomes metrics once confirmed."""

    published: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    newest_event_ms: int = 0
    size: int = 0


class FeedPipeline:
    """Moves one feed's CDRs into Kafka, one poll at a time."""

    def __init__(
        self,
        *,
        name: str,
        client: FeedClient,
        publisher: Publisher,
        encoder: SingleObjectEncoder,
        cursor_store: CursorStore,
        topic: str,
        dead_letter_topic: str,
        metrics: FeedMetrics,
        source: str = "feed",
        checkpoint_every: int = 10_000,
        flush_timeout_s: float = 120.0,
    ) -> None:
        self.name = name
        self.client = client
        self.publisher = publisher
        self.encoder = encoder
        self.cursor_store = cursor_store
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.metrics = metrics
        self.source = source
        self.checkpoint_every = checkpoint_every
        self.flush_timeout_s = flush_timeout_s
        self._headers_base = [("source", source.encode()), ("feed", name.encode())]

    def poll(self) -> PollResult:
        """Fetch everything after the committed cursor once; commit as it is confirmed."""
        started = time.monotonic()
        # Step 1: the committed cursor is where this poll starts.
        fromid = self.cursor_store.load()
        self.metrics.cursor.set(fromid)
        result = PollResult(cursor_before=fromid, cursor_after=fromid)
        seen = IdRanges()
        high = fromid  # the highest ID handled (published or dead-lettered) in this poll
        ascending = True
        batch = _Batch()
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
                    else:
                        ascending = False
                # Step 4: produce the event or the dead letter.
                if isinstance(item, CallRecord):
                    self._publish(item, batch)
                    result.published += 1
                else:
                    self._dead_letter(item, fromid, batch)
                    result.dead_lettered += 1
                batch.size += 1
                if ascending and batch.size >= self.checkpoint_every:
                    # Step 5 (mid-response): everything up to `high` came before any higher ID.
                    self._checkpoint(batch, high, result)
                    batch = _Batch()
                if time.monotonic() >= next_progress:
                    next_progress += PROGRESS_EVERY_S
                    self._log_progress(result, high, started)
        # Step 5: every event and dead letter of the response confirmed -> commit.
        self._checkpoint(batch, high, result)
        self.metrics.skip("below_cursor", result.skipped)
        self.metrics.skip("duplicate", result.duplicates)
        self.metrics.last_success.set(time.time())
        result.seconds = time.monotonic() - started
        return result

    def _publish(self, record: CallRecord, batch: _Batch) -> None:
        ts = timestamp_ms(record)
        self.publisher.produce(
            self.topic,
            record.account_code.encode("utf-8"),
            self.encoder.encode(record),
            timestamp_ms=ts,
            headers=[("cdr_id", str(record.id).encode()), *self._headers_base],
        )
        batch.published[(record.status, record.direction, record.call_type)] += 1
        if ts > batch.newest_event_ms:
            batch.newest_event_ms = ts

    def _dead_letter(self, rejection: Rejection, fromid: int, batch: _Batch) -> None:
        self.publisher.produce(
            self.dead_letter_topic,
            self.name.encode("utf-8"),
            encode_dead_letter(rejection, feed=self.name, source=self.source, fromid=fromid),
            headers=[("reason", rejection.reason.encode()), *self._headers_base],
        )
        batch.rejected[rejection.reason] += 1

    def _checkpoint(self, batch: _Batch, high: int, result: PollResult) -> None:
        self.metrics.in_flight.set(self.publisher.in_flight)
        try:
            self.publisher.flush(self.flush_timeout_s)
        except RetriableError:
            self.metrics.delivery_errors.inc(max(1, self.publisher.in_flight))
            raise
        self.metrics.confirmed(batch.published, batch.rejected, batch.newest_event_ms / 1000)
        self.metrics.in_flight.set(0)
        if high > result.cursor_after:
            self.cursor_store.commit(high)
            result.cursor_after = high
            self.metrics.cursor.set(high)

    def _log_progress(self, result: PollResult, high: int, started: float) -> None:
        elapsed = time.monotonic() - started
        log.info(
            "feed %s: %d rows so far (%.0f rows/s), %d published, %d dead letters, "
            "cursor %d committed, highest ID %d",
            self.name,
            result.rows,
            result.rows / elapsed if elapsed else 0.0,
            result.published,
            result.dead_lettered,
            result.cursor_after,
            high,
        )


class FeedRunner:
    """Polls one feed until stopped: retriable errors back off, fatal ones stop it."""

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
        self.pipeline = pipeline
        self.poll_interval_s = poll_interval_s
        self.poll_jitter_ratio = poll_jitter_ratio
        self.page_size = page_size
        self.backoff = backoff or Backoff(1.0, min(300.0, max(1.0, poll_interval_s)))
        self._rng = rng or random.Random()
        self.error: StreamerError | None = None

    def run(self, stop: threading.Event, *, once: bool = False, max_failures: int = 5) -> None:
        """Poll until `stop` is set; with `once`, until the feed has nothing more.

        With `once`, `max_failures` retriable errors in a row end the run (recorded in `error`).
        """
        name = self.pipeline.name
        metrics = self.pipeline.metrics
        failures = 0
        while not stop.is_set():
            try:
                result = self.pipeline.poll()
            except FatalError as exc:
                log.error("feed %s stopped: %s", name, exc)
                metrics.poll_error(type(exc).__name__)
                metrics.feed_up.set(0)
                self.error = exc
                return
            except RetriableError as exc:
                metrics.poll_error(type(exc).__name__)
                failures += 1
                if once and failures >= max_failures:
                    log.error("feed %s: giving up after %d failures: %s", name, failures, exc)
                    self.error = exc
                    return
                delay = self.backoff.next_delay(getattr(exc, "retry_after_s", None) or 0.0)
                log.warning(
                    "feed %s: %s; cursor stays at %d, next try in %.1f s",
                    name,
                    exc,
                    self.pipeline.cursor_store.load(),
                    delay,
                )
                stop.wait(delay)
                continue
            self.backoff.reset()
            failures = 0
            log.info(
                "feed %s: %d rows in %.1f s: %d published, %d dead letters, %d skipped, "
                "%d duplicates; cursor %d -> %d",
                name,
                result.rows,
                result.seconds,
                result.published,
                result.dead_lettered,
                result.skipped,
                result.duplicates,
                result.cursor_before,
                result.cursor_after,
            )
            if self.page_size and result.rows >= self.page_size:
                continue  # a full page: the provider has more, fetch it now
            if once:
                return
            stop.wait(self.poll_interval_s * (1 + self._rng.uniform(0, self.poll_jitter_ratio)))
