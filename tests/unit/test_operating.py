"""In-process tests of what operating the streamer rests on: logs, settings, status, locks."""

from __future__ import annotations

import io
import json
import logging
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from streamer.check import render
from streamer.config import StartFrom, parse_settings
from streamer.errors import ConfigError
from streamer.health import Readiness
from streamer.logs import FoldRepeats, JsonLineFormatter, SourceFilter, TextFormatter, polling
from streamer.metrics import Metrics, RecentCounts
from streamer.running import FileLock, file_holder
from streamer.simulator import BillingFeedSimulator, SimulatorConfig
from streamer.sources.feed import FeedClient
from streamer.startup import resolve_start
from streamer.status import StatusBoard, render_html


def record(message: str, level: int = logging.ERROR, name: str = "librdkafka") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_fold_repeats_lets_one_line_per_condition_per_interval() -> None:
    now = [0.0]
    fold = FoldRepeats(60.0, clock=lambda: now[0])
    line = (
        "FAIL [rdkafka#producer-{n}] 127.0.0.1:9/bootstrap: Connect failed: refused "
        "(after {n}ms in state CONNECT)"
    )
    passed = [fold.filter(record(line.format(n=n))) for n in range(50)]
    assert passed == [True] + [False] * 49
    assert fold.filter(record("another condition"))  # a distinct one passes at once
    now[0] = 61.0
    late = record(line.format(n=7))
    assert fold.filter(late)
    assert "(49 more like it in the last 61 s)" in late.getMessage()


def _format(formatter: logging.Formatter, rec: logging.LogRecord) -> str:
    SourceFilter().filter(rec)
    return formatter.format(rec)


def test_lines_logged_while_a_source_polls_name_it() -> None:
    text = TextFormatter("%(levelname)s %(name)s: %(message)s")
    with polling("feed", "main"):
        named = _format(text, record("HTTP Request: POST ...", logging.INFO, "httpx"))
        already = _format(text, record("feed main: 3 rows", logging.INFO, "streamer"))
    outside = _format(text, record("metrics on ...", logging.INFO, "streamer"))
    assert named == "INFO httpx: feed main: HTTP Request: POST ..."
    assert already == "INFO streamer: feed main: 3 rows"  # not named twice
    assert outside == "INFO streamer: metrics on ..."


def test_json_lines_carry_time_level_feed_event_and_fields() -> None:
    formatter = JsonLineFormatter()
    rec = record("feed main: 3 rows", logging.INFO, "streamer.scheduler")
    rec.event, rec.fields = "poll", {"rows": 3}  # what logs.fields() passes as extra
    with polling("feed", "main"):
        line = json.loads(_format(formatter, rec))
    assert line["level"] == "INFO"
    assert line["feed"] == "main"
    assert line["event"] == "poll"
    assert line["fields"] == {"rows": 3}
    assert line["message"] == "feed main: 3 rows"
    assert datetime.fromisoformat(line["time"])
    plain = json.loads(_format(formatter, record("x")))
    assert plain["feed"] is None
    assert plain["event"] == "log"
    assert isinstance(formatter, logging.Formatter)  # handler filters (redaction) apply


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("earliest", StartFrom("earliest")),
        ("latest", StartFrom("latest")),
        (1234, StartFrom("id", id=1234)),
        ("1234", StartFrom("id", id=1234)),
        ("2024-05-22", StartFrom("date", day=date(2024, 5, 22))),
    ],
)
def test_start_from_values(value: object, expected: StartFrom) -> None:
    assert StartFrom.parse(value) == expected


@pytest.mark.parametrize("value", ["yesterday", -1, "2024-02-30", "22/05/2024", True, 1.5])
def test_start_from_refuses_what_it_cannot_mean(value: object) -> None:
    with pytest.raises(ValueError, match="earliest, latest, a CDR ID"):
        StartFrom.parse(value)


FEED = {"name": "main", "url": "http://127.0.0.1:1/billingfeed.php", "login": "1", "password": "p"}


def settings_of(
    data: dict[str, Any], env: dict[str, str] | None = None, base: Path | None = None
) -> Any:
    return parse_settings(data, env=env or {}, base_dir=base)


def test_relative_paths_are_relative_to_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    data = {
        "kafka": {"bootstrap_servers": "k:9092", "producer": {"sasl.password_file": "secret"}},
        "feeds": [{**FEED, "cursor_file": "state/c.json"}, {**FEED, "name": "two"}],
    }
    settings = settings_of(data, base=tmp_path)
    assert settings.feeds[0].cursor_file == str(tmp_path / "state/c.json")
    assert settings.feeds[1].cursor_file == str(tmp_path / "var/cursor-two.json")  # the default too
    assert settings.kafka.producer["sasl.password"] == "s3cret"


