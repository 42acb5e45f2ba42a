"""What the SFTP and the FTP tests share: the source's cursor, and kill -9 in the middle of a file.

Both protocols drive the one collector (streamer/sources/files.py), so their crash
tests are the same test over another server: `kill_twice_mid_file` and
`assert_resumed_without_loss` hold it once.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from helpers import StreamerProcess, read_events, read_topic, run_streamer

from streamer.simulator import SimulatorConfig

SOURCE = "files"  # the name of the file source in every test's configuration
CURSOR_FILE = "sftp-cursor.json"  # under the test's tmp_path, for every protocol
CRASH_ROWS = 50_000
CHECKPOINT_EVERY = 1_000


def files_config(seed: int, **extra: Any) -> SimulatorConfig:
    return SimulatorConfig(password="-", seed=seed, **extra)  # files need no password


def file_cursor(tmp_path: Path, bootstrap: str, cursor_topic: str | None) -> dict[str, Any]:
    """The file source's committed cursor, from its file or the cursor topic."""
    if cursor_topic is None:
        path = tmp_path / CURSOR_FILE
        return json.loads(path.read_text()) if path.exists() else {}
    latest: dict[str, Any] = {}
    for msg in read_topic(bootstrap, cursor_topic):
        if msg.key() == f"sftp:{SOURCE}".encode():
            latest = json.loads(msg.value())
    return latest


def produced(consumer: Consumer, topic: str) -> int:
    """Messages in the topic's log now, committed or not (the sum of high watermarks)."""
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    return sum(
        consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
        for p in partitions
    )


def produced_or_zero(consumer: Consumer, topic: str) -> int:
    """`produced`, or 0 while the streamer's new topic has no leaders yet."""
    if topic not in consumer.list_topics(timeout=10).topics:
        return 0
    try:
        return produced(consumer, topic)
    except KafkaException:
        return 0


def kill_twice_mid_file(
    config: Path,
    tmp_path: Path,
    bootstrap: str,
    topic: str,
    cursor_topic: str | None,
    file_name: str,
    thresholds: tuple[int, int] = (8_000, 25_000),
) -> list[int]:
    """Run the streamer on one big file and kill -9 it twice mid-file; the rows committed then.

    Each kill comes once the topic holds a threshold of messages, then a random instant
    later, so it may land mid-batch or mid-flush.
    """
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    rows_at_kill: list[int] = []
    rng = random.Random(20260301)
    try:
        for i, threshold in enumerate(thresholds):
            streamer = StreamerProcess(config, tmp_path / f"run-{i}.log")
            try:
                deadline = time.monotonic() + 120
                while produced_or_zero(watcher, topic) < threshold:
                    assert streamer.proc.poll() is None, streamer.log()[-3000:]
                    assert time.monotonic() < deadline, streamer.log()[-3000:]
                    time.sleep(0.01)  # the polling period of the check
                with pytest.raises(subprocess.TimeoutExpired):
                    streamer.proc.wait(rng.uniform(0.02, 0.4))
            finally:
                streamer.kill()
            cursor = file_cursor(tmp_path, bootstrap, cursor_topic)
            assert cursor.get("files", {}).get(file_name) is None, "the file was done already"
            rows_at_kill.append(cursor.get("rows", 0) if cursor.get("current") else 0)
    finally:
        watcher.close()
    assert rows_at_kill == sorted(rows_at_kill)
    assert rows_at_kill[-1] > 0, "no checkpoint was committed before the second kill"
    return rows_at_kill


def assert_resumed_without_loss(
    config: Path,
    tmp_path: Path,
    bootstrap: str,
    topic: str,
    cursor_topic: str | None,
    file_name: str,
    rows_at_kill: list[int],
    *,
    exactly_once: bool,
    rows: int = CRASH_ROWS,
) -> None:
    """Run once more to the end: every CDR there, and only the unconfirmed batches again."""
    finish = run_streamer("run", "--config", str(config), "--once", timeout_s=300)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert f"resuming {file_name} after row {rows_at_kill[-1]}" in finish.stderr
    assert file_cursor(tmp_path, bootstrap, cursor_topic)["files"] == {file_name: "done"}

    ids = Counter(e.value["ID"] for e in read_events(bootstrap, topic))
    assert set(ids) == set(range(1, rows + 1)), "a CDR was lost"
    duplicated = {i for i, n in ids.items() if n > 1}
    if exactly_once:
        assert not duplicated
    else:
        # Only the batch unconfirmed at a kill may come again: rows (committed, + batch].
        allowed: set[int] = set()
        for committed in rows_at_kill:
            allowed |= set(range(committed + 1, committed + CHECKPOINT_EVERY + 1))
        assert duplicated <= allowed
