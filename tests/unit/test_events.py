"""The fused fast path (`events.RowEncoder`) against the reference path, byte for byte.

The reference is `events.event_reference`: `records.to_record_reference`, then fastavro's
`schemaless_writer` with the real schema (logical types and all). Valid rows are drawn
in every layout the parsers accept, most in the provider's usual one (the one the fast
path takes), with texts of any Unicode and length; invalid rows come from the same
near-miss strategy as the typing fast path's tests, and must be rejected with the same
reason, detail and ID.
"""

from __future__ import annotations

import io
import pickle
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import uuid4

import fastavro
import pytest
from cdr_strategies import rows
from confluent_kafka.schema_registry import Schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import events
from streamer.avro import (
    CDR_SCHEMA_PATH,
    RegistryEncoder,
    SingleObjectEncoder,
    decode_single_object,
    encode_reference,
    load_schema,
    make_encoder,
)
from streamer.events import (
    CACHE_ENTRIES,
    CACHE_TEXT_CHARS,
    Event,
    RowEncoder,
    cache_footprint,
    event_reference,
    row_encoder,
)
from streamer.records import FIELDS, MAX_ROW_CHARS, CallRecord, Rejection, Row, to_record
from streamer.simulator import CdrGenerator

SCHEMA = load_schema()
ENCODER = RowEncoder()
HEADER = SingleObjectEncoder().header


def _agree(row: Row, encoder: RowEncoder = ENCODER) -> Event | Rejection:
    expected = event_reference(row, encoder.header)
    # Twice: the second time from the caches the first one filled.
    for _ in range(2):
        got = encoder.encode(row)
        assert type(got) is type(expected)
        assert got == expected
    return expected


# --- valid rows, in every layout the reference parsers take ----------------------------------

_any_text = st.text(max_size=80)  # past CACHE_TEXT_CHARS now and then: never cached
_moments = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))


def _day_text(draw: st.DrawFn, day: date) -> str:
    layout = draw(st.sampled_from(["iso", "iso", "iso", "nz", "compact", "short", "padded"]))
    if layout == "nz":
        return day.strftime("%d/%m/") + f"{day.year:04}"
    if layout == "compact":
        return f"{day.year:04}{day.month:02}{day.day:02}"
    if layout == "short":
        return f"{day.year:04}-{day.month}-{day.day}"
    text = f"{day.year:04}-{day.month:02}-{day.day:02}"
    return f" {text} " if layout == "padded" else text


def _time_text(draw: st.DrawFn, t: time) -> str:
    layout = draw(st.sampled_from(["hms", "hms", "hms", "hm", "fraction", "short", "padded"]))
    if layout == "hm":
        return f"{t.hour:02}:{t.minute:02}"
    if layout == "fraction":
        return f"{t.hour:02}:{t.minute:02}:{t.second:02}.{t.microsecond:06}"
    if layout == "short":
        return f"{t.hour}:{t.minute:02}:{t.second:02}"
    text = f"{t.hour:02}:{t.minute:02}:{t.second:02}"
    return f"{text} " if layout == "padded" else text


def _utc_text(draw: st.DrawFn, moment: datetime) -> str:
    layout = draw(st.sampled_from(["space", "space", "space", "t", "z", "offset", "nz"]))
    day = f"{moment.year:04}-{moment.month:02}-{moment.day:02}"
    clock = f"{moment.hour:02}:{moment.minute:02}:{moment.second:02}"
    if layout == "t":
        return f"{day}T{clock}"
    if layout == "z":
        return f"{day}T{clock}.{moment.microsecond:06}Z"
    if layout == "offset":
        zone = draw(st.sampled_from(["+00:00", "+13:00", "-05:30"]))
        return f"{day} {clock}{zone}"
    if layout == "nz":
        return moment.strftime("%d/%m/") + f"{moment.year:04} {clock}"
    return f"{day} {clock}"


