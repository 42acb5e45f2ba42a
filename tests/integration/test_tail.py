"""`cdr-streamer tail` against the real broker: both framings, two schema versions, filters.

The events of schema v1 come from a real `cdr-streamer run --once` over the simulator
(so their headers are the streamer's own); events of a second version are produced
beside them with tests/data/cdr-v2-test.avsc, a test-only schema that inserts an
optional field mid-record. The registry framing uses confluent-kafka's in-process mock
registry (as tests/integration/test_registry_end_to_end.py explains, no real registry
can run here), so that part runs `tail` in this process, with the mock as its registry.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import fastavro
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from helpers import FEED_PASSWORD, REPO_ROOT, run_streamer, write_config

from streamer.avro import (
    CDR_SCHEMA_PATH,
    SINGLE_OBJECT_MARKER,
    SingleObjectEncoder,
    fingerprint,
    timestamp_ms,
    to_avro_dict,
)
from streamer.cli import main
from streamer.records import CallRecord, Row, to_record
from streamer.simulator import BillingFeedSimulator, SimulatorConfig
from streamer.tail import EventDecoder, Filters, SchemaSet, TailOptions, consumer_config, tail

# The events carry their calls' times (2024): time retention would delete them at once.
KEEP = {"retention.ms": "-1"}
V2_PATH = REPO_ROOT / "tests" / "data" / "cdr-v2-test.avsc"
BACKLOG = 300
V2_EVENTS = 40  # IDs BACKLOG+1 .. BACKLOG+V2_EVENTS, written with v2


@dataclass(frozen=True)
class Stream:
    bootstrap: str
    topic: str
    config: Path
    rows: dict[int, dict[str, str]]  # the simulator's source row of every ID, by ID
    events: list[int]  # the IDs in the topic, ascending
    dead_letters: int  # rows of the backlog the feed writes broken


def record_of(row: dict[str, str]) -> CallRecord:
    record = to_record(Row(row, ",".join(row.values())))
    assert isinstance(record, CallRecord), record
    return record


def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1, config=KEEP)]).values():
        future.result(30)


def v2_value(row: dict[str, str], schema: Any, header: bytes, tariff: str | None) -> bytes:
    buf = io.BytesIO()
    buf.write(header)
    fastavro.schemaless_writer(buf, schema, {**to_avro_dict(record_of(row)), "Tariff": tariff})
    return buf.getvalue()


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Stream:
    tmp = tmp_path_factory.mktemp("tail")
    topic = f"cdr-{uuid4().hex[:8]}"
    config = SimulatorConfig(password=FEED_PASSWORD, backlog=BACKLOG, malformed_rate=0.03, seed=21)
    with BillingFeedSimulator(config) as sim:
        streamer_config = write_config(
            tmp / "config.toml",
            bootstrap=kafka_bootstrap,
            topic=topic,
            feeds=[{"name": "main", "url": sim.url, "login": "81234567",
                    "cursor_file": str(tmp / "cursor.json")}],
        )  # fmt: skip
        result = run_streamer("run", "--config", str(streamer_config), "--once")
        assert result.returncode == 0, result.stderr
        rows = {i: sim.row(i) for i in range(1, BACKLOG + V2_EVENTS + 1)}
        broken = {i for i in range(1, BACKLOG + 1) if sim.is_malformed(i)}
    # Events of the next version, produced as a newer streamer would (headers and all).
    v2 = fastavro.parse_schema(json.loads(V2_PATH.read_text()))
    header = SINGLE_OBJECT_MARKER + fingerprint(v2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for cdr_id in range(BACKLOG + 1, BACKLOG + V2_EVENTS + 1):
        row = rows[cdr_id]
        producer.produce(
            topic,
            v2_value(row, v2, header, "Peak" if cdr_id % 2 else None),
            row["AccountCode"].encode(),
            headers=[("cdr_id", str(cdr_id).encode()), ("source", b"feed"), ("feed", b"next")],
            timestamp=timestamp_ms(record_of(row)),
        )
    assert producer.flush(30) == 0
    assert broken  # some dead letters to read too
    events = [i for i in rows if i not in broken]
    return Stream(kafka_bootstrap, topic, streamer_config, rows, events, len(broken))


def run_tail(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    """`cdr-streamer tail ARGS` in this process: the exit code and the printed JSON lines."""
    capsys.readouterr()
    code = main(["tail", *args])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def test_tail_decodes_both_versions_by_fingerprint_as_a_real_process(stream: Stream) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "tail", "--bootstrap-servers", stream.bootstrap,
         "--topic", stream.topic, "--schema", str(V2_PATH)],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    by_id = {p["value"]["ID"]: p for p in printed}
    assert sorted(by_id) == stream.events
    for cdr_id, p in by_id.items():
        source = stream.rows[cdr_id]
        value = p["value"]
        assert p["topic"] == stream.topic
        assert p["key"] == source["AccountCode"] == value["AccountCode"]
        assert p["headers"]["cdr_id"] == str(cdr_id)
        for name in ("Status", "CallType", "Direction", "AParty", "BParty", "TextDesc1"):
            assert value[name] == source[name], name
        # Amounts are exact decimal strings; times ISO 8601, the event time in UTC.
        assert Decimal(value["Charge"]) == Decimal(source["Charge"])
        assert value["UTCDateTime"] == source["UTCDateTime"].replace(" ", "T") + ".000Z"
        assert p["timestamp"] == value["UTCDateTime"]
        if cdr_id <= BACKLOG:
            assert p["schema"] == "cdr-v1"
            assert p["headers"]["feed"] == "main"
            assert "Tariff" not in value
        else:
            assert p["schema"] == "cdr-v2-test"
            assert value["Tariff"] == ("Peak" if cdr_id % 2 else None)


def test_an_unknown_version_is_reported_and_the_rest_still_printed(
    stream: Stream, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without the v2 schema: its events cannot be decoded; exit 4, the others printed.
    code, printed = run_tail(capsys, "--config", str(stream.config))
    assert code == 4
    assert {p["value"]["ID"] for p in printed} == {i for i in stream.events if i <= BACKLOG}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--feed", "next"], lambda r, i: i > BACKLOG),
        (["--status", "Busy", "--status", "No Answer"],
         lambda r, i: r["Status"] in ("Busy", "No Answer")),
        (["--call-type", "International"], lambda r, i: r["CallType"] == "International"),
        (["--call-type", "SMS", "--feed", "main"],
         lambda r, i: r["CallType"] == "SMS" and i <= BACKLOG),
    ],
    ids=["feed", "status", "call-type", "call-type-and-feed"],
)  # fmt: skip
def test_filters(
    stream: Stream, capsys: pytest.CaptureFixture[str], args: list[str], expected: Any
) -> None:
    code, printed = run_tail(
        capsys, "--config", str(stream.config), "--schema", str(V2_PATH), *args
    )
    assert code == 0
    want = [i for i in stream.events if expected(stream.rows[i], i)]
    assert want  # the filter selects something, and not everything
    assert len(want) < len(stream.events)
    assert sorted(p["value"]["ID"] for p in printed) == want


def test_account_filter_uses_the_key(stream: Stream, capsys: pytest.CaptureFixture[str]) -> None:
    account = stream.rows[stream.events[0]]["AccountCode"]
    code, printed = run_tail(
        capsys, "--config", str(stream.config), "--schema", str(V2_PATH), "--account", account
    )
    assert code == 0
    want = [i for i in stream.events if stream.rows[i]["AccountCode"] == account]
    assert sorted(p["value"]["ID"] for p in printed) == want


def test_start_positions(stream: Stream, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", str(stream.config), "--schema", str(V2_PATH)]
    _, everything = run_tail(capsys, *base)
    # The last 3 offsets of each partition (the streamer's own transaction-free writes).
    _, last = run_tail(capsys, *base, "--from", "-3")
    per_partition: dict[int, list[int]] = {}
    for p in everything:
        per_partition.setdefault(p["partition"], []).append(p["offset"])
    assert sorted((p["partition"], p["offset"]) for p in last) == sorted(
        (partition, offset)
        for partition, offsets in per_partition.items()
        for offset in offsets[-3:]
    )
    # From an offset, on one partition.
    _, one = run_tail(capsys, *base, "--partition", "1", "--from", "5")
    assert [p["offset"] for p in one] == per_partition[1][5:]
    # From a time: every event at or after it, in each partition.
    times = sorted(p["timestamp"] for p in everything)
    middle = times[len(times) // 2]
    _, later = run_tail(capsys, *base, "--from", middle)
    assert sorted(p["timestamp"] for p in later) == [t for t in times if t >= middle]
    # -n stops early.
    _, first = run_tail(capsys, *base, "-n", "7")
    assert len(first) == 7


def test_table_output(stream: Stream, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert (
        main(["tail", "--config", str(stream.config), "--output", "table", "--feed", "main"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "UTCDateTime", "ID", "AccountCode", "Direction", "CallType", "Status", "Seconds",
        "Charge", "feed",
    ]  # fmt: skip
    assert len(lines) == 1 + len([i for i in stream.events if i <= BACKLOG])
    first = lines[1].split()
    cdr_id = int(first[1])
    assert first[2] == stream.rows[cdr_id]["AccountCode"]
    assert first[-1] == "main"


def test_dead_letters(stream: Stream, capsys: pytest.CaptureFixture[str]) -> None:
    code, printed = run_tail(capsys, "--config", str(stream.config), "--dead-letters")
    assert code == 0
    assert len(printed) == stream.dead_letters
    reasons = {p["value"]["reason"] for p in printed}
    for p in printed:
        assert p["topic"] == f"{stream.topic}-dlq"
        assert p["value"]["feed"] == "main"
        assert p["headers"]["reason"] == p["value"]["reason"]
        assert p["value"]["raw"]
    reason = sorted(reasons)[0]
    _, only = run_tail(capsys, "--config", str(stream.config), "--dead-letters", "--reason", reason)
    assert only
    assert {p["value"]["reason"] for p in only} == {reason}


def test_read_committed_by_default(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = f"cdr-{uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, partitions=1)
    sim = BillingFeedSimulator(SimulatorConfig(password="-", backlog=3, seed=5))
    rows = [sim.row(i) for i in (1, 2, 3)]
    encoder = SingleObjectEncoder()
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tail-test-{uuid4().hex}"}
    )
    producer.init_transactions(30)
    for row, commit in zip(rows, (True, False, True), strict=True):
        producer.begin_transaction()
        record = record_of(row)
        producer.produce(topic, encoder.encode(record), record.account_code.encode())
        assert producer.flush(30) == 0  # on the broker: an abort must not just drop it unsent
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)
    args = ["--bootstrap-servers", kafka_bootstrap, "--topic", topic]
    _, committed = run_tail(capsys, *args)
    assert [p["value"]["ID"] for p in committed] == [1, 3]
    _, everything = run_tail(capsys, *args, "--read-uncommitted")
    assert [p["value"]["ID"] for p in everything] == [1, 2, 3]


def test_registry_framing_by_id_for_two_versions(kafka_bootstrap: str) -> None:
    topic = f"cdr-{uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic)
    registry = SchemaRegistryClient.new_client({"url": f"mock://{uuid4().hex[:8]}"})
    subject = f"{topic}-value"
    v1_id = registry.register_schema(subject, Schema(CDR_SCHEMA_PATH.read_text(), "AVRO"))
    v2_id = registry.register_schema(subject, Schema(V2_PATH.read_text(), "AVRO"))
    assert v1_id != v2_id
    v1 = fastavro.parse_schema(json.loads(CDR_SCHEMA_PATH.read_text()))
    v2 = fastavro.parse_schema(json.loads(V2_PATH.read_text()))
    sim = BillingFeedSimulator(SimulatorConfig(password="-", backlog=60, seed=9))
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    sent = {}
    for cdr_id in range(1, 61):
        record = record_of(sim.row(cdr_id))
        schema_id, schema = (v1_id, v1) if cdr_id % 3 else (v2_id, v2)
        value = to_avro_dict(record) | ({} if schema is v1 else {"Tariff": "Off-peak"})
        buf = io.BytesIO(b"\x00" + schema_id.to_bytes(4, "big"))
        buf.seek(5)
        fastavro.schemaless_writer(buf, schema, value)
        producer.produce(topic, buf.getvalue(), record.account_code.encode())
        sent[cdr_id] = schema_id
    # And one whose id the registry does not know: reported, the rest still printed.
    producer.produce(topic, b"\x00\x00\x00\x03\xe7" + b"\x02", b"unknown")
    assert producer.flush(30) == 0

    out = io.StringIO()
    options = TailOptions(topic=topic, consumer_config=consumer_config(kafka_bootstrap))
    result = tail(options, EventDecoder(SchemaSet(), registry), out)
    printed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert result.undecodable == 1
    assert {p["value"]["ID"]: p["schema"] for p in printed} == {
        i: f"registry id {schema_id}" for i, schema_id in sent.items()
    }
    for p in printed:
        assert p["value"]["Status"] == sim.row(p["value"]["ID"])["Status"]
        if sent[p["value"]["ID"]] == v2_id:
            assert p["value"]["Tariff"] == "Off-peak"
        else:
            assert "Tariff" not in p["value"]

    # Filters apply to registry-framed events the same way.
    out = io.StringIO()
    busy = TailOptions(
        topic=topic,
        consumer_config=consumer_config(kafka_bootstrap),
        filters=Filters(statuses=frozenset({"Ok"})),
    )
    tail(busy, EventDecoder(SchemaSet(), registry), out)
    oks = [json.loads(line)["value"]["ID"] for line in out.getvalue().splitlines()]
    assert sorted(oks) == sorted(i for i in sent if sim.row(i)["Status"] == "Ok")


def test_from_end_follows_new_events(kafka_bootstrap: str) -> None:
    topic = f"cdr-{uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, partitions=2)
    sim = BillingFeedSimulator(SimulatorConfig(password="-", backlog=6, seed=8))
    encoder = SingleObjectEncoder()
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(ids: range) -> None:
        for cdr_id in ids:
            record = record_of(sim.row(cdr_id))
            producer.produce(topic, encoder.encode(record), record.account_code.encode())
        assert producer.flush(30) == 0

    send(range(1, 4))  # before the tail starts: not shown
    out = io.StringIO()
    options = TailOptions(
        topic=topic, consumer_config=consumer_config(kafka_bootstrap), start="end", max_messages=3
    )
    done: list[Any] = []
    reader = threading.Thread(
        target=lambda: done.append(tail(options, EventDecoder(SchemaSet()), out))
    )
    reader.start()
    try:
        # The tail is at the end once librdkafka has fetched (and found nothing) there.
        deadline = time.monotonic() + 60
        while reader.is_alive() and not done:
            send(range(4, 7))
            reader.join(2)
            assert time.monotonic() < deadline, "tail --from end printed nothing new"
    finally:
        reader.join(60)
    printed = [json.loads(line)["value"]["ID"] for line in out.getvalue().splitlines()]
    assert len(printed) == 3
    assert set(printed) <= {4, 5, 6}


def test_a_missing_topic_is_a_clear_error(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code = main(["tail", "--bootstrap-servers", kafka_bootstrap, "--topic", "no-such-topic-xyz"])
    assert code == 1
    assert "topic no-such-topic-xyz" in caplog.text
