"""Input that fails the same way every time must not stall a feed (issue 10).

Valid CDRs that Kafka refuses as they are, or whose call time Kafka would refuse as
a message timestamp: each good row is published, each bad one dead-lettered once
with the broker's reason, the cursor reaches the last ID, in both delivery modes.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from helpers import (
    FEED_PASSWORD,
    read_cursor,
    read_cursor_topic,
    read_dead_letters,
    read_events,
    run_streamer,
)

from streamer.simulator import BillingFeedSimulator, SimulatorConfig

BACKLOG = 300
MODES = [
    pytest.param({}, id="at-least-once"),
    pytest.param({"delivery": "exactly_once", "cursor_store": "kafka"}, id="exactly-once"),
]


def _feed(sim: BillingFeedSimulator, tmp_path: Path) -> dict[str, object]:
    return {
        "name": "main",
        "url": sim.url,
        "login": "81234567",
        "cursor_file": str(tmp_path / "cursor.json"),
        "poll_interval_s": 1,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }


Stream = Callable[[BillingFeedSimulator, dict[str, str]], "subprocess.CompletedProcess[str]"]


@pytest.fixture
def stream(tmp_path: Path, topic_name: str, streamer_config: Callable[..., Path]) -> Stream:
    """`cdr-streamer run --once` against `sim` in a delivery mode; it must exit 0."""

    def run(sim: BillingFeedSimulator, mode: dict[str, str]) -> subprocess.CompletedProcess[str]:
        config = streamer_config(
            [_feed(sim, tmp_path)], cursor_topic=f"{topic_name}-cursors", **mode
        )
        done = run_streamer("run", "--config", str(config), "--once", timeout_s=180)
        assert done.returncode == 0, done.stderr
        return done

    return run


def _ids(kafka_bootstrap: str, topic: str) -> Counter[int]:
    return Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic))


def _cursor(kafka_bootstrap: str, topic: str, mode: dict[str, str], tmp_path: Path) -> int | None:
    if mode:
        return read_cursor_topic(kafka_bootstrap, f"{topic}-cursors", "main")
    return read_cursor(tmp_path / "cursor.json")


@pytest.mark.parametrize("mode", MODES)
def test_call_times_kafka_would_refuse_are_published_with_the_produce_time(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    stream: Stream,
    mode: dict[str, str],
) -> None:
    odd = {20: "future_utc", 21: "before_1970", 150: "future_utc"}
    config_text = ",".join(f"{i}:{kind}" for i, kind in odd.items())
    sim = BillingFeedSimulator(
        SimulatorConfig(password=FEED_PASSWORD, backlog=BACKLOG, odd_rows=config_text)
    )
    with sim:
        done = stream(sim, mode)
    events = read_events(kafka_bootstrap, topic_name)
    ids = Counter(e.value["ID"] for e in events)
    assert set(ids) == set(range(1, BACKLOG + 1))
    assert max(ids.values()) == 1
    replaced = {e.value["ID"]: e for e in events if "timestamp_replaced" in e.headers}
    assert set(replaced) == set(odd)
    assert replaced[21].headers["timestamp_replaced"] == b"before_1970"
    assert replaced[20].headers["timestamp_replaced"] == b"in_future"
    assert all(e.timestamp_ms > 0 for e in events)  # nothing before 1970 on the topic
    assert _cursor(kafka_bootstrap, topic_name, mode, tmp_path) == BACKLOG
    assert done.stderr.count("which Kafka would refuse as a message timestamp") == 1


@pytest.mark.parametrize("mode", MODES)
def test_an_event_kafka_refuses_is_dead_lettered_and_the_rest_committed(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    stream: Stream,
    mode: dict[str, str],
) -> None:
    # A topic whose max.message.bytes a 30 KB event exceeds; ordinary batches fit.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topic = NewTopic(topic_name, 3, 1, config={"max.message.bytes": "20000"})
    admin.create_topics([topic])[topic_name].result()
    refused = {40, 222}
    sim = BillingFeedSimulator(
        SimulatorConfig(
            password=FEED_PASSWORD, backlog=BACKLOG,
            odd_rows=",".join(f"{i}:long_text" for i in sorted(refused)),
        )
    )  # fmt: skip
    with sim:
        done = stream(sim, mode)
    ids = _ids(kafka_bootstrap, topic_name)
    assert set(ids) == set(range(1, BACKLOG + 1)) - refused
    assert max(ids.values()) == 1  # the isolation re-produced nothing twice
    dead = read_dead_letters(kafka_bootstrap, topic_name)
    assert sorted(d["id"] for d in dead) == sorted(refused)
    for d in dead:
        assert d["reason"] == "kafka_rejected"
        assert "Kafka refused" in d["detail"] or "Broker" in d["detail"]
        assert str(d["id"]) in d["raw"]  # the raw row, from the feed
    assert _cursor(kafka_bootstrap, topic_name, mode, tmp_path) == BACKLOG
    for cdr_id in refused:
        assert f"Kafka refused the event of CDR {cdr_id}" in done.stderr


@pytest.mark.parametrize("mode", MODES)
def test_a_body_cut_short_every_time_publishes_each_row_once(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    stream: Stream,
    mode: dict[str, str],
) -> None:
    # Unsorted 100-row batches, each response cut inside its first batch, 4 times in a
    # row (the streamer gives up after 5 failures with --once): the rows before each
    # cut are kept, so no retry publishes them again, and the cursor moves over the
    # IDs handled without a gap.
    sim = BillingFeedSimulator(
        SimulatorConfig(password=FEED_PASSWORD, backlog=BACKLOG, batch_rows=100, unsorted=True)
    )
    with sim:
        sim.inject("truncate", count=4)
        done = stream(sim, mode)
    assert done.stderr.count("the response broke off after") == 4
    ids = _ids(kafka_bootstrap, topic_name)
    assert set(ids) == set(range(1, BACKLOG + 1))
    assert max(ids.values()) == 1  # no duplicate at all, though 4 responses broke off
    assert _cursor(kafka_bootstrap, topic_name, mode, tmp_path) == BACKLOG


@pytest.mark.parametrize("mode", MODES)
def test_a_row_without_an_id_at_the_end_is_dead_lettered_once(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    stream: Stream,
    mode: dict[str, str],
) -> None:
    sim = BillingFeedSimulator(
        SimulatorConfig(password=FEED_PASSWORD, backlog=100, odd_rows="100:no_id")
    )
    with sim:
        for _ in range(3):  # three polls, each ending in the same row without an ID
            stream(sim, mode)
    dead = read_dead_letters(kafka_bootstrap, topic_name)
    assert len(dead) == 1
    assert dead[0]["id"] is None
    assert _cursor(kafka_bootstrap, topic_name, mode, tmp_path) == 99
    ids = _ids(kafka_bootstrap, topic_name)
    assert set(ids) == set(range(1, 100))
    assert max(ids.values()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_cut_at_the_same_place_every_time_is_caught_up_by_date_windows(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    stream: Stream,
    mode: dict[str, str],
) -> None:
    # A PHP time limit: any answer of more than 150 rows is cut after row 150, and the
    # rows come unsorted, so the ID right after the cursor can be cut off every time.
    sim = BillingFeedSimulator(
        SimulatorConfig(
            password=FEED_PASSWORD, backlog=BACKLOG, batch_rows=BACKLOG, unsorted=True,
            cut_after_rows=150, seed=3,
        )
    )  # fmt: skip
    with sim:
        done = stream(sim, mode)
        windows = [r for r in sim.requests if "date" in r.params]
    assert "catching up by date windows" in done.stderr
    assert "caught up by date windows" in done.stderr
    assert windows, "the catch-up asked for date windows"
    ids = _ids(kafka_bootstrap, topic_name)
    assert set(ids) == set(range(1, BACKLOG + 1))
    assert max(ids.values()) == 1
    assert _cursor(kafka_bootstrap, topic_name, mode, tmp_path) == BACKLOG