_offsets = st.sampled_from(
    ["13", "12", "12.75", "+12:45", "-5", "13.00", "14", "-12", "+1245", "0", "5.5", " 13 "]
)
_amounts = st.one_of(
    st.decimals(min_value=-(10**12) + 1, max_value=10**12 - 1, places=6).map(str),
    st.decimals(min_value=-1000, max_value=1000, places=2).map(str),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["", "0", "-0", "$1,234.50", "1e3", "0.0000", "0.330625", " 12 "]),
)
_counts = st.one_of(
    st.integers(0, 10**9 - 1).map(str),
    st.integers(0, 200).map(str),
    st.sampled_from(["", "12.0", " 7", "007"]),
)


@st.composite
def valid_rows(draw: st.DrawFn) -> Row:
    values = {name: draw(_any_text) for name in FIELDS}
    moment = draw(_moments)
    values.update(
        ID=draw(st.one_of(st.integers(1, 10**18 - 1).map(str), st.sampled_from(["007", " 9"]))),
        AccountCode=draw(st.text(min_size=1, max_size=12).filter(str.strip)),
        BillDate=_day_text(draw, draw(st.dates())),
        Date=_day_text(draw, draw(st.dates())),
        Time=_time_text(draw, draw(st.times())),
        UTCDateTime=_utc_text(draw, moment),
        UTCOffset=draw(_offsets),
        Seconds=draw(_counts),
        NetworkSeconds=draw(_counts),
        ConnectSeconds=draw(_counts),
        Charge=draw(_amounts),
        ChargeExcl=draw(_amounts),
        FreeUnitsUsed=draw(_amounts),
    )
    return Row(values, draw(st.sampled_from(["raw", ",".join(values.values())])))


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(valid_rows())
def test_valid_rows_encode_as_the_reference_byte_for_byte(row: Row) -> None:
    assert isinstance(_agree(row), Event)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(rows())
def test_near_miss_rows_give_the_reference_result(row: Row) -> None:
    _agree(row)


@pytest.mark.parametrize(
    ("field", "text", "reason"),
    [
        ("ID", "0", "bad_id"),
        ("ID", "12a", "bad_id"),
        ("AccountCode", "  ", "empty_account"),
        ("BillDate", "2024-02-30", "bad_date"),
        ("Time", "25:61:00", "bad_time"),
        ("Time", "12:60:00", "bad_time"),
        ("UTCDateTime", "2024-02-30 00:00:00", "bad_datetime"),
        ("UTCDateTime", "2024-03-01 24:00:00", "bad_datetime"),
        ("UTCOffset", "12.7", "bad_offset"),
        ("Seconds", "-1", "bad_integer"),
        ("Charge", "N/A", "bad_decimal"),
        ("Charge", "1.0000001", "bad_decimal"),
    ],
)
def test_invalid_fields_are_rejected_as_the_reference_rejects_them(
    field: str, text: str, reason: str
) -> None:
    values = CdrGenerator(1).row(7)
    rejection = _agree(Row({**values, field: text}, "raw,text"))
    assert isinstance(rejection, Rejection)
    assert rejection.reason == reason
    assert rejection.raw == "raw,text"


def test_a_missing_field_and_an_over_long_row_are_rejected_as_the_reference_does() -> None:
    values = CdrGenerator(1).row(8)
    missing = _agree(Row({k: v for k, v in values.items() if k != "Status"}, "raw"))
    assert isinstance(missing, Rejection)
    assert missing.reason == "missing_field"
    too_long = _agree(Row(values, "x" * (MAX_ROW_CHARS + 1)))
    assert isinstance(too_long, Rejection)
    assert (too_long.reason, too_long.cdr_id) == ("row_too_long", 8)


@pytest.mark.parametrize("seed", [1, 7, 99])
def test_simulated_feeds_take_the_fast_path_only(seed: int) -> None:
    """On the provider's usual rows the reference path is never taken (else the
    differential tests above could pass by always falling back)."""
    encoder = RowEncoder()

    def no_fallback(row: Row) -> Event | Rejection:
        raise AssertionError(f"reference path taken for {row.values}")

    encoder._reference = no_fallback  # type: ignore[method-assign]
    generator = CdrGenerator(seed)
    for cdr_id in range(1, 1500):
        row = Row(generator.row(cdr_id), "raw")
        event = encoder.encode(row)
        assert event == event_reference(row)


