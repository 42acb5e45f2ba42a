"""The Kafka side: topic provisioning, the producer, delivery reports, flush.

Delivery reports arrive on librdkafka's thread through `poll()`/`flush()`. The
callback only counts and latches the first error (callbacks never raise);
`flush()` raises it, so the caller never commits a cursor over an unconfirmed event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.cimpl import NewTopic

from streamer.errors import DeliveryError, TopicError

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("librdkafka")

# Our settings win over user overrides for these, because the guarantees rest on them.
REQUIRED_PRODUCER_CONFIG: dict[str, str] = {
    "enable.idempotence": "true",  # implies acks=all and ordered, de-duplicated retries
    "acks": "all",
    # The Java client's default partitioner: a Java consumer or Kafka Streams app
    # keyed by AccountCode finds each account on the same partition we chose.
    "partitioner": "murmur2_random",
}
DEFAULT_PRODUCER_CONFIG: dict[str, str] = {
    "compression.type": "lz4",
    "linger.ms": "20",
    "batch.num.messages": "10000",
    "queue.buffering.max.kbytes": "65536",  # bounds memory: produce() waits when full
}


def producer_config(
    bootstrap_servers: str, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The producer's librdkafka configuration."""
    config = {"bootstrap.servers": bootstrap_servers, "client.id": "cdr-streamer"}
    config.update(DEFAULT_PRODUCER_CONFIG)
    config.update(overrides or {})
    config.update(REQUIRED_PRODUCER_CONFIG)
    return config


class Publisher:
    """Produces events and dead letters, and tells whether all of them were confirmed."""

    def __init__(self, config: Mapping[str, str]) -> None:
        self._config = dict(config)
        # librdkafka's own log lines go through logging, not straight to stderr.
        self._producer = Producer(self._config, logger=_librdkafka_log)
        self.delivered = 0
        self.failed = 0
        self._first_error: KafkaError | None = None

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        timestamp_ms: int = 0,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        """Queue one message; waits (serving delivery reports) while librdkafka's queue is full."""
        while True:
            try:
                self._producer.produce(
                    topic,
                    value,
                    key,
                    on_delivery=self._on_delivery,
                    timestamp=timestamp_ms,
                    headers=headers,
                )
                break
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as exc:
                raise DeliveryError(f"cannot produce to {topic}: {exc.args[0]}") from exc
        self._producer.poll(0)

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if self._first_error is None:
            self._first_error = err

    def flush(self, timeout_s: float) -> None:
        """Wait for every queued message's delivery report; raise if any failed or is missing."""
        deadline = time.monotonic() + timeout_s
        remaining = len(self._producer)
        while remaining and time.monotonic() < deadline:
            remaining = self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        error, self._first_error = self._first_error, None
        if error is not None:
            raise DeliveryError(f"Kafka did not confirm delivery: {error.str()}")
        if remaining:
            raise DeliveryError(
                f"{remaining} events still unconfirmed after {timeout_s:g} s: "
                "is the broker reachable?"
            )

    @property
    def in_flight(self) -> int:
        """Messages queued or sent but not yet confirmed."""
        return len(self._producer)

    def close(self, timeout_s: float = 10.0) -> None:
        """Give queued messages a last chance; whatever is unconfirmed is not committed anyway."""
        self._producer.flush(timeout_s)


def provision_topic(
    admin: AdminClient,
    name: str,
    *,
    partitions: int,
    replication_factor: int,
    min_insync_replicas: int,
    timeout_s: float = 30.0,
) -> None:
    """Create the topic if missing; refuse one that exists but would not keep events."""
    metadata = admin.list_topics(timeout=timeout_s)
    if name not in metadata.topics or metadata.topics[name].error is not None:
        topic = NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication_factor,
            config={"min.insync.replicas": str(min_insync_replicas)},
        )
        future = admin.create_topics([topic], request_timeout=timeout_s)[name]
        try:
            future.result()
            log.info(
                "created topic %s (%d partitions, replication %d)",
                name,
                partitions,
                replication_factor,
            )
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {name}: {exc.args[0].str()}") from exc
        return
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    configs = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result()
    policy = configs["cleanup.policy"].value if "cleanup.policy" in configs else "delete"
    if "compact" in (policy or ""):
        raise TopicError(
            f"topic {name} has cleanup.policy={policy}: compaction would keep only the last "
            "event per AccountCode. Use another topic, or set cleanup.policy=delete"
        )
