"""CursorTable against the real broker: read once, then followed; transactions respected."""

from __future__ import annotations

import json
import threading

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamer.cursor import FeedCursor, KafkaCursorStore
from streamer.cursor_table import CursorTable
from streamer.errors import DeliveryError


def cursor_topic(bootstrap: str, name: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {"cleanup.policy": "compact"}
    admin.create_topics([NewTopic(name, 1, 1, config=config)])[name].result()
    return name


def record(feed: str, cursor: int) -> bytes:
    return json.dumps(FeedCursor(cursor).to_json(feed)).encode()


def test_loads_by_key_read_the_topic_once_then_only_what_came_since(
    kafka_bootstrap: str, topic_name: str
) -> None:
    topic = cursor_topic(kafka_bootstrap, topic_name)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(5):  # 100 feeds, 5 cursors each: 500 records
        for feed in range(100):
            producer.produce(topic, record(f"f{feed}", n * 1000 + feed), f"f{feed}".encode())
    producer.flush(30)
    table = CursorTable(kafka_bootstrap, topic)
    try:
        stores = [
            KafkaCursorStore(kafka_bootstrap, topic, f"f{feed}", table=table) for feed in range(100)
        ]
        assert [s.load() for s in stores] == [4000 + feed for feed in range(100)]
        assert table.records_read == 500  # one pass for all 100 loads
        assert KafkaCursorStore(kafka_bootstrap, topic, "new", initial=9, table=table).load() == 9

        # A cursor committed since is seen by the next load, which reads only it.
        KafkaCursorStore(kafka_bootstrap, topic, "f7").commit(77_777)
        assert KafkaCursorStore(kafka_bootstrap, topic, "f7", table=table).load() == 77_777
        assert table.records_read == 501
        # Stores that share the table commit through its one producer, from any thread.
        writers = [
            threading.Thread(
                target=KafkaCursorStore(kafka_bootstrap, topic, f"f{feed}", table=table).commit,
                args=(90_000 + feed,),
            )
            for feed in range(10)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        fresh = CursorTable(kafka_bootstrap, topic)
        try:
            loaded = [KafkaCursorStore(kafka_bootstrap, topic, f"f{f}", table=fresh).load()
                      for f in range(10)]  # fmt: skip
        finally:
            fresh.close()
        assert loaded == [90_000 + feed for feed in range(10)]
        # A tombstone deletes the key: back to the initial cursor.
        producer.produce(topic, None, b"f8")
        producer.flush(30)
        assert KafkaCursorStore(kafka_bootstrap, topic, "f8", initial=3, table=table).load() == 3
    finally:
        table.close()


def test_an_open_transaction_holds_a_load_back_until_it_ends(
    kafka_bootstrap: str, topic_name: str
) -> None:
    topic = cursor_topic(kafka_bootstrap, topic_name)
    table = CursorTable(kafka_bootstrap, topic)
    try:
        KafkaCursorStore(kafka_bootstrap, topic, "a").commit(42)
        latest = table.latest("a", 30)
        assert latest is not None
        assert json.loads(latest)["cursor"] == 42

        other = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": topic_name})
        other.init_transactions()
        # An aborted cursor record is never seen.
        other.begin_transaction()
        other.produce(topic, record("a", 999), b"a")
        other.abort_transaction()
        assert KafkaCursorStore(kafka_bootstrap, topic, "a", table=table).load() == 42

        # Another feed's transaction is open, and our newer cursor is committed behind it:
        # the load waits rather than answer with the older cursor.
        other.begin_transaction()
        other.produce(topic, record("b", 1), b"b")
        other.flush(30)
        KafkaCursorStore(kafka_bootstrap, topic, "a").commit(43)
        with pytest.raises(DeliveryError, match="a transaction is still open there"):
            KafkaCursorStore(kafka_bootstrap, topic, "a", timeout_s=2, table=table).load()

        # Once it commits, the waiting load answers with the newer cursor.
        answer: list[int] = []
        # The case: the load has taken its targets (the high watermarks, past the open
        # transaction) before the transaction ends.
        targets_taken = threading.Event()
        high_watermarks = table._high_watermarks

        def noted_high_watermarks(timeout_s: float) -> dict[int, int]:
            found = high_watermarks(timeout_s)
            targets_taken.set()
            return found

        table._high_watermarks = noted_high_watermarks  # type: ignore[method-assign]
        waiting = threading.Thread(
            target=lambda: answer.append(
                KafkaCursorStore(kafka_bootstrap, topic, "a", timeout_s=30, table=table).load()
            )
        )
        waiting.start()
        assert targets_taken.wait(30), "the load never asked for the high watermarks"
        other.commit_transaction()
        waiting.join(60)
        assert answer == [43]
        assert KafkaCursorStore(kafka_bootstrap, topic, "b", table=table).load() == 1

    finally:
        table.close()


def test_a_full_feed_cursor_and_a_file_cursor_load_by_key_as_committed(
    kafka_bootstrap: str, topic_name: str
) -> None:
    """The table hands back the record as written: FeedCursor's every field, file cursors."""
    from streamer.cursor import JsonKafkaCursorStore

    topic = cursor_topic(kafka_bootstrap, topic_name)
    state = FeedCursor(100, confirmed=((105, 107), (110, 110)), without_id=("9f2c", "a01b"))
    files = {"files": {"cdr_1.csv": {"size": 10, "done": True}}}
    writer = CursorTable(kafka_bootstrap, topic)
    try:
        KafkaCursorStore(kafka_bootstrap, topic, "main", table=writer).commit_state(state)
        JsonKafkaCursorStore(kafka_bootstrap, topic, "sftp:main", table=writer).commit(files)
    finally:
        writer.close()
    reader = CursorTable(kafka_bootstrap, topic)
    try:
        loaded = KafkaCursorStore(kafka_bootstrap, topic, "main", table=reader).load_state()
        document = JsonKafkaCursorStore(kafka_bootstrap, topic, "sftp:main", table=reader).load()
    finally:
        reader.close()
    assert loaded == state
    assert document is not None
    assert (document["owner"], document["files"]) == ("sftp:main", files["files"])
    # The same records as a store without the table reads them (the whole topic).
    assert KafkaCursorStore(kafka_bootstrap, topic, "main").load_state() == state
