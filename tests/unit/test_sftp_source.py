"""The SFTP collector's pieces that need no server: settling, its cursor, config, files."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streamer.config import Secret, parse_after, parse_settings
from streamer.cursor import IdRanges, JsonFileCursorStore
from streamer.deadletter import encode_dead_letter
from streamer.errors import ConfigError, FatalError, RetriableError
from streamer.formats import parse_rows
from streamer.metrics import FeedMetrics, Metrics
from streamer.records import Rejection
from streamer.retry import Backoff
from streamer.scheduler import Runner, run_together
from streamer.simulator import SimulatorConfig, file_name, write_files
from streamer.sources.base import RemoteFile
from streamer.sources.files import FileCursor, SettleTracker, format_of

# --- settling --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_file_is_taken_once_unchanged_for_settle_s() -> None:
    clock = Clock()
    tracker = SettleTracker(5.0, clock)
    f = RemoteFile("cdr_1.csv", 100, 1)
    first = tracker.observe([f])
    assert (first.new, first.ready, first.waiting) == ([f], [], [f])
    clock.now += 4.9
    assert tracker.observe([f]).ready == []
    clock.now += 0.1
    assert tracker.observe([f]).ready == [f]


def test_a_growing_file_starts_settling_again() -> None:
    clock = Clock()
    tracker = SettleTracker(5.0, clock)
    tracker.observe([RemoteFile("a.csv", 100, 1)])
    clock.now += 4
    grown = RemoteFile("a.csv", 200, 1)
    seen = tracker.observe([grown])
    assert seen.changed == [grown]
    assert seen.waiting == [grown]
    clock.now += 4
    assert tracker.observe([grown]).ready == []  # 4 s since it last changed
    touched = RemoteFile("a.csv", 200, 2)  # same size, new mtime: changed too
    clock.now += 2
    assert tracker.observe([touched]).changed == [touched]
    clock.now += 5
    assert tracker.observe([touched]).ready == [touched]


def test_settle_zero_takes_a_file_at_first_sight_and_gone_files_are_forgotten() -> None:
    clock = Clock()
    tracker = SettleTracker(0.0, clock)
    f = RemoteFile("a.csv", 1, 1)
    assert tracker.observe([f]).ready == [f]
    assert tracker.observe([]).ready == []
    assert tracker.observe([f]).new == [f]


# --- the cursor ------------------------------------------------------------------------------


def test_sftp_cursor_round_trips_through_its_store(tmp_path: Path) -> None:
    store = JsonFileCursorStore(tmp_path / "c.json", "sftp:files")
    assert FileCursor.from_json(store.load(), "here") == FileCursor()
    cursor = FileCursor(
        files={"b.csv": "quarantined", "a.csv": "done"},
        current="c.csv",
        rows=1200,
        covered=IdRanges.of([[10, 20], [30, 30]]),
    )
    store.commit(cursor.to_json())
    again = FileCursor.from_json(store.load(), "here")
    assert again == cursor
    assert list(again.covered) == [(10, 20), (30, 30)]
    assert json.loads((tmp_path / "c.json").read_text())["owner"] == "sftp:files"


def test_cursor_store_refuses_another_owners_file(tmp_path: Path) -> None:
    JsonFileCursorStore(tmp_path / "c.json", "sftp:a").commit({"files": {}})
    with pytest.raises(ConfigError, match="belongs to 'sftp:a'"):
        JsonFileCursorStore(tmp_path / "c.json", "sftp:b").load()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        JsonFileCursorStore(tmp_path / "bad.json", "sftp:a").load()


@pytest.mark.parametrize(
    "data",
    [
        {"files": {"a.csv": "maybe"}},
        {"files": ["a.csv"]},
        {"rows": -1},
        {"rows": "12"},
        {"current": 5},
        {"covered": [[5, 1]]},
        {"covered": [["a", "b"]]},
        {"covered": [1]},
    ],
)
def test_unreadable_sftp_cursor_is_a_config_error(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="unreadable SFTP cursor"):
        FileCursor.from_json(data, "the cursor file")


@given(
    st.lists(st.integers(min_value=1, max_value=300), max_size=200),
    st.integers(min_value=0, max_value=320),
)
def test_id_ranges_contains_and_discard_through_behave_like_a_set(
    ids: list[int], through: int
) -> None:
    ranges, reference = IdRanges(), set(ids)
    for n in ids:
        ranges.add(n)
    assert all((n in ranges) == (n in reference) for n in range(0, 302))
    copy = IdRanges.of([list(pair) for pair in ranges])
    assert copy == ranges
    copy.discard_through(through)
    assert {n for n in range(0, 302) if n in copy} == {n for n in reference if n > through}
    assert all(n in ranges for n in reference)  # the original is untouched


# --- formats and actions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "configured", "expected"),
    [
        ("cdr_20240301_0000.csv", "auto", "csv"),
        ("cdr_20240301_0000.TXT", "auto", "txt"),
        ("cdr_20240301_0000.tsv", "auto", "txt"),
        ("cdr_20240301_0000.psv", "auto", "pipe"),
        ("cdr_20240301_0000.json", "auto", "json"),
        ("cdr_20240301_0000.dat", "auto", None),
        ("cdr_20240301_0000.dat", "pipe", "pipe"),
    ],
)
def test_format_from_extension_or_setting(name: str, configured: str, expected: str) -> None:
    assert format_of(name, configured) == expected


def test_after_setting() -> None:
    assert parse_after("keep") == ("keep", "")
    assert parse_after("delete") == ("delete", "")
    assert parse_after("move: done/cdr ") == ("move", "done/cdr")
    for bad in ("move:", "move", "archive", "Delete"):
        with pytest.raises(ValueError, match="move:DIRECTORY"):
            parse_after(bad)


def test_dead_letter_names_the_file_only_when_given() -> None:
    rejection = Rejection("bad_file", "not a feed file", "cdr_1.csv")
    with_file = json.loads(
        encode_dead_letter(rejection, feed="f", source="sftp", fromid=0, file="cdr_1.csv")
    )
    assert with_file["file"] == "cdr_1.csv"
    assert "file" not in json.loads(
        encode_dead_letter(rejection, feed="f", source="feed", fromid=0)
    )


# --- configuration ---------------------------------------------------------------------------

FEED = {"name": "main", "url": "http://127.0.0.1:8080/billingfeed.php", "login": "81234567"}


def sftp_table(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    return {
        "name": "files", "host": "sftp.example.net", "user": "cdr",
        "password_env": "SFTP_PW", "known_hosts": str(known_hosts), **extra,
    }  # fmt: skip


def settings(feeds: list[dict[str, Any]], sources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kafka": {"bootstrap_servers": "h:1"}, "feeds": feeds, "sftp": sources}


ENV = {"SFTP_PW": "s3cret-pw", "CDR_FEED_PASSWORD": "x", "KEY_PW": "phrase"}


def test_sftp_settings_with_defaults_and_hidden_secrets(tmp_path: Path) -> None:
    s = parse_settings(settings([], [sftp_table(tmp_path)]), env=ENV)
    [source] = s.sftp
    assert source.password == Secret("s3cret-pw")
    assert (source.port, source.format, source.after, source.settle_s) == (22, "auto", "keep", 60)
    assert source.cursor_file == "var/sftp-cursor-files.json"
    assert "s3cret-pw" not in repr(s)
    assert s.feeds == ()


def test_sftp_key_with_passphrase_from_env(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    table = sftp_table(tmp_path, key_file=str(key), key_passphrase_env="KEY_PW")
    del table["password_env"]
    [source] = parse_settings(settings([], [table]), env=ENV).sftp
    assert source.password is None
    assert source.key_passphrase == Secret("phrase")
    assert source.key_file == str(key)


def test_every_sftp_problem_reported_at_once(tmp_path: Path) -> None:
    sources = [
        {"name": "a", "host": "", "user": "u", "known_hosts": str(tmp_path / "nope"),
         "format": "xml", "after": "archive", "port": 70000, "pairs_with_feed": "other",
         "key_passphrase": "in-the-file", "settel_s": 5},
        sftp_table(tmp_path, name="main"),
        sftp_table(tmp_path, name="b", pairs_with_feed="calls"),
        sftp_table(tmp_path, name="c", pairs_with_feed="main"),
        sftp_table(tmp_path, name="d", pairs_with_feed="main", password_env="UNSET"),
    ]  # fmt: skip
    feeds = [FEED, {**FEED, "name": "calls", "callsonly": True}]
    with pytest.raises(ConfigError) as info:
        parse_settings(settings(feeds, sources), env=ENV)
    message = str(info.value)
    for expected in (
        "sftp[a]: host is required",
        "sftp[a]: no password or key",
        "sftp[0].settel_s: unknown setting",
        "sftp[a].key_passphrase: not in the file",
        "sftp[a].known_hosts",
        "trust_unknown_host_key",
        "sftp[a].format: must be one of auto",
        "sftp[a].after: must be 'keep', 'delete' or 'move:DIRECTORY'",
        "sftp[a].port: must be 1..65535",
        "sftp[a].pairs_with_feed: no feed named 'other'",
        "sftp[main]: a feed or another SFTP source has this name",
        "feed 'calls' fetches only calls or only services",
        "sftp[d].pairs_with_feed: feed 'main' already pairs with 'c'",
        "sftp[d].password_env: environment variable UNSET is not set",
    ):
        assert expected in message, expected
    assert "in-the-file" not in message


def test_unknown_host_key_may_be_trusted_without_known_hosts(tmp_path: Path) -> None:
    table = sftp_table(tmp_path, known_hosts=str(tmp_path / "new"), trust_unknown_host_key=True)
    [source] = parse_settings(settings([], [table]), env=ENV).sftp
    assert source.trust_unknown_host_key


def test_no_feeds_and_no_sftp_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"no \[\[feeds\]\] \(or \[\[sftp\]\]\) configured"):
        parse_settings({"kafka": {"bootstrap_servers": "h:1"}}, env={})


# --- the simulator's files -------------------------------------------------------------------


@pytest.mark.parametrize(("cadence", "count"), [("daily", 2), ("hourly", 26), ("20min", 76)])
def test_simulated_files_hold_each_cdr_once(tmp_path: Path, cadence: str, count: int) -> None:
    config = SimulatorConfig(password="-", seed=2)
    paths = write_files(config, tmp_path, cadence=cadence, fmt="csv", upto_id=3000)  # type: ignore[arg-type]
    assert len(paths) == count
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp files
    ids = [
        int(row.values["ID"])
        for path in paths
        for row in parse_rows([path.read_bytes()], "csv")
        if not isinstance(row, Rejection)
    ]
    assert sorted(ids) == list(range(1, 3001))
    assert paths[0].name == "cdr_20240301_0000.csv"


def test_simulated_files_are_the_feeds_rows(tmp_path: Path) -> None:
    from streamer.simulator import CdrGenerator

    [path] = write_files(
        SimulatorConfig(password="-", seed=9), tmp_path, cadence="daily", fmt="json", upto_id=50
    )
    rows = [r for r in parse_rows([path.read_bytes()], "json") if not isinstance(r, Rejection)]
    generator = CdrGenerator(9)
    assert [r.values for r in rows] == [generator.row(i) for i in range(1, 51)]
    assert path.name == file_name(SimulatorConfig(password="-").start, "json")


# --- sources taking turns in one thread ------------------------------------------------------


class ScriptedRunner(Runner):
    """A runner whose polls follow a script: a delay, None (done) or an exception."""

    kind = "test"

    def __init__(self, name: str, metrics: FeedMetrics, script: list[Any], log: list[str]) -> None:
        super().__init__(name, metrics, Backoff(0.01, 0.01))
        self.script = script
        self.log = log

    def _poll(self, *, once: bool) -> float | None:
        self.log.append(self.name)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return None if step is None else float(step)

    def _position(self) -> str:
        return "nowhere"

    def close(self) -> None:
        pass


def test_run_together_alternates_and_a_fatal_source_stops_alone() -> None:
    metrics = Metrics(CollectorRegistry())
    calls: list[str] = []
    feed = ScriptedRunner("feed", metrics.for_feed("feed"), [0, 0, 0, None], calls)
    files = ScriptedRunner(
        "files", metrics.for_feed("files", "sftp"), [0, RetriableError("later"), FatalError("x")],
        calls,
    )  # fmt: skip
    run_together([feed, files], threading.Event(), once=True)
    assert calls[:4] == ["feed", "files", "feed", "files"]  # due at once: in turn
    assert sorted(calls) == ["feed"] * 4 + ["files"] * 3
    assert isinstance(files.error, FatalError)
    assert feed.error is None
    assert metrics.feed_up.labels("files")._value.get() == 0
