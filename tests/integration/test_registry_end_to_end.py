"""`cdr-streamer run` with `schema_registry_url` set writes the Confluent wire format to Kafka.

No Confluent-compatible registry can run on the test machines (none is installable from
the package registries they reach), so the streamer process uses confluent-kafka's
in-process mock registry (`mock://`). This covers everything but the registry's HTTP:
the setting, the encoder the CLI builds from it, and the framed events in Kafka. The HTTP
side (requests, auth, error mapping) is tested in tests/unit/test_schema_registry.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from helpers import (
    FEED_PASSWORD,
    SCHEMA_PATH,
    assert_matches_source,
    read_topic,
    run_streamer,
)

from streamer.simulator import BillingFeedSimulator, SimulatorConfig


def test_events_carry_registry_framing(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=300, seed=11)) as sim:
        config = streamer_config(
            [
                {
                    "name": "main",
                    "url": sim.url,
                    "login": "81234567",
                    "cursor_file": str(tmp_path / "cursor.json"),
                }
            ],
            schema_registry_url="mock://cdr-streamer-it",
        )
        result = run_streamer("run", "--config", str(config), "--once")
        assert result.returncode == 0, result.stderr
        rows = {cdr_id: sim.row(cdr_id) for cdr_id in range(1, 301)}

    messages = read_topic(kafka_bootstrap, topic_name)
    assert len(messages) == 300
    schema = fastavro.parse_schema(json.loads(SCHEMA_PATH.read_text()))
    schema_ids = set()
    for msg in messages:
        data = msg.value()
        assert data[0] == 0, "no Confluent magic byte"
        schema_ids.add(int.from_bytes(data[1:5], "big"))
        # Decoded with the .avsc alone: the body is plain Avro binary after the 5-byte header.
        value = fastavro.schemaless_reader(io.BytesIO(data[5:]), schema, None)
        assert msg.key().decode() == value["AccountCode"]
        assert_matches_source(value, rows[value["ID"]])
    assert len(schema_ids) == 1  # registered once, under one id

    # A Confluent consumer's deserializer decodes them, given the schema under that id.
    registry = SchemaRegistryClient.new_client({"url": "mock://consumer"})
    registered = registry.register_schema(f"{topic_name}-value", Schema(SCHEMA_PATH.read_text()))
    assert schema_ids == {registered}
    deserialize = AvroDeserializer(registry)
    context = SerializationContext(topic_name, MessageField.VALUE)
    for msg in messages[:50]:
        value = deserialize(msg.value(), context)
        assert_matches_source(value, rows[value["ID"]])
