"""The typed CDR record, the rejected row, and row -> record validation.

The provider documents 26 fields but not their text layout, so each parser here
accepts every plausible layout of its type and rejects the rest with a stable
reason code that downstream teams can count and alert on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields, make_dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, cast

# The documented order: used when a response has no header row.
FIELDS: tuple[str, ...] = (
    "ID",
    "AccountCode",
    "Direction",
    "CallType",
    "BillDate",
    "Date",
    "Time",
    "UTCDateTime",
    "UTCOffset",
    "AParty",
    "BParty",
    "BillNumber",
    "Seconds",
    "NetworkSeconds",
    "ConnectSeconds",
    "Charge",
    "ChargeExcl",
    "FreeUnitsUsed",
    "TextDesc1",
    "TextDesc2",
    "ReleaseCause",
    "Status",
    "ServiceType",
    "BillingGroup",
    "CallingGroup",
    "Profile",
)

# Stable reason codes for rejected rows (the dead-letter topic and the metrics use them).
REASONS: tuple[str, ...] = (
    "wrong_field_count",  # a delimited row whose field count is not the header's / 26
    "missing_field",  # a JSON object or header lacking a documented field
    "bad_json",  # a JSON array element that is not an object
    "bad_json_element",  # an array element that is not valid JSON (parsing resumed after it)
    "unclosed_quote",  # a delimited row whose opening quote never closes (resumed at the next line)
    "bad_encoding",  # bytes that are not text in the feed's encoding
    "bad_id",  # ID not a positive integer
    "empty_account",  # AccountCode empty: there is no key to publish under
    "bad_date",  # BillDate or Date not a date
    "bad_time",  # Time not a time of day
    "bad_datetime",  # UTCDateTime not a date and time
    "bad_offset",  # UTCOffset not an offset in hours
    "bad_integer",  # Seconds, NetworkSeconds or ConnectSeconds not a whole number >= 0
    "bad_decimal",  # Charge, ChargeExcl or FreeUnitsUsed not an exact decimal
    "row_too_long",  # longer than MAX_ROW_CHARS (of any length): no CDR is, Kafka would refuse it
    "bad_file",  # an SFTP file that is not a feed file at all (one dead letter for the file)
    "kafka_rejected",  # a valid CDR whose event Kafka refuses (policy, record, size)
)

# A CDR row is a few hundred characters. Far longer ones are rejected before they can
# make an event over the broker's message.max.bytes (1 MB), which Kafka would refuse
# on every retry and so stall the feed.
MAX_ROW_CHARS = 100_000

# Decimals are carried at this scale (Avro decimal(18, 6)): more digits would be rounded.
DECIMAL_SCALE = 6
DECIMAL_PRECISION = 18


@dataclass(frozen=True, slots=True)
class Row:
    """One row as the feed gave it: field name -> text, plus the raw text for dead letters.

    `codec` is the codec `raw` was decoded with, so that a dead letter can give back the
    row's original bytes (`raw.encode(codec)`) without every row carrying them. It is a
    class attribute: a third field would cost every row about 0.6 µs to build (a tenth
    of the parse stage), so rows of another codec are instances of `row_class(codec)`.
    """

    values: dict[str, str]
    raw: str
    codec: ClassVar[str] = "utf-8"


class _Cp1252Row(Row):
    __slots__ = ()
    codec = "cp1252"


class _Latin1Row(Row):
    __slots__ = ()
    codec = "latin-1"


_ROW_CLASSES: dict[str, type[Row]] = {"utf-8": Row, "cp1252": _Cp1252Row, "latin-1": _Latin1Row}


def row_class(codec: str) -> type[Row]:
    """The Row type of rows decoded with `codec` (utf-8, cp1252 or latin-1)."""
    return _ROW_CLASSES[codec]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that could not become a record; it goes to the dead-letter topic.

    `raw` is always valid Unicode (best effort). `raw_bytes` are the row's original
    bytes when they are not `raw` in UTF-8 (another encoding, bytes that are not text,
    a row cut to its start); `raw_chars` is the row's full length when `raw` holds
    only its start.
    """

    reason: str
    detail: str
    raw: str
    cdr_id: int | None = None
    raw_bytes: bytes | None = None
    raw_chars: int | None = None

    def original_bytes(self) -> bytes:
        """The row's bytes as the source sent them (as far as they were kept)."""
        if self.raw_bytes is not None:
            return self.raw_bytes
        return self.raw.encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One billed CDR with every documented field typed."""

    id: int
    account_code: str
    direction: str
    call_type: str
    bill_date: date
    date: date
    time: time
    utc_datetime: datetime
    utc_offset: Decimal
    a_party: str
    b_party: str
    bill_number: str
    seconds: int
    network_seconds: int
    connect_seconds: int
    charge: Decimal
    charge_excl: Decimal
    free_units_used: Decimal
    text_desc1: str
    text_desc2: str
    release_cause: str
    status: str
    service_type: str
    billing_group: str
    calling_group: str
    profile: str


class _InvalidFieldError(Exception):
    """Internal: one field failed to parse; carries the reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_DATE_ISO = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})\Z")
