"""A row straight to its Kafka event: typing and Avro encoding fused into one pass.

`RowEncoder.encode(row)` gives what the sink produces for a row (`Event`: key, Avro
value, timestamp, CDR ID and the published-events counter's labels) or the row's
`Rejection`. It writes the Avro body itself from the row's text, without building a
`CallRecord` or a dict for fastavro, for the contract schema (schemas/cdr.avsc) only:

* the values that repeat (accounts, call types, dates, offsets, charges, plans,
  statuses...) are typed and encoded once and then taken from small bounded caches,
  each value by the reference parser of `records`, so a cached value is exactly what
  the reference path makes of that text;
* the rest (ID, times, numbers called) is encoded from the text by plain arithmetic,
  for the layouts the provider sends (``YYYY-MM-DD HH:MM:SS``); other layouts of a
  field go through that field's reference parser;
* anything else (a missing field, a value a reference parser refuses, an over-long
  row, a text that is not Unicode) takes the reference path for the whole row:
  `records.to_record`, then fastavro. So a rejection is always the reference path's
  own, and fastavro stays the encoder of last resort.

The framing is the caller's `header`: Avro single-object (C3 01 + fingerprint) or
the schema registry's (byte 0 + 4-byte schema id); the body is the same. A
`RowEncoder` holds no Kafka or registry object, so a worker process can run it on
rows it parsed itself.

`event_reference` is the straightforward path the tests hold `RowEncoder` to, byte
for byte: `records.to_record_reference` and fastavro with the real schema.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any, NamedTuple, Protocol, cast

from streamer.avro import (
    SINGLE_OBJECT_MARKER,
    RegistryEncoder,
    SingleObjectEncoder,
    encode_reference,
    fingerprint,
    load_schema,
    timestamp_ms,
)
from streamer.records import (
    FIELDS,
    MAX_ROW_CHARS,
    CallRecord,
    Rejection,
    Row,
    _InvalidFieldError,
    _too_long,
    parse_date,
    parse_decimal,
    parse_offset,
    parse_seconds,
    parse_time,
    parse_utc_datetime,
    to_record,
    to_record_reference,
)


class Event(NamedTuple):
    """What the sink produces for one typed row, and what its metrics need of it."""

    key: bytes  # AccountCode, UTF-8
    value: bytes  # header + Avro body
    timestamp_ms: int  # the call's UTC instant: the Kafka message timestamp
    cdr_id: int
    # The published-events labels and the usage KPIs (metrics.UsageTally) of the call.
    status: str
    direction: str
    call_type: str
    seconds: int
    network_seconds: int
    charge: Decimal
    # The call's provider-local Date and the hour of its Time: its reconciliation window.
    day: date
    hour: int

    @property
    def counters(self) -> tuple[str, str, str]:
        """(Status, Direction, CallType): the published-events counter's labels."""
        return (self.status, self.direction, self.call_type)


class RowTyper(Protocol):
    """Row -> its event or its rejection: what the sources' loops call for each row."""

    def encode(self, row: Row) -> Event | Rejection: ...


# A NamedTuple's own constructor is a Python function (about 0.4 µs): tuple.__new__
# builds the same object from C.
_new_event = cast(Callable[[type[Event], tuple[Any, ...]], Event], tuple.__new__)
_cells = itemgetter(*FIELDS)  # Row.values -> the 26 texts in the documented order
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_MS = 86_400_000
_DAYS_BEFORE_EPOCH = 719_163  # date(1970, 1, 1).toordinal()

# --- Avro's zigzag varints -------------------------------------------------------------------
#
# Avro writes int and long as the zigzag of the number (0, -1, 1, -2... -> 0, 1, 2, 3...)
# in groups of 7 bits, low group first, the high bit set on every byte but the last.
# Two tables of 14-bit groups make an ID or a time of day one or two lookups.
_GROUP = 1 << 14
_LAST = tuple(bytes([z]) if z < 0x80 else bytes([(z & 0x7F) | 0x80, z >> 7]) for z in range(_GROUP))
_MORE = tuple(bytes([(z & 0x7F) | 0x80, ((z >> 7) & 0x7F) | 0x80]) for z in range(_GROUP))


_MASK = _GROUP - 1
_TWO_GROUPS = _GROUP * _GROUP
_THREE_GROUPS = _TWO_GROUPS * _GROUP  # 2**42: epoch ms from 1970-01-04 to 2109


