"""The fake billing feed: a deterministic, streaming stand-in for the provider's billingfeed.php.

Three layers, each usable on its own:

    CdrGenerator          (seed, cdr_id) -> one CDR row; nothing is stored, so a 10M backlog is free
    FeedStore             which IDs exist (backlog + growth over time) and the query over them
    BillingFeedSimulator  the HTTP endpoint: parameters, auth, output variants, faults, request log

The provider documents the parameters and the 26 fields but not the text layout, the
error responses or the framing, so every such choice here is a `SimulatorConfig` variant
that tests and demos can switch, and faults are injectable one request at a time.
"""

from __future__ import annotations

import array
import bisect
import csv
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from decimal import ROUND_HALF_UP, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Literal, cast, get_args
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo

from streamer.errors import ConfigError
from streamer.records import FIELDS

logger = logging.getLogger(__name__)

PATH = "/billingfeed.php"
AUCKLAND = "Pacific/Auckland"
CHATHAM = "Pacific/Chatham"
DEFAULT_START = datetime(2024, 3, 1, tzinfo=UTC)  # crosses the NZ DST end on 2024-04-07
SERVICE_CALL_TYPE = "Service"  # CallType of service fees (number rental, broadband, fixed charges)
AUTH_FAILURE_TEXT = "Invalid login or password"

FORMATS: tuple[str, ...] = ("csv", "txt", "pipe", "json")
DELIMITERS: Mapping[str, str] = {"csv": ",", "txt": "\t", "pipe": "|"}
NUMERIC_FIELDS = frozenset(
    {"ID", "Seconds", "NetworkSeconds", "ConnectSeconds", "Charge", "ChargeExcl",
     "FreeUnitsUsed", "UTCOffset"}
)  # fmt: skip
FAULTS: tuple[str, ...] = (
    "500", "503", "429", "truncate", "truncate_chunked", "html", "auth_text200", "latency",
    "cut_last_line",
)  # fmt: skip
MALFORMATIONS: tuple[str, ...] = (
    "bad_date", "bad_time", "bad_id", "wrong_field_count", "empty_account", "bad_decimal",
)  # fmt: skip

DateStyle = Literal["iso", "nz"]
DateTimeStyle = Literal["space", "iso_t", "iso_z", "offset", "nz"]
EmptyStyle = Literal["empty", "header"]
AuthFailureStyle = Literal["text200", "401", "403"]
Transfer = Literal["auto", "chunked", "length", "close"]
# "none", or the format whose responses are rendered once, at start, and then served from memory.
Prerender = Literal["none", "csv", "txt", "pipe", "json"]

