"""Reconciliation in process: the record of published IDs, the schedule, DST, and the pass.

The pass runs against the simulator on loopback with a fake publisher (tests/unit/
test_drive.py); tests/integration/test_reconcile.py shows the same end to end against
the real broker, across a kill -9.
"""

from __future__ import annotations

import base64
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_drive import Encoder, FakePublisher, Message
from test_metrics import value

import streamer.reconcile as reconcile
from streamer.config import Secret
from streamer.cursor import (
    FeedCursor,
    FileCursorStore,
    IdRanges,
    MemoryCursorStore,
    PublishedHours,
    decode_ids,
    encode_ids,
)
from streamer.errors import EventsRejectedError
from streamer.events import Event, event_of
from streamer.metrics import Metrics
from streamer.pipeline import FeedPipeline
from streamer.reconcile import (
    PublishedRecord,
    Reconciler,
    Reconciliation,
    Schedule,
    check_ages,
    window_end,
    window_of,
    windows_ending_between,
)
from streamer.records import FIELDS, CallRecord, Row, to_record
from streamer.simulator import BillingFeedSimulator, CdrGenerator, SimulatorConfig
from streamer.sink import PublisherSlot
from streamer.sources.feed import FeedClient

ZONE = ZoneInfo("Pacific/Auckland")
HOUR = 3600.0
GAP_S = 120  # 30 CDRs an hour
DST_END_ID = 26_340  # 2024-04-06 14:00 UTC, when 03:00 NZDT becomes 02:00 NZST
GENERATOR = CdrGenerator(1, mean_gap_s=GAP_S)
PASSWORD = "pw"


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def record_of(cdr_id: int) -> Event:
    """The event of the generator's CDR `cdr_id` (what the drive loop notes)."""
    values = GENERATOR.row(cdr_id)
    item = to_record(Row(dict(zip(FIELDS, values.values(), strict=True)), ""))
    assert isinstance(item, CallRecord)
    return event_of(item, b"")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def schedule_of(wall: Clock, **settings: Any) -> Schedule:
    return Schedule(Reconciliation(**settings), ZONE, wall)


# --- the encoding of IDs in the cursor record ------------------------------------------------


@given(st.lists(st.integers(0, 2**40), max_size=300))
def test_encoded_ids_round_trip(ids: list[int]) -> None:
    ranges = IdRanges()
    for i in ids:
        ranges.add(i)
    decoded = decode_ids(encode_ids(ranges))
    assert decoded == ranges
    assert all(i in decoded for i in ids)


def test_an_hour_of_contiguous_ids_is_a_few_bytes_and_sparse_ids_about_two_each() -> None:
    dense = IdRanges()
    dense.add_range(1_000_000_001, 1_000_004_000)
    assert len(encode_ids(dense)) < 20
    sparse = IdRanges()
    for cdr_id in random.Random(1).sample(range(1_000_000_000, 1_000_100_000), 10_000):
        sparse.add(cdr_id)  # one ID in ten, at random
    assert len(encode_ids(sparse)) < 2.5 * 10_000


@pytest.mark.parametrize(
    "text",
    ["", "x", "vAAA", "z" + base64.b64encode(b"not zlib").decode(),
     "v" + base64.b64encode(b"\x80").decode(), "v" + base64.b64encode(b"\x01").decode(), 7],
)  # fmt: skip
def test_damaged_encoded_ids_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="encoded IDs"):
        decode_ids(text)


def test_the_record_round_trips_through_the_cursor_file(tmp_path: Path) -> None:
    ids = IdRanges()
    ids.add_range(5, 9)
    published = PublishedHours(3, 1.7e9, (("2024-04-07T02", 2, encode_ids(ids)),), 1.6e9)
    store = FileCursorStore(tmp_path / "cursor.json", "main")
    store.commit_state(FeedCursor(9, published=published))
    assert store.load_state() == FeedCursor(9, published=published)
    data = json.loads((tmp_path / "cursor.json").read_text())
    assert data["published"]["hours"] == {"2024-04-07T02": [2, encode_ids(ids)]}


