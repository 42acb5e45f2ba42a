"""The session's Kafka broker takes a topic, idempotent writes, and gives them back."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

KAFKA_LOCAL = Path(__file__).resolve().parents[2] / "scripts" / "kafka-local"
TIMEOUT_S = 30.0


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    futures[topic].result(timeout=TIMEOUT_S)


def test_produce_and_consume_roundtrip(kafka_bootstrap: str, topic_name: str) -> None:
    create_topic(kafka_bootstrap, topic_name)
    sent = {f"acct-{i}".encode(): f"call-{i}".encode() for i in range(10)}

    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for key, value in sent.items():
        producer.produce(topic_name, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(TIMEOUT_S) == 0, "messages still in the producer queue"
    assert errors == []

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{topic_name}-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: dict[bytes, bytes] = {}
    try:
        consumer.subscribe([topic_name])
        deadline = time.monotonic() + TIMEOUT_S
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got_key, got_value = msg.key(), msg.value()
            assert got_key is not None
            assert got_value is not None
            received[got_key] = got_value
    finally:
        consumer.close()

    assert received == sent


def test_status_reports_the_session_broker(
    kafka_bootstrap: str, kafka_local_dir: Path | None
) -> None:
    if kafka_local_dir is None:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS names a broker this session did not start")
    status = subprocess.run(
        [str(KAFKA_LOCAL), "status", "--dir", str(kafka_local_dir)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith(f"running {kafka_bootstrap} ")


def test_local_broker_does_not_create_topics_on_write(
    kafka_bootstrap: str, kafka_local_dir: Path | None, topic_name: str
) -> None:
    if kafka_local_dir is None:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS names a broker this session did not start")
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    # Fail the write as soon as metadata says "no such topic" instead of after 30 s.
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "topic.metadata.propagation.max.ms": 1000}
    )
    producer.produce(topic_name, value=b"x", on_delivery=on_delivery)
    assert producer.flush(TIMEOUT_S) == 0
    assert len(errors) == 1
    assert errors[0].code() in {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=TIMEOUT_S)
    assert topic_name not in topics.topics
