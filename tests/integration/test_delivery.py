"""Delivery guarantees against the real broker: crashes, fencing, broker outages."""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    FEED_PASSWORD,
    REPO_ROOT,
    StreamerProcess,
    read_cursor_topic,
    read_events,
    run_streamer,
    write_config,
)

from streamer.simulator import BillingFeedSimulator, SimulatorConfig

KAFKA_LOCAL = REPO_ROOT / "scripts" / "kafka-local"
CRASH_CDRS = 200_000
CRASHES = 20
CHECKPOINT_EVERY = 5_000


@pytest.fixture
def simulator() -> Iterator[Callable[..., BillingFeedSimulator]]:
    started: list[BillingFeedSimulator] = []

    def start(**config: object) -> BillingFeedSimulator:
        sim = BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, **config))  # type: ignore[arg-type]
        sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


def feed(sim: BillingFeedSimulator, tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "name": "main", "url": sim.url, "login": "81234567", "poll_interval_s": 1,
        "cursor_file": str(tmp_path / "cursor.json"), "backoff_base_s": 0.2,
        "backoff_max_s": 2, "ids_ascending": True, **extra,
    }  # fmt: skip


def test_exactly_once_publishes_each_cdr_once_with_cursor_in_kafka(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    simulator: Callable[..., BillingFeedSimulator],
    streamer_config: Callable[..., Path],
) -> None:
    sim = simulator(backlog=3000, malformed_rate=0.01)
    cursor_topic = f"{topic_name}-cursors"
    config = streamer_config(
        [feed(sim, tmp_path)], delivery="exactly_once", cursor_topic=cursor_topic,
        checkpoint_every=700,
    )  # fmt: skip
    done = run_streamer("run", "--config", str(config), "--once")
    assert done.returncode == 0, done.stderr
    assert read_cursor_topic(kafka_bootstrap, cursor_topic, "main") == 3000
    assert not (tmp_path / "cursor.json").exists()  # the file store is not used

    events = read_events(kafka_bootstrap, topic_name)
    malformed = {i for i in range(1, 3001) if sim.is_malformed(i)}
    ids = Counter(e.value["ID"] for e in events)
    assert max(ids.values()) == 1
    assert set(ids) | malformed >= set(range(1, 3001))
    dead = read_events_raw_json(kafka_bootstrap, f"{topic_name}-dlq")
    assert len(dead) == len(malformed) - len(malformed & set(ids))
    assert all(d["raw"] and d["reason"] for d in dead)

    # Restart: the cursor is read back from Kafka and nothing is published again.
    sim.add(100)
    again = run_streamer("run", "--config", str(config), "--once")
    assert again.returncode == 0, again.stderr
    assert read_cursor_topic(kafka_bootstrap, cursor_topic, "main") == 3100
    ids = Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name))
    assert max(ids.values()) == 1
    assert {i for i in range(3001, 3101) if not sim.is_malformed(i)} <= set(ids)


def read_events_raw_json(bootstrap: str, topic: str) -> list[dict[str, object]]:
    from helpers import read_topic

    return [json.loads(m.value()) for m in read_topic(bootstrap, topic)]


