"""Unit tests for the billing-feed simulator: its data, its query semantics, its HTTP behaviour."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import ConfigError
from streamer.records import FIELDS
from streamer.simulator import (
    CHATHAM,
    DELIMITERS,
    DIAERESIS,
    FORMATS,
    MALFORMATIONS,
    SERVICE_CALL_TYPE,
    BillingFeedSimulator,
    CdrGenerator,
    FeedQuery,
    FeedStore,
    SimulatorConfig,
)

LOGIN = "81234567"
PASSWORD = "Monkey-123-s3cret"
BOM = b"\xef\xbb\xbf"
CALL_TYPES = {
    "Local", "National", "Mobile", "International", "SMS", "Onnet", "0800", "0900", "Directory",
}  # fmt: skip
STATUS_CAUSES = {
    "Ok": {"0016"}, "Busy": {"0017"}, "No Answer": {"0018", "0019"}, "Unallocated": {"0001"},
    "Error": {"0031", "0041", "0038"}, "Rejected": {"0021"}, "Congestion": {"0034"},
}  # fmt: skip
PER_MINUTE = {"National", "Mobile", "International", "0900", "Directory"}
DST_START = datetime(2024, 4, 5, tzinfo=UTC)  # 20 000 CDRs from here cross the DST end (7 April)

MakeSim = Callable[..., BillingFeedSimulator]


def config(**overrides: Any) -> SimulatorConfig:
    return SimulatorConfig(password=PASSWORD, **overrides)


@pytest.fixture
def make_sim() -> Iterator[MakeSim]:
    """Start simulators with config overrides; all are stopped after the test."""
    running: list[BillingFeedSimulator] = []

    def make(**overrides: Any) -> BillingFeedSimulator:
        sim = BillingFeedSimulator(config(**overrides))
        sim.start()
        running.append(sim)
        return sim

    yield make
    for sim in running:
        sim.stop()


@pytest.fixture
def sim(make_sim: MakeSim) -> BillingFeedSimulator:
    return make_sim(backlog=300)


def fetch(sim: BillingFeedSimulator, method: str = "POST", **params: str) -> httpx.Response:
    """One request with valid credentials (unless overridden), POST form or GET query."""
    data = {"login": LOGIN, "password": PASSWORD, **params}
    if method == "GET":
        return httpx.get(sim.url, params=data)
    return httpx.post(sim.url, data=data)


_DATETIME_LAYOUTS = {
    "space": r"(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)",
    "iso_t": r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)",
    "iso_z": r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)Z",
    "offset": r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)\+00:00",
    "nz": r"(\d\d/\d\d/\d{4}) (\d\d:\d\d:\d\d)",
}


def _iso(day: str, style: str) -> str:
    """A date in the given style back to YYYY-MM-DD, asserting the style's layout."""
    if style == "nz":
        m = re.fullmatch(r"(\d\d)/(\d\d)/(\d{4})", day)
        assert m, day
        return f"{m[3]}-{m[2]}-{m[1]}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", day), day
    return day


def canonical(values: dict[str, str], cfg: SimulatorConfig) -> dict[str, str]:
    """A row as the wire wrote it, back to canonical text; asserts the configured layouts."""
    out = dict(values)
    for name in ("BillDate", "Date"):
        out[name] = _iso(out[name], cfg.date_style)
    m = re.fullmatch(_DATETIME_LAYOUTS[cfg.datetime_style], out["UTCDateTime"])
    assert m, out["UTCDateTime"]
    day = _iso(m[1], "nz" if cfg.datetime_style == "nz" else "iso")
    out["UTCDateTime"] = f"{day} {m[2]}"
    return out


def decode(body: bytes, fmt: str, cfg: SimulatorConfig) -> list[dict[str, str]]:
    """A response body -> canonical rows, asserting BOM, header and layouts as configured."""
    assert body.startswith(BOM) == cfg.bom
    text = body.removeprefix(BOM).decode("utf-8")
    if not text:
        return []
    if fmt == "json":
        # parse_int/parse_float=str keep a JSON number's literal text, as the feed wrote it
        items = json.loads(text, parse_int=str, parse_float=str)
        return [canonical(item, cfg) for item in items]
    lines = list(csv.reader(io.StringIO(text, newline=""), delimiter=DELIMITERS[fmt]))
    if cfg.header:
        assert lines[0] == list(FIELDS)
        lines = lines[1:]
    return [canonical(dict(zip(FIELDS, line, strict=True)), cfg) for line in lines]


def ids(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["ID"]) for r in rows]


# --- configuration ---------------------------------------------------------------------------


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        SimulatorConfig(password="", port=-1, date_style="us", error_rate=2.0)  # type: ignore[arg-type]
    message = str(info.value)
    for problem in ("password", "port", "date_style", "error_rate"):
        assert problem in message


def test_config_repr_hides_the_password() -> None:
    assert PASSWORD not in repr(config())


# --- the generator ---------------------------------------------------------------------------


def test_same_seed_gives_same_rows_in_any_order() -> None:
    a, b = CdrGenerator(7), CdrGenerator(7)
    forward = [a.row(i) for i in range(1, 200)]
    backward = [b.row(i) for i in reversed(range(1, 200))][::-1]
    assert forward == backward
    assert a.row(9_999_999) == b.row(9_999_999)


