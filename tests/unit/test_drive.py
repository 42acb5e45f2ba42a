"""The drive loop and the sink, in process: a fake publisher stands in for Kafka.

The real-broker tests (tests/integration/test_deterministic_faults.py and others) show
the same guarantees end to end; these pin down the ordering rules themselves, fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from streamer.cursor import FeedCursor, MemoryCursorStore
from streamer.errors import EventsRejectedError, MessagesRejectedError
from streamer.metrics import Metrics
from streamer.pipeline import Drive, FeedPosition
from streamer.publisher import RejectedMessage
from streamer.records import FIELDS, Rejection, Row
from streamer.simulator import CdrGenerator
from streamer.sink import EventSink, PublisherSlot

GENERATOR = CdrGenerator(7, odd_rows={5: "before_1970"})


@dataclass
class Message:
    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: list[tuple[str, Any]]


@dataclass
class FakePublisher:
    """Kafka as the sink sees it: queues, a flush that confirms, and refusals on demand.

    `refuse(value)` decides which event values the fake broker refuses; as Kafka does,
    a refused message fails every other message of its flush too.
    """

    transactional_id: str | None = None
    refuse_ids: set[int] = field(default_factory=set)
    queued: list[Message] = field(default_factory=list)
    delivered: list[Message] = field(default_factory=list)
    flushes: int = 0
    in_transaction: bool = False
    usable: bool = True

    @property
    def in_flight(self) -> int:
        return len(self.queued)

    def _refused(self, m: Message) -> bool:
        ids = [int(v) for k, v in m.headers if k == "cdr_id"]
        return bool(ids) and ids[0] in self.refuse_ids

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        timestamp_ms: int = 0,
        headers: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.in_transaction = bool(self.transactional_id)
        self.queued.append(Message(topic, key, value, timestamp_ms, list(headers or [])))

    def flush(self, timeout_s: float) -> None:
        self.flushes += 1
        batch, self.queued = self.queued, []
        if any(self._refused(m) for m in batch):
            self.in_transaction = False  # the transaction is aborted
            reports = [RejectedMessage(m.topic, m.key, m.value, [], 0, "Broker: Invalid record")
                       for m in batch]  # fmt: skip
            raise MessagesRejectedError("refused", rejected=reports)
        self.delivered += batch
        self.in_transaction = False

    def probe(self, messages: list[RejectedMessage], timeout_s: float) -> list[RejectedMessage]:
        batch = [Message(m.topic, m.key, m.value, m.timestamp_ms, m.headers) for m in messages]
        if any(self._refused(b) for b in batch):
            return list(messages)  # as Kafka: one refused record fails its whole request
        if not self.transactional_id:
            self.delivered += batch  # at least once, a probe that passes is a delivery
        return []

    def abort(self, timeout_s: float = 30.0) -> None:
        self.queued.clear()
        self.in_transaction = False

    def close(self, timeout_s: float = 10.0) -> None:
        pass


class Encoder:
    def encode(self, record: Any) -> bytes:
        return json.dumps({"ID": record.id, "account": record.account_code}).encode()


def rows(ids: list[int]) -> Iterator[Row]:
    for i in ids:
        values = GENERATOR.wire_row(i)
        yield Row(dict(zip(FIELDS, values.values(), strict=True)), ",".join(values.values()))


def make_sink(publisher: FakePublisher, encoder: Any = None) -> EventSink:
    metrics = Metrics(CollectorRegistry()).for_feed("main")
    return EventSink(
        name="main", source="feed", slot=PublisherSlot(lambda: publisher, lambda: publisher),
        encoder=encoder or Encoder(), topic="events", dead_letter_topic="dead", metrics=metrics,
        flush_timeout_s=1.0,
    )  # fmt: skip


def drive_once(
    publisher: FakePublisher,
    store: MemoryCursorStore,
    source: Iterator[Row | Rejection],
    *,
    sink: EventSink | None = None,
    ascending: bool = False,
    every: int = 1000,
) -> Drive:
    start = store.load_state()
    position = FeedPosition(
        "main", start, store, exactly_once=False, ascending=ascending, covered=None
    )
    drive = Drive(sink or make_sink(publisher), publisher, position, checkpoint_every=every)  # type: ignore[arg-type]
    drive.run(source)
    return drive


def delivered_ids(publisher: FakePublisher, topic: str = "events") -> list[int]:
    return [json.loads(m.value)["ID"] for m in publisher.delivered if m.topic == topic]


def test_a_whole_response_commits_its_highest_id_after_the_flush() -> None:
    publisher, store = FakePublisher(), MemoryCursorStore(0)
    drive = drive_once(publisher, store, rows([3, 1, 2, 5, 4]))
    assert store.load() == 0  # nothing committed before the checkpoint
    drive.checkpoint()
    assert store.load() == 5
    assert sorted(delivered_ids(publisher)) == [1, 2, 3, 4, 5]


def test_mid_response_checkpoints_only_while_ids_ascend() -> None:
    publisher, store = FakePublisher(), MemoryCursorStore(0)
    commits: list[int] = []
    original = store.commit_state

    def recording(state: FeedCursor) -> None:
        commits.append(state.cursor)
        original(state)

    store.commit_state = recording  # type: ignore[method-assign]
    drive = drive_once(publisher, store, rows([1, 2, 3, 4, 6, 5, 7, 8]), ascending=True, every=2)
    drive.checkpoint()
    # Checkpoints at 2 and 4; after 5 came below 6, none until the response ended.
    assert commits == [2, 4, 8]


def test_a_broken_response_keeps_its_rows_and_a_retry_skips_them() -> None:
    publisher, store = FakePublisher(), MemoryCursorStore(0)

    def cut_after(ids: list[int]) -> Iterator[Row]:
        yield from rows(ids)
        raise ConnectionError("cut")

    position = FeedPosition(
        "main", store.load_state(), store, exactly_once=False, ascending=False, covered=None
    )
    drive = Drive(make_sink(publisher), publisher, position, checkpoint_every=1000)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        drive.run(cut_after([2, 1, 4, 7, 6]))
    drive.checkpoint(broken=True)
    state = store.load_state()
    assert state.cursor == 2  # 1 and 2 handled without a gap; 3 may still come
    assert state.confirmed == ((4, 4), (6, 7))
    again = drive_once(publisher, store, rows([1, 2, 3, 4, 5, 6, 7, 8]))
    again.checkpoint()
    assert sorted(delivered_ids(publisher)) == [1, 2, 3, 4, 5, 6, 7, 8]  # each once
    assert again.tally.skipped["confirmed_before"] == 3
    assert store.load_state() == FeedCursor(8)


def test_a_row_without_an_id_is_dead_lettered_once_across_polls() -> None:
    publisher, store = FakePublisher(), MemoryCursorStore(0)
    odd = Rejection("bad_id", "ID is empty", "junk,row", None)
    for _ in range(3):
        drive = drive_once(publisher, store, iter([*rows([1, 2]), odd]))
        drive.checkpoint()
    assert len([m for m in publisher.delivered if m.topic == "dead"]) == 1
    assert store.load() == 2


def test_at_least_once_a_refused_event_is_dead_lettered_and_the_rest_delivered() -> None:
    publisher, store = FakePublisher(refuse_ids={3}), MemoryCursorStore(0)
    drive = drive_once(publisher, store, rows([1, 2, 3, 4]))
    drive.checkpoint()
    assert sorted(delivered_ids(publisher)) == [1, 2, 4]
    dead = [json.loads(m.value) for m in publisher.delivered if m.topic == "dead"]
    assert [(d["id"], d["reason"]) for d in dead] == [(3, "kafka_rejected")]
    assert dead[0]["raw"].startswith("3,")
    assert store.load() == 4


def test_exactly_once_a_refused_event_aborts_and_the_replay_dead_letters_it() -> None:
    publisher = FakePublisher(transactional_id="t", refuse_ids={3})
    store = MemoryCursorStore(0)
    sink = make_sink(publisher)
    drive = drive_once(publisher, store, rows([1, 2, 3, 4]), sink=sink)
    with pytest.raises(EventsRejectedError):
        drive.checkpoint()
    assert publisher.delivered == []  # nothing of the aborted transaction is visible
    assert store.load() == 0
    assert set(sink.refused) == {3}
    replay = drive_once(publisher, store, rows([1, 2, 3, 4]), sink=sink)
    replay.checkpoint()
    assert sorted(delivered_ids(publisher)) == [1, 2, 4]
    assert [json.loads(m.value)["id"] for m in publisher.delivered if m.topic == "dead"] == [3]
    assert store.load() == 4


def test_a_call_before_1970_gets_the_produce_time_and_a_header() -> None:
    publisher, store = FakePublisher(), MemoryCursorStore(0)
    drive = drive_once(publisher, store, rows([4, 5, 6]))
    drive.checkpoint()
    by_id = {json.loads(m.value)["ID"]: m for m in publisher.delivered}
    assert by_id[5].timestamp_ms == 0  # librdkafka stamps it with the produce time
    assert ("timestamp_replaced", b"before_1970") in by_id[5].headers
    assert all(h[0] != "timestamp_replaced" for h in by_id[4].headers)
    assert by_id[4].timestamp_ms > 0


def test_a_stop_mid_response_abandons_the_batch_since_the_last_checkpoint() -> None:
    import threading

    from streamer.errors import StoppedError

    publisher, store = FakePublisher(), MemoryCursorStore(0)
    stop = threading.Event()

    def stopping_after(n: int, ids: list[int]) -> Iterator[Row]:
        for i, row in enumerate(rows(ids)):
            if i == n:
                stop.set()  # as a revoke does, from another thread, between two rows
            yield row

    position = FeedPosition(
        "main", store.load_state(), store, exactly_once=False, ascending=True, covered=None
    )
    drive = Drive(make_sink(publisher), publisher, position, checkpoint_every=3, stop=stop)  # type: ignore[arg-type]
    with pytest.raises(StoppedError, match="stopped after 7 rows"):
        drive.run(stopping_after(7, list(range(1, 21))))
    assert store.load() == 6  # the checkpoints at 3 and 6; rows 7 (produced) are not
    assert sorted(delivered_ids(publisher)) == [1, 2, 3, 4, 5, 6]
    assert drive.tally.rows == 7


@pytest.mark.parametrize("cdr_id", [1, 63, 64, 5001, 2**31 + 7, 2**62])
def test_event_id_reads_the_first_field_in_either_framing(cdr_id: int) -> None:
    from dataclasses import replace

    from cdr_samples import sample_records

    from streamer.avro import SingleObjectEncoder
    from streamer.sink import event_id

    single = SingleObjectEncoder().encode(replace(sample_records()[0], id=cdr_id))
    assert event_id(single) == cdr_id
    assert event_id(b"\x00\x00\x00\x00\x07" + single[10:]) == cdr_id  # registry framing
    assert event_id(b"{}") is None


def test_a_refused_event_no_longer_held_is_still_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import streamer.sink
    from streamer.avro import SingleObjectEncoder
    from streamer.sink import event_id

    monkeypatch.setattr(streamer.sink, "MAX_RECENT_KEPT", 1)  # only the last message held
    publisher, store = FakePublisher(refuse_ids={1}), MemoryCursorStore(0)
    sink = make_sink(publisher, SingleObjectEncoder())
    drive = drive_once(publisher, store, rows([1, 2, 3]), sink=sink)
    drive.checkpoint()
    assert sorted(event_id(m.value) for m in publisher.delivered if m.topic == "events") == [2, 3]
    dead = [json.loads(m.value) for m in publisher.delivered if m.topic == "dead"]
    assert [(d["id"], d["raw"]) for d in dead] == [(1, "")]
    assert store.load() == 3


def test_the_fast_path_publishes_what_typing_and_the_encoder_make_with_their_tallies() -> None:
    """With the contract's encoder the drive takes `events.RowEncoder`; events, keys,
    headers and the tallies (counted a block at a time) are the reference path's."""
    from collections import Counter

    from streamer.avro import SingleObjectEncoder
    from streamer.events import RowEncoder
    from streamer.metrics import UsageTally
    from streamer.records import CallRecord, to_record
    from streamer.sink import TALLY_BLOCK

    encoder = SingleObjectEncoder()
    publisher, store = FakePublisher(), MemoryCursorStore(0)
    sink = make_sink(publisher, encoder)
    assert isinstance(sink.rows, RowEncoder)
    confirmed: list[tuple[Any, ...]] = []
    sink.metrics.confirmed = lambda *args: confirmed.append(args)  # type: ignore[method-assign]
    ids = list(range(1, 2 * TALLY_BLOCK + 100))
    position = FeedPosition("main", store.load_state(), store, exactly_once=False,
                            ascending=False, covered=None)  # fmt: skip
    drive = Drive(sink, publisher, position, checkpoint_every=10**6,  # type: ignore[arg-type]
                  headers=[("file", b"x.csv")])  # fmt: skip
    drive.run(rows(ids))
    drive.checkpoint()
    records = [to_record(row) for row in rows(ids)]
    assert all(isinstance(r, CallRecord) for r in records)
    events = [m for m in publisher.delivered if m.topic == "events"]
    assert [(m.key, m.value) for m in events] == [
        (r.account_code.encode(), encoder.encode(r))
        for r in records  # type: ignore[union-attr]
    ]
    assert events[0].headers[:4] == [
        ("cdr_id", b"1"),
        ("source", b"feed"),
        ("feed", b"main"),
        ("file", b"x.csv"),
    ]
    usage = UsageTally()
    for r in records:
        usage.add(r)  # type: ignore[arg-type]
    published = Counter((r.status, r.direction, r.call_type) for r in records)  # type: ignore[union-attr]
    [(got_published, got_rejected, newest_s, got_usage)] = confirmed
    assert not got_rejected
    assert got_published == published
    assert got_usage.by_key == usage.by_key
    assert newest_s == max(m.timestamp_ms for m in events if m.timestamp_ms) / 1000
    assert store.load() == ids[-1]


