"""The event contract in code: schemas/*.avsc loaded once, CallRecord -> Avro bytes.

Without a schema registry the wire format is Avro single-object encoding, as the
Avro specification defines it: the marker C3 01, the schema's 8-byte CRC-64-AVRO
fingerprint (little-endian), then the binary record. A consumer needs only the
`.avsc` to check the fingerprint and decode.
"""

from __future__ import annotations

import importlib.resources
import io
import json
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, cast

import fastavro
import fastavro.schema

from streamer.records import CallRecord


def _schema_dir() -> Path:
    """schemas/ at the top of the repository, installed as the package streamer.schemas."""
    try:
        return Path(str(importlib.resources.files("streamer.schemas")))
    except ModuleNotFoundError:  # imported from a source checkout's working directory
        return Path(__file__).resolve().parent.parent / "schemas"


SCHEMA_DIR = _schema_dir()
CDR_SCHEMA_PATH = SCHEMA_DIR / "cdr.avsc"
SINGLE_OBJECT_MARKER = b"\xc3\x01"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def load_schema(path: Path = CDR_SCHEMA_PATH) -> dict[str, Any]:
    """Read and parse an `.avsc` (fastavro's parsed form)."""
    with path.open(encoding="utf-8") as f:
        return cast(dict[str, Any], fastavro.parse_schema(json.load(f)))


def fingerprint(schema: dict[str, Any]) -> bytes:
    """The schema's CRC-64-AVRO fingerprint, little-endian (single-object encoding)."""
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    # fastavro prints the fingerprint's bytes in little-endian order already.
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def to_avro_dict(record: CallRecord) -> dict[str, Any]:
    """The record under the provider's field names, in the types fastavro's logical types take."""
    return {
        "ID": record.id,
        "AccountCode": record.account_code,
        "Direction": record.direction,
        "CallType": record.call_type,
        "BillDate": record.bill_date,
        "Date": record.date,
        "Time": _time_millis(record.time),
        "UTCDateTime": record.utc_datetime,
        "UTCOffset": record.utc_offset,
        "AParty": record.a_party,
        "BParty": record.b_party,
        "BillNumber": record.bill_number,
        "Seconds": record.seconds,
        "NetworkSeconds": record.network_seconds,
        "ConnectSeconds": record.connect_seconds,
        "Charge": record.charge,
        "ChargeExcl": record.charge_excl,
        "FreeUnitsUsed": record.free_units_used,
        "TextDesc1": record.text_desc1,
        "TextDesc2": record.text_desc2,
        "ReleaseCause": record.release_cause,
        "Status": record.status,
        "ServiceType": record.service_type,
        "BillingGroup": record.billing_group,
        "CallingGroup": record.calling_group,
        "Profile": record.profile,
    }


def _time_millis(t: time) -> int:
    # Written as an int so sub-millisecond digits are truncated the same way on every path.
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1000 + t.microsecond // 1000


def timestamp_ms(record: CallRecord) -> int:
    """The call's UTC instant in epoch milliseconds: the Kafka message timestamp."""
    delta = record.utc_datetime - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


class SingleObjectEncoder:
    """CallRecord -> Avro single-object bytes (marker + fingerprint + body)."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        self.schema = schema if schema is not None else load_schema()
        self._header = SINGLE_OBJECT_MARKER + fingerprint(self.schema)

    def encode(self, record: CallRecord) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self.schema, to_avro_dict(record))
        return buf.getvalue()


def decode_single_object(data: bytes, schema: dict[str, Any]) -> dict[str, Any]:
    """Decode one single-object-encoded event, checking the marker and fingerprint."""
    if data[:2] != SINGLE_OBJECT_MARKER:
        raise ValueError("not Avro single-object encoding (no C3 01 marker)")
    if data[2:10] != fingerprint(schema):
        raise ValueError("event was written with another schema (fingerprint differs)")
    return cast(dict[str, Any], fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None))