def test_different_seed_gives_different_rows() -> None:
    a, b = CdrGenerator(1), CdrGenerator(2)
    differing = sum(a.row(i) != b.row(i) for i in range(1, 101))
    assert differing == 100
    assert {acc.code for acc in a.accounts} != {acc.code for acc in b.accounts}


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 10**6), cdr_id=st.integers(1, 10**7))
def test_every_row_is_consistent(seed: int, cdr_id: int) -> None:
    gen = CdrGenerator(seed)
    row = gen.row(cdr_id)
    assert tuple(row) == FIELDS
    assert row["ID"] == str(cdr_id)
    assert re.fullmatch(r"8\d{7}", row["AccountCode"])
    assert row["Direction"] in {"inbound", "outbound", "onnet"}
    # Money: exact decimals, GST 15 % rounded to 4 places
    excl, charge = Decimal(row["ChargeExcl"]), Decimal(row["Charge"])
    assert excl.as_tuple().exponent == -4
    assert charge == (excl * Decimal("1.15")).quantize(Decimal("0.0001"), ROUND_HALF_UP)
    assert Decimal(row["FreeUnitsUsed"]) >= 0
    # Local time is UTCDateTime in the account's zone; UTCOffset is that instant's offset
    utc = datetime.strptime(row["UTCDateTime"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    local = utc.astimezone(ZoneInfo(gen.account(row["AccountCode"]).zone))
    assert row["Date"] == local.strftime("%Y-%m-%d")
    assert row["Time"] == local.strftime("%H:%M:%S")
    offset = local.utcoffset()
    assert offset is not None
    assert Decimal(row["UTCOffset"]) == Decimal(int(offset.total_seconds())) / 3600
    assert row["UTCOffset"] in {"12", "13", "12.75", "13.75"}
    # Billed on the first of the month after the call
    day = date.fromisoformat(row["Date"])
    assert row["BillDate"] == date(day.year + day.month // 12, day.month % 12 + 1, 1).isoformat()
    seconds, network = int(row["Seconds"]), int(row["NetworkSeconds"])
    if row["CallType"] == SERVICE_CALL_TYPE:
        assert (row["AParty"], row["BParty"], row["ReleaseCause"]) == ("", "", "")
        assert (seconds, network, row["ConnectSeconds"], row["Status"]) == (0, 0, "0", "Ok")
        assert row["BillNumber"] == gen.account(row["AccountCode"]).lines[0]
        return
    assert row["CallType"] in CALL_TYPES
    assert row["ReleaseCause"] in STATUS_CAUSES[row["Status"]]
    for number in ("AParty", "BParty", "BillNumber"):
        assert row[number].isdigit(), number
    if row["Status"] != "Ok":
        assert (network, seconds, charge) == (0, 0, Decimal(0))
    assert seconds >= network
    if row["CallType"] in PER_MINUTE:
        assert seconds % 60 == 0
        assert seconds - network < 60
    elif row["CallType"] != "SMS":
        assert seconds == network


def test_time_rises_with_id_within_the_jitter() -> None:
    gen = CdrGenerator(3, mean_gap_s=30.0, jitter_s=20)
    start = datetime(2024, 3, 1, tzinfo=UTC)
    for cdr_id in range(1, 3000):
        utc = datetime.strptime(gen.row(cdr_id)["UTCDateTime"], "%Y-%m-%d %H:%M:%S")
        slot = start + timedelta(seconds=30 * cdr_id)
        assert abs(utc.replace(tzinfo=UTC) - slot) <= timedelta(seconds=20)


def test_data_crosses_the_dst_change_in_both_zones() -> None:
    gen = CdrGenerator(1, start=DST_START)
    rows = [gen.row(i) for i in range(1, 20_001)]
    assert {r["UTCOffset"] for r in rows} == {"13", "12", "13.75", "12.75"}
    chatham = {a.code for a in gen.accounts if a.zone == CHATHAM}
    assert len(chatham) == 1
    assert {r["UTCOffset"] for r in rows if r["AccountCode"] in chatham} == {"13.75", "12.75"}


def test_rows_are_realistic() -> None:
    gen = CdrGenerator(1)
    rows = [gen.row(i) for i in range(1, 5001)]
    assert len({r["AccountCode"] for r in rows}) <= 50  # keys repeat
    services = [r for r in rows if r["CallType"] == SERVICE_CALL_TYPE]
    assert 0.03 < len(services) / len(rows) < 0.07
    assert sum(r["Status"] == "Ok" for r in rows) / len(rows) > 0.8
    assert {r["CallType"] for r in rows} == CALL_TYPES | {SERVICE_CALL_TYPE}
    text = [r["TextDesc1"] + r["TextDesc2"] for r in rows]
    for needle in (",", '"', "|"):
        assert any(needle in t for t in text), needle
    assert any(not t.isascii() for t in text)
    assert any(r["BParty"].startswith("6421") for r in rows)
    assert any(r["BParty"].startswith("64800") for r in rows)
    assert any(r["BParty"].startswith(("61", "44")) for r in rows)


def test_malformed_ids_are_deterministic_and_tell_their_kind() -> None:
    clean = CdrGenerator(5)
    assert not any(clean.is_malformed(i) for i in range(1, 1000))
    gen, again = CdrGenerator(5, malformed_rate=0.2), CdrGenerator(5, malformed_rate=0.2)
    bad = [i for i in range(1, 5001) if gen.is_malformed(i)]
    assert bad == [i for i in range(1, 5001) if again.is_malformed(i)]
    assert 0.15 < len(bad) / 5000 < 0.25
    assert {gen.malformation(i) for i in bad} == set(MALFORMATIONS)
    for i in range(1, 300):
        wire, row = gen.wire_row(i), gen.row(i)
        assert (wire != row) == gen.is_malformed(i)
        assert row == clean.row(i)  # malformation never changes the canonical row
        if gen.malformation(i) not in (None, "bad_id"):
            assert wire["ID"] == str(i)


def test_status_fault_fails_every_call_from_its_id_and_leaves_earlier_rows_alone() -> None:
    clean, faulty = CdrGenerator(5), CdrGenerator(5, status_fault_from_id=301)
    assert all(faulty.row(i) == clean.row(i) for i in range(1, 301))
    rows = [faulty.row(i) for i in range(301, 701)]
    calls = [r for r in rows if r["CallType"] not in ("SMS", SERVICE_CALL_TYPE)]
    assert {r["Status"] for r in calls} == {"Busy", "Unallocated"}
    assert all(r["Seconds"] == "0" and Decimal(r["Charge"]) == 0 for r in calls)
    assert {r["Status"] for r in rows if r not in calls} == {"Ok"}  # SMS and service fees


# --- the feed --------------------------------------------------------------------------------


def test_store_grows_with_the_clock_and_with_add() -> None:
    now = [100.0]
    store = FeedStore(CdrGenerator(1), backlog=10, rate_per_s=2.0, clock=lambda: now[0])
    assert store.high_id == 10
    now[0] = 105.2
    assert store.high_id == 20
    store.add(5)
    assert store.high_id == 25
    assert [i for i, _ in store.select(FeedQuery(from_id=22))] == [23, 24, 25]


def test_simulator_clock_is_injectable() -> None:
    now = [0.0]
    sim = BillingFeedSimulator(config(backlog=10, rate_per_s=0.5), clock=lambda: now[0])
    with sim:
        now[0] = 20.0
        assert sim.high_id == 20
        assert ids(decode(fetch(sim, fromid="15").content, "csv", sim.config)) == [
            16,
            17,
            18,
            19,
            20,
        ]


def test_date_query_on_a_huge_backlog_reads_only_its_window() -> None:
    gen = CdrGenerator(1)
    store = FeedStore(gen, backlog=10_000_000)
    target = date(2033, 6, 15)
    center = int(
        (datetime(2033, 6, 15, 12, tzinfo=UTC) - datetime(2024, 3, 1, tzinfo=UTC))
        / timedelta(seconds=30)
    )
    brute = [i for i in range(center - 5000, center + 5000) if gen.row(i)["Date"] == "2033-06-15"]
    assert [i for i, _ in store.select(FeedQuery(from_id=0, date=target))] == brute
    assert 2800 < len(brute) < 2960  # a day of 30 s gaps, give or take the jitter at its ends


# --- HTTP: the happy path --------------------------------------------------------------------


def test_url_and_context_manager() -> None:
    with BillingFeedSimulator(config(backlog=3)) as sim:
        assert sim.url.startswith("http://127.0.0.1:")
        assert sim.url.endswith("/billingfeed.php")
        url = sim.url
        assert fetch(sim, fromid="0").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, data={"login": LOGIN, "password": PASSWORD, "fromid": "0"})


def test_ten_million_backlog_tail_is_served_on_demand(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=10_000_000)
    rows = decode(fetch(sim, fromid="9999990").content, "csv", sim.config)
    assert ids(rows) == list(range(9_999_991, 10_000_001))
    assert rows == [sim.row(i) for i in range(9_999_991, 10_000_001)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_carries_all_26_fields(sim: BillingFeedSimulator, fmt: str) -> None:
    response = fetch(sim, fromid="0", format=fmt)
    assert response.status_code == 200
    rows = decode(response.content, fmt, sim.config)
    assert rows == [sim.row(i) for i in range(1, 301)]
    assert all(tuple(r) == FIELDS for r in rows)


def test_format_defaults_to_csv(sim: BillingFeedSimulator) -> None:
    response = fetch(sim, fromid="298")
    assert response.headers["content-type"].startswith("text/csv")
    assert response.text.splitlines()[0] == ",".join(FIELDS)


def test_json_is_written_the_way_php_writes_it(sim: BillingFeedSimulator) -> None:
    body = fetch(sim, fromid="0", format="json").content
    assert body.isascii()  # non-ASCII as \uXXXX
    assert b"\\u" in body


def _no_header(raw: bytes, fmt: str) -> None:
    if fmt != "json":
        assert raw.startswith((b"1", b'"1')), raw[:20]


def _nz_dates(raw: bytes, fmt: str) -> None:
    # BillDate of March calls (PHP's json_encode writes '/' as '\/')
    assert (b"01\\/04\\/2024" if fmt == "json" else b"01/04/2024") in raw
    assert b"2024-04-01" not in raw


def _utc_layout(pattern: bytes) -> Callable[[bytes, str], None]:
    def check(raw: bytes, fmt: str) -> None:
        text = raw.replace(b"\\/", b"/") if fmt == "json" else raw
        assert re.search(pattern, text), pattern

    return check


def _json_numbers(raw: bytes, fmt: str) -> None:
    if fmt == "json":
        assert re.search(rb'"ID":1,', raw)
        assert re.search(rb'"Charge":\d+\.\d{4},', raw)
        assert re.search(rb'"UTCOffset":13,', raw)
        assert json.loads(raw)[0]["ID"] == 1


def _pretty(raw: bytes, fmt: str) -> None:
    if fmt == "json":
        assert raw.startswith(b'[\n    {\n        "ID": "1",\n')


def _crlf(raw: bytes, fmt: str) -> None:
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")


def _bom(raw: bytes, fmt: str) -> None:
    assert raw.startswith(BOM)


def _quote_all(raw: bytes, fmt: str) -> None:
    if fmt != "json":
        assert all(line.startswith(b'"') for line in raw.splitlines())


def _order_checked_on_rows(raw: bytes, fmt: str) -> None:
    assert raw


VARIANTS: list[tuple[str, dict[str, Any], Callable[[bytes, str], None]]] = [
    ("no-header", {"header": False}, _no_header),
    ("nz-dates", {"date_style": "nz"}, _nz_dates),
    ("iso-t", {"datetime_style": "iso_t"}, _utc_layout(rb"2024-03-01T\d\d:\d\d:\d\d[^Z+]")),
    ("iso-z", {"datetime_style": "iso_z"}, _utc_layout(rb"2024-03-01T\d\d:\d\d:\d\dZ")),
    ("offset", {"datetime_style": "offset"}, _utc_layout(rb"2024-03-01T\d\d:\d\d:\d\d\+00:00")),
    ("nz-datetime", {"datetime_style": "nz"}, _utc_layout(rb"01/03/2024 \d\d:\d\d:\d\d")),
    ("json-numbers", {"json_numbers": True}, _json_numbers),
    ("pretty", {"json_pretty": True}, _pretty),
    ("crlf", {"line_ending": "\r\n"}, _crlf),
    ("bom", {"bom": True}, _bom),
    ("quote-all", {"quote_all": True}, _quote_all),
    ("unsorted", {"unsorted": True}, _order_checked_on_rows),
    (
        "everything",
        {
            "header": False,
            "date_style": "nz",
            "datetime_style": "iso_z",
            "json_numbers": True,
            "json_pretty": True,
            "line_ending": "\r\n",
            "bom": True,
            "quote_all": True,
        },
        _crlf,
    ),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("overrides", "visible"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS]
)
def test_each_variant_is_honoured_in_each_format(
    make_sim: MakeSim,
    fmt: str,
    overrides: dict[str, Any],
    visible: Callable[[bytes, str], None],
) -> None:
    sim = make_sim(backlog=200, **overrides)
    raw = fetch(sim, fromid="0", format=fmt).content
    visible(raw, fmt)
    rows = decode(raw, fmt, sim.config)
    expected = [sim.row(i) for i in range(1, 201)]
    if sim.config.unsorted:
        assert ids(rows) != sorted(ids(rows))
        rows.sort(key=lambda r: int(r["ID"]))
    assert rows == expected


@pytest.mark.parametrize(
    ("fmt", "empty_style", "header", "body"),
    [
        ("csv", "empty", True, b""),
        ("csv", "header", True, ",".join(FIELDS).encode() + b"\n"),
        ("txt", "header", True, "\t".join(FIELDS).encode() + b"\n"),
        ("pipe", "header", False, b""),
        ("json", "empty", True, b"[]"),
        ("json", "header", True, b"[]"),
        ("json", "null", True, b"null"),
        ("csv", "null", True, b""),
        ("csv", "text", True, b"No records found"),
        ("json", "text", True, b"No records found"),
    ],
)
def test_no_records(
    make_sim: MakeSim, fmt: str, empty_style: str, header: bool, body: bytes
) -> None:
    sim = make_sim(backlog=10, empty_style=empty_style, header=header)
    response = fetch(sim, fromid="10", format=fmt)
    assert (response.status_code, response.content) == (200, body)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_records_as_204(make_sim: MakeSim, fmt: str) -> None:
    sim = make_sim(backlog=10, empty_style="no_content")
    response = fetch(sim, fromid="10", format=fmt)
    assert (response.status_code, response.content) == (204, b"")
    assert "content-length" not in response.headers
    assert fetch(sim, fromid="9", format=fmt).status_code == 200  # a row: a page as usual


@pytest.mark.parametrize("fmt", ["csv", "txt", "pipe"])
def test_broken_rows_open_a_quote_that_never_closes(make_sim: MakeSim, fmt: str) -> None:
    sim = make_sim(backlog=5, broken_row_ids=(2,))
    lines = fetch(sim, fromid="0", format=fmt).content.decode().splitlines()
    delimiter = DELIMITERS[fmt]
    # Header, then IDs 1..5: only row 2 is written differently, by one quote.
    assert lines[2].startswith("2" + delimiter)
    assert lines[2].count('"') == 1
    cells = lines[2].split(delimiter)
    assert cells[FIELDS.index("TextDesc2")].startswith('"')
    assert len(cells) >= len(FIELDS)
    assert decode("\n".join([lines[0], lines[1], *lines[3:]]).encode(), fmt, sim.config) == [
        sim.row(i) for i in (1, 3, 4, 5)
    ]


def test_a_broken_json_element_lacks_a_comma(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=3, broken_row_ids=(2,))
    body = fetch(sim, fromid="0", format="json").text
    with pytest.raises(json.JSONDecodeError, match="Expecting ',' delimiter"):
        json.loads(body)
    fixed = body.replace('"ID":"2" "AccountCode"', '"ID":"2","AccountCode"')
    assert decode(fixed.encode(), "json", sim.config) == [sim.row(i) for i in (1, 2, 3)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_rows(make_sim: MakeSim, fmt: str) -> None:
    sim = make_sim(backlog=3, long_row_ids=(2,), long_row_chars=3 << 20)
    limit = csv.field_size_limit(4 << 20)  # the reader here must take the long field
    try:
        rows = decode(fetch(sim, fromid="0", format=fmt).content, fmt, sim.config)
    finally:
        csv.field_size_limit(limit)
    assert rows == [sim.row(1), sim.row(2) | {"TextDesc1": "x" * (3 << 20)}, sim.row(3)]


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_bodies_in_another_encoding(make_sim: MakeSim, fmt: str, encoding: str) -> None:
    sim = make_sim(backlog=300, encoding=encoding)
    response = fetch(sim, fromid="0", format=fmt)
    charset = {"cp1252": "windows-1252", "latin-1": "iso-8859-1"}[encoding]
    if fmt == "json":  # \u escapes: ASCII, so UTF-8 too
        assert response.content.isascii()
    else:
        assert f"charset={charset}" in response.headers["content-type"]
        with pytest.raises(UnicodeDecodeError):
            response.content.decode("utf-8")
    text = response.content.decode(encoding)
    rows = decode(text.encode(), fmt, sim.config)
    expected = [{k: v.translate(DIAERESIS) for k, v in sim.row(i).items()} for i in range(1, 301)]
    assert rows == expected
    assert any("Ö" in r["TextDesc2"] or "ä" in r["TextDesc2"] for r in rows)


@pytest.mark.parametrize(
    ("transfer", "backlog", "chunked"),
    [("auto", 10, False), ("auto", 2500, True), ("chunked", 10, True), ("length", 2500, False)],
)
def test_transfer_framing(make_sim: MakeSim, transfer: str, backlog: int, chunked: bool) -> None:
    sim = make_sim(backlog=backlog, transfer=transfer)
    response = fetch(sim, fromid="0")
    assert ("transfer-encoding" in response.headers) == chunked
    assert ("content-length" in response.headers) != chunked
    assert ids(decode(response.content, "csv", sim.config)) == list(range(1, backlog + 1))


def test_connection_close_framing(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=2500, transfer="close")
    response = fetch(sim, fromid="0", format="txt")
    assert response.headers["connection"] == "close"
    assert len(decode(response.content, "txt", sim.config)) == 2500


def test_large_response_streams_in_batches(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=25_000, batch_rows=1000)
    data = {"login": LOGIN, "password": PASSWORD, "fromid": "0", "format": "pipe"}
    lines = 0
    with httpx.stream("POST", sim.url, data=data) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        for _ in response.iter_lines():
            lines += 1
    assert lines == 25_001
    assert sim.requests[-1].rows == 25_000


def test_fromid_means_greater_than(sim: BillingFeedSimulator) -> None:
    assert ids(decode(fetch(sim, fromid="0").content, "csv", sim.config))[0] == 1
    assert ids(decode(fetch(sim, fromid="10").content, "csv", sim.config))[:2] == [11, 12]
    assert fetch(sim, fromid="300").content == b""
    assert fetch(sim, fromid="5000").content == b""


def test_add_makes_new_rows_appear(sim: BillingFeedSimulator) -> None:
    sim.add(5)
    assert sim.high_id == 305
    assert ids(decode(fetch(sim, fromid="300").content, "csv", sim.config)) == list(range(301, 306))


def test_max_rows_pages_through_the_backlog(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=250, max_rows=100)
    cursor, pages = 0, []
    while rows := decode(fetch(sim, fromid=str(cursor)).content, "csv", sim.config):
        pages.append(len(rows))
        cursor = max(ids(rows))
    assert pages == [100, 100, 50]
    assert cursor == 250


def test_post_is_given_priority_over_get(sim: BillingFeedSimulator) -> None:
    response = httpx.post(
        sim.url,
        params={"fromid": "2", "format": "json"},
        data={"login": LOGIN, "password": PASSWORD, "fromid": "5"},
    )
    assert ids(decode(response.content, "json", sim.config))[0] == 6  # fromid from the body
    record = sim.requests[-1]
    assert record.method == "POST"
    assert record.query == {"fromid": "2", "format": "json"}
    assert record.form == {"login": LOGIN, "fromid": "5"}
    assert record.params == {"fromid": "5", "format": "json", "login": LOGIN}
    assert record.password_in == ("form",)
    assert (record.status, record.rows) == (200, 295)


def test_get_works_and_is_logged_as_get(sim: BillingFeedSimulator) -> None:
    response = fetch(sim, "GET", fromid="290", format="pipe")
    assert ids(decode(response.content, "pipe", sim.config)) == list(range(291, 301))
    record = sim.requests[-1]
    assert (record.method, record.path, record.password_in) == (
        "GET",
        "/billingfeed.php",
        ("query",),
    )
    assert record.params == {"login": LOGIN, "fromid": "290", "format": "pipe"}
    assert sim.request_count == 1


def test_other_paths_are_not_found(sim: BillingFeedSimulator) -> None:
    assert httpx.get(sim.url.replace("billingfeed.php", "index.php")).status_code == 404
    assert httpx.post(sim.url.removesuffix("billingfeed.php")).status_code == 404


# --- HTTP: parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "status"), [("text200", 200), ("html200", 200), ("401", 401), ("403", 403)]
)
@pytest.mark.parametrize(
    "credentials",
    [{"password": "wrong"}, {"login": "89999999"}, {"password": ""}],
    ids=["bad-password", "bad-login", "empty-password"],
)
def test_auth_failure_styles(
    make_sim: MakeSim, style: str, status: int, credentials: dict[str, str]
) -> None:
    sim = make_sim(backlog=10, auth_failure_style=style)
    response = fetch(sim, fromid="0", **credentials)
    assert response.status_code == status
    if style == "html200":
        assert response.text.startswith("<!DOCTYPE html>")
        assert '<p class="error">Invalid login or password</p>' in response.text
    else:
        assert response.text == "Invalid login or password"


@pytest.mark.parametrize("fault", ["auth_text200", "auth_html200"])
def test_auth_faults_refuse_good_credentials(sim: BillingFeedSimulator, fault: str) -> None:
    sim.inject(fault)
    refused = fetch(sim, fromid="0")
    assert refused.status_code == 200
    assert "Invalid login or password" in refused.text
    assert refused.text.startswith("<!DOCTYPE") == (fault == "auth_html200")
    assert fetch(sim, fromid="0").text.startswith("ID,")


def test_missing_credentials_fail_auth(sim: BillingFeedSimulator) -> None:
    response = httpx.post(sim.url, data={"fromid": "0"})
    assert (response.status_code, response.text) == (200, "Invalid login or password")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "fromid"),
        ({"fromid": ""}, "fromid"),
        ({"fromid": "abc"}, "fromid"),
        ({"fromid": "-1"}, "fromid"),
        ({"fromid": "1.5"}, "fromid"),
        ({"fromid": "0", "format": "xml"}, "format"),
        ({"fromid": "0", "date": "2024-13-01"}, "date"),
        ({"fromid": "0", "date": "01/03/2024"}, "date"),
        ({"fromid": "0", "date": "2024-03-01", "hour": "24"}, "hour"),
        ({"fromid": "0", "date": "2024-03-01", "hour": "x"}, "hour"),
        ({"fromid": "0", "hour": "5"}, "hour"),
        ({"fromid": "0", "callsonly": "1", "servicesonly": "1"}, "callsonly"),
    ],
)
def test_bad_parameters_are_400(
    sim: BillingFeedSimulator, params: dict[str, str], message: str
) -> None:
    response = fetch(sim, **params)
    assert response.status_code == 400
    assert message in response.text
    assert sim.requests[-1].status == 400


