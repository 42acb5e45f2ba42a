"""The event contract in code: schemas/*.avsc loaded once, CallRecord -> Avro bytes.

Without a schema registry the wire format is Avro single-object encoding, as the
Avro specification defines it: the marker C3 01, the schema's 8-byte CRC-64-AVRO
fingerprint (little-endian), then the binary record. A consumer needs only the
`.avsc` to check the fingerprint and decode.

With a schema registry (`[kafka] schema_registry_url`) it is the Confluent framing:
byte 0, the registry's 4-byte schema id (big-endian), then the same binary record;
the schema is registered under the subject `<topic>-value`.
"""

from __future__ import annotations

import importlib.resources
import io
import json
from collections.abc import Mapping
from datetime import UTC, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import fastavro
import fastavro.schema
from fastavro.write import LOGICAL_WRITERS

from streamer.config import Secret
from streamer.errors import RegistryError, RegistryUnavailableError
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


def encode_reference(schema: dict[str, Any], record: CallRecord, header: bytes = b"") -> bytes:
    """Single-object bytes the straightforward way: what `SingleObjectEncoder` must equal.

    `header` is the marker and fingerprint, if the caller has them (they cost a schema walk).
    """
    buf = io.BytesIO()
    buf.write(header or SINGLE_OBJECT_MARKER + fingerprint(schema))
    fastavro.schemaless_writer(buf, schema, to_avro_dict(record))
    return buf.getvalue()


# --- the fast path ---------------------------------------------------------------------------
#
# fastavro converts logical types (decimal, date, timestamp-millis) on every write, and
# that was about 45 % of the encoding cost (the three decimals a third of it). A
# logical type changes nothing on the wire: a date is written as its int, a decimal
# as its bytes. So the encoder gives fastavro the schema with the logical types taken
# off ("plain": the same fields and wire format) and converts those fields itself,
# the way fastavro does, remembering the few distinct decimals a feed repeats.

_DAYS_BEFORE_EPOCH = 719_163  # date(1970, 1, 1).toordinal(), as fastavro counts
_DECIMAL_CACHE_LIMIT = 4096
_prepare_decimal = LOGICAL_WRITERS["bytes-decimal"]
_prepare_timestamp_millis = LOGICAL_WRITERS["long-timestamp-millis"]


def _plain_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with each field's logical type removed: the same bytes on the wire."""
    plain = {k: v for k, v in schema.items() if not k.startswith("__")}
    plain["fields"] = [
        {**f, "type": f["type"]["type"]} if isinstance(f["type"], dict) else f
        for f in schema["fields"]
    ]
    return cast(dict[str, Any], fastavro.parse_schema(plain))


class _DecimalBytes:
    """decimal.Decimal -> the bytes fastavro writes for a `bytes` decimal of one scale.

    Remembered by the Decimal object itself (held, so its id stays its own): records
    typed by `records.to_record` share the Decimal of each distinct text.
    """

    def __init__(self, field_schema: dict[str, Any]) -> None:
        self._schema = field_schema
        self._by_id: dict[int, tuple[Decimal, bytes]] = {}

    def __call__(self, value: Decimal) -> bytes:
        hit = self._by_id.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        # fastavro's own conversion, errors included.
        data = cast(bytes, _prepare_decimal(value, self._schema))
        if len(self._by_id) >= _DECIMAL_CACHE_LIMIT:
            self._by_id.clear()
        self._by_id[id(value)] = (value, data)
        return data


_CONTRACT_FINGERPRINT = fingerprint(load_schema())