@pytest.mark.parametrize(
    "published",
    [{"floor": -1}, {"floor": 1, "hours": {"2024-04-07": [0, "v"]}},
     {"floor": 1, "hours": {"2024-04-07T02": [0, "garbage"]}}, {"floor": 1, "after": "x"}],
)  # fmt: skip
def test_a_damaged_record_makes_the_cursor_file_unreadable(
    tmp_path: Path, published: dict[str, Any]
) -> None:
    path = tmp_path / "cursor.json"
    path.write_text(json.dumps({"feed": "main", "cursor": 9, "published": published}))
    with pytest.raises(Exception, match="unreadable"):
        FileCursorStore(path, "main").load_state()


# --- provider-local hours across the DST changes --------------------------------------------


def test_the_hour_that_repeats_when_clocks_go_back_is_one_window() -> None:
    # 2024-04-07 03:00 NZDT (14:00 UTC) became 02:00 NZST: local 02:00-03:00 happened twice.
    listed = [w for _, w in windows_ending_between(utc(2024, 4, 6, 11), utc(2024, 4, 6, 17), ZONE)]
    day = date(2024, 4, 7)
    assert listed == [(day, 0), (day, 1), (day, 2), (day, 3), (day, 4)]
    assert window_end((day, 2), ZONE) == utc(2024, 4, 6, 15)  # the end of its second occurrence
    assert window_of(utc(2024, 4, 6, 13, 30), ZONE) == window_of(utc(2024, 4, 6, 14, 30), ZONE)


def test_the_hour_that_clocks_skip_is_listed_too() -> None:
    # 2024-09-29 02:00 NZST became 03:00 NZDT; a Chatham Islands row can still be in hour 02.
    day = date(2024, 9, 29)
    ends = windows_ending_between(utc(2024, 9, 28, 11), utc(2024, 9, 29, 11), ZONE)
    assert [w for _, w in ends if w[0] == day] == [(day, h) for h in range(24)]


def test_checks_are_spaced_geometrically_from_an_hour_to_the_horizon() -> None:
    assert check_ages(24 * HOUR, 3) == pytest.approx((HOUR, math.sqrt(24) * HOUR, 24 * HOUR))
    assert check_ages(24 * HOUR, 1) == (24 * HOUR,)
    assert check_ages(3 * HOUR, 2) == (HOUR, 3 * HOUR)


# --- the record and the schedule -------------------------------------------------------------


def test_each_hour_is_checked_at_its_ages_and_the_most_overdue_first() -> None:
    clock = Clock(utc(2024, 4, 6, 12, 10))  # 01:10 NZDT on 2024-04-07
    schedule = schedule_of(clock, horizon_s=3 * HOUR, checks=2)
    record = PublishedRecord(schedule, 0, since=utc(2024, 4, 6, 11))  # began at 00:00 NZDT
    for cdr_id in range(DST_END_ID - 90, DST_END_ID - 70):  # hour 00 NZDT, 01 started
        record.add(record_of(cdr_id))
    record.snapshot()
    h0, h1, h2 = (date(2024, 4, 7), 0), (date(2024, 4, 7), 1), (date(2024, 4, 7), 2)
    assert schedule.due(record) is None  # hour 00 ended 10 minutes ago
    clock.now = utc(2024, 4, 6, 13)  # 02:00 NZDT: hour 00 is an hour old
    assert schedule.due(record) == (h0, 0, utc(2024, 4, 6, 13))
    record.checked(h0)
    assert schedule.due(record) is None
    # 04:00 NZST. Hour 00 ended 4 h ago, hour 01 3 h ago, hour 02 (NZDT, then NZST) 1 h ago.
    clock.now = utc(2024, 4, 6, 16)
    assert schedule.pending(record) == 4  # 00's second, 01's first and second, 02's first
    assert schedule.due(record) == (h1, 0, utc(2024, 4, 6, 14))
    record.checked(h1)
    assert schedule.due(record) == (h0, 1, utc(2024, 4, 6, 15))
    record.checked(h0)
    assert schedule.due(record) == (h1, 1, utc(2024, 4, 6, 16))
    record.checked(h1)
    assert schedule.due(record) == (h2, 0, utc(2024, 4, 6, 16))
    record.checked(h2)
    assert schedule.due(record) is None
    # Checked for the last time: hour 00 keeps its place (and checks), not its IDs.
    hours = {key: (checks, decode_ids(ids)) for key, checks, ids in record.snapshot().hours}
    assert hours["2024-04-07T00"] == (2, IdRanges())
    assert hours["2024-04-07T01"][0] == 2
    assert hours["2024-04-07T01"][1] == IdRanges()
    assert hours["2024-04-07T02"][0] == 1


