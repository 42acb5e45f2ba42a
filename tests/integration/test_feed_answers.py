"""Answers and rows that used to stall a feed: simulator over HTTP -> the real CLI -> Kafka.

A broken row (an unclosed quote, a broken JSON element), a row over 1 MiB and a row
in another encoding are each one dead letter, with its reason and original bytes,
and the rest of the response is published; HTTP 204, a "No records found" text and
JSON null are no records; an HTML page refusing the login stops its feed. Where
delivery is involved, both modes: the feed keeps polling and the cursor reaches the
last ID, and nothing is published twice.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FEED_PASSWORD,
    StreamerProcess,
    assert_matches_source,
    read_cursor,
    read_cursor_topic,
    read_dead_letters,
    read_events,
    run_streamer,
)

from streamer.simulator import DIAERESIS, BillingFeedSimulator, SimulatorConfig
from streamer.simulator.render import Renderer

LOGIN = "81234567"
BACKLOG = 200
MORE = 20  # rows added once the backlog is in: the feed must fetch them on a later poll
BROKEN = (7, BACKLOG)  # the last row too: a break at the very end of the body
LONG = (40,)
LONG_CHARS = 2 << 20  # twice formats.MAX_RECORD_CHARS


def make_sim(**overrides: Any) -> BillingFeedSimulator:
    return BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, **overrides))


def feed_settings(url: str, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "main",
        "url": url,
        "login": LOGIN,
        "cursor_file": str(tmp_path / "cursor.json"),
        "poll_interval_s": 1,
        "poll_jitter_ratio": 0.0,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        **overrides,
    }


def wire_text(sim: BillingFeedSimulator, fmt: str, cdr_id: int) -> str:
    """The text the simulator writes for one row: the line without its end, or the element."""
    text = Renderer(fmt, sim.config).row(sim.generator.wire_row(cdr_id), True).decode()
    return text.removesuffix(sim.config.line_ending)


@pytest.mark.parametrize(
    ("fmt", "delivery"),
    [
        ("json", "at_least_once"),
        ("json", "exactly_once"),
        ("csv", "at_least_once"),  # later rows hold quotes that close the open one
        ("txt", "exactly_once"),
    ],
)
def test_broken_and_oversized_rows_are_one_dead_letter_each_and_the_feed_goes_on(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    fmt: str,
    delivery: str,
) -> None:
    cursor_topic = f"{topic_name}-cursors"

    def cursor() -> int:
        if delivery == "exactly_once":
            return read_cursor_topic(kafka_bootstrap, cursor_topic, "main") or 0
        return read_cursor(tmp_path / "cursor.json") or 0

    with make_sim(
        backlog=BACKLOG, broken_row_ids=BROKEN, long_row_ids=LONG, long_row_chars=LONG_CHARS
    ) as sim:
        config = streamer_config(
            [feed_settings(sim.url, tmp_path, format=fmt)],
            delivery=delivery,
            cursor_topic=cursor_topic,
            # Its own transactional id: other tests on a shared broker would fence it.
            transactional_id_prefix=f"test-{topic_name}",
        )
        streamer = StreamerProcess(config, tmp_path / "streamer.log")
        try:
            streamer.wait_for(lambda: cursor() == BACKLOG, f"the cursor to reach {BACKLOG}")
            sim.add(MORE)  # the same response breaks the same way: a later poll must go on
            streamer.wait_for(lambda: cursor() == BACKLOG + MORE, "the rows added later")
        finally:
            code = streamer.stop()
        log = streamer.log()
        assert code == 0, log
        expected_raw = {i: wire_text(sim, fmt, i) for i in BROKEN}
        long_start = wire_text(sim, fmt, LONG[0])[:1000]
    bad = set(BROKEN) | set(LONG)
    events = read_events(kafka_bootstrap, topic_name)
    assert Counter(e.value["ID"] for e in events) == Counter(
        i for i in range(1, BACKLOG + MORE + 1) if i not in bad
    )
    letters = read_dead_letters(kafka_bootstrap, topic_name)
    assert Counter(letter["id"] for letter in letters) == Counter(bad)  # once each
    broken_reason = "bad_json_element" if fmt == "json" else "unclosed_quote"
    for letter in letters:
        if letter["id"] in BROKEN:
            assert letter["reason"] == broken_reason
            assert letter["raw"] == expected_raw[letter["id"]]
            assert base64.b64decode(letter["raw_base64"]) == letter["raw"].encode()
        else:
            assert letter["reason"] == "row_too_long"
            assert letter["raw_truncated"] is True
            assert letter["raw_chars"] > LONG_CHARS
            assert letter["raw"].startswith(long_start)
    assert "truncated" not in log
    assert "not a billing feed" not in log


def test_a_cp1252_feed_read_with_each_encoding(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    """cp1252 and auto publish every row; utf-8 dead-letters the rows with non-ASCII text."""
    encodings = ["cp1252", "auto", "utf-8"]
    with make_sim(backlog=BACKLOG, encoding="cp1252") as sim:
        # Three feeds of the same provider, one per encoding, in one process.
        feeds = [
            feed_settings(
                sim.url, tmp_path, name=f"f{i}", encoding=encoding,
                cursor_file=str(tmp_path / f"cursor-{i}.json"),
            )
            for i, encoding in enumerate(encodings)
        ]  # fmt: skip
        result = run_streamer("run", "--once", "--config", str(streamer_config(feeds)))
        assert result.returncode == 0, result.stderr
        for i in range(len(encodings)):
            assert read_cursor(tmp_path / f"cursor-{i}.json") == BACKLOG
        source = {i: {k: v.translate(DIAERESIS) for k, v in sim.row(i).items()}
                  for i in range(1, BACKLOG + 1)}  # fmt: skip
        wire = {i: Renderer("csv", sim.config).row(sim.generator.wire_row(i), True)
                for i in range(1, BACKLOG + 1)}  # fmt: skip
    non_ascii = {i for i, line in wire.items() if not line.isascii()}
    assert 10 < len(non_ascii) < BACKLOG  # the test needs both kinds of rows
    events = read_events(kafka_bootstrap, topic_name)
    by_feed: dict[bytes, Counter[int]] = {}
    for event in events:
        by_feed.setdefault(event.headers["feed"], Counter())[event.value["ID"]] += 1
        assert_matches_source(event.value, source[event.value["ID"]])
    every = Counter(range(1, BACKLOG + 1))
    assert by_feed[b"f0"] == every
    assert by_feed[b"f1"] == every
    assert by_feed[b"f2"] == every - Counter(non_ascii)
    letters = read_dead_letters(kafka_bootstrap, topic_name)
    assert {letter["feed"] for letter in letters} == {"f2"}
    assert sorted(letter["id"] for letter in letters) == sorted(non_ascii)
    for letter in letters:
        assert letter["reason"] == "bad_encoding"
        assert letter["detail"] == "the row is not valid UTF-8"
        # The original bytes, for a replay: the row as the simulator wrote it.
        assert base64.b64decode(letter["raw_base64"]) + b"\n" == wire[letter["id"]]
        assert "\ufffd" in letter["raw"]


@pytest.mark.parametrize(
    ("fmt", "empty_style", "status"),
    [("csv", "no_content", 204), ("txt", "text", 200), ("json", "null", 200)],
)
def test_no_records_answers_are_quiet_polls(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    fmt: str,
    empty_style: str,
    status: int,
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=0, empty_style=empty_style) as sim:
        streamer = StreamerProcess(
            streamer_config([feed_settings(sim.url, tmp_path, format=fmt)]),
            tmp_path / "streamer.log",
        )
        try:
            streamer.wait_for(lambda: sim.request_count >= 2, "two polls of an empty feed")
            sim.add(MORE)
            streamer.wait_for(lambda: read_cursor(cursor_file) == MORE, "the rows added later")
        finally:
            code = streamer.stop()
        log = streamer.log()
        requests = sim.requests
    assert code == 0, log
    assert [r.status for r in requests[:2]] == [status, status]
    assert [r.rows for r in requests[:2]] == [0, 0]
    assert " WARNING " not in log  # an answer, not a failure: no retry, no backoff
    assert " ERROR " not in log
    assert Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name)) == Counter(
        range(1, MORE + 1)
    )


def test_an_html_page_refusing_the_login_stops_the_feed(
    tmp_path: Path, streamer_config: Callable[..., Path]
) -> None:
    config = SimulatorConfig(password="not-" + FEED_PASSWORD, auth_failure_style="html200")
    with BillingFeedSimulator(config) as sim:
        result = run_streamer(
            "run", "--config", str(streamer_config([feed_settings(sim.url, tmp_path)]))
        )
        requests = sim.requests
    assert result.returncode == 3, result.stderr  # every feed stopped on a fatal error
    assert [r.status for r in requests] == [200]  # refused once, never asked again
    stopped = next(line for line in result.stderr.splitlines() if "feed main stopped" in line)
    assert "check the login and password" in stopped
    assert "Invalid login or password" in stopped
    assert FEED_PASSWORD not in result.stderr
    assert read_cursor(tmp_path / "cursor.json") is None