def test_calls_only_and_services_only_partition_the_feed(sim: BillingFeedSimulator) -> None:
    calls = decode(fetch(sim, fromid="0", callsonly="1").content, "csv", sim.config)
    services = decode(fetch(sim, fromid="0", servicesonly="1").content, "csv", sim.config)
    assert services
    assert all(r["CallType"] == SERVICE_CALL_TYPE for r in services)
    assert all(r["CallType"] != SERVICE_CALL_TYPE for r in calls)
    assert sorted(ids(calls) + ids(services)) == list(range(1, 301))
    # "0" is not "1": no filter
    assert len(decode(fetch(sim, fromid="0", callsonly="0").content, "csv", sim.config)) == 300


@pytest.fixture(scope="module")
def dst_rows() -> list[dict[str, str]]:
    gen = CdrGenerator(1, start=DST_START)
    return [gen.row(i) for i in range(1, 20_001)]


@pytest.mark.parametrize(
    ("day", "hour", "fromid", "flags"),
    [
        ("2024-04-05", None, 0, {}),  # the first, partial day
        ("2024-04-06", None, 0, {}),
        ("2024-04-07", None, 0, {}),  # 25 hours long: DST ends at 03:00
        ("2024-04-07", 2, 0, {}),  # 02:00-02:59 happens twice
        ("2024-04-07", 3, 0, {}),
        ("2024-04-06", 23, 0, {}),
        ("2024-04-08", 0, 0, {}),
        ("2024-04-07", None, 6500, {}),
        ("2024-04-08", None, 0, {"callsonly": "1"}),
        ("2024-04-08", None, 0, {"servicesonly": "1"}),
        ("2024-04-11", None, 0, {}),  # the last, partial day
        ("2024-04-12", None, 0, {}),  # after the backlog
        ("2024-03-01", None, 0, {}),  # before it
    ],
)
def test_date_and_hour_filters_match_brute_force(
    make_sim: MakeSim,
    dst_rows: list[dict[str, str]],
    day: str,
    hour: int | None,
    fromid: int,
    flags: dict[str, str],
) -> None:
    sim = make_sim(backlog=20_000, start=DST_START)
    params = {"fromid": str(fromid), "date": day, "format": "json", **flags}
    if hour is not None:
        params["hour"] = str(hour)
    got = decode(fetch(sim, **params).content, "json", sim.config)
    expected = [
        r
        for r in dst_rows
        if r["Date"] == day
        and (hour is None or int(r["Time"][:2]) == hour)
        and int(r["ID"]) > fromid
        and (flags.get("callsonly") != "1" or r["CallType"] != SERVICE_CALL_TYPE)
        and (flags.get("servicesonly") != "1" or r["CallType"] == SERVICE_CALL_TYPE)
    ]
    assert got == expected
    if day in ("2024-04-06", "2024-04-07") and hour is None:
        assert any(r["AccountCode"] == chatham for r in got for chatham in _chatham(sim))


