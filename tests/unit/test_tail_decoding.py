"""`cdr-streamer tail` without a broker: decoding by fingerprint and by id, --from, options."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import fastavro
import pytest
from cdr_samples import sample_records
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from streamer.avro import CDR_SCHEMA_PATH, SingleObjectEncoder, fingerprint, to_avro_dict
from streamer.cli import build_parser
from streamer.errors import ConfigError
from streamer.tail import DecodeError, EventDecoder, SchemaSet, options_from_args, parse_start

V2_PATH = Path(__file__).resolve().parents[1] / "data" / "cdr-v2-test.avsc"


def test_the_released_versions_and_the_current_schema_are_known_by_fingerprint() -> None:
    schemas = SchemaSet()
    names = {w.name for w in schemas.by_fingerprint.values()}
    assert "cdr-v1" in names
    current = fastavro.parse_schema(json.loads(CDR_SCHEMA_PATH.read_text()))
    assert fingerprint(current) in schemas.by_fingerprint


def test_single_object_events_decode_with_the_writers_schema() -> None:
    record = sample_records()[0]
    decoded, writer = EventDecoder(SchemaSet()).decode(SingleObjectEncoder().encode(record))
    assert writer == "cdr-v1"
    assert decoded["ID"] == record.id
    assert decoded["Charge"] == format(record.charge, "f")  # exact decimal text

    v2 = fastavro.parse_schema(json.loads(V2_PATH.read_text()))
    event = SingleObjectEncoder(v2)
    data = io.BytesIO()
    fastavro.schemaless_writer(data, v2, {**to_avro_dict(record), "Tariff": "Peak"})
    value = event.header + data.getvalue()
    with pytest.raises(DecodeError, match=r"unknown schema fingerprint .*--schema"):
        EventDecoder(SchemaSet()).decode(value)
    decoded, writer = EventDecoder(SchemaSet([V2_PATH])).decode(value)
    assert writer == "cdr-v2-test"
    assert decoded["Tariff"] == "Peak"


def test_registry_framing_decodes_by_id_and_caches_the_schema() -> None:
    registry = SchemaRegistryClient.new_client({"url": f"mock://{uuid4().hex[:8]}"})
    schema_id = registry.register_schema("t-value", Schema(CDR_SCHEMA_PATH.read_text(), "AVRO"))
    record = sample_records()[1]
    body = SingleObjectEncoder().encode(record)[10:]
    value = b"\x00" + schema_id.to_bytes(4, "big") + body
    decoder = EventDecoder(SchemaSet(), registry)
    decoded, writer = decoder.decode(value)
    assert (decoded["ID"], writer) == (record.id, f"registry id {schema_id}")
    assert decoder.decode(value)[0] == decoded
    with pytest.raises(DecodeError, match="schema id 999 is not in the registry"):
        decoder.decode(b"\x00" + (999).to_bytes(4, "big") + body)
    with pytest.raises(DecodeError, match="give --schema-registry-url"):
        EventDecoder(SchemaSet()).decode(value)


def test_plain_decoding_prints_what_fastavros_logical_types_mean() -> None:
    """The fast path (plain schema + our conversions) against fastavro's own decoding."""
    schema = fastavro.parse_schema(json.loads(CDR_SCHEMA_PATH.read_text()))
    decoder = EventDecoder(SchemaSet())
    for record in sample_records():
        data = SingleObjectEncoder().encode(record)
        full = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)
        decoded, _ = decoder.decode(data)
        assert decoded.keys() == full.keys()
        for name, value in full.items():
            if isinstance(value, Decimal):
                assert decoded[name] == format(value, "f"), name
            elif isinstance(value, datetime):
                assert decoded[name] == value.isoformat(timespec="milliseconds")[:-6] + "Z"
            elif isinstance(value, time):
                assert decoded[name] == value.isoformat(timespec="milliseconds")
            elif isinstance(value, date):
                assert decoded[name] == value.isoformat()
            else:
                assert decoded[name] == value, name


@pytest.mark.parametrize(
    "data", [b"", b"{}", b"\xc3\x01" + b"\x00" * 3, b"\xc3\x01" + fingerprint(
        fastavro.parse_schema(json.loads(CDR_SCHEMA_PATH.read_text()))
    ) + b"\x02"]
)  # fmt: skip
def test_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        EventDecoder(SchemaSet()).decode(data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("beginning", "beginning"),
        ("END", "end"),
        ("1200", 1200),
        ("-20", -20),
        ("2024-03-01T09:30:00+13:00", datetime(2024, 2, 29, 20, 30, tzinfo=UTC)),
        ("2024-03-01T09:30:00Z", datetime(2024, 3, 1, 9, 30, tzinfo=UTC)),
        ("2024-03-01", datetime(2024, 3, 1, tzinfo=UTC)),  # no offset: UTC
    ],
)
def test_from_positions(text: str, expected: object) -> None:
    assert parse_start(text) == expected


def test_a_bad_from_says_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match="beginning, end, an offset"):
        parse_start("yesterday")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--dead-letters", "--status", "Busy"], "filter events, not dead letters"),
        (["--reason", "bad_date"], "add --dead-letters"),
        (["--from", "soon"], "--from 'soon'"),
    ],
)
def test_contradictory_options_are_refused(args: list[str], problem: str) -> None:
    parsed = build_parser().parse_args(["tail", "--bootstrap-servers", "127.0.0.1:1", *args])
    with pytest.raises(ConfigError, match=problem):
        options_from_args(parsed)


def test_defaults_read_committed_from_the_beginning_without_a_group_commit() -> None:
    parsed = build_parser().parse_args(["tail", "--bootstrap-servers", "127.0.0.1:1"])
    options, _ = options_from_args(parsed)
    assert options.topic == "cdr-events"
    assert options.start == "beginning"
    assert options.consumer_config["isolation.level"] == "read_committed"
    assert options.consumer_config["enable.auto.commit"] is False
    dead = build_parser().parse_args(["tail", "--bootstrap-servers", "x:1", "--dead-letters"])
    assert options_from_args(dead)[0].topic == "cdr-dead-letters"


def test_config_gives_brokers_topics_and_tls_settings_but_needs_no_feed_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("CDR_FEED_PASSWORD", raising=False)
    config = tmp_path / "c.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "b:9093"\ntopic = "t"\ndead_letter_topic = "t-dlq"\n'
        '[kafka.producer]\n"security.protocol" = "SSL"\n"linger.ms" = "50"\n'
        '[[feeds]]\nname = "main"\nurl = "https://x/billingfeed.php"\nlogin = "1"\n'
    )
    parsed = build_parser().parse_args(["tail", "--config", str(config), "--dead-letters"])
    options, _ = options_from_args(parsed)
    assert options.topic == "t-dlq"
    assert options.consumer_config["bootstrap.servers"] == "b:9093"
    assert options.consumer_config["security.protocol"] == "SSL"
    assert "linger.ms" not in options.consumer_config  # a producer setting
