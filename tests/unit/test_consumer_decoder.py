"""The README's Python decoder, taken from the README itself, against every schema version.

It must decode events of each released version, and of a newer version (the test-only
tests/data/cdr-v2-test.avsc, which inserts an optional field mid-record) into a v1
reader: resolving the writer's schema by fingerprint is what lets a v1 consumer survive
a v2 producer. Taken from the README, so the test breaks when the README changes.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import fastavro
import pytest
from cdr_samples import sample_records

from streamer.avro import CDR_SCHEMA_PATH, SingleObjectEncoder, fingerprint, to_avro_dict

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RELEASED = REPO / "schemas" / "released"
V1 = RELEASED / "cdr-v1.avsc"
V2 = REPO / "tests" / "data" / "cdr-v2-test.avsc"


def readme_block(marker: str, language: str) -> str:
    """The first ```language block after `<!-- marker`."""
    text = README.read_text()
    found = re.search(
        rf"<!-- {re.escape(marker)}[^>]*-->\s*```{language}\n(.*?)\n```", text, re.DOTALL
    )
    assert found, f"README.md has no {language} block after <!-- {marker} -->"
    return found.group(1)


@pytest.fixture(scope="module")
def snippet() -> dict[str, Any]:
    """The README's decoder, executed: its names (CdrDecoder, fingerprint, ...)."""
    namespace: dict[str, Any] = {"__name__": "readme_decoder"}
    code = readme_block("consumer-decoder-python", "python")
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace


def test_the_readme_shows_examples_cdr_decoder_as_it_is() -> None:
    code = readme_block("consumer-decoder-python", "python")
    assert (REPO / "examples" / "cdr_decoder.py").read_text().rstrip("\n") == code


def write(schema_path: Path, value: dict[str, Any]) -> bytes:
    """One single-object event written with the schema at `schema_path`."""
    schema = fastavro.parse_schema(json.loads(schema_path.read_text()))
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + fingerprint(schema))
    fastavro.schemaless_writer(buf, schema, value)
    return buf.getvalue()


def expected_v1(record: Any) -> dict[str, Any]:
    value = to_avro_dict(record)
    value["Time"] = record.time.replace(microsecond=record.time.microsecond // 1000 * 1000)
    return value


@pytest.mark.parametrize("writer", sorted(RELEASED.glob("*.avsc")), ids=lambda p: p.stem)
def test_events_of_every_released_version_decode(snippet: dict[str, Any], writer: Path) -> None:
    decoder = snippet["CdrDecoder"](RELEASED, reader=CDR_SCHEMA_PATH)
    for record in sample_records():
        assert decoder.decode(write(writer, to_avro_dict(record))) == expected_v1(record)


def test_the_streamers_own_events_decode(snippet: dict[str, Any]) -> None:
    decoder = snippet["CdrDecoder"](RELEASED, reader=V1)
    for record in sample_records():
        assert decoder.decode(SingleObjectEncoder().encode(record)) == expected_v1(record)


@pytest.fixture
def released_with_v2(tmp_path: Path) -> Path:
    """A consumer's copy of schemas/released/ after a v2 was released."""
    copy = tmp_path / "released"
    shutil.copytree(RELEASED, copy)
    shutil.copy(V2, copy / "cdr-v2.avsc")
    return copy


def test_a_v1_reader_survives_events_of_v2(snippet: dict[str, Any], released_with_v2: Path) -> None:
    decoder = snippet["CdrDecoder"](released_with_v2, reader=V1)
    for record in sample_records():
        v2_event = write(V2, {**to_avro_dict(record), "Tariff": "Peak"})
        # Inserted mid-record: reading it with v1 alone would misread every later field.
        decoded = decoder.decode(v2_event)
        assert decoded == expected_v1(record)
        assert "Tariff" not in decoded
    # A v2 reader gets the new field, and its default from v1 events.
    v2_reader = snippet["CdrDecoder"](released_with_v2, reader=V2)
    record = sample_records()[0]
    assert v2_reader.decode(write(V2, {**to_avro_dict(record), "Tariff": "Peak"}))["Tariff"] == (
        "Peak"
    )
    assert v2_reader.decode(write(V1, to_avro_dict(record)))["Tariff"] is None


def test_reading_v2_with_the_v1_schema_alone_goes_wrong() -> None:
    """Why the fingerprint matters: the body of a v2 event is not a v1 record."""
    record = sample_records()[0]
    body = write(V2, {**to_avro_dict(record), "Tariff": "Peak"})[10:]
    v1 = fastavro.parse_schema(json.loads(V1.read_text()))
    try:
        misread = fastavro.schemaless_reader(io.BytesIO(body), v1, None)
    except (EOFError, ValueError, UnicodeDecodeError):
        return  # failed outright
    assert misread != expected_v1(record)  # or read wrong values


def test_an_unknown_fingerprint_is_an_error_that_says_what_to_do(snippet: dict[str, Any]) -> None:
    decoder = snippet["CdrDecoder"](RELEASED, reader=V1)  # a copy from before v2
    v2_event = write(V2, {**to_avro_dict(sample_records()[0]), "Tariff": None})
    with pytest.raises(LookupError, match="update your copy of schemas/released/"):
        decoder.decode(v2_event)
    with pytest.raises(ValueError, match="not an Avro single-object"):
        decoder.decode(b"\x00\x00\x00\x00\x01rest")