_DATE_NZ = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})\Z")  # New Zealand writes day first
_DATE_COMPACT = re.compile(r"(\d{4})(\d{2})(\d{2})\Z")
_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?\Z")
_OFFSET_HHMM = re.compile(r"([+-]?)(\d{1,2}):?(\d{2})\Z")
_UTC_SUFFIX = re.compile(r"(?:Z|UTC|GMT|[+-]00:?00)\Z", re.IGNORECASE)


def parse_date(text: str, field: str = "Date") -> date:
    """YYYY-MM-DD, DD/MM/YYYY (New Zealand order) or YYYYMMDD."""
    s = text.strip()
    m = _DATE_ISO.match(s)
    if m:
        y, mo, d = int(m[1]), int(m[2]), int(m[3])
    elif m := _DATE_NZ.match(s):
        d, mo, y = int(m[1]), int(m[2]), int(m[3])
    elif m := _DATE_COMPACT.match(s):
        y, mo, d = int(m[1]), int(m[2]), int(m[3])
    else:
        raise _InvalidFieldError(
            "bad_date", f"{field} {text!r} is not a date (YYYY-MM-DD or DD/MM/YYYY)"
        )
    try:
        return date(y, mo, d)
    except ValueError as exc:
        raise _InvalidFieldError("bad_date", f"{field} {text!r} is not a date: {exc}") from None


def parse_time(text: str) -> time:
    """HH:MM:SS, HH:MM or HH:MM:SS.ffffff."""
    m = _TIME.match(text.strip())
    if not m:
        raise _InvalidFieldError("bad_time", f"Time {text!r} is not a time of day (HH:MM:SS)")
    hour, minute, second = int(m[1]), int(m[2]), int(m[3] or 0)
    micro = int((m[4] or "0").ljust(6, "0"))
    try:
        return time(hour, minute, second, micro)
    except ValueError as exc:
        raise _InvalidFieldError("bad_time", f"Time {text!r} is not a time of day: {exc}") from None


