"""The event contract: single-object encoding per the Avro specification, every field typed."""

from __future__ import annotations

import io
import json
from decimal import Decimal

import fastavro
import pytest

from streamer.avro import (
    CDR_SCHEMA_PATH,
    SingleObjectEncoder,
    decode_single_object,
    fingerprint,
    load_schema,
    timestamp_ms,
)
from streamer.records import FIELDS, CallRecord, Row, to_record

SAMPLE = dict(
    zip(
        FIELDS,
        [
            "5",
            "81234567",
            "outbound",
            "Mobile",
            "2024-04-01",
            "2024-03-05",
            "13:45:12",
            "2024-03-05 00:45:12",
            "12.75",
            "6493001234",
            "6421555123",
            "6493001234",
            "60",
            "42",
            "3",
            "0.330625",
            "0.2875",
            "0",
            "Whangārei",
            'Call to Mobile, "Spark"',
            "0016",
            "Ok",
            "Plan",
            "Default",
            "Default",
            "Default",
        ],
        strict=True,
    )
)


def sample_record() -> CallRecord:
    record = to_record(Row(SAMPLE, "raw"))
    assert isinstance(record, CallRecord)
    return record


def test_schema_keeps_provider_names_and_documents_every_field() -> None:
    raw = json.loads(CDR_SCHEMA_PATH.read_text())
    assert [f["name"] for f in raw["fields"]] == list(FIELDS)
    assert raw["namespace"]
    assert all(f.get("doc") for f in raw["fields"])


def test_fingerprint_matches_avro_spec_vector() -> None:
    # CRC-64-AVRO of the canonical form of "int" is 0x7275D51A3F395C8F (Avro's test data).
    assert fingerprint(fastavro.parse_schema("int")) == (0x7275D51A3F395C8F).to_bytes(8, "little")


def test_single_object_round_trip_keeps_every_value() -> None:
    record = sample_record()
    data = SingleObjectEncoder().encode(record)
    assert data[:2] == b"\xc3\x01"
    decoded = decode_single_object(data, load_schema())
    assert decoded["ID"] == 5
    assert decoded["UTCOffset"] == Decimal("12.75")
    assert decoded["Charge"] == Decimal("0.330625")
    assert decoded["TextDesc1"] == "Whangārei"
    assert decoded["UTCDateTime"] == record.utc_datetime
    assert decoded["Time"] == record.time
    assert decoded["BillDate"] == record.bill_date


def test_decoder_refuses_other_schema() -> None:
    data = bytearray(SingleObjectEncoder().encode(sample_record()))
    data[2] ^= 0xFF
    with pytest.raises(ValueError, match="fingerprint"):
        decode_single_object(bytes(data), load_schema())


def test_body_is_plain_avro_for_any_reader() -> None:
    # What a Java or Python consumer does with the .avsc alone: skip 10 bytes, read.
    data = SingleObjectEncoder().encode(sample_record())
    raw_schema = fastavro.parse_schema(json.loads(CDR_SCHEMA_PATH.read_text()))
    assert (
        fastavro.schemaless_reader(io.BytesIO(data[10:]), raw_schema, None)["AccountCode"]
        == "81234567"
    )


def test_timestamp_is_event_time_in_ms() -> None:
    assert timestamp_ms(sample_record()) == 1709599512000