def test_timestamp_limits_follow_the_clock_even_when_batches_are_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tallies are kept per block, but the limits are recomputed by events published,
    however few each checkpoint holds: an event too old by now gets the produce time."""
    import streamer.sink
    from streamer.avro import SingleObjectEncoder
    from streamer.events import RowEncoder
    from streamer.publisher import TimestampLimits
    from streamer.sink import TIMESTAMP_SLACK_MS

    row = next(rows([10]))
    event = RowEncoder().encode(row)
    assert not isinstance(event, Rejection)
    hour = 3_600_000
    now = [event.timestamp_ms + 10 * hour]
    monkeypatch.setattr(streamer.sink.time, "time", lambda: now[0] / 1000)
    monkeypatch.setattr(streamer.sink, "_TIMESTAMP_REFRESH_EVERY", 3)
    publisher, store = FakePublisher(), MemoryCursorStore(0)
    sink = EventSink(
        name="main", source="feed", slot=PublisherSlot(lambda: publisher),
        encoder=SingleObjectEncoder(), topic="events", dead_letter_topic="dead",
        metrics=Metrics(CollectorRegistry()).for_feed("main"), flush_timeout_s=1.0,
        timestamp_limits=TimestampLimits(before_max_ms=11 * hour + TIMESTAMP_SLACK_MS),
    )  # fmt: skip
    now[0] += 2 * hour  # the CDR of ID 10 is too old for the topic from now on
    for ids in ([10], [11, 12], [13]):  # small checkpoints: 4 events refresh the limits
        drive_once(publisher, store, rows(ids), sink=sink).checkpoint()
    store = MemoryCursorStore(0)
    drive_once(publisher, store, rows([10]), sink=sink).checkpoint()
    first, last = publisher.delivered[0], publisher.delivered[-1]
    assert first.timestamp_ms == event.timestamp_ms  # the limits of the start, at first
    assert last.timestamp_ms == 0
    assert ("timestamp_replaced", b"too_old") in last.headers


def test_a_fenced_probe_is_a_retriable_failure_not_a_fenced_unit() -> None:
    """Exactly-once: only `<tid>-probe` taken by another instance says nothing of the unit's id.

    Fenced there must not pass for the unit's own producer being fenced: alone that
    would be an outage, in cluster mode a handover (the unit stopped on its owner).
    """
    from streamer.errors import DeliveryError, FencedError, StreamerError

    @dataclass
    class FencedProber(FakePublisher):
        closed: bool = False

        def probe(self, messages: list[RejectedMessage], timeout_s: float) -> list[RejectedMessage]:
            raise FencedError("Kafka fenced transactional id 't-main-probe'")

        def close(self, timeout_s: float = 10.0) -> None:
            self.closed = True

    publisher, prober = FakePublisher(transactional_id="t-main"), FencedProber("t-main-probe")
    metrics = Metrics(CollectorRegistry()).for_feed("main")
    sink = EventSink(
        name="main", source="feed", slot=PublisherSlot(lambda: publisher, lambda: prober),
        encoder=Encoder(), topic="events", dead_letter_topic="dead", metrics=metrics,
        flush_timeout_s=1.0,
    )  # fmt: skip
    refused = [RejectedMessage("events", b"k", b"v", [], 0, "Broker: Invalid record")]
    with pytest.raises(StreamerError) as caught:
        sink.isolate(publisher, refused)  # type: ignore[arg-type]
    assert type(caught.value) is DeliveryError
    assert isinstance(caught.value.__cause__, FencedError)
    assert prober.closed