class SingleObjectEncoder:
    """CallRecord -> Avro single-object bytes (marker + fingerprint + body)."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        self.schema = schema if schema is not None else load_schema()
        self.header = self._header = SINGLE_OBJECT_MARKER + fingerprint(self.schema)
        # The fast path knows the contract's fields; another schema takes the plain road.
        self._plain: dict[str, Any] | None = None
        if self._header[2:] == _CONTRACT_FINGERPRINT:
            self._plain = _plain_schema(self.schema)
            types = {f["name"]: f["type"] for f in self.schema["fields"]}
            self._timestamp_schema = types["UTCDateTime"]
            self._offset_bytes = _DecimalBytes(types["UTCOffset"])
            self._money_bytes = _DecimalBytes(types["Charge"])
            if types["ChargeExcl"] != types["Charge"] or types["FreeUnitsUsed"] != types["Charge"]:
                raise AssertionError("the contract's three amounts share one decimal type")

    def encode(self, record: CallRecord) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        if self._plain is None:
            fastavro.schemaless_writer(buf, self.schema, to_avro_dict(record))
        else:
            fastavro.schemaless_writer(buf, self._plain, self._plain_dict(record))
        return buf.getvalue()

    def _plain_dict(self, r: CallRecord) -> dict[str, Any]:
        """`to_avro_dict`, with the logical types converted as fastavro converts them."""
        money = self._money_bytes
        t = r.time
        return {
            "ID": r.id,
            "AccountCode": r.account_code,
            "Direction": r.direction,
            "CallType": r.call_type,
            "BillDate": r.bill_date.toordinal() - _DAYS_BEFORE_EPOCH,
            "Date": r.date.toordinal() - _DAYS_BEFORE_EPOCH,
            "Time": ((t.hour * 60 + t.minute) * 60 + t.second) * 1000 + t.microsecond // 1000,
            "UTCDateTime": _prepare_timestamp_millis(r.utc_datetime, self._timestamp_schema),
            "UTCOffset": self._offset_bytes(r.utc_offset),
            "AParty": r.a_party,
            "BParty": r.b_party,
            "BillNumber": r.bill_number,
            "Seconds": r.seconds,
            "NetworkSeconds": r.network_seconds,
            "ConnectSeconds": r.connect_seconds,
            "Charge": money(r.charge),
            "ChargeExcl": money(r.charge_excl),
            "FreeUnitsUsed": money(r.free_units_used),
            "TextDesc1": r.text_desc1,
            "TextDesc2": r.text_desc2,
            "ReleaseCause": r.release_cause,
            "Status": r.status,
            "ServiceType": r.service_type,
            "BillingGroup": r.billing_group,
            "CallingGroup": r.calling_group,
            "Profile": r.profile,
        }


def decode_single_object(data: bytes, schema: dict[str, Any]) -> dict[str, Any]:
    """Decode one single-object-encoded event, checking the marker and fingerprint."""
    if data[:2] != SINGLE_OBJECT_MARKER:
        raise ValueError("not Avro single-object encoding (no C3 01 marker)")
    if data[2:10] != fingerprint(schema):
        raise ValueError("event was written with another schema (fingerprint differs)")
    return cast(dict[str, Any], fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None))


# A request to the registry gives up after this long (the client's own default is no limit).
REGISTRY_TIMEOUT_S = 10.0


class RegistryEncoder:
    """CallRecord -> Confluent Schema Registry framing: 0, schema id, body; subject `<topic>-value`.

    The first `encode` registers the schema (or, with `auto_register=False`, looks it
    up); the id is kept, so later records cost no request. Registry errors are
    translated: unreachable, 5xx, 408 or 429 is retriable (the cursor stays), anything
    else (credentials, an incompatible or unregistered schema) is fatal.
    """

    def __init__(
        self,
        url: str,
        topic: str,
        *,
        auto_register: bool = True,
        user: str = "",
        password: Secret | None = None,
        schema_path: Path = CDR_SCHEMA_PATH,
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        # Imported here, not with the module: the registry client is about 30 MiB of
        # modules that every worker process (streamer/workers.py), which imports this
        # module for the schema, would carry for nothing.
        from confluent_kafka.schema_registry import (
            Schema,
            SchemaRegistryClient,
            SchemaRegistryError,
            topic_subject_name_strategy,
        )
        from confluent_kafka.schema_registry.avro import AvroSerializer

        # The HTTP client confluent-kafka's registry client uses (httpx2, or httpx on old
        # Pythons): its transport errors are what "registry unreachable" looks like.
        from confluent_kafka.schema_registry.common._httpx_compat import httpx
        from confluent_kafka.serialization import MessageField, SerializationContext

        self._registry_error, self._transport_error = SchemaRegistryError, httpx.TransportError
        conf: dict[str, Any] = {"url": url, "timeout": REGISTRY_TIMEOUT_S, **(client_config or {})}
        if user:
            secret = password.reveal() if password is not None else ""
            conf["basic.auth.user.info"] = f"{user}:{secret}"
        self.topic = topic
        self.subject = f"{topic}-{MessageField.VALUE}"
        # new_client: a mock:// URL gives confluent-kafka's in-process mock registry (tests).
        self.registry = SchemaRegistryClient.new_client(conf)
        self._context = SerializationContext(topic, MessageField.VALUE)
        self._where = _without_userinfo(url)
        self._serializer = AvroSerializer(
            self.registry,
            Schema(schema_path.read_text(encoding="utf-8"), "AVRO"),
            lambda record, _ctx: to_avro_dict(record),
            {
                "auto.register.schemas": auto_register,
                # Set explicitly: confluent-kafka's default strategy changed across versions.
                "subject.name.strategy": topic_subject_name_strategy,
            },
        )

    def encode(self, record: CallRecord) -> bytes:
        try:
            data = self._serializer(record, self._context)
        except self._registry_error as exc:
            status = exc.http_status_code
            message = (
                f"schema registry {self._where} answered {status} for subject {self.subject}: "
                f"{exc.error_message}"
            )
            if status >= 500 or status in (408, 429):
                raise RegistryUnavailableError(message) from exc
            raise RegistryError(message + _REGISTRY_HINTS.get(status, "")) from exc
        except self._transport_error as exc:
            raise RegistryUnavailableError(
                f"schema registry {self._where} unreachable: {type(exc).__name__}"
            ) from exc
        return cast(bytes, data)


_REGISTRY_HINTS = {
    401: " (check schema_registry_user and its password)",
    403: " (the registry user may not read or register this subject)",
    404: (
        " (is schema_registry_url the registry's Confluent-compatible API root? With "
        "schema_registry_auto_register = false, register the schema first)"
    ),
    409: " (the schema is not compatible with the subject's compatibility rule)",
    422: " (the registry refused the schema as invalid)",
}


def _without_userinfo(url: str) -> str:
    """The URL as it may appear in a message: no user or password in it."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if rest else url


def make_encoder(
    topic: str,
    *,
    registry_url: str = "",
    auto_register: bool = True,
    registry_user: str = "",
    registry_password: Secret | None = None,
) -> SingleObjectEncoder | RegistryEncoder:
    """The event encoder: registry framing when a registry URL is set, else single-object."""
    if not registry_url:
        return SingleObjectEncoder()
    return RegistryEncoder(
        registry_url,
        topic,
        auto_register=auto_register,
        user=registry_user,
        password=registry_password,
    )
