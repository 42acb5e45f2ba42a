"""Integration helpers: an independent consumer, and the streamer run as a real process.

The consumer uses only confluent-kafka, fastavro and the `.avsc`, as a downstream
team would: it checks the single-object marker and fingerprint itself.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import fastavro
import fastavro.schema
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "schemas" / "cdr.avsc"
FEED_PASSWORD = "Tr1cky&pa=ss word"  # characters that must survive form and URL encoding


@dataclass(frozen=True)
class Event:
    key: str
    value: dict[str, Any]
    partition: int
    timestamp_ms: int
    headers: dict[str, bytes]


def load_cdr_schema() -> Any:
    return fastavro.parse_schema(json.loads(SCHEMA_PATH.read_text()))


def schema_fingerprint(schema: Any) -> bytes:
    """The schema's CRC-64-AVRO fingerprint, as single-object encoding carries it."""
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def decode_event(data: bytes, schema: Any, fingerprint: bytes) -> dict[str, Any]:
    """Avro single-object encoding, per the Avro specification."""
    assert data[:2] == b"\xc3\x01", "missing single-object marker"
    assert data[2:10] == fingerprint
    value: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)
    return value


def read_topic(bootstrap: str, topic: str, *, timeout_s: float = 60.0) -> list[Any]:
    """Every message in `topic` now (read_committed), read until each partition says EOF.

    Not "until the high watermark": a transaction's commit marker takes the last
    offset and is never delivered as a message.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = list(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Any] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(partitions):
            assert time.monotonic() < deadline, f"timed out reading {topic}: at end {at_end}"
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                at_end.add(msg.partition())
                continue
            at_end.discard(msg.partition())
            messages.append(msg)
        return messages
    finally:
        consumer.close()


def read_events(bootstrap: str, topic: str) -> list[Event]:
    schema = load_cdr_schema()
    fingerprint = schema_fingerprint(schema)  # once: it takes about a millisecond
    events = []
    for msg in read_topic(bootstrap, topic):
        events.append(
            Event(
                key=msg.key().decode("utf-8"),
                value=decode_event(msg.value(), schema, fingerprint),
                partition=msg.partition(),
                timestamp_ms=msg.timestamp()[1],
                headers=dict(msg.headers() or []),
            )
        )
    return events


def assert_matches_source(value: Mapping[str, Any], source: Mapping[str, str]) -> None:
    """Every field of a decoded event against the simulator's canonical source row."""
    assert str(value["ID"]) == source["ID"]
    for name in ("BillDate", "Date"):
        assert value[name].isoformat() == source[name], name
    assert value["Time"].strftime("%H:%M:%S") == source["Time"]
    assert value["UTCDateTime"].strftime("%Y-%m-%d %H:%M:%S") == source["UTCDateTime"]
    assert value["UTCDateTime"].utcoffset().total_seconds() == 0
    for name in ("UTCOffset", "Charge", "ChargeExcl", "FreeUnitsUsed"):
        assert value[name] == Decimal(source[name]), name
    for name in ("Seconds", "NetworkSeconds", "ConnectSeconds"):
        assert value[name] == int(source[name] or 0), name
    for name in (
        "AccountCode",
        "Direction",
        "CallType",
        "AParty",
        "BParty",
        "BillNumber",
        "TextDesc1",
        "TextDesc2",
        "ReleaseCause",
        "Status",
        "ServiceType",
        "BillingGroup",
        "CallingGroup",
        "Profile",
    ):
        assert value[name] == source[name], name


def write_config(
    path: Path,
    *,
    bootstrap: str,
    topic: str,
    feeds: list[dict[str, Any]],
    sftp: list[dict[str, Any]] | None = None,
    processing: dict[str, Any] | None = None,
    **kafka: Any,
) -> Path:
    """A streamer configuration file (TOML) for one test; `sftp`: its [[sftp]] tables."""
    lines = [
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        f'topic = "{topic}"',
        f'dead_letter_topic = "{topic}-dlq"',
        "partitions = 3",
    ]
    # A transactional id of its own: tests sharing a broker (KAFKA_BOOTSTRAP_SERVERS) with
    # other test runs never fence each other's feeds; two instances of one config still do.
    kafka.setdefault("transactional_id_prefix", f"test-{uuid4().hex[:8]}")
    lines += [f"{k} = {json.dumps(v)}" for k, v in kafka.items()]
    lines += ["[metrics]", "port = 0"]
    if processing:
        lines.append("[processing]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in processing.items()]
    for feed in feeds:
        lines.append("[[feeds]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in feed.items()]
    for source in sftp or []:
        lines.append("[[sftp]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in source.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_streamer(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """`cdr-streamer ARGS` as a real process, the way an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        env={**os.environ, "CDR_FEED_PASSWORD": FEED_PASSWORD, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO_ROOT,
    )


def read_dead_letters(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """The JSON values of the dead-letter topic `<topic>-dlq` (as write_config names it)."""
    return [json.loads(msg.value()) for msg in read_topic(bootstrap, f"{topic}-dlq")]


def read_cursor(path: Path) -> int | None:
    """The cursor a FileCursorStore committed, or None if it never wrote the file."""
    try:
        cursor: int = json.loads(path.read_text())["cursor"]
    except FileNotFoundError:
        return None
    return cursor


def wait_until(condition: Callable[[], bool], what: str, *, timeout_s: float = 60.0) -> None:
    """Return as soon as `condition()` holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.05)  # the polling period of the check, not a guess at how long it takes


def read_cursor_topic(bootstrap: str, topic: str, feed: str) -> int | None:
    """The latest committed cursor of `feed` in a compacted cursor topic (read_committed)."""
    latest = None
    for msg in read_topic(bootstrap, topic):
        if msg.key() == feed.encode():
            latest = json.loads(msg.value())["cursor"]
    return latest


class StreamerProcess:
    """`cdr-streamer run` in the background, its output in a log file."""

    def __init__(
        self, config: Path, log_path: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamer", "run", "--config", str(config), *args],
                env={**(os.environ if env is None else env), "CDR_FEED_PASSWORD": FEED_PASSWORD},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
        """Wait until `condition()` holds, failing with the log if the process dies first."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.proc.poll() is None, (
                f"streamer exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
            )
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}:\n{self.log()[-3000:]}"
            )
            time.sleep(0.2)  # polling interval of the condition above

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup, no flush
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout_s)