def parse_utc_datetime(text: str) -> datetime:
    """A UTC date and time: 'YYYY-MM-DD HH:MM:SS', ISO 8601 with T, Z or +00:00, or DD/MM/YYYY.

    An explicit non-UTC offset is converted to UTC; a naive value is taken as UTC,
    which is what the field's name promises.
    """
    s = text.strip()
    if not s:
        raise _InvalidFieldError("bad_datetime", "UTCDateTime is empty")
    bare = _UTC_SUFFIX.sub("", s).strip()
    sep = "T" if "T" in bare else " "
    day_part, _, time_part = bare.partition(sep)
    try:
        if _DATE_NZ.match(day_part) or _DATE_COMPACT.match(day_part):
            d = parse_date(day_part, "UTCDateTime")
            t = parse_time(time_part) if time_part else time(0)
            return datetime.combine(d, t, UTC)
        parsed = datetime.fromisoformat(s.replace("UTC", "").replace("GMT", "").strip())
    except (_InvalidFieldError, ValueError):
        raise _InvalidFieldError(
            "bad_datetime", f"UTCDateTime {text!r} is not a date and time"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 has no UTC instant in datetime's range
        raise _InvalidFieldError("bad_datetime", f"UTCDateTime {text!r} is out of range") from None


def parse_offset(text: str) -> Decimal:
    """Hours east of UTC: '13', '+13', '12.75', '+12:45', '+1245'. Must be whole quarter hours."""
    s = text.strip()
    m = _OFFSET_HHMM.match(s)
    if m and (":" in s or len(m[2]) + len(m[3]) == 4):
        hours = Decimal(int(m[2])) + Decimal(int(m[3])) / 60
        value = -hours if m[1] == "-" else hours
    else:
        try:
            value = Decimal(s)
        except InvalidOperation:
            raise _InvalidFieldError(
                "bad_offset", f"UTCOffset {text!r} is not an offset in hours"
            ) from None
        if not value.is_finite():
            raise _InvalidFieldError("bad_offset", f"UTCOffset {text!r} is not an offset in hours")
    if not Decimal(-12) <= value <= Decimal(14) or (value * 4) % 1 != 0:
        raise _InvalidFieldError("bad_offset", f"UTCOffset {text!r} is not a real time zone offset")
    return value.quantize(Decimal("0.01"))


def parse_seconds(text: str, field: str) -> int:
    """A whole number of seconds >= 0; empty (a service fee) means 0."""
    s = text.strip()
    if not s:
        return 0
    if s.endswith(".0"):  # JSON numbers written as floats
        s = s[:-2]
    # Nine digits at most: the field is an Avro int (32 bits), and int() of a junk
    # cell of thousands of digits would hit Python's own limit.
    if not s.isdigit() or not s.isascii() or len(s) > 9:
        raise _InvalidFieldError(
            "bad_integer", f"{field} {text!r} is not a whole number of seconds"
        )
    return int(s)


_DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_SCALE)
_DECIMAL_LIMIT = Decimal(10) ** (DECIMAL_PRECISION - DECIMAL_SCALE)


def parse_decimal(text: str, field: str) -> Decimal:
    """An exact decimal (never a float); empty means 0; '$' and thousands commas are allowed."""
    s = text.strip().replace(",", "").replace("$", "")
    if not s:
        return Decimal(0).quantize(_DECIMAL_QUANTUM)
    try:
        value = Decimal(s)
    except InvalidOperation:
        raise _InvalidFieldError(
            "bad_decimal", f"{field} {text!r} is not a decimal amount"
        ) from None
    if not value.is_finite() or abs(value) >= _DECIMAL_LIMIT:
        raise _InvalidFieldError("bad_decimal", f"{field} {text!r} is out of range")
    quantized = value.quantize(_DECIMAL_QUANTUM)
    if quantized != value:  # rounding money silently is not an option
        raise _InvalidFieldError(
            "bad_decimal", f"{field} {text!r} has more than {DECIMAL_SCALE} decimals"
        )
    return quantized


def parse_id(text: str) -> int:
    """A positive whole number."""
    s = text.strip()
    if s.endswith(".0"):
        s = s[:-2]
    # 18 digits at most: the field is an Avro long, and junk must not reach int().
    if not s.isdigit() or not s.isascii() or len(s) > 18 or int(s) <= 0:
        raise _InvalidFieldError("bad_id", f"ID {text!r} is not a positive whole number")
    return int(s)


