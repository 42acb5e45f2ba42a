"""The hot path's fast code against the straightforward code it replaces: same results, same bytes.

`records.to_record` against `records.to_record_reference`, and
`avro.SingleObjectEncoder.encode` (fastavro with the logical types taken off, the
conversions done by the encoder) against `avro.encode_reference` (fastavro's plain
`schemaless_writer` with the real schema), over generated rows and records.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cdr_samples import sample_records
from cdr_strategies import rows
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamer.avro import SingleObjectEncoder, encode_reference, load_schema
from streamer.records import (
    CallRecord,
    Rejection,
    Row,
    _CallRecordBuilder,
    to_record,
    to_record_reference,
)
from streamer.simulator import CdrGenerator

ENCODER = SingleObjectEncoder()
SCHEMA = load_schema()


def _same(row: Row) -> CallRecord | Rejection:
    fast, reference = to_record(row), to_record_reference(row)
    assert fast == reference
    assert type(fast) is type(reference)
    if isinstance(fast, CallRecord):
        assert isinstance(reference, CallRecord)
        # Equal values of another type (an int for a Decimal, say) would encode otherwise.
        for name in CallRecord.__slots__:
            a, b = getattr(fast, name), getattr(reference, name)
            assert (type(a), str(a)) == (type(b), str(b)), name
    return fast


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_to_record_equals_the_reference(row: Row) -> None:
    _same(row)


@pytest.mark.parametrize("seed", [1, 7])
def test_to_record_equals_the_reference_on_simulated_rows(seed: int) -> None:
    generator = CdrGenerator(seed, malformed_rate=0.05)
    for cdr_id in range(1, 3000):
        _same(Row(generator.wire_row(cdr_id), "raw"))


def test_fast_records_are_frozen_call_records() -> None:
    record = to_record(Row(CdrGenerator(1).row(5), "raw"))
    assert type(record) is CallRecord
    with pytest.raises(AttributeError):
        record.id = 6  # type: ignore[misc]
    # The __class__ switch needs the builder's slots to be CallRecord's, in order.
    assert _CallRecordBuilder.__slots__ == CallRecord.__slots__


# --- Avro ----------------------------------------------------------------------------------

_money = st.decimals(
    min_value=Decimal("-999999999999.999999"),
    max_value=Decimal("999999999999.999999"),
    places=6,
    allow_nan=False,
)
_short = st.decimals(min_value=-99, max_value=99, places=2, allow_nan=False)
_money_any_scale = st.one_of(
    _money, st.decimals(-(10**6), 10**6, places=2), st.integers(-5, 5).map(Decimal)
)


@st.composite
def records(draw: st.DrawFn) -> CallRecord:
    zone = draw(
        st.sampled_from([UTC, timezone(timedelta(hours=13)), timezone(timedelta(hours=-5))])
    )
    return CallRecord(
        id=draw(st.integers(1, 2**63 - 1)),
        account_code=draw(st.text(min_size=1)),
        direction=draw(st.text()),
        call_type=draw(st.text()),
        bill_date=draw(st.dates()),
        date=draw(st.dates()),
        time=draw(st.times()),
        utc_datetime=draw(
            st.datetimes(
                min_value=datetime(1900, 1, 2),
                max_value=datetime(2200, 1, 1),
                timezones=st.just(zone),
            )
        ),
        utc_offset=draw(_short),
        a_party=draw(st.text()),
        b_party=draw(st.text()),
        bill_number=draw(st.text()),
        seconds=draw(st.integers(0, 2**31 - 1)),
        network_seconds=draw(st.integers(0, 2**31 - 1)),
        connect_seconds=draw(st.integers(0, 2**31 - 1)),
        charge=draw(_money_any_scale),
        charge_excl=draw(_money),
        free_units_used=draw(_money),
        text_desc1=draw(st.text()),
        text_desc2=draw(st.text()),
        release_cause=draw(st.text()),
        status=draw(st.text()),
        service_type=draw(st.text()),
        billing_group=draw(st.text()),
        calling_group=draw(st.text()),
        profile=draw(st.text()),
    )


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(records())
@example(sample_records()[2])
def test_encode_equals_fastavro_with_the_real_schema(record: CallRecord) -> None:
    assert ENCODER.encode(record) == encode_reference(SCHEMA, record)
    # Twice: the second time from the encoder's remembered decimals.
    assert ENCODER.encode(record) == encode_reference(SCHEMA, record)


@pytest.mark.parametrize("value", ["-128", "-127.99", "-0.000001", "-0", "128", "255.999999"])
def test_encode_decimal_edges_equal_fastavro(value: str) -> None:
    base = sample_records()[0]
    fields = {name: getattr(base, name) for name in CallRecord.__slots__}
    record = CallRecord(**{**fields, "charge": Decimal(value), "free_units_used": -Decimal(value)})
    assert ENCODER.encode(record) == encode_reference(SCHEMA, record)


def test_encode_refuses_what_fastavro_refuses() -> None:
    base = sample_records()[0]
    fields = {name: getattr(base, name) for name in CallRecord.__slots__}
    record = CallRecord(**{**fields, "charge": Decimal("1.0000001")})  # scale 7 > 6
    with pytest.raises(ValueError, match=r"[Ss]cale"):
        encode_reference(SCHEMA, record)
    with pytest.raises(ValueError, match=r"[Ss]cale"):
        ENCODER.encode(record)


def test_pipeline_records_encode_as_the_reference() -> None:
    generator = CdrGenerator(3)
    for cdr_id in range(1, 3000):
        record = to_record(Row(generator.row(cdr_id), "raw"))
        assert isinstance(record, CallRecord)
        assert ENCODER.encode(record) == encode_reference(SCHEMA, record)


def test_another_schema_takes_the_plain_road() -> None:
    schema = load_schema()
    schema["doc"] = "a copy with another doc: the same canonical form"
    encoder = SingleObjectEncoder(schema)
    record = sample_records()[0]
    assert encoder.encode(record) == encode_reference(SCHEMA, record)