def test_simulated_rows_with_malformations_agree() -> None:
    generator = CdrGenerator(5, malformed_rate=0.05)
    rejected = 0
    for cdr_id in range(1, 4000):
        rejected += isinstance(_agree(Row(generator.wire_row(cdr_id), "raw")), Rejection)
    assert rejected > 100


def test_event_fields_are_what_the_sink_publishes() -> None:
    row = Row(CdrGenerator(2).row(42), "raw")
    event = ENCODER.encode(row)
    record = to_record(row)
    assert isinstance(event, Event)
    assert isinstance(record, CallRecord)
    assert event.key == record.account_code.encode()
    assert event.cdr_id == record.id == 42
    assert event.counters == (record.status, record.direction, record.call_type)
    utc = record.utc_datetime
    assert event.timestamp_ms == round(utc.timestamp() * 1000)
    # The value is an ordinary single-object event: fastavro decodes it.
    decoded = decode_single_object(event.value, SCHEMA)
    assert decoded["ID"] == 42
    assert decoded["UTCDateTime"] == utc
    assert decoded["Charge"] == record.charge


def test_texts_outside_utf8_fail_as_fastavro_fails() -> None:
    values = CdrGenerator(1).row(3)
    row = Row({**values, "TextDesc1": "bad \udcff byte"}, "raw")
    with pytest.raises(UnicodeEncodeError):
        ENCODER.encode(row)
    with pytest.raises(UnicodeEncodeError):
        SingleObjectEncoder().encode(to_record(row))  # type: ignore[arg-type]


def test_long_texts_take_the_reference_encoding() -> None:
    values = CdrGenerator(1).row(4)
    # A length of 8192 bytes or more has a varint the fast path does not look up.
    for field in ("BParty", "TextDesc2", "AccountCode"):
        _agree(Row({**values, field: "ā" * 5000}, "raw"))


# --- the caches ---------------------------------------------------------------------------


def test_caches_stay_bounded_in_entries_and_text_length() -> None:
    events.clear_caches()
    values = CdrGenerator(1).row(9)
    for n in range(CACHE_ENTRIES + 50):
        _agree(Row({**values, "TextDesc1": f"desc {n}", "Charge": f"{n}.25"}, "raw"))
    _agree(Row({**values, "TextDesc2": "x" * (CACHE_TEXT_CHARS + 1)}, "raw"))
    footprint = cache_footprint()
    assert 0 < footprint["TextDesc1"][0] <= CACHE_ENTRIES
    assert 0 < footprint["Charge"][0] <= CACHE_ENTRIES
    assert footprint["TextDesc2"][0] == 1  # the long text was encoded, not kept
    assert all(len(text) <= CACHE_TEXT_CHARS for text in events._DESCS2)
    # Every entry is what the reference path makes of its text.
    for text, encoded in events._DESCS1.items():
        data = text.encode()
        assert encoded == events._long(len(data)) + data


def test_the_varint_tables_match_fastavro() -> None:
    for n in [0, 1, -1, 63, 64, -64, -65, 8191, 8192, 2**27, -(2**27), 2**31 - 1, -(2**31),
              2**42, -(2**42) - 7, 2**62, 2**63 - 1, -(2**63)]:  # fmt: skip
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, "long", n)
        assert events._long(n) == buf.getvalue(), n


# --- framing, the factory, and worker processes -------------------------------------------


def test_row_encoder_for_the_single_object_encoder_is_the_fast_path() -> None:
    assert isinstance(row_encoder(make_encoder("t")), RowEncoder)
    other = load_schema()
    other["fields"] = other["fields"][:-1]  # another schema: another fingerprint
    plain = row_encoder(SingleObjectEncoder(fastavro.parse_schema(other)))
    assert not isinstance(plain, RowEncoder)
    row = Row(CdrGenerator(1).row(10), "raw")
    event = plain.encode(row)
    assert isinstance(event, Event)
    assert event.value[:2] == b"\xc3\x01"
    assert event.value[2:10] != HEADER[2:10]