def to_record_reference(row: Row) -> CallRecord | Rejection:
    """Type one row, the straightforward way: what `to_record` must always agree with."""
    v = row.values
    cdr_id: int | None = None
    try:
        cdr_id = parse_id(v["ID"])
        account = v["AccountCode"].strip()
        if not account:
            raise _InvalidFieldError(
                "empty_account", "AccountCode is empty: there is no key to publish under"
            )
        return CallRecord(
            id=cdr_id,
            account_code=account,
            direction=v["Direction"],
            call_type=v["CallType"],
            bill_date=parse_date(v["BillDate"], "BillDate"),
            date=parse_date(v["Date"], "Date"),
            time=parse_time(v["Time"]),
            utc_datetime=parse_utc_datetime(v["UTCDateTime"]),
            utc_offset=parse_offset(v["UTCOffset"]),
            a_party=v["AParty"],
            b_party=v["BParty"],
            bill_number=v["BillNumber"],
            seconds=parse_seconds(v["Seconds"], "Seconds"),
            network_seconds=parse_seconds(v["NetworkSeconds"], "NetworkSeconds"),
            connect_seconds=parse_seconds(v["ConnectSeconds"], "ConnectSeconds"),
            charge=parse_decimal(v["Charge"], "Charge"),
            charge_excl=parse_decimal(v["ChargeExcl"], "ChargeExcl"),
            free_units_used=parse_decimal(v["FreeUnitsUsed"], "FreeUnitsUsed"),
            text_desc1=v["TextDesc1"],
            text_desc2=v["TextDesc2"],
            release_cause=v["ReleaseCause"],
            status=v["Status"],
            service_type=v["ServiceType"],
            billing_group=v["BillingGroup"],
            calling_group=v["CallingGroup"],
            profile=v["Profile"],
        )
    except _InvalidFieldError as exc:
        return Rejection(exc.reason, exc.detail, row.raw, cdr_id, _bytes_of(row))
    except KeyError as exc:
        detail = f"field {exc.args[0]} is missing"
        return Rejection("missing_field", detail, row.raw, cdr_id, _bytes_of(row))


def _bytes_of(row: Row) -> bytes | None:
    """The original bytes of a row decoded with another codec than UTF-8 (rejections only)."""
    return None if row.codec == "utf-8" else row.raw.encode(row.codec, "surrogateescape")


def local_time_of(record: CallRecord) -> datetime:
    """The call's local wall-clock time as UTCDateTime + UTCOffset (for consistency checks)."""
    return (record.utc_datetime + timedelta(hours=float(record.utc_offset))).replace(tzinfo=None)


# --- the fast path ---------------------------------------------------------------------------
#
# `to_record` is on the hot path (every CDR, about a tenth of the streamer's CPU before
# this path existed). It types the layouts the provider actually sends with fewer
# calls: ISO dates and times through the C `fromisoformat`, repeated texts (dates,
# offsets, charges: a few hundred distinct values in 100k CDRs) from small caches,
# and the record built without the frozen dataclass's 26 `object.__setattr__` calls.
# Anything unusual (other layouts, blanks, junk, a missing field) goes to
# `to_record_reference`, so a rejection is always the reference path's own; the
# tests check that both give equal results for generated rows.

_CACHE_LIMIT = 4096  # entries per cache: far above the distinct values of a day's CDRs
_dates: dict[str, date] = {}
_offsets: dict[str, Decimal] = {}
_decimals: dict[str, Decimal] = {}

# A slotted, not frozen, twin of CallRecord with the same slots in the same order: an
# instance is built at plain-class speed, then becomes a CallRecord by __class__
# assignment (Python allows it between classes of the same layout). What comes out is
# an ordinary, frozen CallRecord.
_CallRecordBuilder = make_dataclass(
    "_CallRecordBuilder", [(f.name, f.type) for f in fields(CallRecord)], slots=True
)


def _cached(cache: dict[str, Any], text: str, parse: Callable[[str, str], Any]) -> Any:
    """`parse(text)` (a reference parser), remembered; an error is raised, never cached."""
    value = parse(text, "")  # the field name only shows in an error's message
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[text] = value
    return value