def test_hours_older_than_twice_the_horizon_are_pruned_and_missed_checks_counted() -> None:
    clock = Clock(utc(2024, 4, 6, 12, 10))
    schedule = schedule_of(clock, horizon_s=3 * HOUR, checks=2)
    record = PublishedRecord(schedule, 0, since=utc(2024, 4, 6, 10))
    for cdr_id in range(DST_END_ID - 90, DST_END_ID - 50):  # hours 00 and 01 NZDT
        record.add(record_of(cdr_id))
    hours = set(record.hours)
    assert (date(2024, 4, 7), 0) in hours
    record.checked((date(2024, 4, 7), 0))
    record.checked((date(2024, 4, 7), 0))
    clock.now = utc(2024, 4, 6, 21, 30)  # every one of them more than 6 h old
    snapshot = record.snapshot()
    assert snapshot.hours == ()
    assert record.missed == len(hours) - 1  # all but hour 00 never got their checks
    assert snapshot.after == clock.now - 6 * HOUR
    record.add(record_of(DST_END_ID - 70))  # a row of a pruned hour is not kept again
    assert record.hours == {}
    due = schedule.due(record)  # a later hour, never one of the pruned
    assert due is not None
    assert window_end(due[0], ZONE) > snapshot.after


def test_a_first_sync_counts_as_the_checks_that_were_due_by_then() -> None:
    clock = Clock(utc(2024, 4, 7, 0, 30))  # 12:30 NZST on 2024-04-07
    schedule = schedule_of(clock, horizon_s=12 * HOUR, checks=3)  # at 1 h, 3.5 h, 12 h
    record = PublishedRecord(schedule, 0)  # a new record: the cursor had no record yet
    for cdr_id in range(DST_END_ID - 900, DST_END_ID + 316):  # 40 hours of backlog
        record.add(record_of(cdr_id))
    snapshot = record.snapshot()
    checks = {key: n for key, n, _ in snapshot.hours}
    assert record.since == clock.now
    assert min(checks) >= "2024-04-06T13"  # rows older than twice the horizon: not kept
    assert checks["2024-04-06T20"] == 3  # 16.5 h old: every check was due, this fetch did
    assert checks["2024-04-07T02"] == 2  # 9.5 h old (both occurrences): 1 h and 3.5 h
    assert checks["2024-04-07T11"] == 0  # ended half an hour ago
    assert checks["2024-04-07T12"] == 0  # the hour in progress
    assert schedule.pending(record) == 0
    clock.now += HOUR
    assert schedule.due(record) is not None


def test_hours_before_the_record_began_are_checked_only_where_it_found_cdrs() -> None:
    clock = Clock(utc(2024, 4, 6, 12, 30))
    schedule = schedule_of(clock, horizon_s=3 * HOUR, checks=2)
    # Began at cursor DST_END_ID - 45 (initial_cursor): hours before hold no ID above it.
    record = PublishedRecord(schedule, DST_END_ID - 45)
    for cdr_id in range(DST_END_ID - 44, DST_END_ID - 40):  # hour 01 NZDT (12:00 UTC)
        record.add(record_of(cdr_id))
    record.snapshot()
    clock.now = utc(2024, 4, 6, 14)
    hours = {w for _, w in schedule.hours(record, clock.now)}
    assert (date(2024, 4, 7), 1) in hours
    assert (date(2024, 4, 7), 0) not in hours  # ended before the record began, no ID in it


