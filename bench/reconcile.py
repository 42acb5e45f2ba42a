"""Reconciliation: is the record of published IDs flat over a long run, and what does it cost a CDR?

(a) A simulated week of one feed, hour by hour, in this process (no HTTP, no Kafka):
    each hour's CDRs are noted in a `PublishedRecord` as the drive loop notes them, a
    checkpoint takes a snapshot every 10,000 CDRs and at the end of each hour (as the
    cursor record would carry it), and every check the schedule asks for is made
    (`record.checked`, the pass without its request). At the end of each day: the hours
    held, the size of the committed record, and the memory the record holds (traced
    with tracemalloc while it is rebuilt from that commit, as a restart rebuilds it).
    Dense IDs (a login with the platform to itself) and sparse ones (about one ID in
    ten, at random gaps, as a login on a shared platform sees them), at 3,600 and
    36,000 CDRs an hour.
(b) The hot path. `PublishedRecord.add` alone over 100,000 typed CDRs (the simulator's,
    their hours current): what the record adds to each CDR. And the drive loop with
    and without it: `Drive.run` over the same CDRs as rows, real typing and Avro
    encoding, a producer that drops what it is given (Kafka is not measured),
    reconciliation off (`published=None`: the loop as before this feature, plus one
    `is not None` test per row) and on. Medians of interleaved runs, CPU time of this
    process; on a busy machine the drive loop's runs vary by more than the difference.
(c) One checkpoint's snapshot of the record at the end of (a), dense and sparse.

Run alone: `python -m bench reconcile`.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry

from streamer.avro import SingleObjectEncoder
from streamer.cursor import FeedCursor, MemoryCursorStore, PublishedHours
from streamer.events import Event, event_of
from streamer.metrics import Metrics
from streamer.pipeline import Drive, FeedPosition
from streamer.reconcile import PublishedRecord, Reconciliation, Schedule
from streamer.records import FIELDS, CallRecord, Row, to_record
from streamer.simulator import CdrGenerator
from streamer.sink import EventSink, PublisherSlot

ZONE = ZoneInfo("Pacific/Auckland")
START = datetime(2024, 5, 1, tzinfo=UTC)
DAYS = 7
CHECKPOINT_EVERY = 10_000
DRIVE_ROWS = 100_000
RUNS = 9


@dataclass(slots=True)
class _Noted:
    """What `PublishedRecord.add` reads of an Event: its ID, local date and hour.

    One object, its ID changed per CDR: the week's millions of CDRs cost the noting, not
    the building of events.
    """

    cdr_id: int
    day: date
    hour: int


@dataclass(frozen=True, slots=True)
class Day:
    day: int
    cdrs: int
    hours: int
    record_bytes: int
    memory_kib: float


def _week(per_hour: int, sparse: bool) -> tuple[list[Day], float, int]:
    """(per day, seconds of the last snapshot, hours missed) of a simulated week."""
    clock = [START.timestamp()]
    schedule = Schedule(Reconciliation(), ZONE, lambda: clock[0])
    rng = random.Random(7)
    record = PublishedRecord(schedule, 0, since=clock[0])
    days: list[Day] = []
    cdr_id, noted = 1_000_000, 0
    snapshot_s = 0.0
    for hour in range(DAYS * 24):
        local = (START + timedelta(hours=hour)).astimezone(ZONE)
        cdr = _Noted(cdr_id, local.date(), local.hour)
        add = record.add
        for gap in [rng.randint(1, 19) for _ in range(per_hour)] if sparse else [1] * per_hour:
            cdr_id += gap
            cdr.cdr_id = cdr_id
            add(cast(Event, cdr))
            noted += 1
            if noted % CHECKPOINT_EVERY == 0:
                record.snapshot()
        clock[0] = (START + timedelta(hours=hour + 1)).timestamp()
        started = time.perf_counter()
        committed = record.snapshot()
        snapshot_s = time.perf_counter() - started
        record.committed = committed
        while (due := schedule.due(record)) is not None:  # the pass, minus its request
            record.checked(due[0])
        if (hour + 1) % 24 == 0:
            days.append(
                Day((hour + 1) // 24, noted, len(record.hours), committed.size,
                    _held_kib(schedule, committed))
            )  # fmt: skip
    return days, snapshot_s, record.missed


def _held_kib(schedule: Schedule, committed: PublishedHours) -> float:
    """The memory of a record as the pipeline holds it: one rebuilt from the snapshot, traced.

    (Tracing the whole week would slow every noted CDR down several times over.)
    """
    gc.collect()
    tracemalloc.start()
    try:
        held = PublishedRecord.load(schedule, FeedCursor(0, published=committed))
        size, _ = tracemalloc.get_traced_memory()
        del held
        return size / 1024
    finally:
        tracemalloc.stop()


class _NullPublisher:
    """A producer that drops what it is given: the loop's own cost, not Kafka's."""

    transactional_id = None
    in_flight = 0
    usable = True

    def produce(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self, timeout_s: float) -> None:
        pass

    def abort(self, timeout_s: float = 30.0) -> None:
        pass

    def close(self, timeout_s: float = 10.0) -> None:
        pass


def _rows() -> list[Row]:
    """The simulator's CDRs, timed so that their hours are current for the record."""
    gap = 3600 / 3600  # 3,600 CDRs an hour
    start = datetime.now(UTC) - timedelta(seconds=DRIVE_ROWS * gap)
    generator = CdrGenerator(1, start=start, mean_gap_s=gap)
    out = []
    for i in range(1, DRIVE_ROWS + 1):
        values = generator.row(i)
        out.append(Row(dict(zip(FIELDS, values.values(), strict=True)), ",".join(values.values())))
    return out


