"""Events and dead letters to Kafka for any source: produce, confirm every delivery, then commit.

One `EventSink` per source (its name, `source` header and metrics), writing through the
producer of its `PublisherSlot`; a feed and the SFTP source paired with it share a slot.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from operator import attrgetter, itemgetter
from typing import Protocol

from streamer.deadletter import encode_dead_letter
from streamer.errors import DeliveryError, FencedError
from streamer.events import Event, RowTyper, row_encoder
from streamer.metrics import FeedMetrics, UsageTally
from streamer.publisher import Publisher, RejectedMessage, TimestampLimits
from streamer.records import CallRecord, Rejection

log = logging.getLogger(__name__)


# Events are tallied into the batch's counters a block at a time (Batch.fold), not one
# by one: a list append per event, then C-speed counting over the block.
TALLY_BLOCK = 1024
_labels_of = attrgetter("status", "direction", "call_type")
_timestamp_of = itemgetter(2)  # Event.timestamp_ms


@dataclass
class Batch:
    """What was produced since the last checkpoint; becomes metrics once confirmed."""

    published: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    usage: UsageTally = field(default_factory=UsageTally)  # seconds and charges, for the KPIs
    newest_event_ms: int = 0
    size: int = 0
    # Events produced and not yet tallied above (at most TALLY_BLOCK of them).
    block: list[Event] = field(default_factory=list)

    def fold(self) -> None:
        """Tally the block's events into the counters; `confirm` does, before the metrics."""
        block = self.block
        if block:
            self.published.update(map(_labels_of, block))
            self.usage.add_all(block)
            newest = max(map(_timestamp_of, block))
            if newest > self.newest_event_ms:
                self.newest_event_ms = newest
            block.clear()


@dataclass(frozen=True, slots=True)
class Sent:
    """One recently produced message, as the sink remembers it (EventSink.recent)."""

    cdr_id: int | None
    raw: str
    timestamp_ms: int
    headers: list[tuple[str, str | bytes | None]]


# Kept this far inside the topic's limits: a batch may reach the broker minutes later.
TIMESTAMP_SLACK_MS = 300_000
_TIMESTAMP_REFRESH_EVERY = 10_000  # publishes between recomputing the limits against now


MAX_REFUSED_KEPT = 10_000
MAX_RECENT_KEPT = 10_000


def event_id(value: bytes) -> int | None:
    """The CDR ID of an event's value: its first field, a zig-zag varint after the framing."""
    if value[:2] == b"\xc3\x01":  # Avro single-object: marker and an 8-byte fingerprint
        body = value[10:]
    elif value[:1] == b"\x00":  # Schema Registry: magic byte and a 4-byte schema id
        body = value[5:]
    else:
        return None
    n = shift = 0
    for byte in body[:10]:
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (n >> 1) ^ -(n & 1)
        shift += 7
    return None


def _utc_text(ts: int) -> str:
    """An epoch-ms instant as ISO 8601 UTC, for log lines (any instant Avro can carry)."""
    try:
        return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ts)).isoformat()
    except OverflowError:
        return f"{ts} ms since 1970"


def _bisect(
    probe: Callable[[list[RejectedMessage]], list[RejectedMessage]],
    messages: list[RejectedMessage],
) -> list[RejectedMessage]:
    failed = probe(messages)
    if not failed:
        return []
    if len(messages) == 1:
        return failed
    if len(failed) < len(messages):
        return _bisect(probe, failed)
    half = len(messages) // 2
    return _bisect(probe, messages[:half]) + _bisect(probe, messages[half:])


class Encoder(Protocol):
    """CallRecord -> the event's value bytes (single-object Avro, or registry framing).

    The sink does not call it row by row for the contract schema: `events.row_encoder`
    gives the fused fast path beside it (the encoder stays the reference and fallback).
    """

    def encode(self, record: CallRecord) -> bytes: ...