def _chatham(sim: BillingFeedSimulator) -> list[str]:
    return [a.code for a in sim.generator.accounts if a.zone == CHATHAM]


def test_repeated_hour_holds_both_offsets(
    make_sim: MakeSim, dst_rows: list[dict[str, str]]
) -> None:
    sim = make_sim(backlog=20_000, start=DST_START)
    got = decode(fetch(sim, fromid="0", date="2024-04-07", hour="2").content, "csv", sim.config)
    offsets = {r["UTCOffset"] for r in got if r["AccountCode"] not in _chatham(sim)}
    assert offsets == {"13", "12"}


def test_date_filter_on_ten_million_backlog(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=10_000_000)
    got = decode(fetch(sim, fromid="0", date="2024-03-02").content, "csv", sim.config)
    brute = [sim.row(i) for i in range(1, 6001) if sim.row(i)["Date"] == "2024-03-02"]
    assert got == brute


# --- HTTP: faults ----------------------------------------------------------------------------


def test_injected_status_faults(sim: BillingFeedSimulator) -> None:
    sim.inject("500")
    sim.inject("503")
    sim.inject("429", retry_after=7)
    sim.inject("html")
    sim.inject("html", status=500)
    sim.inject("auth_text200")
    responses = [fetch(sim, fromid="0") for _ in range(7)]
    assert [r.status_code for r in responses] == [500, 503, 429, 200, 500, 200, 200]
    assert responses[2].headers["retry-after"] == "7"
    assert all(r.text.startswith("<!DOCTYPE html>") for r in responses[3:5])
    assert responses[5].text == "Invalid login or password"
    assert len(decode(responses[6].content, "csv", sim.config)) == 300  # healthy again
    assert [r.fault for r in sim.requests] == [
        "500", "503", "429", "html", "html", "auth_text200", None,
    ]  # fmt: skip


