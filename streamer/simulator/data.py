"""Deterministic CDRs: (seed, cdr_id) -> one realistic NZ row; nothing is stored."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from streamer.simulator.config import (
    AUCKLAND,
    CHATHAM,
    DEFAULT_START,
    GST,
    MALFORMATIONS,
    MONEY,
    SERVICE_CALL_TYPE,
    ZERO,
)

logger = logging.getLogger("streamer.simulator")  # one name for the whole simulator

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
    "Local": ZERO, "National": Decimal("0.0900"), "Mobile": Decimal("0.1900"), "Onnet": ZERO,
    "0800": Decimal("0.0550"), "0900": Decimal("1.9900"), "Directory": ZERO,
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
    return str(value.quantize(MONEY, rounding=ROUND_HALF_UP))


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
        odd_rows: Mapping[int, str] | None = None,
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
        self._odd = dict(odd_rows or {})
        self._now_epoch = math.floor(time.time())  # "now" for future_utc, fixed per generator
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
        odd = self._odd.get(cdr_id)
        if odd == "future_utc":
            epoch = self._now_epoch + 7200
        elif odd == "before_1970":
            epoch = -86_400 * 200  # 1969-06-15
        account = self.accounts[_pick(rng, self._account_cum)]
        utc = datetime.fromtimestamp(epoch, UTC)
        local = datetime.fromtimestamp(epoch, self._zones[account.zone])
        bill_date = date(local.year + local.month // 12, local.month % 12 + 1, 1)
        if rng.random() < 0.05:
            usage = self._service(rng, account, bill_date)
        else:
            usage = self._call(rng, account, failing=0 < self._status_fault_from <= cdr_id)
        # GST on the rounded amount, so that Charge == round(ChargeExcl * 1.15) holds on the wire
        charge_excl = usage.charge_excl.quantize(MONEY, rounding=ROUND_HALF_UP)
        text_desc2 = usage.desc2
        if odd == "long_text":  # 30,000 letters that do not compress: a ~30 KB event
            text_desc2 = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=30_000))
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
            "Charge": _money(charge_excl * GST),
            "ChargeExcl": str(charge_excl),
            "FreeUnitsUsed": _money(usage.free_units),
            "TextDesc1": usage.desc1,
            "TextDesc2": text_desc2,
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
        if self._odd.get(cdr_id) == "no_id":
            return {**canonical, "ID": ""}
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
        rate = _PER_MINUTE_RATE.get(call_type, ZERO)
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
        charge_excl = free_units = ZERO
        if ok:
            charge_excl = rate * seconds / 60 + _FLAT_FEE.get(call_type, ZERO)
            if call_type in ("Mobile", "National") and rng.random() < 0.2:
                free_units, charge_excl = Decimal(seconds) / 60, ZERO  # minutes from a bundle
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
            "outbound", SERVICE_CALL_TYPE, "", "", number, 0, 0, 0, amount, ZERO, desc1, desc2,
            "", "Ok",
        )  # fmt: skip