def test_the_feed_clock_is_the_newest_hour_with_a_cdr_not_a_skewed_one() -> None:
    clock = Clock(utc(2026, 1, 1))  # the wall clock: far after the data
    schedule = schedule_of(clock, horizon_s=3 * HOUR, checks=2, clock="feed")
    record = PublishedRecord(schedule, 0)
    for cdr_id in range(DST_END_ID - 60, DST_END_ID):
        record.add(record_of(cdr_id))
    assert schedule.now(record) == utc(2024, 4, 6, 13)  # the start of local hour 02 NZDT
    record.add_id(7, window_of(clock.now + 2 * HOUR, ZONE))  # a provider clock 2 h ahead
    assert schedule.now(record) == utc(2024, 4, 6, 13)


def test_the_record_stays_under_its_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "MAX_RECORD_BYTES", 2_000)
    clock = Clock(utc(2024, 4, 7, 0))
    record = PublishedRecord(schedule_of(clock), 0, since=utc(2024, 4, 6))
    for hour in range(6):  # six hours of sparse IDs, about 400 bytes encoded each
        window = window_of(utc(2024, 4, 6, 18 + hour), ZONE)
        for cdr_id in random.Random(hour).sample(range(10_000 * hour, 10_000 * hour + 3000), 300):
            record.add_id(cdr_id, window)
    snapshot = record.snapshot()
    assert snapshot.size <= 2_000
    assert 1 <= len(snapshot.hours) < 6
    kept = {reconcile.parse_window_key(key) for key, _, _ in snapshot.hours}
    assert max(kept) == window_of(utc(2024, 4, 6, 23), ZONE)  # the oldest were given up
    assert snapshot.after >= window_end(window_of(utc(2024, 4, 6, 18), ZONE), ZONE)


# --- the pass, against the simulator on loopback ------------------------------------------


class TransactionalMemoryStore(MemoryCursorStore):
    """A cursor store that joins the transaction, as KafkaCursorStore does."""

    def message_state(self, state: FeedCursor) -> tuple[str, bytes, bytes]:
        return "cursors", b"main", json.dumps(state.to_json("main")).encode()

    def committed_state(self, state: FeedCursor) -> None:
        self.state = state


@pytest.fixture
def simulator() -> Iterator[Callable[..., BillingFeedSimulator]]:
    started: list[BillingFeedSimulator] = []

    def start(**config: Any) -> BillingFeedSimulator:
        sim = BillingFeedSimulator(
            SimulatorConfig(password=PASSWORD, mean_gap_s=GAP_S, late_by_ids=45, **config)
        )
        sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


PipelineOf = Callable[..., tuple[FeedPipeline, CollectorRegistry]]


@pytest.fixture
def pipeline_of() -> Iterator[PipelineOf]:
    """A feed pipeline with a reconciler over the simulator (feed clock: 3 h, 2 checks)."""
    made: list[FeedPipeline] = []

    def make(
        sim: BillingFeedSimulator,
        publisher: FakePublisher,
        store: MemoryCursorStore,
        *,
        exactly_once: bool = False,
        min_interval_s: float = 0.0,
        monotonic: Callable[[], float] | None = None,
    ) -> tuple[FeedPipeline, CollectorRegistry]:
        registry = CollectorRegistry()
        metrics = Metrics(registry).for_feed("main")
        client = FeedClient(sim.url, "81234567", Secret(PASSWORD), name="main", max_attempts=1)
        pipeline = FeedPipeline(
            name="main", client=client, encoder=Encoder(), cursor_store=store, topic="events",
            dead_letter_topic="dead", metrics=metrics,
            # The fake is its own probe: its aborted tries never become visible.
            publisher_slot=PublisherSlot(lambda: publisher, lambda: publisher),
            exactly_once=exactly_once, checkpoint_every=2,
        )  # fmt: skip
        pipeline.reconciler = Reconciler(
            name="main", client=client, sink=pipeline.sink, store=store, metrics=metrics,
            settings=Reconciliation(3 * HOUR, 2, min_interval_s, "feed"), zone=ZONE,
            exactly_once=exactly_once, checkpoint_every=2, monotonic=monotonic or Monotonic(),
        )  # fmt: skip
        made.append(pipeline)
        return pipeline, registry

    yield make
    for pipeline in made:
        pipeline.close()


