"""The thin path, real at every step: simulator over HTTP -> `cdr-streamer run` -> Kafka."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import FEED_PASSWORD, assert_matches_source, read_events, run_streamer

from streamer.simulator import BillingFeedSimulator, SimulatorConfig


def test_publish_all_then_only_new_after_restart(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=1500, seed=7)) as sim:
        config = streamer_config(
            [
                {
                    "name": "main",
                    "url": sim.url,
                    "login": "81234567",
                    "cursor_file": str(cursor_file),
                    "poll_interval_s": 1,
                }
            ]
        )
        first = run_streamer("run", "--config", str(config), "--once")
        assert first.returncode == 0, first.stderr
        assert json.loads(cursor_file.read_text())["cursor"] == 1500

        events = read_events(kafka_bootstrap, topic_name)
        ids = Counter(e.value["ID"] for e in events)
        assert sorted(ids) == list(range(1, 1501))
        assert max(ids.values()) == 1  # each CDR once
        for event in events:
            source = sim.row(event.value["ID"])
            assert event.key == source["AccountCode"]
            assert_matches_source(event.value, source)
            assert event.headers["cdr_id"] == str(event.value["ID"]).encode()
            assert event.headers["source"] == b"feed"
            assert event.headers["feed"] == b"main"
            assert event.timestamp_ms == int(event.value["UTCDateTime"].timestamp() * 1000)
        # One account's events all on one partition, in ID order.
        by_key: dict[str, set[int]] = {}
        for event in events:
            by_key.setdefault(event.key, set()).add(event.partition)
        assert all(len(p) == 1 for p in by_key.values())
        assert len(by_key) > 10

        # Stop, let the provider bill more calls, restart: only the new ones are published.
        sim.add(250)
        second = run_streamer("run", "--config", str(config), "--once")
        assert second.returncode == 0, second.stderr
        assert json.loads(cursor_file.read_text())["cursor"] == 1750
        requests = [r for r in sim.requests if r.status == 200]
        assert requests[-1].method == "POST"
        assert requests[-1].params["fromid"] == "1500"

    events = read_events(kafka_bootstrap, topic_name)
    ids = Counter(e.value["ID"] for e in events)
    assert sorted(ids) == list(range(1, 1751))
    assert max(ids.values()) == 1


def test_password_never_in_output(
    tmp_path: Path, kafka_bootstrap: str, streamer_config: Callable[..., Path]
) -> None:
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=50)) as sim:
        feed: dict[str, Any] = {
            "name": "get",
            "url": sim.url,
            "login": "81234567",
            "method": "GET",
            "cursor_file": str(tmp_path / "c.json"),
        }
        ok = run_streamer(
            "--log-level", "DEBUG", "run", "--config", str(streamer_config([feed])), "--once"
        )
        wrong = run_streamer(
            "--log-level",
            "DEBUG",
            "run",
            "--config",
            str(streamer_config([feed])),
            "--once",
            env={"CDR_FEED_PASSWORD": FEED_PASSWORD + "-wrong"},
        )
    assert ok.returncode == 0, ok.stderr
    assert "HTTP Request: GET" in ok.stderr  # httpx's own line is there, redacted
    assert wrong.returncode == 3, wrong.stderr
    assert "check the login and password" in wrong.stderr
    for output in (ok.stdout, ok.stderr, wrong.stdout, wrong.stderr):
        assert FEED_PASSWORD not in output
        assert "Tr1cky" not in output
