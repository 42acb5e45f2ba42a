"""`cdr-streamer tail` dumping a million events: events/s and CPU per event.

A fresh broker (scripts/kafka-local) gets a topic of 1,000,000 single-object events,
produced the way the streamer produces them (its producer settings, lz4, keyed by
AccountCode, headers); then `cdr-streamer tail` reads all of it to /dev/null as a
separate process, from the start of the process (imports, metadata) to its exit at
the end of every partition. Run alone: `python -m bench.tail` (prints the section).
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._services import REPO_ROOT, broker

# The events carry their calls' times (2024): time retention would delete them at once.
KEEP = {"retention.ms": "-1"}
EVENTS = 1_000_000
DISTINCT = 20_000  # distinct events (simulator rows), cycled to make up EVENTS
PARTITIONS = 6
RUNS = 3
MODES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("JSON lines (default)", ()),
    ("table", ("--output", "table")),
    ("JSON, --call-type International (decode all, print ~5 %)", ("--call-type", "International")),
)


def fill_topic(bootstrap: str, topic: str) -> int:
    """Produce EVENTS events to a new `topic`; the bytes of one value on average."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from streamer.avro import SingleObjectEncoder, timestamp_ms
    from streamer.publisher import producer_config
    from streamer.records import CallRecord, Row, to_record
    from streamer.simulator import BillingFeedSimulator, SimulatorConfig

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, PARTITIONS, 1, config=KEEP)]).values():
        future.result(60)
    config = SimulatorConfig(password="-", backlog=DISTINCT, seed=3)  # noqa: S106 - not served
    sim = BillingFeedSimulator(config)
    encoder = SingleObjectEncoder()
    messages = []
    for cdr_id in range(1, DISTINCT + 1):
        row = sim.row(cdr_id)
        record = to_record(Row(row, ",".join(row.values())))
        assert isinstance(record, CallRecord)
        headers = [("cdr_id", str(cdr_id).encode()), ("source", b"feed"), ("feed", b"main")]
        messages.append(
            (record.account_code.encode(), encoder.encode(record), timestamp_ms(record), headers)
        )
    producer = Producer(producer_config(bootstrap))
    for i in range(EVENTS):
        key, value, ts, headers = messages[i % DISTINCT]
        while True:
            try:
                producer.produce(topic, value, key, timestamp=ts, headers=headers)
                break
            except BufferError:  # the local queue is full: let librdkafka send some
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(300) != 0:
        raise RuntimeError("the benchmark's events were not all confirmed")
    return round(statistics.mean(len(m[1]) for m in messages))


def dump(bootstrap: str, topic: str, args: tuple[str, ...]) -> tuple[float, float]:
    """One `cdr-streamer tail` of the whole topic to /dev/null: (wall s, CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open("/dev/null", "w") as devnull:
        done = subprocess.run(
            [sys.executable, "-m", "streamer", "--log-level", "WARNING", "tail",
             "--bootstrap-servers", bootstrap, "--topic", topic, *args],
            stdout=devnull, stderr=subprocess.PIPE, text=True, check=False, cwd=REPO_ROOT,
            timeout=1800,
        )  # fmt: skip
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"cdr-streamer tail failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def run() -> str:
    with (
        tempfile.TemporaryDirectory(prefix="cdr-bench-tail-") as tmp,
        broker(Path(tmp) / "kafka") as bootstrap,
    ):
        topic = "cdr-bench-tail"
        value_bytes = fill_topic(bootstrap, topic)
        results = {}
        for name, args in MODES:
            runs = [dump(bootstrap, topic, args) for _ in range(RUNS)]
            results[name] = runs
            print(f"  tail {name}: {runs}", file=sys.stderr, flush=True)
    lines = [
        "## `cdr-streamer tail`: dump 1,000,000 events",
        "",
        f"{EVENTS:,} single-object events ({DISTINCT:,} distinct simulator CDRs cycled; "
        f"{value_bytes} bytes a value on average, lz4, {PARTITIONS} partitions) on a local "
        "broker; `cdr-streamer tail` reads them all to /dev/null, read_committed, as its own "
        "process (start-up included). Median of "
        f"{RUNS} runs; CPU is the tail process's (librdkafka's threads included).",
        "",
        "| output | events/s | CPU µs per event | runs, s |",
        "|---|---:|---:|---|",
    ]
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        lines.append(
            f"| {name} | {EVENTS / wall:,.0f} | {cpu / EVENTS * 1e6:.1f} | "
            + ", ".join(f"{w:.1f}" for w, _ in runs)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run())