def event_ids(publisher: FakePublisher) -> Counter[int]:
    return Counter(_cdr_id(m) for m in publisher.delivered if m.topic == "events")


def _cdr_id(message: Message) -> int:
    return int(dict(message.headers)["cdr_id"])


def found_late(publisher: FakePublisher) -> set[int]:
    return {
        _cdr_id(m) for m in publisher.delivered
        if m.topic == "events" and ("found_late", b"true") in m.headers
    }  # fmt: skip


FIRST = DST_END_ID - 150
LATE = {DST_END_ID - 28, DST_END_ID - 27, DST_END_ID - 10, DST_END_ID + 5, DST_END_ID + 27}


def run_until(sim: BillingFeedSimulator, pipeline: FeedPipeline, last: int) -> None:
    """Poll, adding half an hour of CDRs after each poll, until `last` exists; then drain."""
    while sim.high_id < last:
        pipeline.poll()
        sim.add(15)
    for _ in range(10):  # the checks that fell due at the end, one a poll
        pipeline.poll()


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_late_cdrs_are_published_once_with_a_header_and_counted(
    simulator: Callable[..., BillingFeedSimulator], pipeline_of: PipelineOf, exactly_once: bool
) -> None:
    late = ",".join(str(i) for i in sorted(LATE))
    sim = simulator(backlog=FIRST + 30, late_ids=late)
    publisher = FakePublisher(transactional_id="t" if exactly_once else None)
    store = TransactionalMemoryStore(FIRST) if exactly_once else MemoryCursorStore(FIRST)
    pipeline, registry = pipeline_of(sim, publisher, store, exactly_once=exactly_once)
    run_until(sim, pipeline, DST_END_ID + 180)
    ids = event_ids(publisher)
    assert set(ids) == set(range(FIRST + 1, sim.high_id + 1))
    assert max(ids.values()) == 1
    assert found_late(publisher) == LATE
    assert value(registry, "cdr_streamer_late_cdr_lateness_seconds_count", feed="main") == len(LATE)

    def found_within(seconds: float) -> float | None:
        return value(
            registry, "cdr_streamer_late_cdr_lateness_seconds_bucket", feed="main",
            le=f"{seconds:.1f}",
        )  # fmt: skip

    assert found_within(3600) == 0  # a first check comes an hour after the hour's end
    assert found_within(86_400) == len(LATE)  # a 3 h horizon: all found within the day
    ok = value(registry, "cdr_streamer_reconcile_requests_total", feed="main", outcome="ok")
    checked = value(registry, "cdr_streamer_reconcile_windows_checked_total", feed="main")
    assert ok == checked
    assert checked is not None
    assert checked > 10
    # Nothing the live poll saw is skipped on reconciliation's account.
    skipped = value(
        registry, "cdr_streamer_rows_skipped_total", feed="main", source="feed",
        reason="below_cursor",
    )  # fmt: skip
    assert skipped == 0
    state = store.load_state()
    assert state.published is not None
    assert state.published.floor == FIRST
    if exactly_once:  # the record rode in the transactions, in the cursor records
        records = [json.loads(m.value) for m in publisher.delivered if m.topic == "cursors"]
        assert records[-1]["published"] == state.published.to_json()


def test_a_check_cut_short_keeps_what_it_published_and_is_made_again(
    simulator: Callable[..., BillingFeedSimulator], pipeline_of: PipelineOf
) -> None:
    late = ",".join(str(i) for i in sorted(LATE))
    sim = simulator(backlog=FIRST + 30, late_ids=late, batch_rows=10)
    # The first check of local hour 02 (both occurrences) breaks off in its first rows.
    sim.inject_window("truncate_chunked", date(2024, 4, 7), 2)
    publisher = FakePublisher()
    pipeline, registry = pipeline_of(sim, publisher, MemoryCursorStore(FIRST))
    run_until(sim, pipeline, DST_END_ID + 180)
    ids = event_ids(publisher)
    assert set(ids) == set(range(FIRST + 1, sim.high_id + 1))
    assert max(ids.values()) == 1  # what the cut check published was not published again
    assert found_late(publisher) == LATE
    failed = value(registry, "cdr_streamer_reconcile_requests_total", feed="main", outcome="failed")
    assert failed == 1
    hour_2 = [r for r in sim.requests if r.params.get("date") == "2024-04-07"
              and r.params.get("hour") == "2"]  # fmt: skip
    assert len(hour_2) == 3  # the cut one, and its two checks