def test_producer_and_registry_settings_by_reference_are_secrets(tmp_path: Path) -> None:
    (tmp_path / "kafka").write_text("from-a-file\n")
    data = {
        "kafka": {
            "bootstrap_servers": "k:9092",
            "schema_registry_url": "http://registry:8081",
            "schema_registry_user_env": "REG_USER",
            "schema_registry_password_file": str(tmp_path / "kafka"),
            "producer": {
                "sasl.username": "svc",
                "sasl.password_env": "KAFKA_PASSWORD",
                "ssl.key.password": "in-the-file",
            },
        },
        "feeds": [FEED],
    }
    settings = settings_of(data, env={"KAFKA_PASSWORD": "from-env", "REG_USER": "reg"})
    k = settings.kafka
    assert k.producer["sasl.password"] == "from-env"
    assert k.producer_secrets == {"sasl.password", "ssl.key.password"}
    assert k.schema_registry_user == "reg"
    assert k.schema_registry_password.reveal() == "from-a-file"
    listing = render(settings, "test.toml")
    for secret in ("from-env", "in-the-file", "from-a-file", 'password = "p"'):
        assert secret not in listing
    assert '"sasl.password" = "********"' in listing
    assert '"sasl.username" = "svc"' in listing
    assert 'schema_registry_password = "********"' in listing
    assert "[[feeds]]" in listing
    assert 'start_from = "earliest"' in listing


def test_missing_reference_is_reported_with_the_rest() -> None:
    data = {
        "kafka": {"bootstrap_servers": "k", "producer": {"sasl.password_env": "NOPE"}},
        "feeds": [FEED],
    }
    with pytest.raises(
        ConfigError, match=r"kafka\.producer\.sasl\.password_env: environment variable NOPE"
    ):
        settings_of(data)


def test_environment_overrides_every_kafka_and_metrics_setting() -> None:
    env = {
        "CDR_STREAMER_KAFKA_TOPIC": "from-env",
        "CDR_STREAMER_KAFKA_PARTITIONS": "12",
        "CDR_STREAMER_KAFKA_SCHEMA_REGISTRY_AUTO_REGISTER": "false",
        "CDR_STREAMER_METRICS_PORT": "9200",
        "CDR_STREAMER_KAFKA_PRODUCER_SASL_MECHANISM": "PLAIN",
    }
    settings = settings_of(
        {"kafka": {"bootstrap_servers": "k", "topic": "file"}, "feeds": [FEED]}, env
    )
    assert settings.kafka.topic == "from-env"
    assert settings.kafka.partitions == 12
    assert settings.kafka.schema_registry_auto_register is False
    assert settings.metrics.port == 9200
    assert settings.kafka.producer["sasl.mechanism"] == "PLAIN"
    with pytest.raises(ConfigError) as info:
        settings_of({"kafka": {"bootstrap_servers": "k"}, "feeds": [FEED]},
                    {"CDR_STREAMER_KAFKA_TOPICS": "x",
                     "CDR_STREAMER_METRICS_PORT": "many"})  # fmt: skip
    assert "CDR_STREAMER_KAFKA_TOPICS: not a setting" in str(info.value)
    assert "CDR_STREAMER_METRICS_PORT: must be a number" in str(info.value)


def test_start_from_and_initial_cursor() -> None:
    settings = settings_of(
        {"kafka": {"bootstrap_servers": "k"}, "feeds": [{**FEED, "initial_cursor": 7}]}
    )
    assert settings.feeds[0].start_from == StartFrom("id", id=7)
    with pytest.raises(ConfigError, match="start_from and initial_cursor"):
        settings_of({"kafka": {"bootstrap_servers": "k"},
                     "feeds": [{**FEED, "initial_cursor": 7, "start_from": "latest"}]})  # fmt: skip


class FakeRunner:
    kind = "feed"

    def __init__(self, name: str, *, error: Exception | None = None, failures: int = 0) -> None:
        self.name = name
        self.error = error
        self.failures = failures
        self.last_poll_at: float | None = 1000.0
        self.last_poll_ok: bool | None = error is None and not failures
        self.last_summary = "3 rows"
        self.last_error_text = str(error) if error else ("HTTP 503" if failures else "")
        self.next_poll_at: float | None = 1010.0


def test_status_board_states_readiness_and_page_escaping() -> None:
    metrics = Metrics(CollectorRegistry())
    for name in ("ok", "bad<b>", "flaky"):
        metrics.for_feed(name)
    board = StatusBoard(metrics, [("feed", "ok"), ("feed", "bad<b>"), ("feed", "flaky")],
                        kafka_servers="k:9092", clock=lambda: 1005.0)  # fmt: skip
    assert board.problems() == ["not started yet: starting"]
    board.waiting("waiting for Kafka at k:9092 for 3 s, 2 tries (down)")
    assert [s["state"] for s in board.snapshot()["sources"]] == ["waiting"] * 3
    board.attach([FakeRunner("ok"), FakeRunner("bad<b>", error=ConfigError("refused <x>")),  # type: ignore[list-item]
                  FakeRunner("flaky", failures=2)])  # type: ignore[list-item]  # fmt: skip
    assert board.problems() == ["feed bad<b> stopped: refused <x>"]
    readiness = Readiness(metrics, lambda: None, max_failing_s=900, extra=board.problems)
    assert readiness.problems() == ["feed bad<b> stopped: refused <x>"]
    snapshot = board.snapshot()
    assert [s["state"] for s in snapshot["sources"]] == ["running", "stopped", "failing"]
    assert snapshot["sources"][2]["failures_in_a_row"] == 2
    page = render_html(snapshot)
    assert "bad&lt;b&gt;" in page
    assert "<b>refused" not in page
    assert "refused &lt;x&gt;" in page
    assert 'data-state="stopped"' in page