def test_second_instance_fences_the_first(
    tmp_path: Path,
    simulator: Callable[..., BillingFeedSimulator],
    streamer_config: Callable[..., Path],
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    sim = simulator(backlog=500, rate_per_s=50)
    prefix = f"fence-{topic_name}"  # both instances share one config, so one id
    config = streamer_config(
        [feed(sim, tmp_path)], delivery="exactly_once", cursor_topic=f"{topic_name}-cursors",
        transactional_id_prefix=prefix,
    )  # fmt: skip
    first = StreamerProcess(config, tmp_path / "first.log")
    first.wait_for(lambda: "cursor 0 -> " in first.log(), "the first instance's first poll")
    second = StreamerProcess(config, tmp_path / "second.log")
    try:
        assert first.proc.wait(120) == 3, first.log()[-3000:]
        assert f"Kafka fenced transactional id '{prefix}-main'" in first.log()
        assert "another cdr-streamer took over this feed" in first.log()
        second.wait_for(lambda: "cursor" in second.log() and " -> " in second.log(), "a poll")
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    ids = Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name))
    assert max(ids.values()) == 1


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_kill_9_at_random_instants_loses_nothing(
    delivery: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    simulator: Callable[..., BillingFeedSimulator],
    streamer_config: Callable[..., Path],
) -> None:
    sim = simulator(backlog=CRASH_CDRS, seed=3)
    cursor_topic = f"{topic_name}-cursors"
    # Parsed in 2 worker processes (streamer/workers.py): the kills hit them mid-block too.
    config = streamer_config(
        [feed(sim, tmp_path)], delivery=delivery, cursor_topic=cursor_topic,
        checkpoint_every=CHECKPOINT_EVERY, processing={"workers": 2},
    )  # fmt: skip

    def committed() -> int:
        if delivery == "exactly_once":
            return read_cursor_topic(kafka_bootstrap, cursor_topic, "main") or 0
        path = tmp_path / "cursor.json"
        return json.loads(path.read_text())["cursor"] if path.exists() else 0

    rng = random.Random(20261125)
    cursors_at_kill = []
    for i in range(CRASHES):
        proc = StreamerProcess(config, tmp_path / f"run-{i}.log")
        # A random instant once the feed is set up (on a loaded machine the start alone
        # can take longer than the longest wait): the process must still be running then.
        proc.wait_for(lambda p=proc: "feed main: polling" in p.log(), "the feed to start")
        with pytest.raises(subprocess.TimeoutExpired):
            proc.proc.wait(rng.uniform(0.8, 2.5))
        proc.kill()
        cursors_at_kill.append(committed())
    assert cursors_at_kill == sorted(cursors_at_kill)  # the cursor never goes back
    logs = [(tmp_path / f"run-{i}.log").read_text() for i in range(CRASHES)]
    assert any("starting 2 worker processes" in log for log in logs)  # (not in a killed start)

    finish = run_streamer("run", "--config", str(config), "--once", timeout_s=600)
    assert finish.returncode == 0, finish.stderr
    assert committed() == CRASH_CDRS

    events = read_events(kafka_bootstrap, topic_name)
    ids = Counter(e.value["ID"] for e in events)
    missing = set(range(1, CRASH_CDRS + 1)) - set(ids)
    assert not missing, (
        f"{len(missing)} CDRs lost of {len(events)} events read, e.g. {sorted(missing)[:5]}"
    )
    assert set(ids) == set(range(1, CRASH_CDRS + 1))
    duplicated = {i for i, n in ids.items() if n > 1}
    if delivery == "exactly_once":
        assert not duplicated
    else:
        # Only the batch that was unconfirmed at a kill may come again: (cursor, cursor + batch].
        allowed = set()
        for cursor in cursors_at_kill:
            allowed |= set(range(cursor + 1, cursor + CHECKPOINT_EVERY + 1))
        assert duplicated <= allowed


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A broker of this test's own, which the test stops and starts again."""
    broker_dir = tmp_path / "kafka"
    started = subprocess.run(
        [str(KAFKA_LOCAL), "start", "--dir", str(broker_dir)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    try:
        yield started.stdout.strip().splitlines()[-1], broker_dir
    finally:
        subprocess.run(
            [str(KAFKA_LOCAL), "stop", "--dir", str(broker_dir)], timeout=120, check=False
        )


@pytest.mark.parametrize("outage", ["restart", "longer_than_delivery_timeout"])
def test_broker_outage_loses_nothing_and_streamer_carries_on(
    outage: str,
    tmp_path: Path,
    own_broker: tuple[str, Path],
    simulator: Callable[..., BillingFeedSimulator],
    topic_name: str,
) -> None:
    bootstrap, broker_dir = own_broker
    sim = simulator(backlog=20_000, rate_per_s=400, seed=5)
    config = write_config(
        tmp_path / "config.toml", bootstrap=bootstrap, topic=topic_name,
        feeds=[feed(sim, tmp_path)], checkpoint_every=2000, flush_timeout_s=20,
    )  # fmt: skip
    with config.open("a") as f:
        # Short delivery timeouts, so "longer than the delivery timeout" fits in a test.
        f.write('[kafka.producer]\n"message.timeout.ms" = "4000"\n"request.timeout.ms" = "2000"\n')
    cursor_path = tmp_path / "cursor.json"

    def cursor() -> int:
        return json.loads(cursor_path.read_text())["cursor"] if cursor_path.exists() else 0

    # --bootstrap-servers: this test's own broker even when KAFKA_BOOTSTRAP_SERVERS is set.
    streamer = StreamerProcess(config, tmp_path / "streamer.log", "--bootstrap-servers", bootstrap)
    try:
        streamer.wait_for(lambda: cursor() >= 20_000, "the backlog to be published")
        subprocess.run(
            [str(KAFKA_LOCAL), "stop", "--dir", str(broker_dir)], timeout=120, check=True
        )
        at_outage = cursor()
        if outage == "longer_than_delivery_timeout":
            streamer.wait_for(
                lambda: "Kafka could not confirm delivery" in streamer.log(),
                "the streamer to report the failed deliveries",
            )
            assert cursor() == at_outage, "the cursor moved while Kafka confirmed nothing"
        subprocess.run(
            [str(KAFKA_LOCAL), "start", "--dir", str(broker_dir)], timeout=300, check=True,
            capture_output=True,
        )  # fmt: skip
        high = sim.high_id
        streamer.wait_for(lambda: cursor() >= high, "the streamer to carry on after the outage")
    finally:
        assert streamer.stop() == 0, streamer.log()[-3000:]
    final = cursor()
    ids = Counter(e.value["ID"] for e in read_events(bootstrap, topic_name))
    assert set(range(1, final + 1)) <= set(ids), "a CDR was lost"