def _drive_cpu_s(rows: list[Row], with_record: bool) -> float:
    publisher = _NullPublisher()
    metrics = Metrics(CollectorRegistry()).for_feed("bench")
    sink = EventSink(
        name="bench", source="feed", slot=PublisherSlot(lambda: publisher),  # type: ignore[arg-type, return-value]
        encoder=SingleObjectEncoder(), topic="events", dead_letter_topic="dead",
        metrics=metrics, flush_timeout_s=10,
    )  # fmt: skip
    record = None
    if with_record:
        record = PublishedRecord(Schedule(Reconciliation(), ZONE), 0)
    store = MemoryCursorStore(0)
    position = FeedPosition(
        "bench", FeedCursor(0), store, exactly_once=False, ascending=True, covered=None,
        record=record,
    )  # fmt: skip
    drive = Drive(
        sink, publisher, position, checkpoint_every=CHECKPOINT_EVERY,  # type: ignore[arg-type]
        published=record,
    )  # fmt: skip
    gc.collect()
    gc.freeze()
    try:
        started = time.process_time()
        drive.run(iter(rows))
        drive.checkpoint()
        return time.process_time() - started
    finally:
        gc.unfreeze()


def _add_cpu_s(records: list[Event]) -> float:
    record = PublishedRecord(Schedule(Reconciliation(), ZONE), 0)
    add = record.add
    gc.collect()
    gc.freeze()
    try:
        started = time.process_time()
        for cdr in records:
            add(cdr)
        return time.process_time() - started
    finally:
        gc.unfreeze()


def _medians(rows: list[Row]) -> tuple[float, float, list[float], list[float]]:
    off: list[float] = []
    on: list[float] = []
    for _ in range(RUNS):  # interleaved, so that a noisy moment hits both alike
        off.append(_drive_cpu_s(rows, False))
        on.append(_drive_cpu_s(rows, True))
    return statistics.median(off), statistics.median(on), off, on


def _us(seconds: float, n: int) -> str:
    return f"{seconds / n * 1e6:.2f}"


def run() -> str:
    weeks: dict[str, tuple[list[Day], float, int]] = {}
    for label, per_hour, sparse in (
        ("dense, 3,600/h", 3_600, False), ("sparse, 3,600/h", 3_600, True),
        ("dense, 36,000/h", 36_000, False), ("sparse, 36,000/h", 36_000, True),
    ):  # fmt: skip
        weeks[label] = _week(per_hour, sparse)
    rows = _rows()
    records = [event_of(r, b"") for r in map(to_record, rows) if isinstance(r, CallRecord)]
    adds = [_add_cpu_s(records) for _ in range(RUNS)]
    off, on, offs, ons = _medians(rows)
    lines = [
        "## Reconciliation: the record of published IDs over a week, and its cost per CDR",
        "",
        f"A simulated week of one feed, hour by hour, in one process (see `bench/reconcile.py`): "
        "the defaults (24 h horizon, 3 checks an hour, hours kept up to 48 h), a checkpoint "
        f"every {CHECKPOINT_EVERY:,} CDRs and at each hour's end, every check made when due. "
        "Per day: the hours in the record, the committed record's size in the cursor record, "
        "and the memory the record holds (tracemalloc).",
        "",
        "| IDs | day | CDRs so far | hours held | record bytes | record memory KiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, (days, _, _) in weeks.items():
        for d in days:
            lines.append(
                f"| {label} | {d.day} | {d.cdrs:,} | {d.hours} | {d.record_bytes:,} | "
                f"{d.memory_kib:,.0f} |"
            )
    lines += [
        "",
        "Hours that aged out with checks still due: "
        + ", ".join(f"{label} {missed}" for label, (_, _, missed) in weeks.items())
        + ". One checkpoint's snapshot at the end of the week: "
        + ", ".join(f"{label} {s * 1000:.2f} ms" for label, (_, s, _) in weeks.items())
        + ".",
        "",
        f"`PublishedRecord.add`, the record's whole cost per CDR on the hot path, over "
        f"{len(records):,} typed CDRs: **{_us(statistics.median(adds), len(records))} µs per "
        f"CDR** (median of {RUNS} runs: "
        + ", ".join(f"{s * 1000:.1f}" for s in adds)
        + " ms).",
        "",
        f"The drive loop over the same {DRIVE_ROWS:,} rows (typing, admit, Avro encoding, a "
        "producer that drops the messages, checkpoints), CPU time of this process, "
        f"median of {RUNS} interleaved runs:",
        "",
        "| reconciliation | µs per CDR | runs (s) |",
        "|---|---:|---|",
        f"| off (the loop as before) | {_us(off, DRIVE_ROWS)} | "
        + ", ".join(f"{s:.3f}" for s in offs) + " |",
        f"| on (each CDR noted in its hour) | {_us(on, DRIVE_ROWS)} | "
        + ", ".join(f"{s:.3f}" for s in ons) + " |",
        "",
        f"Difference of the medians: {_us(on - off, DRIVE_ROWS)} µs per CDR "
        f"({(on - off) / off * 100:+.1f} % of the loop).",
    ]
    return "\n".join(lines)