class _Upper:
    """Any encoder with encode(record) -> bytes: a test's, or a future format's."""

    def encode(self, record: CallRecord) -> bytes:
        return record.account_code.upper().encode()


def test_any_other_encoder_is_called_with_the_typed_record() -> None:
    values = CdrGenerator(1).row(11)
    event = row_encoder(_Upper()).encode(Row(values, "raw"))
    assert isinstance(event, Event)
    assert event.value == values["AccountCode"].strip().upper().encode()
    bad = row_encoder(_Upper()).encode(Row({**values, "ID": "x"}, "raw"))
    assert isinstance(bad, Rejection)
    assert bad.reason == "bad_id"


def test_registry_framing_is_learnt_from_the_first_event_then_fast() -> None:
    encoder = make_encoder("cdr-events", registry_url=f"mock://{uuid4().hex[:8]}")
    assert isinstance(encoder, RegistryEncoder)
    rows_of = row_encoder(encoder)
    assert rows_of.header is None  # type: ignore[attr-defined]
    generator = CdrGenerator(4, malformed_rate=0.1)
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    reader = AvroDeserializer(encoder.registry, Schema(CDR_SCHEMA_PATH.read_text(), "AVRO"))
    context = SerializationContext("cdr-events", MessageField.VALUE)
    published = 0
    for cdr_id in range(1, 300):
        row = Row(generator.wire_row(cdr_id), "raw")
        got = rows_of.encode(row)
        record = to_record(row)
        if isinstance(record, Rejection):
            assert got == record
            continue
        assert isinstance(got, Event)
        # Byte for byte what confluent-kafka's serializer writes for the record.
        assert got.value == encoder.encode(record)
        assert reader(got.value, context)["ID"] == cdr_id
        published += 1
    header = rows_of.header  # type: ignore[attr-defined]
    schema_id = encoder.registry.get_latest_version("cdr-events-value").schema_id
    assert header == b"\0" + schema_id.to_bytes(4, "big")
    assert isinstance(rows_of._settled, RowEncoder)  # type: ignore[attr-defined]
    assert published > 200


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(valid_rows(), st.integers(0, 2**32 - 1))
def test_registry_framing_bodies_equal_fastavro(row: Row, schema_id: int) -> None:
    header = b"\0" + schema_id.to_bytes(4, "big")
    _agree(row, RowEncoder(header))


def test_a_row_encoder_survives_pickling_for_a_worker_process() -> None:
    header = b"\0\0\0\0\x07"
    copy = pickle.loads(pickle.dumps(RowEncoder(header)))  # noqa: S301 - our own bytes
    row = Row(CdrGenerator(1).row(12), "raw")
    assert copy.encode(row) == event_reference(row, header)
    assert pickle.loads(pickle.dumps(copy.encode(row))) == copy.encode(row)  # noqa: S301


def test_records_typed_from_other_time_layouts_keep_their_milliseconds() -> None:
    values = CdrGenerator(1).row(13)
    row = Row({**values, "Time": "13:45:12.345678", "UTCDateTime": "2024-03-05T00:45:12.999Z"},
              "raw")  # fmt: skip
    event = _agree(row)
    assert isinstance(event, Event)
    moment = datetime(2024, 3, 5, 0, 45, 12, 999000, tzinfo=UTC)
    assert event.timestamp_ms == (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        milliseconds=1
    )
    decoded: dict[str, Any] = decode_single_object(event.value, SCHEMA)
    assert decoded["Time"] == time(13, 45, 12, 345000)
    assert decoded["UTCOffset"] == Decimal(values["UTCOffset"]).quantize(Decimal("0.01"))
    assert encode_reference(SCHEMA, to_record(row), HEADER) == event.value  # type: ignore[arg-type]