def test_recent_counts_keep_one_hour() -> None:
    now = [0.0]
    recent = RecentCounts(clock=lambda: now[0])
    recent.add(10, 1)
    now[0] = 1800.0
    recent.add(5, 0)
    assert recent.last_hour() == (15, 1)
    now[0] = 3700.0
    assert recent.last_hour() == (5, 0)


def test_a_cursor_file_lock_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    cursor = tmp_path / "cursor.json"
    assert file_holder(cursor) is None
    lock = FileLock(cursor)
    lock.acquire("feed main")
    try:
        assert file_holder(cursor) is not None  # seen from another open file description
        with pytest.raises(ConfigError, match="feed main is already running"):
            FileLock(cursor).acquire("feed main")
    finally:
        lock.release()
    assert file_holder(cursor) is None


def test_start_from_date_and_latest_ask_only_for_dates_and_hours() -> None:
    zone = ZoneInfo("Pacific/Auckland")
    now = datetime(2024, 3, 2, 12, 30, tzinfo=UTC)
    start = now - timedelta(seconds=3000 * 30)  # 3000 CDRs, 30 s apart, up to now
    with BillingFeedSimulator(SimulatorConfig(password="pw", backlog=3000, start=start)) as sim:
        client = FeedClient(sim.url, "81234567", _secret("pw"), stop=threading.Event())
        day = date.fromisoformat(sim.row(3000)["Date"])
        first = min(i for i in range(1, 3001) if sim.row(i)["Date"] == day.isoformat())
        assert resolve_start(client, StartFrom("date", day=day), zone, now=now) == first - 1
        assert resolve_start(client, StartFrom("latest"), zone, now=now) == 3000
        assert resolve_start(client, StartFrom("id", id=5), zone, now=now) == 5
        assert resolve_start(client, StartFrom("earliest"), zone, now=now) == 0
        client.close()
        assert sim.requests
        assert all(r.params.get("date") for r in sim.requests)  # never the whole history


def _secret(value: str) -> Any:
    from streamer.config import Secret

    return Secret(value)


def test_setup_in_json_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SourceFilter())
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger("test.operating")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with polling("sftp", "files"):
            logger.warning("two\nlines")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["feed"] == "files"
    assert json.loads(lines[0])["source"] == "sftp"


@pytest.mark.parametrize("text", ["22/05/2024", "20240522", "2024-W21-3", "2024-02-30"])
def test_backfill_date_takes_what_the_readme_says(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["backfill", "--config", "c", "--date", "2024-05-22"]).date == date(
        2024, 5, 22
    )
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["backfill", "--config", "c", "--date", text])
    assert info.value.code == 2
    assert "is not a date as YYYY-MM-DD" in capsys.readouterr().err


def test_first_cursor_is_kept_until_committed_and_committed_when_found(tmp_path: Path) -> None:
    from streamer.cursor import FileCursorStore
    from streamer.startup import StartingCursorStore

    calls: list[str] = []

    def store(start: StartFrom, recovered: int | None, name: str) -> StartingCursorStore:
        def resolve(s: StartFrom) -> int:
            calls.append(f"resolve {s}")
            return 7 if s.kind == "id" else 4242

        return StartingCursorStore(
            FileCursorStore(tmp_path / f"{name}.json", name), feed=name, start_from=start,
            resolve=resolve, recover=lambda: recovered,
        )  # fmt: skip

    by_id = store(StartFrom("id", id=7), None, "by-id")
    assert [by_id.load_state().cursor, by_id.load_state().cursor] == [7, 7]  # not 0 later
    assert not (tmp_path / "by-id.json").exists()  # the same every start: not committed
    latest = store(StartFrom("latest"), None, "latest")
    assert latest.load() == 4242
    assert json.loads((tmp_path / "latest.json").read_text())["cursor"] == 4242  # found: kept
    recovered = store(StartFrom("earliest"), 99, "recovered")
    assert recovered.load() == 99
    assert json.loads((tmp_path / "recovered.json").read_text())["cursor"] == 99
    assert calls == ["resolve 7", "resolve latest"]  # each resolved once


def test_recovery_reads_past_events_reconciliation_found_late() -> None:
    """A late find has no fromid and lies below the cursor: it neither vouches nor refuses."""
    from streamer.startup import _better

    live = {"feed": b"main", "source": b"feed", "cdr_id": b"120", "fromid": b"100"}
    late = {"feed": b"main", "source": b"feed", "cdr_id": b"57", "found_late": b"true"}
    best = _better(None, live, b"main")
    assert best == (100, 120)
    assert _better(best, late, b"main") == (100, 120)
    assert _better(None, late, b"main") is None  # not an event of a poll: read further back
    older = {"feed": b"main", "source": b"feed", "cdr_id": b"9"}  # no fromid: an old streamer
    assert _better(None, older, b"main") == (None, 9)