def _varint(z: int) -> bytes:
    """The varint of a zigzag-encoded number `z` >= 0."""
    if z < _GROUP:
        return _LAST[z]
    if z < _TWO_GROUPS:
        return _MORE[z & _MASK] + _LAST[z >> 14]
    parts = []
    while z >= _GROUP:
        parts.append(_MORE[z & _MASK])
        z >>= 14
    parts.append(_LAST[z])
    return b"".join(parts)


def _long(n: int) -> bytes:
    """Avro int or long."""
    return _varint(n << 1 if n >= 0 else (~n << 1) | 1)


def _sized(data: bytes) -> bytes:
    """Avro string or bytes: the length, then the bytes."""
    return _long(len(data)) + data


# --- caches ----------------------------------------------------------------------------------
#
# Text -> encoded bytes, one dict per field, shared by every RowEncoder of the process.
# Bounded in entries and in key length, so the worst case is known (`cache_footprint`);
# a full cache is emptied and refills with what the feed repeats now. Dict reads and
# writes are atomic under the GIL, and every value is final: threads may share them.
CACHE_ENTRIES = 2048  # per field: above the distinct values of a day's CDRs in any field cached
CACHE_TEXT_CHARS = 64  # longer texts are encoded every time, never kept

_CACHED_FIELDS = (
    "AccountCode", "Direction", "CallType", "BillDate", "Date", "UTCDateTime (day)",
    "UTCOffset", "Seconds", "NetworkSeconds", "ConnectSeconds", "Charge", "ChargeExcl",
    "FreeUnitsUsed", "TextDesc1", "TextDesc2", "ReleaseCause", "Status", "ServiceType",
    "BillingGroup", "CallingGroup", "Profile",
)  # fmt: skip
_CACHES: dict[str, dict[str, Any]] = {name: {} for name in _CACHED_FIELDS}
_ACCOUNTS: dict[str, tuple[bytes, bytes]] = _CACHES["AccountCode"]
_DIRECTIONS: dict[str, bytes] = _CACHES["Direction"]
_CALL_TYPES: dict[str, bytes] = _CACHES["CallType"]
_BILL_DATES: dict[str, bytes] = _CACHES["BillDate"]
# Date keeps its value beside its encoding: the event's reconciliation window.
_DATES: dict[str, tuple[bytes, date]] = _CACHES["Date"]
_UTC_DAYS: dict[str, int] = _CACHES["UTCDateTime (day)"]
_OFFSETS: dict[str, bytes] = _CACHES["UTCOffset"]
# Seconds, NetworkSeconds and Charge keep their value beside its encoding, for the KPIs.
_SECONDS: dict[str, tuple[bytes, int]] = _CACHES["Seconds"]
_NETWORK_SECONDS: dict[str, tuple[bytes, int]] = _CACHES["NetworkSeconds"]
_CONNECT_SECONDS: dict[str, bytes] = _CACHES["ConnectSeconds"]
_CHARGES: dict[str, tuple[bytes, Decimal]] = _CACHES["Charge"]
_CHARGES_EXCL: dict[str, bytes] = _CACHES["ChargeExcl"]
_FREE_UNITS: dict[str, bytes] = _CACHES["FreeUnitsUsed"]
_DESCS1: dict[str, bytes] = _CACHES["TextDesc1"]
_DESCS2: dict[str, bytes] = _CACHES["TextDesc2"]
_RELEASES: dict[str, bytes] = _CACHES["ReleaseCause"]
_STATUSES: dict[str, bytes] = _CACHES["Status"]
_SERVICES: dict[str, bytes] = _CACHES["ServiceType"]
_BILLING_GROUPS: dict[str, bytes] = _CACHES["BillingGroup"]
_CALLING_GROUPS: dict[str, bytes] = _CACHES["CallingGroup"]
_PROFILES: dict[str, bytes] = _CACHES["Profile"]

# Fixed tables, not caches: "HH:MM" (00:00..23:59) and "SS" (00..59) -> milliseconds.
_HOUR_MINUTES = {f"{h:02}:{m:02}": (h * 60 + m) * 60_000 for h in range(24) for m in range(60)}
_SECONDS_OF_MINUTE = {f"{s:02}": s * 1000 for s in range(60)}


def _remember(cache: dict[str, Any], text: str, value: Any) -> Any:
    if len(text) <= CACHE_TEXT_CHARS:
        if len(cache) >= CACHE_ENTRIES:
            cache.clear()
        cache[text] = value
    return value


def _string(cache: dict[str, bytes], text: str) -> bytes:
    return cast(bytes, _remember(cache, text, _sized(text.encode("utf-8"))))


def _account(text: str) -> tuple[bytes, bytes]:
    account = text.strip()
    if not account:
        raise _NotFastError  # empty_account: the reference path words the rejection
    key = account.encode("utf-8")
    return cast(tuple[bytes, bytes], _remember(_ACCOUNTS, text, (key, _sized(key))))