_MONEY = Decimal("0.0001")
_GST = Decimal("1.15")
_ZERO = Decimal(0)
# Local offsets in New Zealand lie within [+12:00, +13:45]: a UTC window this much wider
# than a local day or hour holds every CDR of that day or hour, whatever the zone or DST.
_MAX_OFFSET = timedelta(hours=14)
_MIN_OFFSET = timedelta(hours=12)


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Everything the simulator does, with defaults that behave like a quiet, healthy provider."""

    password: str = field(repr=False)
    login: str = "81234567"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    # Data
    seed: int = 1
    backlog: int = 1000  # CDRs that exist at start: IDs 1..backlog
    rate_per_s: float = 0.0  # new CDRs per second of wall-clock time after construction
    start: datetime = DEFAULT_START  # UTC time of CDR 0; CDR n is at start + n * mean_gap_s
    mean_gap_s: float = 30.0
    jitter_s: int = 20  # each CDR's time is off its slot by up to this many seconds either way
    accounts: int = 50
    malformed_rate: float = 0.0  # share of IDs whose row is always written broken
    # An exchange fault: every call from this ID on ends Busy or Unallocated (0: never).
    # For demos and tests of the error-Status metrics and alert; lower IDs are unchanged.
    status_fault_from_id: int = 0
    # Output variants
    max_rows: int | None = None  # provider page cap; None: every matching row
    header: bool = True  # delimited formats only
    date_style: DateStyle = "iso"  # BillDate and Date: YYYY-MM-DD or DD/MM/YYYY
    datetime_style: DateTimeStyle = "space"  # UTCDateTime
    json_numbers: bool = False  # numeric fields as JSON numbers (the decimal text, never a float)
    json_pretty: bool = False
    line_ending: str = "\n"
    bom: bool = False
    quote_all: bool = False
    empty_style: EmptyStyle = "empty"  # no rows: empty body or header only (json: always "[]")
    unsorted: bool = False  # rows of a response shuffled within each batch
    auth_failure_style: AuthFailureStyle = "text200"
    transfer: Transfer = "auto"  # auto: Content-Length for one batch, chunked beyond
    batch_rows: int = 1000  # rows rendered and written to the socket at a time
    # Benchmarks: render the backlog once, at start, in this format, and serve plain requests
    # (no date or call/service filter, no shuffling, no body fault) from memory.
    prerender: Prerender = "none"
    # Faults, drawn per request from a seeded dice (inject() queues deterministic ones)
    latency_s: float = 0.0
    error_rate: float = 0.0  # 500 and 503 alternately
    rate_limit_rate: float = 0.0  # 429 with Retry-After
    retry_after_s: int = 1
    truncate_rate: float = 0.0  # Content-Length short body and chunked without end, alternately
    html_error_rate: float = 0.0  # an HTML error page, status 200 and 500 alternately

    def __post_init__(self) -> None:
        problems: list[str] = []

        def check(ok: bool, problem: str) -> None:
            if not ok:
                problems.append(problem)

        check(bool(self.password), "password must not be empty")
        check(bool(self.login), "login must not be empty")
        check(0 <= self.port <= 65535, f"port {self.port} is not 0..65535")
        check(self.backlog >= 0, "backlog must be >= 0")
        check(self.rate_per_s >= 0, "rate_per_s must be >= 0")
        check(self.start.tzinfo is not None, "start must be timezone-aware")
        check(self.mean_gap_s > 0, "mean_gap_s must be > 0")
        check(self.jitter_s >= 0, "jitter_s must be >= 0")
        check(self.accounts >= 2, "accounts must be >= 2")
        check(self.status_fault_from_id >= 0, "status_fault_from_id must be >= 0")
        check(self.max_rows is None or self.max_rows >= 1, "max_rows must be None or >= 1")
        check(self.batch_rows >= 1, "batch_rows must be >= 1")
        check(self.line_ending in ("\n", "\r\n"), "line_ending must be '\\n' or '\\r\\n'")
        for name, allowed in (
            ("date_style", DateStyle),
            ("datetime_style", DateTimeStyle),
            ("empty_style", EmptyStyle),
            ("auth_failure_style", AuthFailureStyle),
            ("transfer", Transfer),
            ("prerender", Prerender),
        ):
            choices = get_args(allowed)
            check(getattr(self, name) in choices, f"{name} must be one of {', '.join(choices)}")
        check(self.latency_s >= 0, "latency_s must be >= 0")
        check(self.retry_after_s >= 0, "retry_after_s must be >= 0")
        for name in ("malformed_rate", "error_rate", "rate_limit_rate", "truncate_rate",
                     "html_error_rate"):  # fmt: skip
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be within 0..1")
        if problems:
            raise ConfigError("invalid simulator config: " + "; ".join(problems))


# --- data ------------------------------------------------------------------------------------

# (Status, ReleaseCause, weight): ISUP release causes, mostly normal clearing.
_STATUSES: tuple[tuple[str, str, int], ...] = (
    ("Ok", "0016", 860), ("No Answer", "0019", 50), ("No Answer", "0018", 10),
    ("Busy", "0017", 40), ("Unallocated", "0001", 10), ("Error", "0031", 6),
    ("Error", "0041", 4), ("Error", "0038", 3), ("Rejected", "0021", 9),
    ("Congestion", "0034", 8),
)  # fmt: skip
_STATUS_CUM = tuple(itertools.accumulate(w for _, _, w in _STATUSES))
_CALL_TYPES: tuple[tuple[str, int], ...] = (
    ("Local", 24), ("National", 10), ("Mobile", 30), ("International", 5), ("SMS", 12),
    ("Onnet", 8), ("0800", 8), ("0900", 1), ("Directory", 2),
)  # fmt: skip
_CALL_TYPE_CUM = tuple(itertools.accumulate(w for _, w in _CALL_TYPES))
_PER_MINUTE = frozenset({"National", "Mobile", "International", "0900", "Directory"})
_PER_MINUTE_RATE: Mapping[str, Decimal] = {
    "Local": _ZERO, "National": Decimal("0.0900"), "Mobile": Decimal("0.1900"), "Onnet": _ZERO,
    "0800": Decimal("0.0550"), "0900": Decimal("1.9900"), "Directory": _ZERO,
}  # fmt: skip
_FLAT_FEE: Mapping[str, Decimal] = {
    "SMS": Decimal("0.0900"), "0900": Decimal("0.9900"), "Directory": Decimal("1.5000"),
}  # fmt: skip
_NATIONAL: tuple[tuple[str, str], ...] = (
    ("643", "Christchurch"), ("643", "Ōtautahi"), ("643", "Dunedin"), ("644", "Wellington"),
    ("646", "Palmerston North"), ("646", "Napier, Hawke's Bay"), ("647", "Hamilton"),
    ("647", "Taupō"), ("649", "Whangārei"),
)  # fmt: skip
_MOBILE: tuple[tuple[str, str], ...] = (
    ("6421", "One NZ"), ("6422", "2degrees"), ("6427", "Spark"), ("6429", "One NZ"),
)  # fmt: skip
# (prefix, digits after it, country, place, ChargeExcl per minute)
_INTERNATIONAL: tuple[tuple[str, int, str, str, Decimal], ...] = (
    ("612", 8, "Australia", "Sydney", Decimal("0.0500")),
    ("613", 8, "Australia", "Melbourne", Decimal("0.0500")),
    ("614", 8, "Australia", "Mobile", Decimal("0.2500")),
    ("4420", 8, "United Kingdom", "London", Decimal("0.0600")),
    ("447", 9, "United Kingdom", "Mobile", Decimal("0.2900")),
    ("1212", 7, "United States", "New York", Decimal("0.0400")),
    ("8610", 8, "China", "Beijing", Decimal("0.0900")),
    ("9122", 8, "India", "Mumbai", Decimal("0.1900")),
    ("8210", 8, "Korea, Republic of", "Mobile", Decimal("0.2200")),
    ("676", 5, "Tonga", "Nuku'alofa", Decimal("0.8900")),
    ("685", 5, "Samoa", "Apia", Decimal("0.7900")),
)
_PREMIUM = ('"Weather Line"', '"Psychic Hotline"', '"TAB Racing, Results"')
_SERVICES: tuple[tuple[str, Decimal], ...] = (
    ("Number Rental", Decimal("10.0000")), ("Broadband 100/20 Fibre", Decimal("79.0000")),
    ("Fixed charge", Decimal("15.0000")), ("Hosted PBX seat", Decimal("24.9500")),
    ("Voicemail to email", Decimal("3.5000")),
)  # fmt: skip
_SERVICE_TYPES = ("Business Plan 1", "Business Plan 2", "Business Plan 3", "SIP Trunk 10",
                  "Hosted PBX", "Residential Saver")  # fmt: skip
_BILLING_GROUPS = ("Head Office", "Warehouse", "Sales & Marketing", "Ōtautahi Branch")
_CALLING_GROUPS = ("Sales", "Support", "After Hours")
_PROFILES = ("Restricted", "International Barred")
_MONTHS = ("", "January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Account:
    """One customer account: its key, its time zone, its numbers and its plan."""

    code: str
    zone: str
    lines: tuple[str, ...]  # landline numbers, E.164 without '+'
    mobiles: tuple[str, ...]
    freephone: str  # an 0800 number, or "" when the account has none
    service_type: str
    billing_group: str
    calling_group: str
    profile: str
    services: tuple[tuple[str, Decimal], ...]  # (TextDesc1, monthly ChargeExcl)
    weight: float  # share of the traffic, relative


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10**n)).zfill(n)


def _landline(rng: random.Random, area: str) -> str:
    """A landline in an area (E.164 without '+': 64, area digit, 7 digits not starting 0 or 1)."""
    return area + str(rng.randint(2000000, 9999999))


def _make_accounts(seed: int, count: int) -> tuple[Account, ...]:
    rng = random.Random(f"cdr-streamer accounts {seed}")  # str seeds hash the same everywhere
    chatham = rng.randrange(count)  # one account in `count` is on the Chatham Islands
    codes = rng.sample(range(10**7), count)
    accounts = []
    for i, code in enumerate(codes):
        zone = CHATHAM if i == chatham else AUCKLAND
        lines = tuple(
            "643305" + _digits(rng, 4) if zone == CHATHAM else _landline(rng, "649")
            for _ in range(rng.randint(1, 4))
        )
        mobiles = tuple(rng.choice(_MOBILE)[0] + _digits(rng, 7) for _ in range(rng.randint(0, 3)))
        accounts.append(
            Account(
                code=f"8{code:07d}",
                zone=zone,
                lines=lines,
                mobiles=mobiles,
                freephone="64800" + _digits(rng, 6) if rng.random() < 0.6 else "",
                service_type=rng.choice(_SERVICE_TYPES),
                billing_group="Default" if rng.random() < 0.8 else rng.choice(_BILLING_GROUPS),
                calling_group="Default" if rng.random() < 0.85 else rng.choice(_CALLING_GROUPS),
                profile="Default" if rng.random() < 0.9 else rng.choice(_PROFILES),
                services=(_SERVICES[0], *rng.sample(_SERVICES[1:], rng.randint(1, 3))),
                weight=rng.uniform(1.0, 5.0),
            )
        )
    return tuple(accounts)


def _money(value: Decimal) -> str:
    return str(value.quantize(_MONEY, rounding=ROUND_HALF_UP))


def _hours(offset: timedelta | None) -> str:
    """UTC offset in hours as plain text: '13', '12', '12.75', '13.75'."""
    seconds = int(offset.total_seconds()) if offset is not None else 0
    if seconds % 3600 == 0:
        return str(seconds // 3600)
    return str(Decimal(seconds) / Decimal(3600))


def _pick(rng: random.Random, cum: tuple[float, ...]) -> int:
    return bisect.bisect(cum, rng.random() * cum[-1])


@dataclass(frozen=True, slots=True)
class _Usage:
    """The fields that differ between a call and a service fee."""

    direction: str
    call_type: str
    a_party: str
    b_party: str
    bill_number: str
    seconds: int
    network_seconds: int
    connect_seconds: int
    charge_excl: Decimal
    free_units: Decimal
    desc1: str
    desc2: str
    release_cause: str
    status: str


class CdrGenerator:
    """Computes CDR `cdr_id` from (seed, cdr_id) alone: the same ID always gives the same row.

    CDR n happens at `start + n * mean_gap_s` plus a jitter of up to `jitter_s` either way,
    so time rises with ID, mostly; `ids_between` inverts that to find a time window's IDs.
    """

    def __init__(
        self,
        seed: int = 1,
        *,
        start: datetime = DEFAULT_START,
        mean_gap_s: float = 30.0,
        jitter_s: int = 20,
        accounts: int = 50,
        malformed_rate: float = 0.0,
        status_fault_from_id: int = 0,
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if mean_gap_s <= 0 or jitter_s < 0 or accounts < 2:
            raise ValueError("need mean_gap_s > 0, jitter_s >= 0 and accounts >= 2")
        self.seed = seed
        self._start_epoch = math.floor(start.timestamp())
        self._gap = mean_gap_s
        self._jitter = jitter_s
        self._malformed_rate = malformed_rate
        self._status_fault_from = status_fault_from_id
        digest = hashlib.sha256(f"cdr-streamer rows {seed}".encode()).digest()
        # Random(int) seeds from every bit of the int: (key << 64 | id) is one stream per row.
        self._row_key = int.from_bytes(digest[:8], "big") << 64
        self._malformed_key = int.from_bytes(digest[8:16], "big") << 64
        self.accounts = _make_accounts(seed, accounts)
        self._by_code = {a.code: a for a in self.accounts}
        self._account_cum = tuple(itertools.accumulate(a.weight for a in self.accounts))
        self._zones = {AUCKLAND: ZoneInfo(AUCKLAND), CHATHAM: ZoneInfo(CHATHAM)}
        self._all_lines = tuple(line for a in self.accounts for line in a.lines)

    def account(self, code: str) -> Account:
        """The account with this AccountCode (KeyError if the generator has none)."""
        return self._by_code[code]

    def ids_between(self, lo: datetime, hi: datetime) -> range:
        """A range holding every ID whose UTCDateTime can fall in [lo, hi) (a superset: jitter)."""
        # epoch(n) = start + floor(n * gap) + j with |j| <= jitter, so epoch in [lo, hi) implies
        # lo - start - jitter <= n * gap < hi - start + jitter + 1; one more second for rounding.
        first = math.floor((lo.timestamp() - self._start_epoch - self._jitter - 1) / self._gap)
        last = math.ceil((hi.timestamp() - self._start_epoch + self._jitter + 1) / self._gap)
        return range(max(1, first), max(1, last + 1))

    def row(self, cdr_id: int) -> dict[str, str]:
        """CDR number `cdr_id` as canonical text, keyed by the documented field names in order."""
        if cdr_id < 1:
            raise ValueError(f"CDR IDs start at 1, not {cdr_id}")
        rng = random.Random(self._row_key | cdr_id)
        epoch = self._start_epoch + math.floor(cdr_id * self._gap)
        epoch += rng.randint(-self._jitter, self._jitter)
        account = self.accounts[_pick(rng, self._account_cum)]
        utc = datetime.fromtimestamp(epoch, UTC)
        local = datetime.fromtimestamp(epoch, self._zones[account.zone])
        bill_date = date(local.year + local.month // 12, local.month % 12 + 1, 1)
        if rng.random() < 0.05:
            usage = self._service(rng, account, bill_date)
        else:
            usage = self._call(rng, account, failing=0 < self._status_fault_from <= cdr_id)
        # GST on the rounded amount, so that Charge == round(ChargeExcl * 1.15) holds on the wire
        charge_excl = usage.charge_excl.quantize(_MONEY, rounding=ROUND_HALF_UP)
        return {
            "ID": str(cdr_id),
            "AccountCode": account.code,
            "Direction": usage.direction,
            "CallType": usage.call_type,
            "BillDate": bill_date.isoformat(),
            "Date": f"{local.year:04d}-{local.month:02d}-{local.day:02d}",
            "Time": f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}",
            "UTCDateTime": (
                f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d} "
                f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
            ),
            "UTCOffset": _hours(local.utcoffset()),
            "AParty": usage.a_party,
            "BParty": usage.b_party,
            "BillNumber": usage.bill_number,
            "Seconds": str(usage.seconds),
            "NetworkSeconds": str(usage.network_seconds),
            "ConnectSeconds": str(usage.connect_seconds),
            "Charge": _money(charge_excl * _GST),
            "ChargeExcl": str(charge_excl),
            "FreeUnitsUsed": _money(usage.free_units),
            "TextDesc1": usage.desc1,
            "TextDesc2": usage.desc2,
            "ReleaseCause": usage.release_cause,
            "Status": usage.status,
            "ServiceType": account.service_type,
            "BillingGroup": account.billing_group,
            "CallingGroup": account.calling_group,
            "Profile": account.profile,
        }

    def malformation(self, cdr_id: int) -> str | None:
        """How the feed writes this ID's row broken (one of MALFORMATIONS), or None."""
        if self._malformed_rate <= 0:
            return None
        rng = random.Random(self._malformed_key | cdr_id)
        if rng.random() >= self._malformed_rate:
            return None
        return rng.choice(MALFORMATIONS)

    def is_malformed(self, cdr_id: int) -> bool:
        """True if the feed always writes this ID's row broken (deterministic for the seed)."""
        return self.malformation(cdr_id) is not None

    def wire_row(self, cdr_id: int, row: dict[str, str] | None = None) -> dict[str, str]:
        """The row as the feed writes it: `row(cdr_id)` with its malformation, if any, applied."""
        canonical = self.row(cdr_id) if row is None else row
        kind = self.malformation(cdr_id)
        if kind is None:
            return canonical
        broken = dict(canonical)
        if kind == "bad_date":
            broken["Date"] = f"{canonical['Date'][:4]}-13-45"
        elif kind == "bad_time":
            broken["Time"] = "25:61:00"
        elif kind == "bad_id":
            broken["ID"] = f"{cdr_id}a"
        elif kind == "wrong_field_count":
            del broken["Profile"]
        elif kind == "empty_account":
            broken["AccountCode"] = ""
        else:  # bad_decimal
            broken["Charge"] = "N/A"
        return broken

    def _caller(self, rng: random.Random) -> str:
        """Someone outside the platform: a landline somewhere in NZ or a mobile."""
        if rng.random() < 0.5:
            return rng.choice(_MOBILE)[0] + _digits(rng, 7)
        return _landline(rng, rng.choice(_NATIONAL)[0])

    def _call(self, rng: random.Random, account: Account, *, failing: bool = False) -> _Usage:
        call_type = _CALL_TYPES[_pick(rng, _CALL_TYPE_CUM)][0]
        if call_type == "0800" and not account.freephone:
            call_type = "Local"
        if call_type == "SMS":
            status, cause = "Ok", "0016"
        else:
            status, cause, _ = _STATUSES[_pick(rng, _STATUS_CUM)]
            if failing:  # status_fault_from_id; the extra draw only shifts rows of the fault
                status, cause = ("Busy", "0017") if rng.random() < 0.5 else ("Unallocated", "0001")
        own = rng.choice(account.lines + account.mobiles)
        direction, a_party, bill_number = "outbound", own, own
        rate = _PER_MINUTE_RATE.get(call_type, _ZERO)
        if call_type == "Local":
            chatham = account.zone == CHATHAM
            b_party = ("643305" + _digits(rng, 4)) if chatham else _landline(rng, "649")
            desc1, desc2 = ("Chatham Islands" if chatham else "Auckland"), "Local call"
        elif call_type == "National":
            prefix, city = rng.choice(_NATIONAL)
            b_party, desc1, desc2 = _landline(rng, prefix), city, f"National call - {city}"
        elif call_type in ("Mobile", "SMS"):
            prefix, carrier = rng.choice(_MOBILE)
            b_party = prefix + _digits(rng, 7)
            if call_type == "SMS":
                desc1, desc2 = "SMS", f"SMS to {carrier}"
            else:
                desc1, desc2 = "Mobile", f"Call to Mobile - {carrier}"
        elif call_type == "International":
            prefix, n, country, place, rate = rng.choice(_INTERNATIONAL)
            b_party, desc1, desc2 = prefix + _digits(rng, n), country, f"{country} - {place}"
        elif call_type == "Onnet":
            direction, b_party = "onnet", rng.choice(self._all_lines)
            desc1, desc2 = "Onnet", f"Onnet call | ext {rng.randint(200, 299)}"
        elif call_type == "0800":
            direction, a_party = "inbound", self._caller(rng)
            b_party = bill_number = account.freephone
            source = "mobile" if a_party.startswith("642") else "landline"
            desc1, desc2 = "0800 Freephone", f"Freephone call from {source}"
        elif call_type == "0900":
            b_party, desc1 = "64900" + _digits(rng, 5), "0900 Premium"
            desc2 = f"Premium service {rng.choice(_PREMIUM)}"
        else:  # Directory
            b_party, desc1, desc2 = "6418", "Directory Assistance", "018 Directory, connected"
        if call_type in ("Local", "National", "Mobile") and rng.random() < 0.03:
            # A diverted call: someone else called, the account's line is billed for the leg.
            a_party, desc2 = self._caller(rng), desc2 + " (diverted)"

        ok = status == "Ok"
        if call_type == "SMS":
            network = connect = seconds = 0
        elif ok:
            network = min(int(rng.lognormvariate(4.2, 1.1)) + 1, 4 * 3600)
            connect = rng.randint(1, 9)
            seconds = -(-network // 60) * 60 if call_type in _PER_MINUTE else network
        else:
            network = seconds = 0
            connect = rng.randint(15, 60) if status == "No Answer" else rng.randint(0, 5)
        charge_excl = free_units = _ZERO
        if ok:
            charge_excl = rate * seconds / 60 + _FLAT_FEE.get(call_type, _ZERO)
            if call_type in ("Mobile", "National") and rng.random() < 0.2:
                free_units, charge_excl = Decimal(seconds) / 60, _ZERO  # minutes from a bundle
        return _Usage(
            direction, call_type, a_party, b_party, bill_number, seconds, network, connect,
            charge_excl, free_units, desc1, desc2, cause, status,
        )  # fmt: skip

    def _service(self, rng: random.Random, account: Account, bill_date: date) -> _Usage:
        name, amount = rng.choice(account.services)
        desc1 = name
        if rng.random() < 0.05:
            desc1, amount = f"Credit - {name}", -amount
        number = account.lines[0]
        desc2 = f"{name} for {number}, {_MONTHS[bill_date.month]} {bill_date.year}"
        return _Usage(
            "outbound", SERVICE_CALL_TYPE, "", "", number, 0, 0, 0, amount, _ZERO, desc1, desc2,
            "", "Ok",
        )  # fmt: skip


# --- the feed --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedQuery:
    """One billing-feed query, parameters already validated."""

    from_id: int
    date: date | None = None  # NZ local Date
    hour: int | None = None  # of the local Time; only with date
    calls_only: bool = False
    services_only: bool = False


class FeedStore:
    """The CDRs that exist: IDs 1..high_id, growing with the clock and with `add`."""

    def __init__(
        self,
        generator: CdrGenerator,
        *,
        backlog: int,
        rate_per_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        max_rows: int | None = None,
    ) -> None:
        self.generator = generator
        self._backlog = backlog
        self._rate = rate_per_s
        self._clock = clock
        self._t0 = clock()
        self._added = 0
        self._max_rows = max_rows
        self._lock = threading.Lock()

    @property
    def high_id(self) -> int:
        """The highest ID that exists now (computed from the clock, no thread involved)."""
        grown = math.floor(self._rate * max(0.0, self._clock() - self._t0)) if self._rate else 0
        with self._lock:
            return self._backlog + self._added + grown

    def add(self, n: int) -> None:
        """Make `n` more CDRs exist."""
        if n < 0:
            raise ValueError("cannot remove CDRs")
        with self._lock:
            self._added += n

    def select(self, query: FeedQuery) -> Iterator[tuple[int, dict[str, str]]]:
        """(ID, canonical row) for each matching CDR with ID > from_id, ascending, lazily."""
        first, last = query.from_id + 1, self.high_id
        want_date = want_hour = None
        if query.date is not None:
            local = datetime.combine(query.date, time_of_day(query.hour or 0), UTC)
            span = timedelta(days=1) if query.hour is None else timedelta(hours=1)
            window = self.generator.ids_between(local - _MAX_OFFSET, local + span - _MIN_OFFSET)
            first, last = max(first, window.start), min(last, window.stop - 1)
            want_date = query.date.isoformat()
            want_hour = None if query.hour is None else f"{query.hour:02d}"
        count = 0
        for cdr_id in range(first, last + 1):
            row = self.generator.row(cdr_id)
            if want_date is not None and row["Date"] != want_date:
                continue
            if want_hour is not None and row["Time"][:2] != want_hour:
                continue
            is_service = row["CallType"] == SERVICE_CALL_TYPE
            if (query.calls_only and is_service) or (query.services_only and not is_service):
                continue
            yield cdr_id, row
            count += 1
            if self._max_rows is not None and count >= self._max_rows:
                return


# --- rendering -------------------------------------------------------------------------------

_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?")


def _php_json_string(text: str) -> str:
    """A JSON string as PHP's json_encode writes it: non-ASCII as \\uXXXX, '/' as '\\/'."""
    return json.dumps(text).replace("/", "\\/")


def _styled(row: Mapping[str, str], date_style: str, datetime_style: str) -> dict[str, str]:
    """The row's dates and UTCDateTime rewritten in the configured layout (by position, so a
    malformed date keeps its broken digits)."""
    out = dict(row)
    if date_style == "nz":
        for name in ("BillDate", "Date"):
            if name in out:
                d = out[name]
                out[name] = f"{d[8:10]}/{d[5:7]}/{d[:4]}"
    if datetime_style != "space" and "UTCDateTime" in out:
        day, _, clock = out["UTCDateTime"].partition(" ")
        out["UTCDateTime"] = {
            "iso_t": f"{day}T{clock}",
            "iso_z": f"{day}T{clock}Z",
            "offset": f"{day}T{clock}+00:00",
            "nz": f"{day[8:10]}/{day[5:7]}/{day[:4]} {clock}",
        }[datetime_style]
    return out


class _Renderer:
    """Rows -> bytes for one response in one format and one set of variants."""

    def __init__(self, fmt: str, config: SimulatorConfig) -> None:
        self._fmt = fmt
        self._config = config
        self._le = config.line_ending
        self._bom = "\ufeff" if config.bom else ""
        self._buffer = io.StringIO()
        self._writer = csv.writer(
            self._buffer,
            delimiter=DELIMITERS.get(fmt, ","),
            lineterminator=config.line_ending,
            quoting=csv.QUOTE_ALL if config.quote_all else csv.QUOTE_MINIMAL,
        )

    def _line(self, values: Iterable[str]) -> str:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(values)
        return self._buffer.getvalue()

    def preamble(self) -> bytes:
        if self._fmt == "json":
            return (self._bom + "[").encode()
        header = self._line(FIELDS) if self._config.header else ""
        return (self._bom + header).encode()

    def trailer(self) -> bytes:
        if self._fmt != "json":
            return b""
        return (self._le + "]").encode() if self._config.json_pretty else b"]"

    def empty(self) -> bytes:
        if self._fmt == "json":
            return (self._bom + "[]").encode()
        if self._config.empty_style == "header" and self._config.header:
            return self.preamble()
        return b""

    def row(self, row: Mapping[str, str], first: bool) -> bytes:
        cfg = self._config
        values = _styled(row, cfg.date_style, cfg.datetime_style)
        if self._fmt != "json":
            return self._line([values[name] for name in FIELDS if name in values]).encode()
        members = [
            (
                _php_json_string(name),
                value
                if cfg.json_numbers and name in NUMERIC_FIELDS and _JSON_NUMBER.fullmatch(value)
                else _php_json_string(value),
            )
            for name, value in values.items()
        ]
        le = self._le
        if cfg.json_pretty:
            body = f",{le}".join(f"        {k}: {v}" for k, v in members)
            text = f"{le}    {{{le}{body}{le}    }}"
        else:
            text = "{" + ",".join(f"{k}:{v}" for k, v in members) + "}"
        separator = "" if first else ("," if cfg.json_pretty else "," + le)
        return (separator + text).encode()


@dataclass(slots=True)
class _Part:
    """A piece of a response body: rendered rows (the first part opens with the preamble)."""

    pieces: list[bytes]
    trailer: bytes
    last: bool
    rows: int  # rows rendered in this part

    def data(self) -> bytes:
        return b"".join(self.pieces) + self.trailer

    def cut(self, line_ending: bytes) -> bytes:
        """Everything but the trailer, the last line's terminator and the end of the last line."""
        last = self.pieces[-1].removesuffix(line_ending)
        return b"".join(self.pieces[:-1]) + last[: len(last) // 2]


@dataclass(slots=True)
class _Counter:
    rows: int = 0


class _Prerendered:
    """The backlog's rows rendered once in one format, served as slices of one buffer.

    `body` holds every row of IDs 1..high_id in order, each as the feed writes it after
    another row (in JSON with its leading separator, which the first row of a response
    leaves out); `starts[n - 1]` is where the row of ID n begins.
    """

    __slots__ = ("body", "fmt", "high_id", "renderer", "skip", "starts")

    def __init__(self, fmt: str, config: SimulatorConfig, generator: CdrGenerator) -> None:
        self.fmt = fmt
        self.high_id = config.backlog
        self.renderer = _Renderer(fmt, config)
        if fmt != "json":
            self.skip = 0
        else:
            self.skip = len(b"," if config.json_pretty else ("," + config.line_ending).encode())
        body = bytearray()
        starts = array.array("q")
        row, wire_row = self.renderer.row, generator.wire_row
        for cdr_id in range(1, self.high_id + 1):
            starts.append(len(body))
            body += row(wire_row(cdr_id), False)
        starts.append(len(body))
        self.body = bytes(body)
        self.starts = starts

    def serves(self, fmt: str, query: FeedQuery, store: FeedStore, config: SimulatorConfig) -> bool:
        """True when this request's answer is a slice of the prerendered rows."""
        plain = query.date is None and not (query.calls_only or query.services_only)
        return (
            fmt == self.fmt
            and plain
            and not config.unsorted
            and store.high_id == self.high_id
            and query.from_id < self.high_id
        )

    def response(self, from_id: int, max_rows: int | None) -> tuple[bytes, memoryview, bytes, int]:
        """(preamble, rows, trailer, row count) of the answer to `fromid=from_id`."""
        last = self.high_id if max_rows is None else min(self.high_id, from_id + max_rows)
        begin = self.starts[from_id] + self.skip
        rows = memoryview(self.body)[begin : self.starts[last]]
        return self.renderer.preamble(), rows, self.renderer.trailer(), last - from_id


_Selected = tuple[int, dict[str, str]]


def _batched(items: Iterator[_Selected], n: int) -> Iterator[list[_Selected]]:
    while batch := list(itertools.islice(items, n)):
        yield batch


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the simulator received it, minus the password."""

    method: str
    path: str
    params: Mapping[str, str]  # effective parameters (POST over GET), password removed
    query: Mapping[str, str]  # from the URL, password removed
    form: Mapping[str, str]  # from the POST body, password removed
    password_in: tuple[str, ...]  # where a password was sent: "query" and/or "form"
    content_type: str
    status: int
    rows: int  # rows written, whole or (for a truncating fault) in part
    fault: str | None
    received_at: float  # time.monotonic() when the request had been read


class _BadRequestError(Exception):
    """A parameter the feed cannot serve; the message is the 400 body."""


def _form(text: str) -> dict[str, str]:
    """URL-encoded pairs; a repeated key keeps its last value, as PHP's $_GET and $_POST do."""
    return dict(parse_qsl(text, keep_blank_values=True, errors="replace"))


def _without_password(params: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if k.lower() != "password"}


def _parse_query(params: Mapping[str, str]) -> tuple[str, FeedQuery]:
    """(format, query) from the request parameters; _BadRequestError says what is wrong."""
    from_id = params.get("fromid")
    if from_id is None or from_id == "":
        raise _BadRequestError("Missing required parameter: fromid")
    if not (from_id.isascii() and from_id.isdigit()):
        raise _BadRequestError("Invalid fromid: it must be a whole number >= 0")
    fmt = (params.get("format") or "csv").lower()
    if fmt not in FORMATS:
        raise _BadRequestError("Invalid format: use csv, txt, pipe or json")
    day: date | None = None
    if params.get("date"):
        text = params["date"]
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise _BadRequestError("Invalid date: use YYYY-MM-DD")
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise _BadRequestError("Invalid date: use YYYY-MM-DD") from None
    hour: int | None = None
    if params.get("hour"):
        text = params["hour"]
        if not (text.isascii() and text.isdigit() and len(text) <= 2 and int(text) <= 23):
            raise _BadRequestError("Invalid hour: use 0 to 23")
        if day is None:
            raise _BadRequestError("Invalid hour: hour must be used together with date")
        hour = int(text)
    calls_only = params.get("callsonly") == "1"
    services_only = params.get("servicesonly") == "1"
    if calls_only and services_only:
        raise _BadRequestError("callsonly and servicesonly cannot both be set")
    return fmt, FeedQuery(int(from_id), day, hour, calls_only, services_only)


_CONTENT_TYPES: Mapping[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "txt": "text/plain; charset=utf-8",
    "pipe": "text/plain; charset=utf-8",
    "json": "application/json",
}
_HTML_ERROR = (
    "<!DOCTYPE html>\n<html>\n<head><title>Service temporarily unavailable</title></head>\n"
    "<body>\n<h1>Database error</h1>\n<p>The billing database is busy, please try again "
    "later.</p>\n</body>\n</html>\n"
)
_HTML_TYPE = "text/html; charset=UTF-8"  # what a PHP script sends when it sets nothing
_FORM_TYPE = "application/x-www-form-urlencoded"
_MAX_FORM_BYTES = 1 << 20
_PRERENDERED_CHUNK_BYTES = 1 << 18  # chunked transfer of a prerendered answer
_REDACT = re.compile(r"(password=)[^&\s'\"]*", re.IGNORECASE)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], simulator: BillingFeedSimulator) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.simulator = simulator
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up in DNS (getfqdn): slow, and not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """One connection; every request goes through `_serve`."""

    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "Apache"  # what a PHP host says, rather than Python's version

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Requests are logged by `_record`, without the query string."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s", _REDACT.sub(r"\1***", format % args))

    @property
    def sim(self) -> BillingFeedSimulator:
        return cast(_Server, self.server).simulator

    # Step 1: read the parameters; Step 2: faults that preempt everything; Step 3: auth;
    # Step 4: validate; Step 5: stream the rows (with any body fault).
    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        query = _form(split.query)
        form: dict[str, str] = {}
        content_type = self.headers.get("Content-Type", "")
        length_text = self.headers.get("Content-Length") or "0"
        length = int(length_text) if length_text.isdigit() else -1
        if 0 < length <= _MAX_FORM_BYTES:
            body = self.rfile.read(length)  # read even for GET, or keep-alive loses its place
            is_form = content_type.split(";")[0].strip().lower() in ("", _FORM_TYPE)
            if method == "POST" and is_form:
                form = _form(body.decode("utf-8", "replace"))
        params = {**query, **form}  # "Post is given priority"
        self._incoming = RequestRecord(
            method=method,
            path=split.path,
            params=_without_password(params),
            query=_without_password(query),
            form=_without_password(form),
            password_in=tuple(
                where
                for where, got in (("query", query), ("form", form))
                if any(k.lower() == "password" for k in got)
            ),
            content_type=content_type,
            status=0,
            rows=0,
            fault=None,
            received_at=time.monotonic(),
        )
        try:
            if length < 0 or length > _MAX_FORM_BYTES:
                self.close_connection = True  # the body was not read
                self._send_text(413 if length > 0 else 400, "Bad Content-Length")
            else:
                self._respond(split.path, params)
        except ConnectionError:
            logger.debug("client went away during %s %s", method, split.path)
            self.close_connection = True

    def _respond(self, path: str, params: Mapping[str, str]) -> None:
        sim, cfg = self.sim, self.sim.config
        if path != PATH:
            self._send_text(404, "Not Found")
            return
        fault, fault_params = sim._take_fault()
        delay = cfg.latency_s + (fault_params.get("seconds", 1.0) if fault == "latency" else 0.0)
        if delay > 0:
            sim._stopping.wait(delay)
        if fault in ("500", "503"):
            text = "Internal Server Error" if fault == "500" else "Service Unavailable"
            self._send_text(int(fault), text, fault=fault)
            return
        if fault == "429":
            retry_after = int(fault_params.get("retry_after", cfg.retry_after_s))
            headers = (("Retry-After", str(retry_after)),)
            self._send_text(429, "Too Many Requests", headers=headers, fault=fault)
            return
        if fault == "html":
            status = int(fault_params.get("status", 200))
            self._send_text(status, _HTML_ERROR, content_type=_HTML_TYPE, fault=fault)
            return
        login_ok = hmac.compare_digest(params.get("login", "").encode(), cfg.login.encode())
        password_ok = hmac.compare_digest(
            params.get("password", "").encode(), cfg.password.encode()
        )
        if fault == "auth_text200" or not (login_ok and password_ok):
            style = "text200" if fault == "auth_text200" else cfg.auth_failure_style
            status = 200 if style == "text200" else int(style)
            self._send_text(status, AUTH_FAILURE_TEXT, content_type=_HTML_TYPE, fault=fault)
            return
        try:
            fmt, query = _parse_query(params)
        except _BadRequestError as exc:
            self._send_text(400, str(exc), fault=fault)
            return
        body_fault = fault if fault in ("truncate", "truncate_chunked", "cut_last_line") else None
        prerendered = sim.prerendered
        if (
            body_fault is None
            and prerendered is not None
            and prerendered.serves(fmt, query, sim.store, cfg)
        ):
            self._send_prerendered(prerendered, query, fault)
            return
        self._send_feed(fmt, query, body_fault, fault)

    def _record(self, status: int, rows: int, fault: str | None) -> None:
        self.sim._record(replace(self._incoming, status=status, rows=rows, fault=fault))

    def _send_text(
        self,
        status: int,
        text: str,
        *,
        content_type: str = "text/plain; charset=utf-8",
        headers: tuple[tuple[str, str], ...] = (),
        fault: str | None = None,
    ) -> None:
        body = text.encode()
        self._record(status, 0, fault)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _parts(self, fmt: str, query: FeedQuery, counter: _Counter) -> Iterator[_Part]:
        sim, cfg = self.sim, self.sim.config
        renderer = _Renderer(fmt, cfg)
        generator = sim.generator
        shuffler = random.Random(f"unsorted {cfg.seed} {query.from_id}") if cfg.unsorted else None

        def batches() -> Iterator[list[bytes]]:
            first = True
            for batch in _batched(sim.store.select(query), cfg.batch_rows):
                if shuffler is not None:
                    shuffler.shuffle(batch)
                pieces = []
                for cdr_id, row in batch:
                    pieces.append(renderer.row(generator.wire_row(cdr_id, row), first))
                    first = False
                counter.rows += len(batch)
                yield pieces

        rendered = batches()
        current = next(rendered, None)
        if current is None:
            yield _Part([renderer.empty()], b"", True, 0)
            return
        # One batch ahead, so that the last part is known as the last (it gets the trailer).
        pieces, rows = [renderer.preamble(), *current], len(current)
        for following in rendered:
            yield _Part(pieces, b"", False, rows)
            pieces, rows = following, len(following)
        yield _Part(pieces, renderer.trailer(), True, rows)

    def _start(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_feed(
        self, fmt: str, query: FeedQuery, body_fault: str | None, fault: str | None
    ) -> None:
        sim, cfg = self.sim, self.sim.config
        le = cfg.line_ending.encode()
        counter = _Counter()
        parts = self._parts(fmt, query, counter)
        content_type = _CONTENT_TYPES[fmt]

        if body_fault in ("truncate", "truncate_chunked"):
            # Cut in the middle of a row of the first part, then hang up.
            part = next(parts)
            sent = part.cut(le)
            # The rows of this part only (the cut one included): `counter` is a batch ahead.
            self._record(200, part.rows, fault)
            self.close_connection = True
            if body_fault == "truncate":
                declared = len(part.data()) + 1024
                self._start(200, content_type, {"Content-Length": str(declared)})
                self.wfile.write(sent)
            else:
                self._start(200, content_type, {"Transfer-Encoding": "chunked"})
                self._write_chunk(sent)
            return

        cut = body_fault == "cut_last_line"
        chunks = (part.cut(le) if cut and part.last else part.data() for part in parts)
        first = next(chunks)
        second = next(chunks, None)
        if cfg.transfer == "length" or (cfg.transfer == "auto" and second is None):
            body = first + (second or b"") + b"".join(chunks)
            self._record(200, counter.rows, fault)
            self._start(200, content_type, {"Content-Length": str(len(body))})
            self.wfile.write(body)
            return
        pending = [first] if second is None else [first, second]
        try:
            write = self._start_streamed(content_type)
            for chunk in itertools.chain(pending, chunks):
                if sim._stopping.is_set():
                    self.close_connection = True
                    self._record(200, counter.rows, fault)
                    return
                write(chunk)
        except ConnectionError:
            # The client went away (it timed out, say): the request is logged all the same.
            self._record(200, counter.rows, fault)
            raise
        # Record before the final bytes: once a client has the whole body, the log has the request.
        self._record(200, counter.rows, fault)
        if cfg.transfer != "close":
            self.wfile.write(b"0\r\n\r\n")

    def _start_streamed(self, content_type: str) -> Callable[[bytes], object]:
        """Send the headers of a body of unknown length; the writer for its pieces."""
        if self.sim.config.transfer == "close":
            self.close_connection = True
            self._start(200, content_type, {"Connection": "close"})
            return self.wfile.write
        self._start(200, content_type, {"Transfer-Encoding": "chunked"})
        return self._write_chunk

    def _send_prerendered(
        self, prerendered: _Prerendered, query: FeedQuery, fault: str | None
    ) -> None:
        sim, cfg = self.sim, self.sim.config
        preamble, rows, trailer, count = prerendered.response(query.from_id, cfg.max_rows)
        content_type = _CONTENT_TYPES[prerendered.fmt]
        if cfg.transfer == "length" or (cfg.transfer == "auto" and count <= cfg.batch_rows):
            self._record(200, count, fault)
            size = len(preamble) + len(rows) + len(trailer)
            self._start(200, content_type, {"Content-Length": str(size)})
            self.wfile.write(preamble)
            self.wfile.write(rows)
            self.wfile.write(trailer)
            return
        write = self._start_streamed(content_type)
        try:
            write(preamble)
            for at in range(0, len(rows), _PRERENDERED_CHUNK_BYTES):
                if sim._stopping.is_set():
                    self.close_connection = True
                    self._record(200, count, fault)
                    return
                write(bytes(rows[at : at + _PRERENDERED_CHUNK_BYTES]))
            write(trailer)
        except ConnectionError:
            self._record(200, count, fault)
            raise
        self._record(200, count, fault)
        if cfg.transfer != "close":
            self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class BillingFeedSimulator:
    """A fake billingfeed.php on a local port, serving in a background thread."""

    def __init__(
        self, config: SimulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.generator = CdrGenerator(
            config.seed,
            start=config.start,
            mean_gap_s=config.mean_gap_s,
            jitter_s=config.jitter_s,
            accounts=config.accounts,
            malformed_rate=config.malformed_rate,
            status_fault_from_id=config.status_fault_from_id,
        )
        self.store = FeedStore(
            self.generator,
            backlog=config.backlog,
            rate_per_s=config.rate_per_s,
            clock=clock,
            max_rows=config.max_rows,
        )
        self._lock = threading.Lock()
        self._faults: deque[tuple[str, dict[str, float]]] = deque()
        self._dice = random.Random(f"cdr-streamer faults {config.seed}")
        self._turns: dict[str, int] = {}
        self._log: list[RequestRecord] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.prerendered: _Prerendered | None = None
        if config.prerender != "none":
            started = time.monotonic()
            self.prerendered = _Prerendered(config.prerender, config, self.generator)
            logger.info(
                "prerendered %d rows (%d bytes of %s) in %.1f s",
                config.backlog, len(self.prerendered.body), config.prerender,
                time.monotonic() - started,
            )  # fmt: skip

    def __enter__(self) -> BillingFeedSimulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind host:port (port 0: a free one) and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        self._stopping.clear()
        self._server = _Server((self.config.host, self.config.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="billingfeed-simulator",
            daemon=True,
        )
        self._thread.start()
        logger.info("billing feed simulator listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving; responses still streaming are cut off. Safe to call twice."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """The full URL of the endpoint, ending in /billingfeed.php."""
        if self._server is None:
            raise RuntimeError("the simulator is not running: call start()")
        host, port = self._server.server_address[:2]
        host_text = str(host)
        if ":" in host_text:
            host_text = f"[{host_text}]"  # IPv6
        return f"http://{host_text}:{port}{PATH}"

    @property
    def high_id(self) -> int:
        """The highest CDR ID that exists now."""
        return self.store.high_id

    def add(self, n: int) -> None:
        """Make `n` more CDRs exist."""
        self.store.add(n)

    def row(self, cdr_id: int) -> dict[str, str]:
        """CDR `cdr_id` as canonical text (what the feed writes unless the ID is malformed)."""
        return self.generator.row(cdr_id)

    def is_malformed(self, cdr_id: int) -> bool:
        """True if this ID's row is always written broken (see `malformed_rate`)."""
        return self.generator.is_malformed(cdr_id)

    def inject(self, fault: str, count: int = 1, **params: float) -> None:
        """Give the next `count` requests this fault (one of FAULTS), in order after earlier ones.

        Parameters: "429" retry_after (seconds; default `retry_after_s`), "latency" seconds
        (default 1), "html" status (default 200).
        """
        allowed = {"429": {"retry_after"}, "latency": {"seconds"}, "html": {"status"}}
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        unknown = set(params) - allowed.get(fault, set())
        if unknown:
            raise ValueError(f"fault {fault!r} takes no parameter {', '.join(sorted(unknown))}")
        with self._lock:
            self._faults.extend((fault, dict(params)) for _ in range(count))

    @property
    def requests(self) -> tuple[RequestRecord, ...]:
        """Every request answered so far, oldest first, without passwords.

        A request is logged once its answer is written (or the client has gone), so a
        slow answer is logged after quicker later ones: sorting restores arrival order.
        """
        with self._lock:
            return tuple(sorted(self._log, key=lambda record: record.received_at))

    @property
    def request_count(self) -> int:
        """How many requests have been received."""
        with self._lock:
            return len(self._log)

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)
        logger.info(
            "%s %s format=%s fromid=%s rows=%d status=%d%s",
            record.method,
            record.path,
            record.params.get("format") or "csv",
            record.params.get("fromid", "-"),
            record.rows,
            record.status,
            f" fault={record.fault}" if record.fault else "",
        )

    def _take_fault(self) -> tuple[str | None, dict[str, float]]:
        """The next injected fault, else one drawn with the configured rates."""
        cfg = self.config
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            rates = (
                ("error", cfg.error_rate),
                ("429", cfg.rate_limit_rate),
                ("html", cfg.html_error_rate),
                ("truncate", cfg.truncate_rate),
            )
            if not any(rate for _, rate in rates):
                return None, {}
            roll = self._dice.random()
            for kind, rate in rates:
                if roll < rate:
                    turn = self._turns[kind] = self._turns.get(kind, -1) + 1
                    if kind == "error":
                        return ("500", "503")[turn % 2], {}
                    if kind == "html":
                        return "html", {"status": (200, 500)[turn % 2]}
                    if kind == "truncate":
                        return ("truncate", "truncate_chunked")[turn % 2], {}
                    return "429", {}
                roll -= rate
        return None, {}


def serve(config: SimulatorConfig) -> None:
    """Run the simulator until KeyboardInterrupt or SIGTERM, printing its URL first."""
    stop = threading.Event()
    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if in_main:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with BillingFeedSimulator(config) as sim:
            print(f"Billing feed simulator on {sim.url} (login {config.login})", flush=True)
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


# --- files: the provider's SFTP delivery ----------------------------------------------------

Cadence = Literal["daily", "hourly", "20min"]
CADENCES: Mapping[str, timedelta] = {
    "daily": timedelta(days=1),
    "hourly": timedelta(hours=1),
    "20min": timedelta(minutes=20),
}


def file_name(period_start: datetime, fmt: str) -> str:
    """The name of the file of the period starting then: cdr_YYYYMMDD_HHMM.<format>."""
    return f"cdr_{period_start:%Y%m%d_%H%M}.{fmt}"


def write_files(
    config: SimulatorConfig,
    directory: Path,
    *,
    cadence: Cadence,
    fmt: str,
    upto_id: int | None = None,
) -> list[Path]:
    """Write the files the provider would deliver by SFTP, with the feed's data for the seed.

    CDRs 1..`upto_id` (default: `config.backlog`), one file per period of `cadence`
    (UTC, so no name repeats when the clocks go back) that holds any, by the call's
    UTCDateTime, rows in ID order, rendered as the feed renders `fmt` with the config's
    variants (header, date styles, malformed rows...). Each file is written under a
    temporary name (a dot first, so no glob on `cdr_*` matches it) and then renamed, so a
    reader never sees half a file. Returns the paths written, in period order.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if cadence not in CADENCES:
        raise ConfigError(f"cadence must be one of {', '.join(CADENCES)}, not {cadence!r}")
    last = config.backlog if upto_id is None else upto_id
    generator = CdrGenerator(
        config.seed,
        start=config.start,
        mean_gap_s=config.mean_gap_s,
        jitter_s=config.jitter_s,
        accounts=config.accounts,
        malformed_rate=config.malformed_rate,
        status_fault_from_id=config.status_fault_from_id,
    )
    directory.mkdir(parents=True, exist_ok=True)
    step = CADENCES[cadence]
    if last < 1:
        return []

    def utc_of(row: Mapping[str, str]) -> datetime:
        return datetime.strptime(row["UTCDateTime"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)

    def period_of(when: datetime) -> datetime:
        midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight + (when - midnight) // step * step

    slack = timedelta(seconds=config.jitter_s + 1)
    period = period_of(utc_of(generator.row(1)) - slack)
    end = utc_of(generator.row(last)) + slack
    written: list[Path] = []
    while period <= end:
        # Every ID whose call can fall in this period, kept if it does (jitter crosses edges).
        window = generator.ids_between(period, period + step)
        ids = range(max(1, window.start), min(last, window.stop - 1) + 1)
        rows = [
            (cdr_id, row)
            for cdr_id in ids
            if period <= utc_of(row := generator.row(cdr_id)) < period + step
        ]
        if rows:
            name = file_name(period, fmt)
            written.append(_write_file(directory / name, _Renderer(fmt, config), generator, rows))
        period += step
    return written


def _write_file(
    path: Path,
    renderer: _Renderer,
    generator: CdrGenerator,
    rows: list[tuple[int, dict[str, str]]],
) -> Path:
    """One file, written to a temporary name and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(renderer.preamble())
        for i, (cdr_id, row) in enumerate(rows):
            f.write(renderer.row(generator.wire_row(cdr_id, row), i == 0))
        f.write(renderer.trailer())
    tmp.replace(path)
    return path