class PublisherSlot:
    """The producer of one thread's sources: built on first use, again after a fatal error.

    A feed and the SFTP source paired with it share one slot, so in exactly-once
    mode both write through one transactional producer, one transaction at a time.
    """

    def __init__(
        self,
        factory: Callable[[], Publisher],
        probe_factory: Callable[[], Publisher] | None = None,
    ) -> None:
        self._factory = factory
        # Exactly-once: builds a producer of its own transactional id, for the aborted
        # transactions that find which messages Kafka refuses (EventSink.isolate).
        self._probe_factory = probe_factory
        self._publisher: Publisher | None = None

    def probe_publisher(self) -> Publisher | None:
        return self._probe_factory() if self._probe_factory is not None else None

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
        timestamp_limits: TimestampLimits | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.slot = slot
        self.encoder = encoder
        # Steps 3 and 4 fused: row -> event (key, Avro value, timestamp) or rejection.
        self.rows: RowTyper = row_encoder(encoder)
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.metrics = metrics
        self.flush_timeout_s = flush_timeout_s
        self._headers_base: list[tuple[str, str | bytes | None]] = [
            ("source", source.encode()),
            ("feed", name.encode()),
        ]
        self.timestamp_limits = timestamp_limits or TimestampLimits()
        self._ts_lo, self._ts_hi, self._ts_refresh = 0, 0, 0
        self._refresh_timestamp_limits()
        self._warned_timestamp = False
        # Exactly-once: CDR IDs whose event Kafka refused, with its reason. The replay of
        # the aborted transaction dead-letters them (Drive.run). Bounded; pruned by cursor.
        self.refused: dict[int, str] = {}
        # The last messages produced, as (value, cdr_id, raw, timestamp, headers): Kafka's
        # report of a refused message carries neither headers nor timestamp, and its dead
        # letter needs the raw row (isolate). Bounded: a report comes back within the
        # producer's in-flight window, far fewer messages than this in practice. Kept as
        # plain tuples, indexed by value (unique: each holds its ID) only when asked.
        self.recent: deque[tuple[bytes, int | None, str, int, list[tuple[str, str | bytes | None]]]]
        self.recent = deque(maxlen=MAX_RECENT_KEPT)
        self._recent_index: dict[bytes, Sent] = {}
        self._recent_indexed: object = None  # the newest entry when the index was built

    def header_tail(
        self, headers: Sequence[tuple[str, str | bytes | None]] = ()
    ) -> tuple[tuple[str, str | bytes | None], ...]:
        """The headers every event of a drive carries after its cdr_id: computed once."""
        return (*self._headers_base, *headers)

    def _refresh_timestamp_limits(self) -> None:
        limits, now_ms = self.timestamp_limits, int(time.time() * 1000)
        lo, hi = 0, 2**63 - 1  # before 1970 is out, always
        if not limits.log_append_time:
            if limits.before_max_ms is not None:
                lo = max(0, now_ms - limits.before_max_ms + TIMESTAMP_SLACK_MS)
            if limits.after_max_ms is not None:
                hi = now_ms + max(0, limits.after_max_ms - TIMESTAMP_SLACK_MS)
        self._ts_lo, self._ts_hi = lo, hi
        self._ts_refresh = _TIMESTAMP_REFRESH_EVERY

    def _replaced_timestamp(self, event: Event) -> str:
        """Why the call's time cannot be the message timestamp (counted, warned once)."""
        ts = event.timestamp_ms
        reason = "before_1970" if ts < 0 else "too_old" if ts < self._ts_lo else "in_future"
        self.metrics.timestamp_replaced(reason)
        if not self._warned_timestamp:
            self._warned_timestamp = True
            log.warning(
                "%s %s: CDR %d has UTCDateTime %s, which Kafka would refuse as a message "
                "timestamp (%s): published with the produce time as its timestamp and a "
                "timestamp_replaced header; further ones are only counted "
                "(cdr_streamer_timestamps_replaced_total)",
                self.source, self.name, event.cdr_id, _utc_text(ts), reason,
            )  # fmt: skip
        return reason

    def publish(
        self,
        publisher: Publisher,
        event: Event,
        batch: Batch,
        tail: tuple[tuple[str, str | bytes | None], ...],
        raw: str = "",
    ) -> None:
        """Produce a row's event (`rows.encode`), keyed by AccountCode, at the call's time.

        `tail`: the drive's `header_tail`, after the event's own cdr_id header.
        """
        ts = event.timestamp_ms
        headers: list[tuple[str, str | bytes | None]] = [("cdr_id", b"%d" % event.cdr_id), *tail]
        if not self._ts_lo <= ts <= self._ts_hi:
            message_ts = 0  # librdkafka: the produce time
            headers.append(("timestamp_replaced", self._replaced_timestamp(event).encode()))
        else:
            message_ts = ts
        publisher.produce(
            self.topic, event.key, event.value, timestamp_ms=message_ts, headers=headers
        )
        self.recent.append((event.value, event.cdr_id, raw, message_ts, headers))
        block = batch.block
        block.append(event)
        batch.size += 1
        if len(block) >= TALLY_BLOCK:
            self._tally(batch)

    def _tally(self, batch: Batch) -> None:
        """Fold the batch's block of events into its counters (at a full block, at confirm)."""
        self._ts_refresh -= len(batch.block)
        batch.fold()
        # The topic's timestamp limits move with the clock: recomputed every so many events.
        if self._ts_refresh <= 0:
            self._refresh_timestamp_limits()

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
        value = encode_dead_letter(
            rejection, feed=self.name, source=self.source, fromid=fromid, file=file
        )
        publisher.produce(self.dead_letter_topic, self.name.encode("utf-8"), value, headers=headers)
        self.recent.append((value, None, rejection.raw, 0, headers))
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
        self._tally(batch)
        try:
            for topic, key, value in cursor_messages:
                publisher.produce(topic, key, value)
            publisher.flush(self.flush_timeout_s)  # in a transaction: commits it
            if on_confirmed is not None:
                on_confirmed()
        except DeliveryError:
            self.metrics.delivery_errors.inc(max(1, publisher.in_flight))
            raise
        self.metrics.confirmed(
            batch.published, batch.rejected, batch.newest_event_ms / 1000, batch.usage
        )
        self.metrics.in_flight.set(0)

    def sent(self, message: RejectedMessage) -> Sent:
        """What the sink produced as `message`; rebuilt from its value if no longer held."""
        recent = self.recent
        if recent and recent[-1] is not self._recent_indexed:  # produced since: index again
            self._recent_index = {v: Sent(i, r, ts, h) for v, i, r, ts, h in recent}
            self._recent_indexed = recent[-1]
        sent = self._recent_index.get(message.value)
        if sent is not None:
            return sent
        if message.topic != self.topic:
            return Sent(None, "", 0, list(self._headers_base))
        cdr_id = event_id(message.value)
        headers = list(self._headers_base)
        if cdr_id is not None:
            headers.insert(0, ("cdr_id", str(cdr_id).encode()))
        return Sent(cdr_id, "", 0, headers)  # 0: the produce time, for want of the call's

    def isolate(
        self, publisher: Publisher, rejected: list[RejectedMessage]
    ) -> list[RejectedMessage]:
        """The messages Kafka refuses on their own, out of a batch it refused.

        Kafka refuses a whole produce request for one bad record, so the refused ones are
        produced again, halving the set that fails until each culprit stands alone. At
        least once, the others are thereby delivered; exactly once, every try is an
        aborted transaction of a separate producer, and nothing becomes visible.
        """
        timeout_s = self.flush_timeout_s
        # Kafka's reports lack headers and timestamps: restore them.
        rejected = [
            replace(m, headers=sent.headers, timestamp_ms=sent.timestamp_ms)
            for m, sent in ((m, self.sent(m)) for m in rejected)
        ]
        prober = self.slot.probe_publisher() if publisher.transactional_id else publisher
        if prober is None:
            raise DeliveryError("no producer to find the refused messages with")
        try:
            return _bisect(lambda ms: prober.probe(ms, timeout_s), rejected)
        except FencedError as exc:
            if prober is publisher:
                raise
            # Only the prober's id (<transactional id>-probe) was taken: another instance
            # of this unit is isolating too (in cluster mode, an owner not yet stopped).
            # That says nothing of who holds the unit's own id: no outage and no
            # handover, so the poll is tried again (and, if the unit's own producer was
            # fenced too, that producer says so).
            raise DeliveryError(
                "another instance took the probe producer's transactional id while this one "
                "looked for the messages Kafka refuses; trying again"
            ) from exc
        finally:
            if prober is not publisher:
                prober.close(0)

    def refuse(self, messages: list[RejectedMessage]) -> None:
        """Exactly-once: remember refused events; the replay of their poll dead-letters them."""
        for m in messages:
            if m.cdr_id is not None:
                self.refused[m.cdr_id] = m.reason
        while len(self.refused) > MAX_REFUSED_KEPT:
            del self.refused[next(iter(self.refused))]

    def forget_refused_through(
        self, cursor: int, handled: Callable[[int], bool] | None = None
    ) -> None:
        """IDs at or below a committed cursor are done with, if `handled` (when given) says so.

        Reconciliation publishes IDs below the cursor: one whose event Kafka refused in a
        check is done with only once a later check of its hour has dead-lettered it.
        """
        if self.refused:
            self.refused = {
                i: r for i, r in self.refused.items()
                if i > cursor or (handled is not None and not handled(i))
            }  # fmt: skip

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
