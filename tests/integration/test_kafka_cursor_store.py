"""KafkaCursorStore against the real broker: committed, aborted and still-open transactions."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamer.cursor import KafkaCursorStore
from streamer.errors import DeliveryError


def test_reads_back_only_committed_cursors_and_waits_out_open_transactions(
    kafka_bootstrap: str, topic_name: str
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    config = {"cleanup.policy": "compact"}
    admin.create_topics([NewTopic(topic_name, 1, 1, config=config)])[topic_name].result()

    assert KafkaCursorStore(kafka_bootstrap, topic_name, "a", initial=7).load() == 7  # empty
    KafkaCursorStore(kafka_bootstrap, topic_name, "a").commit(42)
    assert KafkaCursorStore(kafka_bootstrap, topic_name, "a").load() == 42

    other = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": topic_name})
    other.init_transactions()
    # An aborted cursor record is never read back.
    other.begin_transaction()
    other.produce(topic_name, b'{"feed": "a", "cursor": 999}', b"a")
    other.abort_transaction()
    assert KafkaCursorStore(kafka_bootstrap, topic_name, "a").load() == 42

    # Another feed's transaction still open: our newer cursor could be behind it, so the
    # store refuses to answer (retriable) rather than start from an old cursor.
    other.begin_transaction()
    other.produce(topic_name, b'{"feed": "b", "cursor": 1}', b"b")
    other.flush()
    with pytest.raises(DeliveryError, match="open transaction"):
        KafkaCursorStore(kafka_bootstrap, topic_name, "a", timeout_s=10).load()
    other.commit_transaction()
    assert KafkaCursorStore(kafka_bootstrap, topic_name, "a").load() == 42
    assert KafkaCursorStore(kafka_bootstrap, topic_name, "b").load() == 1
