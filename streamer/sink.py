"""Events and dead letters to Kafka for any source: produce, confirm every delivery, then commit.

One `EventSink` per source (its name, `source` header and metrics), writing through the
producer of its `PublisherSlot`; a feed and the SFTP source paired with it share a slot.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from streamer.avro import timestamp_ms
from streamer.deadletter import encode_dead_letter
from streamer.errors import DeliveryError
from streamer.metrics import FeedMetrics
from streamer.publisher import Publisher
from streamer.records import CallRecord, Rejection

log = logging.getLogger(__name__)


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
