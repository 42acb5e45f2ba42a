"""The Schema Registry wire format: framing, subject, registration, settings, error mapping.

The registry here is confluent-kafka's in-process mock (`mock://`) or, for the HTTP
error table, a stub HTTP server on loopback that answers every request with one status.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from uuid import uuid4

import fastavro
import pytest
from cdr_samples import sample_records
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streamer.avro import (
    CDR_SCHEMA_PATH,
    RegistryEncoder,
    SingleObjectEncoder,
    make_encoder,
    to_avro_dict,
)
from streamer.config import Secret, parse_settings
from streamer.errors import ConfigError, RegistryError, RegistryUnavailableError

TOPIC = "cdr-events"


def mock_url() -> str:
    return f"mock://{uuid4().hex[:8]}"


def framing(data: bytes) -> tuple[int, bytes]:
    """Confluent framing: magic byte 0, the schema id (4 bytes, big-endian), the Avro body."""
    assert data[0] == 0, "missing magic byte 0"
    return int.from_bytes(data[1:5], "big"), data[5:]


def expected(record: Any) -> dict[str, Any]:
    """What a reader gets back: the encoded dict, with Time as fastavro reads time-millis."""
    value = to_avro_dict(record)
    value["Time"] = record.time.replace(microsecond=record.time.microsecond // 1000 * 1000)
    return value


def test_without_a_registry_url_events_stay_single_object() -> None:
    assert isinstance(make_encoder(TOPIC), SingleObjectEncoder)


def test_registry_framing_registers_under_topic_value_and_decodes_both_ways() -> None:
    encoder = make_encoder(TOPIC, registry_url=mock_url())
    assert isinstance(encoder, RegistryEncoder)
    records = sample_records()
    encoded = [encoder.encode(r) for r in records]

    registry = encoder.registry
    assert registry.get_subjects() == [f"{TOPIC}-value"]
    latest = registry.get_latest_version(f"{TOPIC}-value")
    ids = {framing(data)[0] for data in encoded}
    assert ids == {latest.schema_id}
    # The registry holds our .avsc as written, docs and all, for downstream teams.
    registered = json.loads(registry.get_schema(latest.schema_id).schema_str)
    assert registered == json.loads(CDR_SCHEMA_PATH.read_text())

    # Independently: the id's schema from the registry, fastavro, nothing of ours.
    writer = fastavro.parse_schema(registered)
    for record, data in zip(records, encoded, strict=True):
        body = framing(data)[1]
        assert fastavro.schemaless_reader(io.BytesIO(body), writer, None) == expected(record)

    # And with confluent-kafka's own deserializer, as a Confluent consumer would.
    deserializer = AvroDeserializer(registry)
    context = SerializationContext(TOPIC, MessageField.VALUE)
    for record, data in zip(records, encoded, strict=True):
        assert deserializer(data, context) == expected(record)


def test_body_equals_the_single_object_body() -> None:
    # Only the header differs between the two wire formats: the Avro body is the same.
    record = sample_records()[1]
    registry_body = framing(make_encoder(TOPIC, registry_url=mock_url()).encode(record))[1]
    assert registry_body == SingleObjectEncoder().encode(record)[10:]


def test_without_auto_register_an_unregistered_schema_is_fatal() -> None:
    encoder = make_encoder(TOPIC, registry_url=mock_url(), auto_register=False)
    with pytest.raises(RegistryError, match="register the schema first"):
        encoder.encode(sample_records()[0])


def test_without_auto_register_the_registered_schema_is_looked_up() -> None:
    encoder = make_encoder(TOPIC, registry_url=mock_url(), auto_register=False)
    assert isinstance(encoder, RegistryEncoder)
    schema_id = encoder.registry.register_schema(
        f"{TOPIC}-value", Schema(CDR_SCHEMA_PATH.read_text(), "AVRO")
    )
    assert framing(encoder.encode(sample_records()[0]))[0] == schema_id


# --- the HTTP client against a stub registry: auth sent, errors mapped ------------------------


class _StubRegistry(BaseHTTPRequestHandler):
    status: ClassVar[int] = 200
    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        if self.status == 200:
            body = {"id": 42, "version": 1, "subject": f"{TOPIC}-value"}
        else:
            body = {"error_code": self.status * 100 + 1, "message": f"stub says {self.status}"}
        data = json.dumps(body).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest shows stderr of failing tests


@pytest.fixture
def stub_registry() -> Iterator[type[_StubRegistry]]:
    handler = type("Stub", (_StubRegistry,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def stub_encoder(url: str, **kwargs: Any) -> RegistryEncoder:
    # No client-side retries: each status is answered once, and the test stays fast.
    return RegistryEncoder(url, TOPIC, client_config={"max.retries": 0}, **kwargs)


def test_basic_auth_and_registration_request(stub_registry: type[_StubRegistry]) -> None:
    url = stub_registry.url  # type: ignore[attr-defined]
    encoder = stub_encoder(url, user="streamer", password=Secret("s3cr&t:pw"))
    first, second = (encoder.encode(r) for r in sample_records()[:2])
    assert framing(first)[0] == framing(second)[0] == 42
    # One registration for both records, under <topic>-value, with the credentials.
    ((method, path, auth),) = stub_registry.seen
    assert (method, path.partition("?")[0]) == ("POST", f"/subjects/{TOPIC}-value/versions")
    assert auth == "Basic " + base64.b64encode(b"streamer:s3cr&t:pw").decode()


@pytest.mark.parametrize(
    ("status", "error", "hint"),
    [
        (401, RegistryError, "check schema_registry_user"),
        (403, RegistryError, "may not read or register"),
        (404, RegistryError, "register the schema first"),
        (409, RegistryError, "not compatible"),
        (422, RegistryError, "invalid"),
        (400, RegistryError, "stub says 400"),
        (408, RegistryUnavailableError, "stub says 408"),
        (429, RegistryUnavailableError, "stub says 429"),
        (500, RegistryUnavailableError, "stub says 500"),
        (503, RegistryUnavailableError, "stub says 503"),
    ],
)
def test_registry_answer_to_error(
    stub_registry: type[_StubRegistry], status: int, error: type[Exception], hint: str
) -> None:
    stub_registry.status = status
    encoder = stub_encoder(stub_registry.url)  # type: ignore[attr-defined]
    with pytest.raises(error, match=hint) as caught:
        encoder.encode(sample_records()[0])
    assert f"answered {status} for subject {TOPIC}-value" in str(caught.value)


def test_unreachable_registry_is_retriable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now: connection refused.
    encoder = stub_encoder(f"http://127.0.0.1:{port}")
    with pytest.raises(RegistryUnavailableError, match="unreachable: ConnectError"):
        encoder.encode(sample_records()[0])


# --- settings ---------------------------------------------------------------------------------


def settings_with(env: dict[str, str] | None = None, **kafka: Any) -> Any:
    data = {
        "kafka": {"bootstrap_servers": "127.0.0.1:9092", **kafka},
        "feeds": [{"name": "a", "url": "http://127.0.0.1:1/", "login": "1", "password": "p"}],
    }
    return parse_settings(data, env=env or {})


def test_registry_settings_default_to_single_object() -> None:
    kafka = settings_with().kafka
    assert kafka.schema_registry_url == ""
    assert kafka.schema_registry_auto_register is True


def test_registry_password_comes_from_the_environment_only() -> None:
    kafka = settings_with(
        {"CDR_SCHEMA_REGISTRY_PASSWORD": "pw-from-env"},
        schema_registry_url="https://registry.example.net:8081",
        schema_registry_user="streamer",
        schema_registry_auto_register=False,
    ).kafka
    assert kafka.schema_registry_password == Secret("pw-from-env")
    assert kafka.schema_registry_auto_register is False
    assert "pw-from-env" not in repr(kafka)


@pytest.mark.parametrize(
    ("kafka", "problem"),
    [
        ({"schema_registry_url": "registry:8081"}, r"must be http\(s\)://HOST"),
        ({"schema_registry_url": "ftp://registry"}, r"must be http\(s\)://HOST"),
        ({"schema_registry_url": "https://u:pw@registry"}, "must not carry credentials"),
        ({"schema_registry_url": "https://r", "schema_registry_user": "u"}, "has no password"),
        ({"schema_registry_password": "pw"}, "not in the file"),
        ({"schema_registry_auto_register": "yes"}, "must be true or false"),
    ],
)
def test_bad_registry_settings_are_reported(kafka: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        settings_with(**kafka)
    assert "pw@" not in str(caught.value)


def test_registry_values_keep_their_types() -> None:
    # Decimal and date logical types survive the registry path too (not strings or floats).
    encoder = make_encoder(TOPIC, registry_url=mock_url())
    assert isinstance(encoder, RegistryEncoder)
    record = sample_records()[2]
    schema = fastavro.parse_schema(json.loads(CDR_SCHEMA_PATH.read_text()))
    value = fastavro.schemaless_reader(io.BytesIO(framing(encoder.encode(record))[1]), schema, None)
    assert value["Charge"] == Decimal("999999999999.999999")
    assert value["UTCOffset"] == Decimal("13.00")