def test_injected_fault_count(sim: BillingFeedSimulator) -> None:
    sim.inject("503", count=2)
    assert [fetch(sim, fromid="0").status_code for _ in range(3)] == [503, 503, 200]


def test_inject_rejects_unknown_faults(sim: BillingFeedSimulator) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        sim.inject("teapot")
    with pytest.raises(ValueError, match="no parameter"):
        sim.inject("500", retry_after=3)


def test_injected_latency(sim: BillingFeedSimulator) -> None:
    sim.inject("latency", seconds=0.3)
    started = time.monotonic()
    response = fetch(sim, fromid="295")
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200


@pytest.mark.parametrize("fault", ["truncate", "truncate_chunked"])
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_injected_truncation_breaks_the_framing(
    sim: BillingFeedSimulator, fault: str, fmt: str
) -> None:
    sim.inject(fault)
    with pytest.raises(httpx.RemoteProtocolError):
        fetch(sim, fromid="0", format=fmt)
    assert sim.requests[-1].fault == fault
    assert fetch(sim, fromid="0", format=fmt).status_code == 200


def test_truncation_logs_the_rows_of_the_part_it_cut(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=250, batch_rows=100)
    sim.inject("truncate")
    with pytest.raises(httpx.RemoteProtocolError):
        fetch(sim, fromid="0")
    assert sim.requests[-1].rows == 100  # rows 1..100, the last cut in half; not the next batch