def _date(cache: dict[str, bytes], text: str) -> bytes:
    days = parse_date(text, "").toordinal() - _DAYS_BEFORE_EPOCH
    return cast(bytes, _remember(cache, text, _long(days)))


def _date_valued(cache: dict[str, tuple[bytes, date]], text: str) -> tuple[bytes, date]:
    value = parse_date(text, "")
    encoded = _long(value.toordinal() - _DAYS_BEFORE_EPOCH)
    return cast(tuple[bytes, date], _remember(cache, text, (encoded, value)))


def _seconds(cache: dict[str, bytes], text: str) -> bytes:
    return cast(bytes, _remember(cache, text, _long(parse_seconds(text, ""))))


def _seconds_valued(cache: dict[str, tuple[bytes, int]], text: str) -> tuple[bytes, int]:
    n = parse_seconds(text, "")
    return cast(tuple[bytes, int], _remember(cache, text, (_long(n), n)))


def _utc_day_ms(text: str) -> int:
    """'YYYY-MM-DD' -> its UTC midnight in epoch ms; `_NotFastError` for any other text."""
    if not (
        len(text) == 10
        and text[4] == "-" == text[7]
        and text.isascii()
        and (text[:4] + text[5:7] + text[8:]).isdigit()
    ):
        raise _NotFastError
    try:
        days = date.fromisoformat(text).toordinal() - _DAYS_BEFORE_EPOCH
    except ValueError:
        raise _NotFastError from None
    return cast(int, _remember(_UTC_DAYS, text, days * _DAY_MS))


def _time_ms(text: str) -> int:
    """Time of day in ms through the reference parser (layouts other than HH:MM:SS)."""
    t = parse_time(text)
    # As avro._time_millis: sub-millisecond digits truncated.
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1000 + t.microsecond // 1000


def _utc_ms(text: str) -> int:
    """UTCDateTime in epoch ms through the reference parser (layouts other than the usual)."""
    delta = parse_utc_datetime(text) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


class _NotFastError(Exception):
    """Internal: this row takes the reference path."""


class _Decimals:
    """Decimal text -> Avro bytes for one decimal type, typed by a reference parser."""

    def __init__(self, field_schema: dict[str, Any], parse: Callable[[str], Decimal]) -> None:
        from fastavro.write import LOGICAL_WRITERS

        self._schema = field_schema
        self._parse = parse
        # fastavro's own conversion (and its checks of scale and precision).
        self._prepare = LOGICAL_WRITERS["bytes-decimal"]

    def __call__(self, cache: dict[str, bytes], text: str) -> bytes:
        data = cast(bytes, self._prepare(self._parse(text), self._schema))
        return cast(bytes, _remember(cache, text, _sized(data)))

    def valued(self, cache: dict[str, tuple[bytes, Decimal]], text: str) -> tuple[bytes, Decimal]:
        """The encoding and the value itself."""
        value = self._parse(text)
        data = cast(bytes, self._prepare(value, self._schema))
        return cast(tuple[bytes, Decimal], _remember(cache, text, (_sized(data), value)))


_CONTRACT = load_schema()
_CONTRACT_HEADER = SINGLE_OBJECT_MARKER + fingerprint(_CONTRACT)
_TYPES = {f["name"]: f["type"] for f in _CONTRACT["fields"]}
_offset_bytes = _Decimals(_TYPES["UTCOffset"], parse_offset)
_money_bytes = _Decimals(_TYPES["Charge"], lambda text: parse_decimal(text, ""))
if [f["name"] for f in _CONTRACT["fields"]] != list(FIELDS) or not (
    _TYPES["Charge"] == _TYPES["ChargeExcl"] == _TYPES["FreeUnitsUsed"]
):
    raise AssertionError("RowEncoder writes the fields of schemas/cdr.avsc in FIELDS order")