def test_at_most_one_reconciliation_request_per_interval(
    simulator: Callable[..., BillingFeedSimulator], pipeline_of: PipelineOf
) -> None:
    sim = simulator(backlog=FIRST + 30)
    monotonic = Monotonic()
    pipeline, registry = pipeline_of(
        sim, FakePublisher(), MemoryCursorStore(FIRST), min_interval_s=600, monotonic=monotonic
    )
    pipeline.poll()
    sim.add(300)  # 10 hours at once, after the record began: many checks fall due together
    for _ in range(3):
        pipeline.poll()
    windows = [r for r in sim.requests if "date" in r.params]
    assert len(windows) == 1
    due = value(registry, "cdr_streamer_reconcile_checks_due", feed="main")
    assert due is not None
    assert due > 1
    monotonic.now = 600
    pipeline.poll()
    assert len([r for r in sim.requests if "date" in r.params]) == 2


def test_without_a_reconciler_the_cursor_carries_no_record(
    simulator: Callable[..., BillingFeedSimulator], pipeline_of: PipelineOf
) -> None:
    sim = simulator(backlog=FIRST + 30)
    store = MemoryCursorStore(FIRST)
    pipeline, _ = pipeline_of(sim, FakePublisher(), store)
    pipeline.reconciler = None
    pipeline.poll()
    assert store.load_state() == FeedCursor(FIRST + 30)


def test_ids_published_by_the_paired_sftp_source_are_not_found_late(
    simulator: Callable[..., BillingFeedSimulator], pipeline_of: PipelineOf
) -> None:
    late = ",".join(str(i) for i in sorted(LATE))
    sim = simulator(backlog=FIRST + 30, late_ids=late)
    publisher = FakePublisher()
    pipeline, _ = pipeline_of(sim, publisher, MemoryCursorStore(FIRST))
    by_sftp = IdRanges()
    for cdr_id in sorted(LATE)[:2]:  # the SFTP file had them while the feed did not
        by_sftp.add(cdr_id)
    pipeline.covered_by = lambda: by_sftp
    run_until(sim, pipeline, DST_END_ID + 180)
    assert found_late(publisher) == LATE - set(sorted(LATE)[:2])
    assert max(event_ids(publisher).values()) == 1


def test_exactly_once_a_late_cdr_kafka_refuses_is_dead_lettered_by_the_replay(
    simulator: Callable[..., BillingFeedSimulator], pipeline_of: PipelineOf
) -> None:
    late = ",".join(str(i) for i in sorted(LATE))
    refused = min(LATE)
    sim = simulator(backlog=FIRST + 30, late_ids=late)
    publisher = FakePublisher(transactional_id="t", refuse_ids={refused})
    store = TransactionalMemoryStore(FIRST)
    monotonic = Monotonic()
    pipeline, _ = pipeline_of(
        sim, publisher, store, exactly_once=True, min_interval_s=600, monotonic=monotonic
    )
    failures = 0
    # As the scheduler runs it: a failed poll is retried after a short backoff, a
    # successful one is followed by the next after the poll interval.
    for _ in range(80):
        try:
            pipeline.poll()
        except EventsRejectedError:
            failures += 1
            monotonic.now += 1
            continue
        monotonic.now += 600
        if sim.high_id < DST_END_ID + 180:
            sim.add(15)
    assert sim.high_id >= DST_END_ID + 180
    assert failures == 1  # the refusal aborted one check; its replay dead-lettered the CDR
    ids = event_ids(publisher)
    assert set(ids) == set(range(FIRST + 1, sim.high_id + 1)) - {refused}
    assert max(ids.values()) == 1
    assert found_late(publisher) == LATE - {refused}
    dead = [json.loads(m.value) for m in publisher.delivered if m.topic == "dead"]
    assert [(d["id"], d["reason"]) for d in dead] == [(refused, "kafka_rejected")]
