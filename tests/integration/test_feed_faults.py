"""The feed's "done when": every fault, variant and mode, simulator over HTTP -> CLI -> Kafka.

Each test runs the real `cdr-streamer` process against a `BillingFeedSimulator` on a
local port and reads the topic back with an independent consumer. The delivery mode
is at-least-once: an event produced before a failure is delivered anyway, and the
retry publishes it again unless a checkpoint had committed it. The tests assert
exactly that and no more: never a lost CDR, never a skipped cursor, and duplicates
only where a failed response had already been published past its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FEED_PASSWORD,
    Event,
    StreamerProcess,
    assert_matches_source,
    read_cursor,
    read_dead_letters,
    read_events,
    run_streamer,
    wait_until,
)

from streamer.records import FIELDS
from streamer.simulator import (
    SERVICE_CALL_TYPE,
    BillingFeedSimulator,
    SimulatorConfig,
)

LOGIN = "81234567"
BACKLOG = 300
BATCH_ROWS = 100  # the simulator writes 100 rows at a time: a truncation cuts row 100
CHECKPOINT_EVERY = 40  # so a failed response has committed some of its rows, not all
BODY_FAULTS = frozenset({"truncate", "truncate_chunked", "cut_last_line"})


def make_sim(**overrides: Any) -> BillingFeedSimulator:
    """A simulator that expects the password the streamer is given."""
    return BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, **overrides))


def feed_settings(url: str, cursor_file: Path, **overrides: Any) -> dict[str, Any]:
    """One [[feeds]] table: fast retries, so a test's faults cost milliseconds, not minutes.

    The simulator sends IDs in order unless told otherwise, so these feeds declare
    `ids_ascending` and the cursor is committed every CHECKPOINT_EVERY rows.
    """
    return {
        "name": "main",
        "url": url,
        "login": LOGIN,
        "cursor_file": str(cursor_file),
        "poll_interval_s": 1,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "ids_ascending": True,
        **overrides,
    }


def id_counts(events: Iterable[Event]) -> Counter[int]:
    return Counter(event.value["ID"] for event in events)


def once_each(ids: Iterable[int]) -> Counter[int]:
    return Counter(ids)


def run_once(config: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = run_streamer("run", "--config", str(config), "--once", **kwargs)
    assert result.returncode == 0, result.stderr
    return result


# --- faults, one request at a time ----------------------------------------------------------

FAULTS = [
    pytest.param("500", {}, "answered HTTP 500", id="500"),
    pytest.param("503", {}, "answered HTTP 503", id="503"),
    pytest.param("429", {"retry_after": 1}, "answered HTTP 429", id="429"),
    pytest.param("html", {}, "answered with an HTML page", id="html-200"),
    pytest.param("html", {"status": 500}, "answered HTTP 500", id="html-500"),
    pytest.param("latency", {"seconds": 1.5}, "timed out reaching", id="latency"),
    pytest.param("truncate", {}, "truncated", id="truncate"),
    pytest.param("truncate_chunked", {}, "truncated", id="truncate_chunked"),
    pytest.param("cut_last_line", {}, "truncated", id="cut_last_line"),
]


@pytest.mark.parametrize(("fault", "params", "logged"), FAULTS)
def test_fault_is_retried_without_losing_or_skipping_a_cdr(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    fault: str,
    params: dict[str, float],
    logged: str,
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=BACKLOG, batch_rows=BATCH_ROWS, seed=11) as sim:
        sim.inject(fault, count=3, **params)  # fewer than the 5 failures --once tolerates
        # The read timeout only matters for "latency": 0.5 s, against an answer 1.5 s late.
        feed = feed_settings(sim.url, cursor_file, read_timeout_s=0.5)
        config = streamer_config([feed], checkpoint_every=CHECKPOINT_EVERY)
        result = run_once(config)
        # A late answer is logged when the simulator gives up on it, after the run.
        wait_until(lambda: sim.request_count == 4, "every request in the simulator's log")
        requests = sim.requests

    assert [r.fault for r in requests] == [fault, fault, fault, None]
    assert logged in result.stderr
    assert read_cursor(cursor_file) == BACKLOG

    # What the pipeline guarantees, request by request. A failed body's rows before the cut
    # are confirmed and kept when it breaks off: these come in ID order, so the cursor
    # moves over every one of them and the retry starts right after the last.
    for request, retry in pairwise(requests):
        fromid = int(request.params["fromid"])
        committed = fromid
        if request.fault in BODY_FAULTS:
            handled = request.rows - 1  # the row cut in half never parses
            committed = fromid + handled
        assert int(retry.params["fromid"]) == committed, (request, retry)

    counts = id_counts(read_events(kafka_bootstrap, topic_name))
    # Nothing lost, and no duplicate: no retry publishes a row the broken body delivered.
    assert counts == once_each(range(1, BACKLOG + 1))
    # A body cut short is the response's fault, not a row's: the half row is no dead letter.
    assert read_dead_letters(kafka_bootstrap, topic_name) == []
    if fault == "429":
        # Retry-After honoured: each retry came at least 1 s after its 429, far above the
        # 0.05 s backoff cap, so only the header can explain the wait.
        for refused, retry in pairwise(requests):
            assert retry.received_at - refused.received_at >= 1.0


def test_two_body_faults_in_a_row_each_retry_resumes_at_the_last_checkpoint(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
) -> None:
    """Two different body faults back to back: each retry resumes after the last row kept."""
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=BACKLOG, batch_rows=BATCH_ROWS) as sim:
        sim.inject("truncate")
        sim.inject("cut_last_line")
        config = streamer_config(
            [feed_settings(sim.url, cursor_file)], checkpoint_every=CHECKPOINT_EVERY
        )
        run_once(config)
        requests = sim.requests
    # truncate: rows 1..99 handled and kept; cut_last_line from 99: rows 100..299 handled
    # and kept; then row 300.
    assert [(r.fault, r.params["fromid"]) for r in requests] == [
        ("truncate", "0"),
        ("cut_last_line", "99"),
        (None, "299"),
    ]
    expected = once_each(range(1, BACKLOG + 1))
    assert id_counts(read_events(kafka_bootstrap, topic_name)) == expected
    assert read_cursor(cursor_file) == BACKLOG


# --- provider variants ----------------------------------------------------------------------


def test_unsorted_response_is_published_once_and_committed_at_its_highest_id(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=BACKLOG, batch_rows=BATCH_ROWS, unsorted=True) as sim:
        config = streamer_config(
            [feed_settings(sim.url, cursor_file)], checkpoint_every=CHECKPOINT_EVERY
        )
        run_once(config)
        assert [r.rows for r in sim.requests] == [BACKLOG]
    assert id_counts(read_events(kafka_bootstrap, topic_name)) == once_each(range(1, BACKLOG + 1))
    assert read_cursor(cursor_file) == BACKLOG


def test_unsorted_response_cut_short_loses_no_cdr(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=BACKLOG, batch_rows=BATCH_ROWS, unsorted=True) as sim:
        sim.inject("truncate")
        # Without ids_ascending (the default) no checkpoint comes mid-response, however
        # often the producer is flushed. When the body breaks off, the cursor moves only
        # over the IDs handled without a gap from it (unsorted: maybe none); the others
        # are kept as confirmed above the cursor, so the retry skips them.
        feed = feed_settings(sim.url, cursor_file, ids_ascending=False)
        config = streamer_config([feed], checkpoint_every=1)
        result = run_once(config)
        first, retry = sim.requests[:2]
    retry_from = int(retry.params["fromid"])
    assert retry_from < BATCH_ROWS  # the cut came inside the first batch of 100
    counts = id_counts(read_events(kafka_bootstrap, topic_name))
    assert counts == once_each(range(1, BACKLOG + 1)), f"retry from {retry_from}"
    assert f"the response broke off after {first.rows - 1} rows" in result.stderr


def expected_raw(sim: BillingFeedSimulator, cdr_id: int) -> str:
    """The csv line the simulator writes for a malformed ID, without its line end."""
    wire = sim.generator.wire_row(cdr_id)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([wire[n] for n in FIELDS if n in wire])
    return out.getvalue().removesuffix("\n")


def test_malformed_rows_go_to_the_dead_letter_topic_with_their_raw_text(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=BACKLOG, malformed_rate=0.1, seed=5) as sim:
        config = streamer_config([feed_settings(sim.url, cursor_file)])
        run_once(config)
        kinds = {i: sim.generator.malformation(i) for i in range(1, BACKLOG + 1)}
        raws = {i: expected_raw(sim, i) for i, kind in kinds.items() if kind}
    bad = {i for i, kind in kinds.items() if kind}
    assert 15 <= len(bad) <= 50
    assert {kinds[i] for i in bad} == {
        "bad_date", "bad_time", "bad_id", "wrong_field_count", "empty_account", "bad_decimal",
    }  # fmt: skip

    good = set(range(1, BACKLOG + 1)) - bad
    assert id_counts(read_events(kafka_bootstrap, topic_name)) == once_each(good)

    letters = read_dead_letters(kafka_bootstrap, topic_name)
    assert sorted(letter["raw"] for letter in letters) == sorted(raws.values())
    for letter in letters:
        cdr_id = next(i for i, raw in raws.items() if raw == letter["raw"])
        assert letter["reason"] == kinds[cdr_id]  # the simulator's kinds are our reason codes
        # An ID that is not a number cannot be named; every other rejection carries its ID.
        assert letter["id"] == (None if kinds[cdr_id] == "bad_id" else cdr_id)
        assert (letter["feed"], letter["fromid"], letter["source"]) == ("main", 0, "feed")
        assert letter["detail"]
    # The cursor covers dead letters too: the highest ID that could be read.
    assert read_cursor(cursor_file) == max(i for i in range(1, BACKLOG + 1) if kinds[i] != "bad_id")


def test_provider_page_cap_is_paged_through_at_once(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    """With page_size = the provider's max_rows, a full page means "ask again now".

    `run` (not --once) with a 600 s poll interval: reaching the end within the deadline
    proves the pages were fetched back to back, not one per interval.
    """
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=350, max_rows=100) as sim:
        feed = feed_settings(sim.url, cursor_file, page_size=100, poll_interval_s=600)
        streamer = StreamerProcess(streamer_config([feed]), tmp_path / "streamer.log")
        try:
            streamer.wait_for(lambda: read_cursor(cursor_file) == 350, "the cursor to reach 350")
        finally:
            code = streamer.stop()  # SIGTERM
        assert code == 0, streamer.log()
        requests = sim.requests
    assert [(r.params["fromid"], r.rows) for r in requests] == [
        ("0", 100), ("100", 100), ("200", 100), ("300", 50),
    ]  # fmt: skip
    assert id_counts(read_events(kafka_bootstrap, topic_name)) == once_each(range(1, 351))


# --- credentials, methods, formats ----------------------------------------------------------


@pytest.mark.parametrize("style", ["text200", "401", "403"])
def test_auth_failure_stops_its_feed_while_the_other_goes_on(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    style: str,
) -> None:
    good_cursor, bad_cursor = tmp_path / "good.json", tmp_path / "bad.json"
    # The bad feed's provider expects another password than the one the streamer has.
    bad_config = SimulatorConfig(password="not-" + FEED_PASSWORD, auth_failure_style=style)
    with make_sim(backlog=BACKLOG) as good, BillingFeedSimulator(bad_config) as bad:
        feeds = [
            feed_settings(good.url, good_cursor, name="good", poll_interval_s=600),
            feed_settings(bad.url, bad_cursor, name="bad", poll_interval_s=600),
        ]
        streamer = StreamerProcess(streamer_config(feeds), tmp_path / "streamer.log")
        try:
            streamer.wait_for(lambda: read_cursor(good_cursor) == BACKLOG, "the good feed's cursor")
            streamer.wait_for(lambda: "feed bad stopped" in streamer.log(), "the bad feed to stop")
        finally:
            code = streamer.stop()  # SIGTERM
        log = streamer.log()
        assert code == 0, log  # one feed still running: not "every feed failed"
        assert [r.status for r in bad.requests] == [200 if style == "text200" else int(style)]
    stopped = next(line for line in log.splitlines() if "feed bad stopped" in line)
    assert "check the login and password" in stopped
    assert "SIGTERM received" in log
    assert FEED_PASSWORD not in log
    assert read_cursor(bad_cursor) is None  # never committed anything
    events = read_events(kafka_bootstrap, topic_name)
    assert id_counts(events) == once_each(range(1, BACKLOG + 1))
    assert {e.headers["feed"] for e in events} == {b"good"}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_method_carries_the_password_where_it_should(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    method: str,
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=BACKLOG) as sim:
        run_once(streamer_config([feed_settings(sim.url, cursor_file, method=method)]))
        requests = sim.requests
    assert [(r.method, r.status, r.rows) for r in requests] == [(method, 200, BACKLOG)]
    (request,) = requests
    if method == "GET":
        assert request.password_in == ("query",)
        assert request.form == {}
        assert request.query["login"] == LOGIN
    else:
        assert request.password_in == ("form",)
        assert request.query == {}  # nothing in the URL, so nothing in any access log
        assert request.form["login"] == LOGIN
    assert id_counts(read_events(kafka_bootstrap, topic_name)) == once_each(range(1, BACKLOG + 1))
    assert read_cursor(cursor_file) == BACKLOG


FORMAT_CASES = [
    pytest.param(
        "csv",
        {"header": False, "date_style": "nz", "line_ending": "\r\n", "quote_all": True},
        id="csv-noheader-nz-crlf-quoteall",
    ),
    pytest.param("csv", {"bom": True, "datetime_style": "iso_z"}, id="csv-bom-isoz"),
    pytest.param(
        "txt", {"line_ending": "\r\n", "date_style": "nz", "quote_all": True}, id="txt-crlf-nz-qa"
    ),
    pytest.param(
        "txt", {"header": False, "bom": True, "datetime_style": "iso_z"}, id="txt-noheader-bom"
    ),
    pytest.param(
        "pipe",
        {"header": False, "quote_all": True, "datetime_style": "iso_z"},
        id="pipe-noheader-quoteall-isoz",
    ),
    pytest.param(
        "pipe", {"bom": True, "line_ending": "\r\n", "date_style": "nz"}, id="pipe-bom-crlf-nz"
    ),
    pytest.param(
        "json",
        {"json_numbers": True, "bom": True, "datetime_style": "iso_z"},
        id="json-numbers-bom-isoz",
    ),
    pytest.param(
        "json",
        {"date_style": "nz", "json_pretty": True, "line_ending": "\r\n"},
        id="json-nz-pretty-crlf",
    ),
]


@pytest.mark.parametrize(("fmt", "variants"), FORMAT_CASES)
def test_format_and_variants_end_to_end(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    fmt: str,
    variants: dict[str, Any],
) -> None:
    backlog = 200
    cursor_file = tmp_path / "cursor.json"
    with make_sim(backlog=backlog, seed=3, **variants) as sim:
        run_once(streamer_config([feed_settings(sim.url, cursor_file, format=fmt)]))
        assert [r.params["format"] for r in sim.requests] == [fmt]
        events = read_events(kafka_bootstrap, topic_name)
        assert id_counts(events) == once_each(range(1, backlog + 1))
        for event in events:
            source = sim.row(event.value["ID"])
            assert event.key == source["AccountCode"]
            assert_matches_source(event.value, source)
    assert read_cursor(cursor_file) == backlog


# --- backfill -------------------------------------------------------------------------------

BACKFILL_DAY = date(2024, 3, 2)  # NZ local; the backlog's CDRs run from 1 March 13:00 NZDT


@pytest.mark.parametrize(
    ("hour", "callsonly", "cursor_before"),
    [
        pytest.param(None, False, None, id="date"),
        pytest.param(9, True, 123, id="date-hour-callsonly"),
    ],
)
def test_backfill_publishes_exactly_the_window_and_leaves_the_cursor_alone(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    hour: int | None,
    callsonly: bool,
    cursor_before: int | None,
) -> None:
    backlog = 3000  # 30 s apart: 25 hours, so part of the day is there
    cursor_file = tmp_path / "cursor.json"
    if cursor_before is not None:
        cursor_file.write_text(json.dumps({"feed": "main", "cursor": cursor_before}) + "\n")
    before = (cursor_file.read_bytes(), cursor_file.stat().st_mtime_ns) if cursor_before else None
    args = ["backfill", "--date", BACKFILL_DAY.isoformat()]
    if hour is not None:
        args += ["--hour", str(hour)]
    if callsonly:
        args.append("--callsonly")
    with make_sim(backlog=backlog) as sim:
        config = streamer_config([feed_settings(sim.url, cursor_file)])
        result = run_streamer(*args, "--config", str(config))
        assert result.returncode == 0, result.stderr
        # Brute force over the whole backlog: the simulator's own window arithmetic is not used.
        expected, services = set(), set()
        for cdr_id in range(1, backlog + 1):
            row = sim.row(cdr_id)
            if row["Date"] != BACKFILL_DAY.isoformat():
                continue
            if hour is not None and int(row["Time"][:2]) != hour:
                continue
            if row["CallType"] == SERVICE_CALL_TYPE:
                services.add(cdr_id)
                if callsonly:
                    continue
            expected.add(cdr_id)
        (request,) = sim.requests
        events = read_events(kafka_bootstrap, topic_name)
        for event in events:
            assert_matches_source(event.value, sim.row(event.value["ID"]))
    assert 0 < len(expected) < backlog
    assert services  # so that --callsonly had something to leave out
    assert request.params["date"] == BACKFILL_DAY.isoformat()
    assert request.params.get("hour") == (None if hour is None else str(hour))
    assert request.params.get("callsonly") == ("1" if callsonly else None)
    assert request.params["fromid"] == "0"  # not the live cursor
    assert id_counts(events) == once_each(expected)
    if before is None:
        assert not cursor_file.exists()
    else:
        assert (cursor_file.read_bytes(), cursor_file.stat().st_mtime_ns) == before


# --- secrets --------------------------------------------------------------------------------


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/billingfeed.php"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_password_never_in_debug_output_through_faults_and_failures(
    tmp_path: Path, streamer_config: Callable[..., Path], method: str
) -> None:
    debug = ("--log-level", "DEBUG")
    with make_sim(backlog=50) as sim:
        feed = feed_settings(sim.url, tmp_path / "c.json", method=method, read_timeout_s=0.5)
        # Three faults the client retries itself, then three the runner retries.
        sim.inject("500")
        sim.inject("429", retry_after=0)
        sim.inject("latency", seconds=1)
        sim.inject("truncate")
        sim.inject("html")
        sim.inject("cut_last_line")
        ok = run_streamer(*debug, "run", "--config", str(streamer_config([feed])), "--once")
        wrong = run_streamer(
            *debug,
            "run",
            "--config",
            str(streamer_config([feed])),
            "--once",
            env={"CDR_FEED_PASSWORD": FEED_PASSWORD + "-wrong"},
        )
        wait_until(lambda: sim.request_count == 8, "7 requests of the good run, 1 of the bad")
        faults = [r.fault for r in sim.requests]
    refused_feed = {**feed, "url": closed_port_url(), "max_attempts": 2}
    refused = run_streamer(
        *debug, "run", "--config", str(streamer_config([refused_feed])), "--once"
    )
    outputs = [ok.stdout, ok.stderr, wrong.stdout, wrong.stderr, refused.stdout, refused.stderr]

    assert ok.returncode == 0, ok.stderr
    assert faults[:6] == ["500", "429", "latency", "truncate", "html", "cut_last_line"]
    for logged in ("HTTP 500", "HTTP 429", "timed out", "truncated", "HTML page"):
        assert logged in ok.stderr, logged
    assert f"HTTP Request: {method}" in ok.stderr  # httpx's own DEBUG lines are there
    assert wrong.returncode == 3, wrong.stderr
    assert "check the login and password" in wrong.stderr
    assert refused.returncode == 3, refused.stderr
    assert "cannot reach /billingfeed.php: ConnectError" in refused.stderr
    assert "giving up after 5 failures" in refused.stderr
    for output in outputs:
        assert FEED_PASSWORD not in output
        assert "Tr1cky" not in output  # nor any encoding of it (URL, form, repr)