def test_requests_record_when_they_were_received(sim: BillingFeedSimulator) -> None:
    before = time.monotonic()
    fetch(sim, fromid="290")
    fetch(sim, fromid="295")
    after = time.monotonic()
    first, second = sim.requests
    assert before <= first.received_at <= second.received_at <= after


def test_a_request_the_client_gave_up_on_is_logged_in_arrival_order(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=2500)  # more than one batch: the answer is streamed, chunked
    sim.inject("latency", seconds=0.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sim.url, data={"login": LOGIN, "password": PASSWORD, "fromid": "0"}, timeout=0.1)
    assert fetch(sim, fromid="2490").status_code == 200
    deadline = time.monotonic() + 10
    while sim.request_count < 2:  # the late answer is logged when it is written off
        assert time.monotonic() < deadline, sim.requests
        time.sleep(0.02)
    assert [r.fault for r in sim.requests] == ["latency", None]


def test_injected_cut_last_line(sim: BillingFeedSimulator) -> None:
    sim.inject("cut_last_line")
    broken = fetch(sim, fromid="290").text
    whole = fetch(sim, fromid="290").text
    assert not broken.endswith("\n")
    *lines, last = broken.split("\n")
    assert lines == whole.split("\n")[: len(lines)]
    expected_last = whole.split("\n")[len(lines)]
    assert expected_last.startswith(last)
    assert len(last) < len(expected_last)


