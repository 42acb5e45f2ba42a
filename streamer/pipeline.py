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

Steps 4 and 5 are shared with the SFTP collector (streamer/sources/sftp.py) through
`EventSink`; a feed and the SFTP source paired with it run in one thread
(`run_together`) and share one producer (`PublisherSlot`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from functools import partial
from typing import cast

from streamer.cursor import CursorStore, IdRanges, TransactionalCursorStore, is_transactional_store
from streamer.metrics import FeedMetrics
from streamer.publisher import Publisher
from streamer.records import CallRecord, Rejection, to_record
from streamer.sink import Batch, Encoder, EventSink, PublisherSlot
from streamer.sources.feed import FeedClient

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


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
