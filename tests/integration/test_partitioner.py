"""Our producer puts each key on the partition Kafka's own Java producer picks.

The same keys go to two fresh topics with the same partition count: one through our
producer configuration (librdkafka, `partitioner=murmur2_random`), one through Kafka's
console producer from the broker's own jars (the Java client's built-in partitioner).
A Java or Kafka Streams consumer keyed by AccountCode relies on the two agreeing.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from uuid import uuid4

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from helpers import REPO_ROOT, read_topic

from streamer.publisher import producer_config

KAFKA_LOCAL = REPO_ROOT / "scripts" / "kafka-local"
KAFKA_VERSION = (REPO_ROOT / "scripts" / "kafka-version").read_text().strip()
KAFKA_LIBS = REPO_ROOT / ".cache" / "kafka" / KAFKA_VERSION / "libs"
PARTITIONS = 7  # prime, and not librdkafka's or Kafka's default
SEPARATOR = "\t"  # the console producer's key separator: in no key below


def sample_keys() -> list[str]:
    """~200 account codes: realistic 8-digit ones, plus non-ASCII and odd strings."""
    rng = random.Random(20240522)
    codes: set[str] = set()
    while len(codes) < 180:
        codes.add(f"{rng.choice('3456789')}{rng.randrange(10**7):07d}")
    odd = [
        "0",
        "00000000",
        "99999999",
        "1234567",  # seven digits
        "812345678",  # nine digits
        "8123 4567",
        "81234567 ",
        "ACC-00042",
        "acc-00042",
        "Whangārei",
        "Ōtautahi-02",
        "客户-88120001",
        "ÆØÅ-æøå",
        "📞 0800 838 383",
        'quote"d',
        "back\\slash",
        "key=value,comma;semi",
        "\u00a0non-breaking",
        "x" * 300,
        "z",
    ]
    keys = sorted(codes) + odd
    assert not any(SEPARATOR in k or "\n" in k or "\r" in k for k in keys)
    return keys


@pytest.fixture
def java_available(kafka_local_dir: Path | None) -> None:
    if kafka_local_dir is None and not any(KAFKA_LIBS.glob("kafka-clients-*.jar")):
        pytest.skip(
            f"an external broker (KAFKA_BOOTSTRAP_SERVERS) and no Kafka jars in {KAFKA_LIBS}: "
            "run scripts/kafka-local fetch to compare with the Java producer"
        )


def create_topic(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    future = admin.create_topics(
        [NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)], request_timeout=30
    )[name]
    try:
        future.result(timeout=60)
    except KafkaException as exc:
        pytest.fail(f"cannot create topic {name}: {exc}")


def produce_with_our_config(bootstrap: str, topic: str, keys: list[str], **extra: str) -> None:
    producer = Producer({**producer_config(bootstrap), **extra})
    errors: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    for i, key in enumerate(keys):
        producer.produce(topic, value=f"v{i}".encode(), key=key.encode(), on_delivery=on_delivery)
    assert producer.flush(60) == 0, "messages still unconfirmed after 60 s"
    assert errors == []


def produce_with_java(bootstrap: str, topic: str, keys: list[str]) -> None:
    lines = "".join(f"{key}{SEPARATOR}v{i}\n" for i, key in enumerate(keys))
    result = subprocess.run(
        [
            str(KAFKA_LOCAL),
            "java",
            "org.apache.kafka.tools.ConsoleProducer",
            "--bootstrap-server",
            bootstrap,
            "--topic",
            topic,
            "--property",
            "parse.key=true",
            "--property",
            f"key.separator={SEPARATOR}",
        ],
        input=lines.encode("utf-8"),
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def partitions_by_key(bootstrap: str, topic: str) -> dict[bytes, int]:
    placed: dict[bytes, int] = {}
    for msg in read_topic(bootstrap, topic):
        key = msg.key()
        assert placed.setdefault(key, msg.partition()) == msg.partition()
    return placed


@pytest.mark.usefixtures("java_available")
def test_keys_land_where_the_java_producer_puts_them(kafka_bootstrap: str) -> None:
    keys = sample_keys()
    ours, java, crc = (f"partitioner-{kind}-{uuid4().hex[:8]}" for kind in ("py", "java", "crc"))
    for topic in (ours, java, crc):
        create_topic(kafka_bootstrap, topic)

    produce_with_our_config(kafka_bootstrap, ours, keys)
    produce_with_java(kafka_bootstrap, java, keys)

    by_us = partitions_by_key(kafka_bootstrap, ours)
    by_java = partitions_by_key(kafka_bootstrap, java)
    expected_keys = {k.encode("utf-8") for k in keys}
    # The same bytes arrived as keys both ways (the console producer read UTF-8).
    assert set(by_us) == set(by_java) == expected_keys
    differing = {k.decode(): (by_us[k], by_java[k]) for k in by_us if by_us[k] != by_java[k]}
    assert differing == {}, f"(ours, Java) partitions differ for {len(differing)} keys"
    # Not a vacuous agreement: the keys spread over every partition.
    assert set(by_java.values()) == set(range(PARTITIONS))

    # And the check can fail: librdkafka's own default (CRC32) places keys elsewhere.
    produce_with_our_config(kafka_bootstrap, crc, keys, partitioner="consistent_random")
    by_crc = partitions_by_key(kafka_bootstrap, crc)
    assert sum(by_crc[k] != by_java[k] for k in expected_keys) > len(keys) // 2