def test_injected_cut_last_line_breaks_json(sim: BillingFeedSimulator) -> None:
    sim.inject("cut_last_line")
    with pytest.raises(json.JSONDecodeError):
        json.loads(fetch(sim, fromid="290", format="json").content)


def test_error_rate_alternates_500_and_503(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=10, error_rate=1.0)
    assert [fetch(sim, fromid="0").status_code for _ in range(4)] == [500, 503, 500, 503]


def test_rate_limit_rate(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=10, rate_limit_rate=1.0, retry_after_s=3)
    response = fetch(sim, fromid="0")
    assert (response.status_code, response.headers["retry-after"]) == (429, "3")


def test_html_error_rate(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=10, html_error_rate=1.0)
    responses = [fetch(sim, fromid="0") for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 500]
    assert all(r.text.startswith("<!DOCTYPE html>") for r in responses)


def test_truncate_rate(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=50, truncate_rate=1.0)
    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            fetch(sim, fromid="0")
    assert [r.fault for r in sim.requests] == ["truncate", "truncate_chunked"]


def test_fault_rates_mix_with_healthy_responses(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=10, error_rate=0.3, rate_limit_rate=0.2)
    statuses = [fetch(sim, fromid="0").status_code for _ in range(40)]
    assert {200, 429} <= set(statuses)
    assert {500, 503} & set(statuses)


