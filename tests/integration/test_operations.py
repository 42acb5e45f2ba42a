"""Operating the streamer, real at every step: Kafka down at start, lost cursors, start_from,
the cursor command on both stores, JSON logs. (The status page: test_status_page.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4
from zoneinfo import ZoneInfo

from confluent_kafka import Producer
from helpers import (
    FEED_PASSWORD,
    REPO_ROOT,
    StreamerProcess,
    read_cursor,
    read_cursor_topic,
    read_events,
    run_streamer,
    write_config,
)

from streamer.simulator import BillingFeedSimulator, SimulatorConfig

KAFKA_LOCAL = REPO_ROOT / "scripts" / "kafka-local"
GAP_S = 30.0  # the simulator's mean time between two CDRs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def recent_simulator(**kwargs: Any) -> SimulatorConfig:
    """A simulator whose newest CDR is about now (`latest` and dates look back from today)."""
    backlog = kwargs.pop("backlog", 1500)
    start = datetime.now(UTC) - timedelta(seconds=backlog * GAP_S)
    return SimulatorConfig(password=FEED_PASSWORD, backlog=backlog, start=start, **kwargs)


def test_broker_down_at_start_then_up(tmp_path: Path, topic_name: str) -> None:
    broker_port, controller_port, metrics_port = free_port(), free_port(), free_port()
    broker_dir = tmp_path / "kafka"
    broker_dir.mkdir()
    (broker_dir / "ports").write_text(f"{broker_port} {controller_port}\n")  # kafka-local's
    bootstrap = f"127.0.0.1:{broker_port}"
    cursor_file = tmp_path / "cursor.json"
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=300)) as sim:
        config = write_config(
            tmp_path / "config.toml", bootstrap=bootstrap, topic=topic_name,
            feeds=[{"name": "main", "url": sim.url, "login": "81234567",
                    "cursor_file": str(cursor_file), "poll_interval_s": 1}],
        )  # fmt: skip
        text = config.read_text().replace("port = 0", f'port = {metrics_port}\nhost = "127.0.0.1"')
        config.write_text(text)
        # Not the session's broker: the one this test starts later, at the address in the file.
        env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
        streamer = StreamerProcess(config, tmp_path / "streamer.log", env=env)
        base = f"http://127.0.0.1:{metrics_port}"
        try:

            def tries() -> int:
                status, body = http_get(f"{base}/status")
                if status != 200:
                    return 0
                waiting = json.loads(body)["kafka"]["waiting"] or ""
                return (
                    int(waiting.split(" tries")[0].rsplit(" ", 1)[-1]) if "tries" in waiting else 0
                )

            # Several tries with the broker down, each a new client: librdkafka repeats itself.
            streamer.wait_for(lambda: tries() >= 3, "3 tries to reach Kafka", timeout_s=120)
            status, body = http_get(f"{base}/readyz")
            assert status == 503
            assert "waiting for Kafka at " + bootstrap in body
            down_log = streamer.log()
            started = subprocess.run(
                [str(KAFKA_LOCAL), "start", "--dir", str(broker_dir)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert started.returncode == 0, started.stderr
            assert started.stdout.strip() == bootstrap
            streamer.wait_for(lambda: read_cursor(cursor_file) == 300, "the backlog published")
            streamer.wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, "ready")
            assert streamer.stop() == 0
            events = read_events(bootstrap, topic_name)
        finally:
            if streamer.proc.poll() is None:
                streamer.kill()
            subprocess.run(
                [str(KAFKA_LOCAL), "stop", "--dir", str(broker_dir)],
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip
    assert sorted(e.value["ID"] for e in events) == list(range(1, 301))
    log = streamer.log()
    assert "Traceback" not in log
    plain = [line for line in log.splitlines() if f"Kafka at {bootstrap} does not answer" in line]
    assert len(plain) == 1, plain  # one plain line, not one per try
    assert "check kafka.bootstrap_servers" in plain[0]
    # librdkafka's connection failures are folded: one line per kind per minute, not
    # hundreds (before: 574 in 30 s).
    refused = [line for line in down_log.splitlines() if "Connection refused" in line]
    assert len(refused) == 1, "\n".join(refused)
    assert "answers after" in log


def test_lost_cursor_file_recovers_from_the_topic_and_relative_paths(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=500)) as sim:
        config = write_config(
            conf_dir / "streamer.toml", bootstrap=kafka_bootstrap, topic=topic_name,
            feeds=[{"name": "main", "url": sim.url, "login": "81234567",
                    "cursor_file": "state/cursor.json"}],
        )  # fmt: skip
        first = run_streamer("run", "--config", str(config), "--once")  # cwd: the repository
        assert first.returncode == 0, first.stderr
        cursor_file = conf_dir / "state" / "cursor.json"  # beside the config, not the cwd
        assert read_cursor(cursor_file) == 500
        assert not (REPO_ROOT / "state").exists()

        cursor_file.unlink()  # lost: a volume not mounted, a file moved
        sim.add(100)
        second = run_streamer("run", "--config", str(config), "--once")
        assert second.returncode == 0, second.stderr
        fromids = [int(r.params["fromid"]) for r in sim.requests if r.status == 200]
    # The second run went on from the cursor recovered from the topic: where every
    # partition had got to (3 partitions, 50 accounts: close to 500), never history.
    assert fromids[0] == 0
    recovered = fromids[1]
    assert 450 <= recovered <= 500
    assert f"recovered cursor {recovered} from them" in second.stderr
    assert read_cursor(cursor_file) == 600
    ids = Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name))
    assert sorted(ids) == list(range(1, 601))  # nothing skipped
    # At least once: only the few above the recovered cursor came again.
    assert {i for i, n in ids.items() if n > 1} == set(range(recovered + 1, 501))


def _first_id_on(sim: BillingFeedSimulator, day: date, high: int) -> int:
    return min(i for i in range(1, high + 1) if sim.row(i)["Date"] == day.isoformat())


def test_start_from_date_and_latest_fetch_no_earlier_history(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    with BillingFeedSimulator(recent_simulator(backlog=3000, seed=5)) as sim:
        day = date.fromisoformat(sim.row(3000)["Date"])  # the backlog spans 25 h: two days
        first = _first_id_on(sim, day, 3000)
        assert first > 1  # the day starts after some history, which must not be fetched
        feed = {"name": "bydate", "url": sim.url, "login": "81234567",
                "cursor_file": str(tmp_path / "bydate.json"),
                "start_from": day.isoformat()}  # fmt: skip
        result = run_streamer("run", "--config", str(streamer_config([feed])), "--once")
        assert result.returncode == 0, result.stderr
        requests = [r for r in sim.requests if r.status == 200]
    # Every request before the first poll asked for the day itself (date, hour), from 0;
    # the poll then asked from the cursor found: nothing before the day was fetched.
    windows, polls = requests[:-1], requests[-1:]
    assert windows
    assert all(r.params.get("date") == day.isoformat() for r in windows)
    assert polls[0].params["fromid"] == str(first - 1)
    assert "date" not in polls[0].params
    assert f"start_from {day.isoformat()} gives cursor {first - 1}" in result.stderr
    ids = sorted(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name))
    assert ids == list(range(first, 3001))

    with BillingFeedSimulator(recent_simulator(backlog=2000, seed=6)) as sim:
        feed = {"name": "latest", "url": sim.url, "login": "81234567",
                "cursor_file": str(tmp_path / "latest.json"), "start_from": "latest"}  # fmt: skip
        config = streamer_config([feed])
        result = run_streamer("run", "--config", str(config), "--once")
        assert result.returncode == 0, result.stderr
        assert read_cursor(tmp_path / "latest.json") == 2000  # committed at once
        sim.add(25)
        again = run_streamer("run", "--config", str(config), "--once")
        assert again.returncode == 0, again.stderr
        requests = [r for r in sim.requests if r.status == 200]
    today = datetime.now(ZoneInfo("Pacific/Auckland")).date()
    dated = [r for r in requests if "date" in r.params]
    assert dated
    assert all(abs((date.fromisoformat(r.params["date"]) - today).days) <= 1 for r in dated)
    undated = [r.params["fromid"] for r in requests if "date" not in r.params]
    assert undated == ["2000", "2000"]  # never fromid=0: no history at all
    assert read_cursor(tmp_path / "latest.json") == 2025
    latest_ids = [
        e.value["ID"]
        for e in read_events(kafka_bootstrap, topic_name)
        if e.headers["feed"] == b"latest"
    ]
    assert sorted(latest_ids) == list(range(2001, 2026))


def _cursor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_streamer("cursor", *args, "--config", str(config), timeout_s=120)


def test_cursor_command_on_the_file_store(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    cursor_file = tmp_path / "main.json"
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=400)) as sim:
        feed = {"name": "main", "url": sim.url, "login": "81234567",
                "cursor_file": str(cursor_file), "poll_interval_s": 600}  # fmt: skip
        config = streamer_config([feed])
        shown = _cursor(config, "show")
        assert shown.returncode == 0, shown.stderr
        assert "feed main: no cursor committed yet" in shown.stdout
        assert run_streamer("run", "--config", str(config), "--once").returncode == 0

        dry = _cursor(config, "set", "--feed", "main", "100", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would move cursor 400 -> 100" in dry.stdout
        assert "CDRs 101..400 will be fetched and published again" in dry.stdout
        assert read_cursor(cursor_file) == 400  # a dry run writes nothing

        streamer = StreamerProcess(config, tmp_path / "running.log")
        try:
            streamer.wait_for(lambda: "0 rows" in streamer.log(), "the first poll")
            refused = _cursor(config, "set", "100")
            assert refused.returncode == 1
            assert "feed main is running (process" in refused.stderr
            assert "nothing was changed" in refused.stderr
            assert read_cursor(cursor_file) == 400
            second = StreamerProcess(config, tmp_path / "second.log")
            assert second.proc.wait(60) == 1  # a second instance on the same cursor file
            assert "feed main is already running" in second.log()
        finally:
            assert streamer.stop() == 0

        moved = _cursor(config, "set", "100")
        assert moved.returncode == 0, moved.stderr
        assert "cursor 400 -> 100" in moved.stdout
        assert read_cursor(cursor_file) == 100
        shown = _cursor(config, "show", "--json")
        assert json.loads(shown.stdout)["cursor"] == 100
        reset = _cursor(config, "reset")
        assert reset.returncode == 0, reset.stderr
        assert "reset to start_from = earliest" in reset.stdout
        assert read_cursor(cursor_file) == 0


def test_cursor_command_on_the_kafka_store_fences_in_exactly_once(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    cursor_topic = f"{topic_name}-cursors"
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=300)) as sim:
        feed = {"name": f"eos-{uuid4().hex[:6]}", "url": sim.url, "login": "81234567",
                "poll_interval_s": 1}  # fmt: skip
        name = feed["name"]
        config = streamer_config(
            [feed], delivery="exactly_once", cursor_topic=cursor_topic,
            transactional_id_prefix=f"test-{topic_name}",
        )  # fmt: skip
        assert run_streamer("run", "--config", str(config), "--once").returncode == 0
        shown = _cursor(config, "show")
        assert f"feed {name}: cursor 300, in KafkaCursorStore" in shown.stdout, shown.stderr
        assert "not running" in shown.stdout

        streamer = StreamerProcess(config, tmp_path / "running.log")
        try:
            streamer.wait_for(lambda: "0 rows" in streamer.log(), "the first poll")
            refused = _cursor(config, "set", "120")
            assert refused.returncode == 1
            assert f"feed {name} is running (process" in refused.stderr
            assert "lease renewed" in refused.stderr
            assert read_cursor_topic(kafka_bootstrap, cursor_topic, name) == 300
            forced = _cursor(config, "set", "120", "--force")
            assert forced.returncode == 0, forced.stderr
            # The command's transaction fenced the running instance: at its next
            # transaction (new CDRs to publish) it stops by itself, publishing nothing.
            sim.add(10)
            assert streamer.proc.wait(120) == 3
            assert "fenced" in streamer.log()
        finally:
            if streamer.proc.poll() is None:
                streamer.stop()
        assert read_cursor_topic(kafka_bootstrap, cursor_topic, name) == 120
        dry = _cursor(config, "reset", "--dry-run")
        assert "would move cursor 120 -> 0" in dry.stdout, dry.stderr
        assert read_cursor_topic(kafka_bootstrap, cursor_topic, name) == 120


def test_a_transaction_left_open_by_a_killed_run_does_not_stop_the_next_start(
    kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    """kill -9 between a cursor record and its commit leaves a transaction open on the
    cursor topic. The next start's lease check cannot read past it; the feed's own
    producer then fences it (same transactional id), so the start must go on."""
    cursor_topic = f"{topic_name}-cursors"
    prefix = f"test-{topic_name}"
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=200)) as sim:
        name = f"eos-{uuid4().hex[:6]}"
        feed = {"name": name, "url": sim.url, "login": "81234567", "poll_interval_s": 1}
        config = streamer_config(
            [feed], delivery="exactly_once", cursor_topic=cursor_topic,
            transactional_id_prefix=prefix,
        )  # fmt: skip
        assert run_streamer("run", "--config", str(config), "--once").returncode == 0
        assert read_cursor_topic(kafka_bootstrap, cursor_topic, name) == 200

        # What the killed run left: its transactional producer, a cursor record, no commit.
        killed = Producer(
            {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{prefix}-{name}"}
        )
        killed.init_transactions(30)
        killed.begin_transaction()
        value = json.dumps({"feed": name, "cursor": 9999}).encode()
        killed.produce(cursor_topic, value, name.encode())
        assert killed.flush(30) == 0
        sim.add(15)
        second = run_streamer("run", "--config", str(config), "--once")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
    assert read_cursor_topic(kafka_bootstrap, cursor_topic, name) == 215
    ids = Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name))
    assert set(ids) == set(range(1, 216))
    assert set(ids.values()) == {1}


def test_json_logs_parse_line_by_line_and_hold_no_secret(
    tmp_path: Path, streamer_config: Callable[..., Path]
) -> None:
    secret_file = tmp_path / "kafka-secret"
    secret_file.write_text("Kafka-S3cret-value\n")
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=50)) as sim:
        sim.inject("500")
        feed = {"name": "main", "url": sim.url, "login": "81234567", "method": "GET",
                "cursor_file": str(tmp_path / "c.json"), "backoff_base_s": 0.1}  # fmt: skip
        wrong = {**feed, "name": "wrong", "cursor_file": str(tmp_path / "w.json"),
                 "password_env": "WRONG_PASSWORD"}  # fmt: skip
        config = streamer_config([feed, wrong])
        text = config.read_text().replace(
            "[metrics]", f'[kafka.producer]\n"sasl.password_file" = "{secret_file}"\n[metrics]'
        )
        config.write_text(text)
        result = run_streamer(
            "--log-format", "json", "--log-level", "DEBUG", "run", "--config", str(config),
            "--once", env={"WRONG_PASSWORD": FEED_PASSWORD + "-wrong"},
        )  # fmt: skip
        checked = run_streamer("check-config", "--config", str(config), env={"WRONG_PASSWORD": "x"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) > 10
    for line in lines:
        assert {"time", "level", "logger", "feed", "event", "message", "fields"} <= set(line)
    polls = [line for line in lines if line["event"] == "poll"]
    assert [p["feed"] for p in polls] == ["main"]
    assert polls[0]["fields"]["cursor_after"] == 50
    assert polls[0]["fields"]["published"] == 50
    retries = [line for line in lines if line["event"] == "retry"]
    assert retries
    assert retries[0]["feed"] in ("main", "wrong")
    assert retries[0]["fields"]["attempt"] == 1
    assert "HTTP 500" in retries[0]["message"]
    stopped = [line for line in lines if line["event"] == "stopped"]
    assert [s["feed"] for s in stopped] == ["wrong"]
    # Every line logged while a feed polls names it, httpx's (DEBUG) and librdkafka's too.
    httpx_lines = [line for line in lines if line["logger"] == "httpx"]
    assert httpx_lines
    assert all(line["feed"] in ("main", "wrong") for line in httpx_lines)
    for output in (result.stdout, result.stderr, checked.stdout, checked.stderr):
        for secret in (FEED_PASSWORD, "Tr1cky", "Kafka-S3cret"):
            assert secret not in output
    assert checked.returncode == 0, checked.stderr
    assert '"sasl.password" = "********"' in checked.stdout


def test_env_overrides_and_secret_files_reach_the_producer(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=20)) as sim:
        feed = {"name": "main", "url": sim.url, "login": "81234567",
                "cursor_file": str(tmp_path / "c.json")}  # fmt: skip
        config = streamer_config([feed])
        other = f"{topic_name}-env"
        env = {"CDR_STREAMER_KAFKA_TOPIC": other, "CDR_STREAMER_KAFKA_PRODUCER_LINGER_MS": "5"}
        checked = run_streamer("check-config", "--config", str(config), "--connect", env=env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f'topic = "{other}"' in checked.stdout
        assert '"linger.ms" = "5"' in checked.stdout
        assert "feed main: login 81234567 accepted" in checked.stdout
        assert f"kafka {kafka_bootstrap}: brokers answering: 1" in checked.stdout
        assert sim.requests[-1].params.get("date")  # no cursor: one hour of today, no history
        result = run_streamer("run", "--config", str(config), "--once", env=env)
        assert result.returncode == 0, result.stderr
    assert len(read_events(kafka_bootstrap, other)) == 20
    assert os.environ.get("CDR_STREAMER_KAFKA_TOPIC") is None