def _offset(text: str, _field: str) -> Decimal:
    return parse_offset(text)


def to_record(row: Row) -> CallRecord | Rejection:
    """Type one row; a field that cannot be typed makes the whole row a `Rejection`."""
    if len(row.raw) > MAX_ROW_CHARS:
        return _too_long(row)
    v = row.values
    try:
        id_text = v["ID"]
        time_text = v["Time"]
        utc_text = v["UTCDateTime"]
        seconds = v["Seconds"]
        network_seconds = v["NetworkSeconds"]
        connect_seconds = v["ConnectSeconds"]
        account = v["AccountCode"].strip()
        if not (
            account
            and id_text.isdigit()
            and id_text.isascii()
            and len(id_text) <= 18
            and id_text[0] != "0"
            # HH:MM:SS and YYYY-MM-DD HH:MM:SS, nothing else: fromisoformat takes more
            # layouts (offsets, week dates, fractions), which the reference treats its
            # own way; at these lengths and separators it takes ASCII digits only.
            and len(time_text) == 8
            and time_text[2] == ":" == time_text[5]
            and time_text.isascii()
            and len(utc_text) == 19
            and utc_text[4] == "-" == utc_text[7]
            and utc_text[10] == " "
            and utc_text[13] == ":" == utc_text[16]
            and utc_text.isascii()
            and seconds.isdigit()
            and network_seconds.isdigit()
            and connect_seconds.isdigit()
            and len(seconds) <= 9
            and len(network_seconds) <= 9
            and len(connect_seconds) <= 9
            and (seconds + network_seconds + connect_seconds).isascii()
        ):
            return to_record_reference(row)
        # Cached values are looked up inline: a call per field is what this path saves.
        bill_date = _dates.get(v["BillDate"])
        if bill_date is None:
            bill_date = _cached(_dates, v["BillDate"], parse_date)
        day = _dates.get(v["Date"])
        if day is None:
            day = _cached(_dates, v["Date"], parse_date)
        offset = _offsets.get(v["UTCOffset"])
        if offset is None:
            offset = _cached(_offsets, v["UTCOffset"], _offset)
        charge = _decimals.get(v["Charge"])
        if charge is None:
            charge = _cached(_decimals, v["Charge"], parse_decimal)
        charge_excl = _decimals.get(v["ChargeExcl"])
        if charge_excl is None:
            charge_excl = _cached(_decimals, v["ChargeExcl"], parse_decimal)
        free_units = _decimals.get(v["FreeUnitsUsed"])
        if free_units is None:
            free_units = _cached(_decimals, v["FreeUnitsUsed"], parse_decimal)
        record = _CallRecordBuilder(
            int(id_text),
            account,
            v["Direction"],
            v["CallType"],
            bill_date,
            day,
            time.fromisoformat(time_text),
            datetime.fromisoformat(utc_text).replace(tzinfo=UTC),
            offset,
            v["AParty"],
            v["BParty"],
            v["BillNumber"],
            int(seconds),
            int(network_seconds),
            int(connect_seconds),
            charge,
            charge_excl,
            free_units,
            v["TextDesc1"],
            v["TextDesc2"],
            v["ReleaseCause"],
            v["Status"],
            v["ServiceType"],
            v["BillingGroup"],
            v["CallingGroup"],
            v["Profile"],
        )
    except (KeyError, ValueError, _InvalidFieldError):
        return to_record_reference(row)
    record.__class__ = CallRecord
    return cast(CallRecord, record)


def _too_long(row: Row) -> Rejection:
    try:
        cdr_id: int | None = parse_id(row.values.get("ID", ""))
    except _InvalidFieldError:
        cdr_id = None
    return Rejection(
        "row_too_long",
        f"row of {len(row.raw)} characters (at most {MAX_ROW_CHARS})",
        row.raw,
        cdr_id,
        _bytes_of(row),
    )