def test_latency_rate(make_sim: MakeSim) -> None:
    sim = make_sim(backlog=10, latency_s=0.2)
    started = time.monotonic()
    assert fetch(sim, fromid="0").status_code == 200
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("fmt", FORMATS)
def test_malformed_rows_are_the_ones_the_generator_names(make_sim: MakeSim, fmt: str) -> None:
    sim = make_sim(backlog=400, malformed_rate=0.25)
    body = fetch(sim, fromid="0", format=fmt).content.decode()
    if fmt == "json":
        written = json.loads(body)
    else:
        lines = list(csv.reader(io.StringIO(body, newline=""), delimiter=DELIMITERS[fmt]))[1:]
        written = [dict(zip(FIELDS, line, strict=False)) for line in lines]
    assert len(written) == 400
    bad = 0
    for cdr_id, row in enumerate(written, start=1):
        assert row == sim.generator.wire_row(cdr_id)
        bad += row != sim.row(cdr_id)
        assert (row != sim.row(cdr_id)) == sim.is_malformed(cdr_id)
    assert bad > 50


# --- logging ---------------------------------------------------------------------------------


def test_password_is_never_logged(
    sim: BillingFeedSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fetch(sim, fromid="0")
    fetch(sim, fromid="0", password="wrong-" + PASSWORD)
    sim.inject("500")
    fetch(sim, fromid="0")
    address = urlsplit(sim.url)
    with socket.create_connection((str(address.hostname), int(address.port or 80))) as raw:
        raw.sendall(f"GET /billingfeed.php?password={PASSWORD} junk HTTP/1.1\r\n\r\n".encode())
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    messages = [record.getMessage() for record in caplog.records]
    assert messages
    assert not [m for m in messages if PASSWORD in m]
    assert PASSWORD not in repr(sim.requests)
    info = [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamer.simulator" and r.levelno == logging.INFO
    ]
    assert any("POST /billingfeed.php" in m and "fromid=0" in m and "status=200" in m for m in info)


def test_password_in_a_get_url_is_not_logged(
    sim: BillingFeedSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamer")
    fetch(sim, "GET", fromid="0")  # httpx itself logs the URL; the simulator must not
    assert sim.requests[-1].password_in == ("query",)
    assert "password" not in sim.requests[-1].params
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]


@pytest.mark.parametrize(
    "variant",
    [
        {"prerender": "csv"},
        {"prerender": "csv", "transfer": "length", "bom": True, "quote_all": True},
        {"prerender": "txt", "header": False, "line_ending": "\r\n", "malformed_rate": 0.1},
        {"prerender": "pipe", "transfer": "close", "date_style": "nz"},
        {"prerender": "json", "json_pretty": True, "json_numbers": True},
        {"prerender": "json", "line_ending": "\r\n", "transfer": "chunked"},
        {"prerender": "csv", "max_rows": 700},
    ],
)
def test_prerendered_answers_are_the_rendered_ones(make_sim: MakeSim, variant: Any) -> None:
    """A prerendering simulator answers byte for byte as one rendering on request does."""
    fmt = variant["prerender"]
    common = {k: v for k, v in variant.items() if k != "prerender"}
    fast = make_sim(backlog=2500, batch_rows=1000, **variant)
    slow = make_sim(backlog=2500, batch_rows=1000, **common)
    assert fast.prerendered is not None
    for fromid in ("0", "1", "1499", "2499", "2500", "4000"):
        answers = [fetch(sim, fromid=fromid, format=fmt) for sim in (fast, slow)]
        assert answers[0].status_code == answers[1].status_code == 200
        assert answers[0].content == answers[1].content, fromid
        framing = [
            ("content-length" in a.headers, "transfer-encoding" in a.headers) for a in answers
        ]
        assert framing[0] == framing[1]
        assert [r.rows for r in fast.requests] == [r.rows for r in slow.requests]


def test_prerendered_simulator_renders_other_requests_on_demand(make_sim: MakeSim) -> None:
    fast = make_sim(backlog=300, prerender="csv")
    slow = make_sim(backlog=300)
    for params in ({"format": "json"}, {"date": "2024-03-01"}, {"callsonly": "1"}):
        answers = [fetch(sim, fromid="0", **params).content for sim in (fast, slow)]
        assert answers[0] == answers[1]
    fast.add(5)  # rows beyond the prerendered backlog: rendered on request
    slow.add(5)
    assert fetch(fast, fromid="10").content == fetch(slow, fromid="10").content