class RowEncoder:
    """Row -> `Event` (header + Avro body of the contract schema) or `Rejection`.

    `header` is the framing before the body: `avro.SingleObjectEncoder().header`, or the
    registry's byte 0 + schema id. Plain data in, plain data out: picklable, no I/O.
    """

    def __init__(self, header: bytes = _CONTRACT_HEADER) -> None:
        self.header = header
        self._records = SingleObjectEncoder(_CONTRACT)  # the reference path's encoder

    def __reduce__(self) -> tuple[type[RowEncoder], tuple[bytes]]:
        return (RowEncoder, (self.header,))

    def encode(self, row: Row) -> Event | Rejection:
        """The row's event, or its rejection (with the reference path's reason and detail)."""
        try:
            if len(row.raw) > MAX_ROW_CHARS:
                raise _NotFastError
            (
                id_text, account, direction, call_type, bill_date, day, tod, utc, offset,
                a_party, b_party, bill_number, seconds, network_seconds, connect_seconds,
                charge, charge_excl, free_units, desc1, desc2, release, status, service,
                billing_group, calling_group, profile,
            ) = _cells(row.values)  # fmt: skip
            # ID: a positive whole number of at most 18 digits, as records.parse_id takes
            # it; other spellings (" 12", "12.0", "007") go the reference way.
            if not (
                id_text.isdigit() and id_text.isascii() and len(id_text) <= 18
                and id_text[0] != "0"
            ):  # fmt: skip
                raise _NotFastError
            cdr_id = int(id_text)
            key, account_avro = _ACCOUNTS.get(account) or _account(account)
            # Time "HH:MM:SS" and UTCDateTime "YYYY-MM-DD HH:MM:SS" from the tables;
            # every other layout through the field's reference parser.
            hm = _HOUR_MINUTES.get(tod[:5])
            ss = _SECONDS_OF_MINUTE.get(tod[6:])
            tod_ms = _time_ms(tod) if hm is None or ss is None or tod[5] != ":" else hm + ss
            hm = _HOUR_MINUTES.get(utc[11:16])
            ss = _SECONDS_OF_MINUTE.get(utc[17:])
            if hm is None or ss is None or utc[10] != " " or utc[16] != ":":
                ts = _utc_ms(utc)
            else:
                ts = (_UTC_DAYS.get(utc[:10]) or _utc_day_ms(utc[:10])) + hm + ss
            # The varints every event has, as table entries straight into the join: an ID
            # below 2**27 is two of them, a time of day two, an epoch ms of 1970-2109 three.
            z = cdr_id << 1
            if _GROUP <= z < _TWO_GROUPS:
                id1, id2 = _MORE[z & _MASK], _LAST[z >> 14]
            else:
                id1, id2 = _varint(z), b""
            z = tod_ms << 1  # below 2**28: a time of day is at most 86,399,999 ms
            if z >= _GROUP:
                tod1, tod2 = _MORE[z & _MASK], _LAST[z >> 14]
            else:
                tod1, tod2 = _LAST[z], b""
            z = ts << 1
            if _TWO_GROUPS <= z < _THREE_GROUPS:
                ts1, ts2, ts3 = _MORE[z & _MASK], _MORE[(z >> 14) & _MASK], _LAST[z >> 28]
            else:
                ts1, ts2, ts3 = _long(ts), b"", b""
            seconds_avro, seconds_n = _SECONDS.get(seconds) or _seconds_valued(_SECONDS, seconds)
            network_avro, network_n = _NETWORK_SECONDS.get(network_seconds) or _seconds_valued(
                _NETWORK_SECONDS, network_seconds
            )
            charge_avro, charge_value = _CHARGES.get(charge) or _money_bytes.valued(
                _CHARGES, charge
            )
            day_avro, day_value = _DATES.get(day) or _date_valued(_DATES, day)
            a = a_party.encode("utf-8")
            b = b_party.encode("utf-8")
            n = bill_number.encode("utf-8")
            # A zigzag n is 2n: lengths below 8192 bytes are one lookup (else IndexError).
            value = b"".join((
                self.header,
                id1, id2,
                account_avro,
                _DIRECTIONS.get(direction) or _string(_DIRECTIONS, direction),
                _CALL_TYPES.get(call_type) or _string(_CALL_TYPES, call_type),
                _BILL_DATES.get(bill_date) or _date(_BILL_DATES, bill_date),
                day_avro,
                tod1, tod2,
                ts1, ts2, ts3,
                _OFFSETS.get(offset) or _offset_bytes(_OFFSETS, offset),
                _LAST[len(a) << 1], a,
                _LAST[len(b) << 1], b,
                _LAST[len(n) << 1], n,
                seconds_avro,
                network_avro,
                _CONNECT_SECONDS.get(connect_seconds)
                or _seconds(_CONNECT_SECONDS, connect_seconds),
                charge_avro,
                _CHARGES_EXCL.get(charge_excl) or _money_bytes(_CHARGES_EXCL, charge_excl),
                _FREE_UNITS.get(free_units) or _money_bytes(_FREE_UNITS, free_units),
                _DESCS1.get(desc1) or _string(_DESCS1, desc1),
                _DESCS2.get(desc2) or _string(_DESCS2, desc2),
                _RELEASES.get(release) or _string(_RELEASES, release),
                _STATUSES.get(status) or _string(_STATUSES, status),
                _SERVICES.get(service) or _string(_SERVICES, service),
                _BILLING_GROUPS.get(billing_group) or _string(_BILLING_GROUPS, billing_group),
                _CALLING_GROUPS.get(calling_group) or _string(_CALLING_GROUPS, calling_group),
                _PROFILES.get(profile) or _string(_PROFILES, profile),
            ))  # fmt: skip
        except (_NotFastError, _InvalidFieldError, KeyError, IndexError, ValueError):
            # ValueError includes UnicodeEncodeError (a lone surrogate): fastavro raises it.
            return self._reference(row)
        return _new_event(
            Event,
            (key, value, ts, cdr_id, status, direction, call_type, seconds_n, network_n,
             charge_value, day_value, tod_ms // 3_600_000),
        )  # fmt: skip

    def _reference(self, row: Row) -> Event | Rejection:
        """The row through `records.to_record` and fastavro."""
        record = to_record(row)
        if isinstance(record, Rejection):
            return record
        body = self._records.encode(record)[len(self._records.header) :]
        return event_of(record, self.header + body)


def event_of(record: CallRecord, value: bytes) -> Event:
    """The event of a typed record whose value `value` some encoder wrote."""
    return Event(
        record.account_code.encode("utf-8"), value, timestamp_ms(record), record.id,
        record.status, record.direction, record.call_type, record.seconds,
        record.network_seconds, record.charge, record.date, record.time.hour,
    )  # fmt: skip


def event_reference(row: Row, header: bytes = _CONTRACT_HEADER) -> Event | Rejection:
    """`RowEncoder.encode`, the straightforward way: what it must always agree with."""
    if len(row.raw) > MAX_ROW_CHARS:
        return _too_long(row)
    record = to_record_reference(row)
    if isinstance(record, Rejection):
        return record
    return event_of(record, encode_reference(_CONTRACT, record, header))


class _RecordRows:
    """Any other encoder (another schema, a test's): `to_record`, then `encoder.encode`."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder

    def encode(self, row: Row) -> Event | Rejection:
        record = to_record(row)
        if isinstance(record, Rejection):
            return record
        return event_of(record, self._encoder.encode(record))


class _RegistryRows:
    """Registry framing: the first event goes through the registry encoder; from then on
    (the schema registered or looked up, its id known) the fast path, with that framing."""

    def __init__(self, encoder: RegistryEncoder) -> None:
        self._encoder = encoder
        self._settled: RowTyper | None = None

    @property
    def header(self) -> bytes | None:
        """The framing (byte 0 + schema id) once the first event was encoded, else None."""
        return self._settled.header if isinstance(self._settled, RowEncoder) else None

    def encode(self, row: Row) -> Event | Rejection:
        if self._settled is not None:
            return self._settled.encode(row)
        record = to_record(row)
        if isinstance(record, Rejection):
            return record
        value = self._encoder.encode(record)  # registry errors raise here, translated
        body = encode_reference(_CONTRACT, record, b"\0")[1:]
        if value[:1] == b"\0" and value.endswith(body):
            self._settled = RowEncoder(value[: len(value) - len(body)])
        else:  # the serializer wrote another body (a rule, another schema): keep to it
            self._settled = _RecordRows(self._encoder)
        return event_of(record, value)


def row_encoder(encoder: object) -> RowTyper:
    """The fast path for an event encoder (`avro.make_encoder`'s), when it has one.

    Single-object encoding of the contract schema: `RowEncoder`. Registry framing: the
    same, once the registry gave the schema id. Any other encoder: typing, then that
    encoder, as before the fast path.
    """
    if isinstance(encoder, SingleObjectEncoder) and encoder.header == _CONTRACT_HEADER:
        return RowEncoder(encoder.header)
    if isinstance(encoder, RegistryEncoder):
        return _RegistryRows(encoder)
    return _RecordRows(encoder)


def cache_footprint() -> dict[str, tuple[int, int]]:
    """Per cache: (entries, bytes held: the dict, its keys and its values)."""
    footprint = {}
    for name, cache in _CACHES.items():
        size = sys.getsizeof(cache)
        for text, value in cache.items():
            size += sys.getsizeof(text)
            if isinstance(value, tuple):
                size += sys.getsizeof(value) + sum(sys.getsizeof(v) for v in value)
            else:
                size += sys.getsizeof(value)
        footprint[name] = (len(cache), size)
    return footprint


def clear_caches() -> None:
    """Empty every cache (tests and benchmarks)."""
    for cache in _CACHES.values():
        cache.clear()
