"""Decode cdr-streamer events of any released schema version (Avro single-object encoding).

Copy this file and schemas/released/ into your consumer. Needs only fastavro.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

SINGLE_OBJECT_MARKER = b"\xc3\x01"


def fingerprint(schema: Any) -> bytes:
    """The schema's CRC-64-AVRO fingerprint (little-endian), as each event carries it."""
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


class CdrDecoder:
    """Event bytes -> a dict shaped by *your* schema version, whichever version wrote it.

    `released`: your copy of schemas/released/, every writer schema you may meet.
    `reader`: the .avsc your code was written against (one of the released ones).
    A field a newer writer added is dropped; one your version has and the writer's
    lacks gets its default. A fingerprint you do not know is an error, never a guess.
    """

    def __init__(self, released: Path, reader: Path) -> None:
        self.reader = fastavro.parse_schema(json.loads(reader.read_text()))
        self.writers: dict[bytes, Any] = {}
        for path in sorted(released.glob("*.avsc")):
            writer = fastavro.parse_schema(json.loads(path.read_text()))
            self.writers[fingerprint(writer)] = writer

    def decode(self, value: bytes) -> dict[str, Any]:
        if value[:2] != SINGLE_OBJECT_MARKER:
            raise ValueError("not an Avro single-object encoded event")
        writer = self.writers.get(value[2:10])
        if writer is None:
            raise LookupError(
                f"unknown schema fingerprint {value[2:10].hex()}: "
                "update your copy of schemas/released/"
            )
        record = fastavro.schemaless_reader(io.BytesIO(value[10:]), writer, self.reader)
        assert isinstance(record, dict)
        return record
