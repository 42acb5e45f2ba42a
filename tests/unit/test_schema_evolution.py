"""Schema evolution: every released schema version and the current one stay fully compatible.

Events written with any released version stay in Kafka for the topic's retention and
consumers upgrade when they choose, so compatibility is checked both ways (Avro schema
resolution): the current schema must read what every released version wrote (backward),
and every released version must read what the current one writes (forward).

Two checks that back each other up: `incompatibilities` applies the Avro specification's
resolution rules to the schemas themselves, and sample events go through fastavro's own
schema resolution (`schemaless_reader(buf, writer_schema, reader_schema)`).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import fastavro
import pytest
from cdr_samples import sample_records

from streamer.avro import CDR_SCHEMA_PATH, fingerprint, to_avro_dict

RELEASED_DIR = Path(__file__).resolve().parents[2] / "schemas" / "released"
# The CRC-64-AVRO fingerprint of cdr-v1.avsc's canonical form: a released schema never changes.
V1_FINGERPRINT = "f5c3922b0e5f8c57"

Json = Any  # a schema as parsed JSON: a type name, a list (union) or a dict

# Writer type -> reader types it is promoted to (the Avro specification, "Schema Resolution").
_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
# Attributes of a logical type that change what the value means.
_LOGICAL_ATTRIBUTES = ("logicalType", "precision", "scale")


def released_versions() -> list[tuple[int, Path]]:
    """(N, path) of every schemas/released/cdr-vN.avsc, oldest first."""
    found = []
    for path in RELEASED_DIR.glob("*.avsc"):
        match = re.fullmatch(r"cdr-v(\d+)\.avsc", path.name)
        assert match, f"{path.name}: released schemas are named cdr-vN.avsc"
        found.append((int(match[1]), path))
    return sorted(found)


def read_json(path: Path) -> Json:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the check --------------------------------------------------------------------------------


def incompatibilities(writer: Json, reader: Json) -> list[str]:
    """Why data written with `writer` cannot be read with `reader`; empty when it can."""
    return _resolve(writer, reader, {}, {}, "")


def full_incompatibilities(old: Json, new: Json) -> list[str]:
    """Both directions: `new` reads what `old` wrote, and `old` reads what `new` writes."""
    return [f"new cannot read old: {p}" for p in incompatibilities(old, new)] + [
        f"old cannot read new: {p}" for p in incompatibilities(new, old)
    ]


def _short(name: str) -> str:
    return name.rpartition(".")[2]


def _named(schema: Json, names: dict[str, Json]) -> Json:
    """A reference to a named type -> its definition; definitions are remembered as met."""
    if isinstance(schema, str) and schema not in _PRIMITIVES:
        return names[_short(schema)]
    if isinstance(schema, dict) and schema.get("type") in ("record", "enum", "fixed"):
        names.setdefault(_short(schema["name"]), schema)
    return schema


def _type_of(schema: Json) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    inner = schema["type"]
    return _type_of(inner) if isinstance(inner, dict | list) else str(inner)


def _logical(schema: Json) -> tuple[Any, ...]:
    return tuple(schema.get(a) for a in _LOGICAL_ATTRIBUTES) if isinstance(schema, dict) else ()


def _names_match(writer: Json, reader: Json) -> bool:
    aliases = {_short(a) for a in reader.get("aliases", [])}
    return _short(writer["name"]) in {_short(reader["name"]), *aliases}


def _resolve(  # one branch per kind of Avro type, in the specification's order
    writer: Json, reader: Json, wnames: dict[str, Json], rnames: dict[str, Json], at: str
) -> list[str]:
    writer, reader = _named(writer, wnames), _named(reader, rnames)
    wtype, rtype = _type_of(writer), _type_of(reader)
    where = at or "<root>"
    if wtype == "union":
        # Every branch the writer may have used must be readable.
        return [p for branch in writer for p in _resolve(branch, reader, wnames, rnames, at)]
    if rtype == "union":
        if any(not _resolve(writer, b, dict(wnames), dict(rnames), at) for b in reader):
            return []
        return [f"{where}: {wtype} matches no branch of the reader's union"]
    if _logical(writer) != _logical(reader) and (_logical(writer) or _logical(reader)):
        return [f"{where}: logical type {_logical(writer)} became {_logical(reader)}"]
    if wtype != rtype:
        if rtype in _PROMOTIONS.get(wtype, set()):
            return []
        return [f"{where}: type {wtype} became {rtype}"]
    if wtype == "record":
        if not _names_match(writer, reader):
            return [f"{where}: record {writer['name']} became {reader['name']}"]
        written = {f["name"]: f for f in writer["fields"]}
        problems = []
        for field in reader["fields"]:
            names = [field["name"], *field.get("aliases", [])]
            source = next((written[n] for n in names if n in written), None)
            path = f"{at}.{field['name']}" if at else field["name"]
            if source is None:
                if "default" not in field:
                    problems.append(
                        f"{path}: the reader needs it, the writer lacks it (no default)"
                    )
                continue
            problems += _resolve(source["type"], field["type"], wnames, rnames, path)
        return problems
    if wtype == "enum":
        if not _names_match(writer, reader):
            return [f"{where}: enum {writer['name']} became {reader['name']}"]
        missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if missing and "default" not in reader:
            return [f"{where}: the reader lacks the symbols {missing} (and has no default)"]
        return []
    if wtype == "fixed":
        if not _names_match(writer, reader) or writer["size"] != reader["size"]:
            return [f"{where}: fixed {writer['name']}[{writer['size']}] changed"]
        return []
    if wtype == "array":
        return _resolve(writer["items"], reader["items"], wnames, rnames, f"{at}[]")
    if wtype == "map":
        return _resolve(writer["values"], reader["values"], wnames, rnames, f"{at}{{}}")
    return []  # the same primitive


# --- the released versions ----------------------------------------------------------------------


def test_released_versions_are_numbered_from_one_without_gaps() -> None:
    versions = [n for n, _ in released_versions()]
    assert versions == list(range(1, len(versions) + 1))
    assert (RELEASED_DIR / "README.md").is_file()


def test_released_v1_never_changes() -> None:
    (_, v1), *_ = released_versions()
    schema = fastavro.parse_schema(read_json(v1))
    assert fingerprint(schema).hex() == V1_FINGERPRINT


def test_current_schema_is_the_newest_release_or_a_compatible_evolution() -> None:
    *_, (_, newest) = released_versions()
    if CDR_SCHEMA_PATH.read_bytes() == newest.read_bytes():
        return
    assert full_incompatibilities(read_json(newest), read_json(CDR_SCHEMA_PATH)) == []


@pytest.mark.parametrize(("version", "path"), released_versions(), ids=lambda v: str(v))
def test_every_release_is_fully_compatible_with_the_current_schema(
    version: int, path: Path
) -> None:
    assert full_incompatibilities(read_json(path), read_json(CDR_SCHEMA_PATH)) == []


@pytest.mark.parametrize(("version", "path"), released_versions(), ids=lambda v: str(v))
def test_events_of_every_release_read_with_the_current_schema(version: int, path: Path) -> None:
    released = fastavro.parse_schema(read_json(path))
    current = fastavro.parse_schema(read_json(CDR_SCHEMA_PATH))
    for record in sample_records():
        event = to_avro_dict(record)
        # Backward: written with the release, read with the current schema.
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, released, event)
        buf.seek(0)
        assert_same_values(fastavro.schemaless_reader(buf, released, current), event)
        # Forward: written with the current schema, read by a consumer still on the release.
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, current, event)
        buf.seek(0)
        assert_same_values(fastavro.schemaless_reader(buf, current, released), event)


def assert_same_values(read: dict[str, Any], written: dict[str, Any]) -> None:
    """Every value read back equals the one written (Time is written as epoch-free ms)."""
    for name, value in written.items():
        if name == "Time":
            t = read[name]
            millis = ((t.hour * 60 + t.minute) * 60 + t.second) * 1000 + t.microsecond // 1000
            assert millis == value
        else:
            assert read[name] == value, name


# --- the check itself catches breaking changes ----------------------------------------------------


def current_schema() -> dict[str, Any]:
    schema: dict[str, Any] = read_json(CDR_SCHEMA_PATH)
    return schema


def field_of(schema: dict[str, Any], name: str, /) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def without(schema: dict[str, Any], name: str, /) -> dict[str, Any]:
    schema["fields"] = [f for f in schema["fields"] if f["name"] != name]
    return schema


def with_field(schema: dict[str, Any], name: str, /, **changes: Any) -> dict[str, Any]:
    field_of(schema, name).update(changes)
    return schema


def with_new_field(schema: dict[str, Any], field: dict[str, Any], /) -> dict[str, Any]:
    schema["fields"].append(field)
    return schema


NEW_CANNOT_READ_OLD = "new cannot read old"
OLD_CANNOT_READ_NEW = "old cannot read new"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s: without(s, "Profile"),
            [f"{OLD_CANNOT_READ_NEW}: Profile: the reader needs it, the writer lacks it "
             "(no default)"],
        ),
        (
            lambda s: with_field(s, "Seconds", type="string"),
            [f"{NEW_CANNOT_READ_OLD}: Seconds: type int became string",
             f"{OLD_CANNOT_READ_NEW}: Seconds: type string became int"],
        ),
        (
            lambda s: with_new_field(s, {"name": "Tariff", "type": "string"}),
            [f"{NEW_CANNOT_READ_OLD}: Tariff: the reader needs it, the writer lacks it "
             "(no default)"],
        ),
        (
            lambda s: with_field(s, "Direction", name="CallDirection"),
            [f"{NEW_CANNOT_READ_OLD}: CallDirection: the reader needs it, the writer lacks it "
             "(no default)",
             f"{OLD_CANNOT_READ_NEW}: Direction: the reader needs it, the writer lacks it "
             "(no default)"],
        ),
        (
            # An alias lets the new reader find the old name; old readers still need theirs.
            lambda s: with_field(s, "Direction", name="CallDirection", aliases=["Direction"]),
            [f"{OLD_CANNOT_READ_NEW}: Direction: the reader needs it, the writer lacks it "
             "(no default)"],
        ),
        (
            lambda s: {**s, "name": "CallRecord"},
            [f"{NEW_CANNOT_READ_OLD}: <root>: record CallDetailRecord became CallRecord",
             f"{OLD_CANNOT_READ_NEW}: <root>: record CallRecord became CallDetailRecord"],
        ),
    ],
    ids=["remove-field", "change-type", "add-field-without-default", "rename",
         "rename-with-alias", "rename-record"],
)  # fmt: skip
def test_breaking_changes_are_reported(change: Any, expected: list[str]) -> None:
    base = current_schema()
    changed = change(current_schema())
    assert full_incompatibilities(base, changed) == expected
    # fastavro's own resolution fails in exactly the directions the check reports.
    for direction, writer, reader in (
        (NEW_CANNOT_READ_OLD, base, changed),
        (OLD_CANNOT_READ_NEW, changed, base),
    ):
        if any(p.startswith(direction) for p in expected):
            with pytest.raises(fastavro.read.SchemaResolutionError):
                resolve_one(writer, reader)
        else:
            resolve_one(writer, reader)


def test_a_changed_decimal_scale_is_reported_though_fastavro_accepts_it() -> None:
    # The Avro specification: decimals that differ in scale or precision do not match.
    # fastavro decodes with the writer's scale without a word, so the check, not a trial
    # decode, is what catches this change.
    base = current_schema()
    charge = field_of(base, "Charge")["type"]
    changed = with_field(current_schema(), "Charge", type={**charge, "scale": 4})
    assert full_incompatibilities(base, changed) == [
        f"{NEW_CANNOT_READ_OLD}: Charge: logical type ('decimal', 18, 6) became ('decimal', 18, 4)",
        f"{OLD_CANNOT_READ_NEW}: Charge: logical type ('decimal', 18, 4) became ('decimal', 18, 6)",
    ]
    resolve_one(base, changed)  # no SchemaResolutionError


@pytest.mark.parametrize(
    "change",
    [
        lambda s: with_new_field(s, {"name": "Tariff", "type": "string", "default": ""}),
        lambda s: with_new_field(s, {"name": "Zone", "type": ["null", "string"], "default": None}),
        lambda s: {**s, "fields": s["fields"][::-1]},
        lambda s: with_field(s, "Seconds", doc="Seconds charged, rounded up to the minute."),
        lambda s: with_field(s, "Status", default="Ok"),
    ],
    ids=["add-field-with-default", "add-optional-field", "reorder-fields", "edit-doc",
         "add-default"],
)  # fmt: skip
def test_compatible_changes_pass(change: Any) -> None:
    base = current_schema()
    changed = change(current_schema())
    assert full_incompatibilities(base, changed) == []
    resolve_one(base, changed)
    resolve_one(changed, base)


def test_promotion_is_one_way() -> None:
    base = current_schema()
    widened = with_field(current_schema(), "Seconds", type="long")
    assert full_incompatibilities(base, widened) == [
        f"{OLD_CANNOT_READ_NEW}: Seconds: type long became int"
    ]


_ZERO = {"string": "", "int": 0, "long": 0}


def event_for(writer: dict[str, Any]) -> dict[str, Any]:
    """A sample event that `writer` can write: a new field gets its default, or a zero value."""
    sample = to_avro_dict(sample_records()[0])
    event = {}
    for field in writer["fields"]:
        name, kind = field["name"], _type_of(field["type"])
        if name in sample:
            event[name] = str(sample[name]) if kind == "string" else sample[name]
        else:
            event[name] = field["default"] if "default" in field else _ZERO[kind]
    return event


def resolve_one(writer: dict[str, Any], reader: dict[str, Any]) -> dict[str, Any]:
    """One sample event written with `writer`, read with `reader` (fastavro's resolution)."""
    writer_schema = fastavro.parse_schema(writer)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer_schema, event_for(writer))
    buf.seek(0)
    value: dict[str, Any] = fastavro.schemaless_reader(
        buf, writer_schema, fastavro.parse_schema(reader)
    )
    return value


# --- Java readers get java.lang.String ------------------------------------------------------------


def _strip_java_hints(schema: Json) -> Json:
    if isinstance(schema, dict):
        return {k: _strip_java_hints(v) for k, v in schema.items() if k != "avro.java.string"}
    if isinstance(schema, list):
        return [_strip_java_hints(s) for s in schema]
    return schema


@pytest.mark.parametrize(
    "path",
    [CDR_SCHEMA_PATH, *(p for _, p in released_versions())],
    ids=lambda p: p.name,
)
def test_string_fields_are_java_strings_without_changing_the_fingerprint(path: Path) -> None:
    schema = read_json(path)
    strings = [f for f in schema["fields"] if _type_of(f["type"]) == "string"]
    assert len(strings) >= 14  # AccountCode, Direction, CallType, AParty, ...
    for field in strings:
        assert field["type"] == {"type": "string", "avro.java.string": "String"}, field["name"]
    # The property is outside the parsing canonical form: the same fingerprint as without it.
    plain = fastavro.parse_schema(_strip_java_hints(schema))
    assert fingerprint(fastavro.parse_schema(schema)) == fingerprint(plain)
