"""The README's Java decoder, run on a real JVM with Apache Avro's own classes.

examples/java/CdrDecoder.java (whose decoder part the README shows) reads single-object
events of cdr-v1 and of the test-only v2 (tests/data/cdr-v2-test.avsc, an optional field
inserted mid-record) into a v1 reader, with Avro's SchemaStore.Cache and
BinaryMessageDecoder, and gets Status as a java.lang.String. Avro's jars come from
scripts/bootstrap (Maven, into .cache/avro).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import fastavro
import pytest
from helpers import REPO_ROOT

from streamer.avro import SingleObjectEncoder, fingerprint, to_avro_dict
from streamer.records import CallRecord, Row, to_record
from streamer.simulator import BillingFeedSimulator, SimulatorConfig

JAVA_FILE = REPO_ROOT / "examples" / "java" / "CdrDecoder.java"
AVRO_JARS = REPO_ROOT / ".cache" / "avro"
RELEASED = REPO_ROOT / "schemas" / "released"
V2 = REPO_ROOT / "tests" / "data" / "cdr-v2-test.avsc"


def sample_records(n: int = 40) -> list[CallRecord]:
    """Simulator CDRs (calls, SMS, service fees; every Status), typed as the streamer types them."""
    sim = BillingFeedSimulator(SimulatorConfig(password="-", seed=17))
    records = []
    for cdr_id in range(1, n + 1):
        row = sim.row(cdr_id)
        record = to_record(Row(row, ",".join(row.values())))
        assert isinstance(record, CallRecord)
        records.append(record)
    return records


def test_the_readme_shows_the_java_decoder_as_it_is() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    java = JAVA_FILE.read_text()
    part = java.split("    // README: begin\n", 1)[1].split("    // README: end\n", 1)[0]
    assert f"```java\n{textwrap.dedent(part)}```" in readme


def test_java_decodes_v1_and_v2_events_into_v1_with_java_strings(tmp_path: Path) -> None:
    java = shutil.which("java")
    if java is None or not any(AVRO_JARS.glob("avro-*.jar")):
        pytest.fail("java or Apache Avro's jars are missing; run scripts/bootstrap", pytrace=False)
    released = tmp_path / "released"  # the consumer's copy, after v2 was released
    shutil.copytree(RELEASED, released)
    shutil.copy(V2, released / "cdr-v2.avsc")
    v2 = fastavro.parse_schema(json.loads(V2.read_text()))
    lines, expected = [], []
    for i, record in enumerate(sample_records()):
        if i % 2:
            buf = io.BytesIO(b"\xc3\x01" + fingerprint(v2))
            buf.seek(10)
            fastavro.schemaless_writer(buf, v2, {**to_avro_dict(record), "Tariff": "Peak"})
            lines.append(buf.getvalue().hex())
        else:
            lines.append(SingleObjectEncoder().encode(record).hex())
        ok = str(record.status == "Ok").lower()
        expected.append(
            f"{record.id}\t{record.status}\tjava.lang.String\t{ok}\t{record.account_code}\t-"
        )
    # Last, an event of a version the copy does not have: Avro refuses it, it does not guess.
    v3 = json.loads(V2.read_text())
    v3["fields"].append({"name": "Zone", "type": ["null", "string"], "default": None})
    v3_schema = fastavro.parse_schema(v3)
    buf = io.BytesIO(b"\xc3\x01" + fingerprint(v3_schema))
    buf.seek(10)
    fastavro.schemaless_writer(buf, v3_schema, {**to_avro_dict(sample_records()[0])})
    lines.append(buf.getvalue().hex())
    done = subprocess.run(
        [java, "-cp", f"{AVRO_JARS}/*", str(JAVA_FILE), str(released),
         str(RELEASED / "cdr-v1.avsc")],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.stdout.splitlines() == expected, done.stderr
    assert any("\tOk\tjava.lang.String\ttrue\t" in line for line in expected)
    assert done.returncode != 0
    assert "MissingSchemaException" in done.stderr
