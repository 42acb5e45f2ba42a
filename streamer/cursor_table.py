"""Every cursor in the compacted cursor topic, read once per process and then followed.

Without it each `KafkaCursorStore` reads the whole topic to its end on each load:
cheap for one feed, quadratic for a thousand that start together (cluster mode moves
units between replicas, and each start loads a cursor). `CursorTable` is one
read_committed consumer per process that reads the topic once and then only what
was appended since, keeping the latest value per key, the way Kafka Connect's
`KafkaBasedLog` keeps its offsets.

A load is answered once the table holds everything committed before it was asked:
the high watermark of each partition is taken first, and the table reads until it
stands there. A read_committed reader stops at the last stable offset, so a
transaction still open below that watermark (another feed's checkpoint) holds the
answer back until it ends: a newer cursor of ours may sit behind it, and starting
from an older one would publish twice. Transactions begun after the load was asked
start above the watermark and hold nothing back, so the wait ends with the longest
transaction that was open at the time. (Our own open transaction, in exactly-once
mode, was aborted by the producer's `init_transactions` before the load.)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamer.errors import DeliveryError, TopicError

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("librdkafka")

_POLL_S = 0.2  # one read of the consumer; a waiting load re-checks its target this often
_BATCH = 1000  # records taken from the consumer at a time


class CursorTable:
    """The latest committed value of every key of the cursor topic; `latest()` asks by key.

    It also writes cursors for the stores that commit on their own (at-least-once):
    `send()`, through one producer for the whole process instead of one per feed.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        client_config: Mapping[str, str] | None = None,
    ) -> None:
        self.topic = topic
        self._producer_config: dict[str, str] = {
            **dict(client_config or {}),
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": "true",
            "acks": "all",
        }
        self._producer: Producer | None = None
        self._producer_lock = threading.Lock()
        self._config: dict[str, str] = {
            **dict(client_config or {}),
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"cdr-streamer-cursors-{uuid.uuid4().hex}",  # never commits offsets
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "isolation.level": "read_committed",
            "enable.partition.eof": "true",
            # Cursor records are small: a modest prefetch keeps an idle table's memory low.
            "queued.max.messages.kbytes": "4096",
        }
        self._lock = threading.Lock()  # one reader of the consumer at a time
        self._consumer: Consumer | None = None
        self._probe: Consumer | None = None  # read_uncommitted: the true high watermarks
        self._partitions: list[int] = []
        self._values: dict[bytes, bytes] = {}
        # partition -> the offset the table has read up to (exclusive): past every record
        # below it that read_committed delivers, aborted ones and markers skipped.
        self._reached: dict[int, int] = {}
        self.records_read = 0

    def __repr__(self) -> str:
        return f"CursorTable(topic={self.topic!r})"

    def latest(self, key: str, timeout_s: float) -> bytes | None:
        """The value last committed under `key` before this call, or None if there is none.

        DeliveryError (retriable) if Kafka is unreachable, or if a transaction open since
        before the call has not ended within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        try:
            with self._lock:
                self._open(timeout_s)
                targets = self._high_watermarks(timeout_s)
            while True:
                with self._lock:
                    behind = {p: t for p, t in targets.items() if self._reached.get(p, 0) < t}
                    if not behind:
                        return self._values.get(key.encode("utf-8"))
                    if time.monotonic() >= deadline:
                        raise self._late(behind, timeout_s)
                    self._read(_POLL_S)
        except KafkaException as exc:  # e.g. the broker unreachable: retriable, cursor unknown
            raise DeliveryError(
                f"cannot read cursor topic {self.topic}: {exc.args[0].str()}"
            ) from exc

    def send(self, message: tuple[str, bytes, bytes], timeout_s: float) -> None:
        """Produce one cursor record and wait until Kafka confirmed it (DeliveryError if not).

        Safe from any thread; each caller waits for its own record only.
        """
        topic, key, value = message
        with self._producer_lock:
            if self._producer is None:
                self._producer = Producer(self._producer_config, logger=_librdkafka_log)
            producer = self._producer
        confirmed = threading.Event()
        errors: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err)
            confirmed.set()

        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
        except (KafkaException, BufferError) as exc:
            reason = exc.args[0].str() if isinstance(exc, KafkaException) else "queue full"
            raise DeliveryError(f"cursor not committed to {topic}: {reason}") from exc
        deadline = time.monotonic() + timeout_s
        while not confirmed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeliveryError(
                    f"cursor not committed to {topic}: no answer within {timeout_s:g} s"
                )
            producer.poll(min(_POLL_S, remaining))  # serves whichever callbacks are due
        if errors:
            raise DeliveryError(f"cursor not committed to {topic}: {errors[0].str()}")

    def close(self) -> None:
        with self._producer_lock:
            if self._producer is not None:
                self._producer.flush(10)
                self._producer = None
        with self._lock:
            for consumer in (self._consumer, self._probe):
                if consumer is not None:
                    consumer.close()
            self._consumer = self._probe = None

    def _open(self, timeout_s: float) -> None:
        if self._consumer is not None:
            return
        consumer = Consumer(self._config, logger=_librdkafka_log)
        try:
            metadata = consumer.list_topics(self.topic, timeout=timeout_s)
            topic = metadata.topics.get(self.topic)
            if topic is None or topic.error is not None:
                raise TopicError(f"cursor topic {self.topic} does not exist")
            partitions = sorted(topic.partitions)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        except BaseException:
            consumer.close()
            raise
        self._consumer, self._partitions = consumer, partitions
        self._probe = Consumer(
            {**self._config, "isolation.level": "read_uncommitted"}, logger=_librdkafka_log
        )

    def _high_watermarks(self, timeout_s: float) -> dict[int, int]:
        # Asked as read_uncommitted: a read_committed client is told the last stable offset.
        assert self._probe is not None
        return {
            p: self._probe.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s)[
                1
            ]
            for p in self._partitions
        }

    def _read(self, timeout_s: float) -> None:
        """Read what the consumer has now (waiting up to `timeout_s` for the first of it)."""
        assert self._consumer is not None
        messages = self._consumer.consume(_BATCH, timeout_s)
        while messages:
            for msg in messages:
                self._take(msg)
            messages = self._consumer.consume(_BATCH, 0) if len(messages) == _BATCH else []

    def _take(self, msg: Message) -> None:
        partition = msg.partition() or 0
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                raise DeliveryError(f"cannot read cursor topic {self.topic}: {err.str()}")
            # The end as read_committed sees it: the last stable offset, past the markers
            # and the aborted records before it.
            end = msg.offset() or 0
        else:
            self.records_read += 1
            key, value = msg.key(), msg.value()
            if key is not None:
                if value is None:  # a tombstone: the key was deleted
                    self._values.pop(key, None)
                else:
                    self._values[key] = value
            end = (msg.offset() or 0) + 1
        if end > self._reached.get(partition, 0):
            self._reached[partition] = end

    def _late(self, behind: Mapping[int, int], timeout_s: float) -> DeliveryError:
        partition, target = next(iter(behind.items()))
        reached = self._reached.get(partition, 0)
        return DeliveryError(
            f"cursor topic {self.topic} not read to offset {target} of partition {partition} "
            f"within {timeout_s:g} s (at {reached}): a transaction is still open there, or "
            "Kafka is slow; reading the cursor again"
        )
