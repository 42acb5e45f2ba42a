"""`cdr-streamer tail`: read the event or dead-letter topic, decode each message, print it.

For people looking at the stream, not for pipelines: it joins no consumer group and
commits nothing, so it never moves anybody's position. Events are decoded whatever
their framing, told apart by their first byte:

- Avro single-object encoding (C3 01, fingerprint, body): the writer's schema is found
  by its CRC-64-AVRO fingerprint among schemas/released/ (every version consumers may
  meet), the current schemas/cdr.avsc, and any `--schema` given;
- the Confluent Schema Registry framing (00, schema id, body): the writer's schema is
  fetched from the registry by its id (once per id).

Each event is printed with the writer's own schema, so fields a newer version added
show too. Dead letters (`--dead-letters`) are JSON already and printed as they are.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, cast
from uuid import uuid4

import fastavro
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.common._httpx_compat import httpx as _registry_httpx

from streamer.avro import (
    CDR_SCHEMA_PATH,
    REGISTRY_TIMEOUT_S,
    SCHEMA_DIR,
    SINGLE_OBJECT_MARKER,
    fingerprint,
)
from streamer.config import SCHEMA_REGISTRY_PASSWORD_ENV, load_kafka_settings
from streamer.errors import ConfigError, FatalError, RegistryUnavailableError

log = logging.getLogger(__name__)

RELEASED_DIR = SCHEMA_DIR / "released"
REGISTRY_MAGIC = 0
DEFAULT_TOPIC = "cdr-events"
DEFAULT_DEAD_LETTER_TOPIC = "cdr-dead-letters"
EXIT_OK, EXIT_FATAL, EXIT_UNDECODABLE = 0, 1, 4
# librdkafka settings of [kafka.producer] that say how to reach the cluster, and so
# apply to this consumer too (TLS, SASL, DNS); the producer-only ones do not.
_CLIENT_SETTING_PREFIXES = ("security.", "sasl.", "ssl.", "ssl_", "client.dns.", "socket.")
_BATCH = 10_000  # messages taken from librdkafka per call
# Consumer errors that no waiting mends: the topic is gone or not ours to read.
_STOPPING_ERRORS = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
TABLE_COLUMNS: tuple[tuple[str, int], ...] = (
    ("UTCDateTime", 24), ("ID", 10), ("AccountCode", 12), ("Direction", 9), ("CallType", 13),
    ("Status", 11), ("Seconds", 7), ("Charge", 12), ("feed", 10),
)  # fmt: skip
DEAD_LETTER_COLUMNS: tuple[tuple[str, int], ...] = (
    ("rejected_at", 29), ("feed", 10), ("source", 6), ("reason", 16), ("id", 10), ("detail", 0),
)  # fmt: skip


class DecodeError(Exception):
    """One message could not be decoded; the others still are."""


@dataclass(frozen=True, slots=True)
class WriterSchema:
    """A writer's schema, ready to decode with: logical types taken off, converted here."""

    name: str  # "cdr-v1", "cdr" (the current schemas/cdr.avsc), "registry id 3", a file's stem
    schema: dict[str, Any]  # as parsed; what the events were written with
    plain: dict[str, Any] = field(init=False)  # the same, top-level logical types removed
    # (field name, raw value -> JSON-ready text) for the top-level fields with a logical type
    converters: tuple[tuple[str, Callable[[Any], str]], ...] = field(init=False)

    def __post_init__(self) -> None:
        # fastavro would build date, time, datetime and Decimal objects that we would only
        # turn into text again: reading the plain values and formatting them is 2-3 times
        # faster. (The wire format is the same; a logical type only says what it means.)
        fields, converters = [], []
        for f in self.schema["fields"]:
            kind = f["type"]
            convert = _converter(kind) if isinstance(kind, dict) else None
            if convert is None:
                fields.append(f)
            else:
                fields.append({**f, "type": kind["type"]})
                converters.append((f["name"], convert))
        plain = {k: v for k, v in self.schema.items() if not k.startswith("__")}
        object.__setattr__(self, "plain", fastavro.parse_schema({**plain, "fields": fields}))
        object.__setattr__(self, "converters", tuple(converters))


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _converter(kind: dict[str, Any]) -> Callable[[Any], str] | None:
    """Raw Avro value -> its text, for the logical types the event schema uses."""
    logical = kind.get("logicalType")
    if logical == "date" and kind.get("type") == "int":
        return _cached(lambda days: date.fromordinal(days + _EPOCH_ORDINAL).isoformat())
    if logical == "time-millis" and kind.get("type") == "int":
        return lambda ms: (
            f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
        )
    if logical == "timestamp-millis" and kind.get("type") == "long":
        return _timestamp_text
    if logical == "decimal" and kind.get("type") == "bytes":
        scale = -int(kind.get("scale", 0))
        return _cached(
            lambda raw: format(Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(scale), "f")
        )
    return None  # another logical type: fastavro's own conversion, printed by _json_value


def _cached(convert: Callable[[Any], str], limit: int = 4096) -> Callable[[Any], str]:
    """`convert`, remembering results: a feed repeats a few dates and amounts endlessly."""
    seen: dict[Any, str] = {}

    def cached(raw: Any) -> str:
        text = seen.get(raw)
        if text is None:
            if len(seen) >= limit:
                seen.clear()
            text = seen[raw] = convert(raw)
        return text

    return cached


class SchemaSet:
    """Writer schemas by fingerprint: the released versions, the current one, extra files."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self.by_fingerprint: dict[bytes, WriterSchema] = {}
        for path in [*sorted(RELEASED_DIR.glob("*.avsc")), CDR_SCHEMA_PATH, *paths]:
            for file in sorted(path.glob("*.avsc")) if path.is_dir() else [path]:
                self.add(file)

    def add(self, path: Path) -> None:
        try:
            schema = fastavro.parse_schema(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, fastavro.schema.SchemaParseException) as exc:
            raise ConfigError(f"{path}: not a readable Avro schema: {exc}") from exc
        # The first file of a fingerprint names it: a release before the working copy.
        parsed = cast(dict[str, Any], schema)
        self.by_fingerprint.setdefault(fingerprint(parsed), WriterSchema(path.stem, parsed))


class EventDecoder:
    """Event value bytes -> (the record as the writer wrote it, the writer's schema name).

    Values are JSON-ready: dates, times and timestamps as ISO 8601 text (UTC for the
    timestamp), decimals as exact decimal text.
    """

    def __init__(self, schemas: SchemaSet, registry: SchemaRegistryClient | None = None) -> None:
        self.schemas = schemas
        self.registry = registry
        self._by_id: dict[int, WriterSchema] = {}

    def decode(self, value: bytes) -> tuple[dict[str, Any], str]:
        if value[:2] == SINGLE_OBJECT_MARKER:
            writer = self.schemas.by_fingerprint.get(value[2:10])
            if writer is None:
                raise DecodeError(
                    f"unknown schema fingerprint {value[2:10].hex()}: not in schemas/released/ "
                    "(a newer streamer?); pass its .avsc with --schema"
                )
            body = value[10:]
        elif value[:1] == bytes([REGISTRY_MAGIC]) and len(value) >= 5:
            writer = self._registry_schema(int.from_bytes(value[1:5], "big"))
            body = value[5:]
        else:
            raise DecodeError("neither Avro single-object encoding nor registry framing")
        try:
            record = cast(dict[str, Any], fastavro.schemaless_reader(
                io.BytesIO(body), writer.plain, None
            ))  # fmt: skip
            for name, convert in writer.converters:
                record[name] = convert(record[name])
        except (EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
            raise DecodeError(f"not a record of {writer.name}: {exc!r}") from exc
        return record, writer.name

    def _registry_schema(self, schema_id: int) -> WriterSchema:
        known = self._by_id.get(schema_id)
        if known is not None:
            return known
        if self.registry is None:
            raise DecodeError(
                f"registry framing (schema id {schema_id}): give --schema-registry-url "
                "(or a --config with schema_registry_url)"
            )
        try:
            found = self.registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code >= 500 or exc.http_status_code in (401, 403):
                raise RegistryUnavailableError(
                    f"schema registry answered {exc.http_status_code}: {exc.error_message}"
                ) from exc
            raise DecodeError(f"schema id {schema_id} is not in the registry") from exc
        except _registry_httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"schema registry unreachable: {type(exc).__name__}"
            ) from exc
        schema = fastavro.parse_schema(json.loads(found.schema_str or ""))
        writer = self._by_id[schema_id] = WriterSchema(
            f"registry id {schema_id}", cast(dict[str, Any], schema)
        )
        return writer


# --- what to read and how --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filters:
    """Which messages to print; an empty set matches every value."""

    accounts: frozenset[str] = frozenset()
    feeds: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    call_types: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()  # dead letters only


@dataclass(frozen=True, slots=True)
class TailOptions:
    topic: str
    consumer_config: dict[str, Any]
    start: str = "beginning"  # beginning | end | OFFSET | -N | an ISO 8601 time
    partitions: tuple[int, ...] = ()  # () = every partition
    follow: bool = False  # keep waiting for new messages at the end
    max_messages: int = 0  # stop after printing this many (0: no limit)
    dead_letters: bool = False
    output: str = "json"  # json | table
    filters: Filters = field(default_factory=Filters)


def parse_start(text: str) -> str | int | datetime:
    """--from: 'beginning', 'end', an offset (N), the last N of each partition (-N), or a time."""
    lowered = text.strip().lower()
    if lowered in ("beginning", "end"):
        return lowered
    if lowered.lstrip("-").isdigit():
        return int(lowered)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--from {text!r}: give beginning, end, an offset (1200), the last N of each "
            "partition (-20) or a time (2024-03-01T09:30:00+13:00; without an offset, UTC)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def start_offsets(
    consumer: Consumer, topic: str, partitions: Sequence[int], start: str
) -> list[TopicPartition]:
    """Where each partition starts, for `--from`."""
    where = parse_start(start)
    if where == "beginning":
        return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
    if where == "end":
        return [TopicPartition(topic, p, OFFSET_END) for p in partitions]
    if isinstance(where, datetime):
        ms = int(where.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in partitions], timeout=30
        )
        # -1: nothing at or after that time in the partition: start at its end.
        return [
            TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
            for tp in found
        ]
    assert isinstance(where, int)
    offsets = []
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
        offset = high + where if where < 0 else where  # -N: the last N offsets
        offsets.append(TopicPartition(topic, p, min(max(offset, low), high)))
    return offsets


def consumer_config(
    bootstrap_servers: str, *, read_committed: bool = True, client: dict[str, str] | None = None
) -> dict[str, Any]:
    """A consumer that reads by assignment: no group membership, no commits."""
    return {
        **(client or {}),
        "bootstrap.servers": bootstrap_servers,
        "client.id": "cdr-streamer-tail",
        # librdkafka wants a group id; nothing is ever committed under it.
        "group.id": f"cdr-streamer-tail-{uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
    }


# --- printing ------------------------------------------------------------------------------------


def _json_value(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)  # exact: never through a float
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date | time_of_day):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot print a {type(value).__name__}")


def _timestamp_text(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class Printer:
    """JSON lines (one object per message, its Kafka metadata around the value) or a table."""

    def __init__(self, out: IO[str], *, output: str, dead_letters: bool) -> None:
        self.out = out
        self.output = output
        self.columns = DEAD_LETTER_COLUMNS if dead_letters else TABLE_COLUMNS
        self._header_done = False
        self._encode = json.JSONEncoder(default=_json_value, ensure_ascii=False).encode

    def print(self, msg: Any, headers: dict[str, str], value: Any, writer: str) -> None:
        if self.output == "table":
            self._row({**headers, **value} if isinstance(value, dict) else headers)
            return
        ts_type, ts = msg.timestamp()
        document: dict[str, Any] = {
            "topic": msg.topic(),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "timestamp": _timestamp_text(ts) if ts_type else None,
            "key": _text(msg.key()),
            "headers": headers,
        }
        if writer:
            document["schema"] = writer
        document["value"] = value
        self.out.write(self._encode(document) + "\n")

    def _row(self, values: dict[str, Any]) -> None:
        if not self._header_done:
            self._header_done = True
            self.out.write(self._line({name: name for name, _ in self.columns}))
        self.out.write(self._line(values))

    def _line(self, values: dict[str, Any]) -> str:
        cells = []
        for name, width in self.columns:
            value = values.get(name, "")
            text = "" if value is None else str(_json_value(value) if _printable(value) else value)
            cells.append(text.ljust(width)[: width or None] if width else text)
        return " ".join(cells).rstrip() + "\n"


def _printable(value: object) -> bool:
    return isinstance(value, Decimal | date | time_of_day | bytes)


def _text(data: bytes | str | None) -> str | None:
    if data is None or isinstance(data, str):
        return data
    return data.decode("utf-8", "replace")


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class TailResult:
    printed: int = 0
    read: int = 0
    undecodable: int = 0


def tail(
    options: TailOptions,
    decoder: EventDecoder,
    out: IO[str],
    *,
    stop: Callable[[], bool] = lambda: False,
) -> TailResult:
    """Read `options.topic` from `options.start`; print what passes the filters."""
    consumer = Consumer(options.consumer_config)
    try:
        printer = Printer(out, output=options.output, dead_letters=options.dead_letters)
        return _tail(consumer, options, decoder, printer, stop)
    finally:
        consumer.close()


def _tail(
    consumer: Consumer,
    options: TailOptions,
    decoder: EventDecoder,
    printer: Printer,
    stop: Callable[[], bool],
) -> TailResult:
    topic = options.topic
    metadata = consumer.list_topics(topic, timeout=30)
    described = metadata.topics.get(topic)
    if described is None or described.error is not None or not described.partitions:
        problem = described.error if described is not None else "not found"
        raise ConfigError(f"topic {topic}: {problem} (check --topic or the config's topics)")
    partitions = sorted(described.partitions)
    if options.partitions:
        missing = sorted(set(options.partitions) - set(partitions))
        if missing:
            raise ConfigError(f"topic {topic} has no partition {missing[0]} (0-{partitions[-1]})")
        partitions = sorted(options.partitions)
    consumer.assign(start_offsets(consumer, topic, partitions, options.start))
    follow = options.follow or options.start.strip().lower() == "end"
    result = TailResult()
    at_end: set[int] = set()
    f = options.filters
    wanted = _value_filter(f, options.dead_letters)
    while not stop():
        if not follow and len(at_end) == len(partitions):
            break
        for msg in consumer.consume(_BATCH, 0.5):
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(cast(int, msg.partition()))
                    continue
                if error.fatal() or error.code() in _STOPPING_ERRORS:
                    raise FatalError(f"reading {topic}: {error.str()}")
                # A lost connection and the like: librdkafka reconnects by itself.
                log.warning("reading %s: %s", topic, error.str())
                continue
            at_end.discard(cast(int, msg.partition()))
            result.read += 1
            if f.accounts and _text(msg.key()) not in f.accounts:
                continue  # cheap filters first: key and headers need no decoding
            raw_headers = cast(list[tuple[str, bytes | None]], msg.headers() or [])
            headers = {k: v.decode("utf-8", "replace") if v else "" for k, v in raw_headers}
            if f.feeds and headers.get("feed") not in f.feeds:
                continue
            value, writer = _decode(msg, decoder, options.dead_letters, result)
            if value is None or not wanted(value):
                continue
            printer.print(msg, headers, value, writer)
            result.printed += 1
            if options.max_messages and result.printed >= options.max_messages:
                return result
    return result


def _decode(
    msg: Any, decoder: EventDecoder, dead_letters: bool, result: TailResult
) -> tuple[Any, str]:
    data = msg.value() or b""
    try:
        if dead_letters:
            return json.loads(data), ""
        return decoder.decode(data)
    except (DecodeError, ValueError) as exc:
        result.undecodable += 1
        log.error("%s [%d] offset %d: cannot decode: %s", msg.topic(), msg.partition(),
                  msg.offset(), exc)  # fmt: skip
        return None, ""


def _value_filter(f: Filters, dead_letters: bool) -> Callable[[Any], bool]:
    if dead_letters:
        return lambda v: not f.reasons or (isinstance(v, dict) and v.get("reason") in f.reasons)
    if not (f.statuses or f.call_types):
        return lambda _v: True
    return lambda v: (
        (not f.statuses or v.get("Status") in f.statuses)
        and (not f.call_types or v.get("CallType") in f.call_types)
    )


# --- the command line ----------------------------------------------------------------------------

TAIL_EPILOG = """\
examples:
  cdr-streamer tail --config streamer.toml --from -20              the last 20 of each partition
  cdr-streamer tail --config streamer.toml --from end              new events as they arrive
  cdr-streamer tail --config streamer.toml --account 81234567 --call-type International
  cdr-streamer tail --config streamer.toml --from 2024-03-01T09:00:00+13:00 --output table
  cdr-streamer tail --config streamer.toml --dead-letters --reason bad_date
  cdr-streamer tail --bootstrap-servers 127.0.0.1:9092 --topic cdr-events > events.jsonl

Prints one JSON object a line: topic, partition, offset, timestamp (the call's UTC time),
key (AccountCode), headers (cdr_id, source, feed), schema (the writer's: cdr-v1, or
"registry id N") and value (dates and times ISO 8601, amounts as exact decimal strings).
Exit codes: 0 done, 1 fatal error, 2 bad usage, 4 some messages could not be decoded."""


def add_tail_parser(sub: Any) -> argparse.ArgumentParser:
    """The `tail` subcommand, on the main parser's subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "tail",
        help="print the events (or dead letters) of the topic, decoded",
        description="Read the event topic (or the dead-letter topic) and print each message "
        "decoded, as JSON lines or a table. Joins no consumer group and commits nothing. "
        "Reads read_committed: events of an aborted or open transaction do not show.",
        epilog=TAIL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group("where to read")
    where.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the streamer's configuration: its brokers, topics, TLS/SASL settings and registry",
    )
    where.add_argument(
        "--bootstrap-servers",
        metavar="HOSTS",
        help="Kafka bootstrap servers (default: the config's, else KAFKA_BOOTSTRAP_SERVERS)",
    )
    where.add_argument(
        "--topic", help=f"the topic (default: the config's topic, else {DEFAULT_TOPIC})"
    )
    where.add_argument(
        "--dead-letters",
        action="store_true",
        help="read the dead-letter topic (the config's, else "
        f"{DEFAULT_DEAD_LETTER_TOPIC}; --topic overrides) and print its JSON records",
    )
    where.add_argument(
        "--from",
        dest="start",
        default="beginning",
        metavar="WHERE",
        help="beginning (default), end (then follow), an offset, -N (the last N of each "
        "partition) or a time (ISO 8601; UTC without an offset)",
    )
    where.add_argument(
        "--partition",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="only this partition (repeatable)",
    )
    where.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="at the end, wait for new messages until Ctrl-C (default: stop at the end)",
    )
    where.add_argument(
        "-n",
        "--max-messages",
        type=int,
        default=0,
        metavar="N",
        help="stop after printing N messages",
    )
    where.add_argument(
        "--read-uncommitted",
        action="store_true",
        help="also show messages of open and aborted transactions (default: read_committed)",
    )
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument(
        "--schema",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="another writer schema (.avsc, or a directory of them) to know by fingerprint, "
        "beside schemas/released/ and schemas/cdr.avsc",
    )
    decoding.add_argument(
        "--schema-registry-url",
        metavar="URL",
        help="the registry of events in registry framing (default: the config's); for basic "
        f"auth add --schema-registry-user, with the password in {SCHEMA_REGISTRY_PASSWORD_ENV}",
    )
    decoding.add_argument("--schema-registry-user", default="", metavar="USER")
    shown = parser.add_argument_group("what to print")
    shown.add_argument("--output", choices=["json", "table"], default="json")
    shown.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="CODE",
        help="only this AccountCode (the message key; repeatable)",
    )
    shown.add_argument(
        "--feed",
        action="append",
        default=[],
        metavar="NAME",
        help="only this feed or SFTP source (the `feed` header; repeatable)",
    )
    shown.add_argument(
        "--status",
        action="append",
        default=[],
        metavar="STATUS",
        help="only this Status, e.g. Busy (repeatable)",
    )
    shown.add_argument(
        "--call-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="only this CallType, e.g. International (repeatable)",
    )
    shown.add_argument(
        "--reason",
        action="append",
        default=[],
        metavar="REASON",
        help="dead letters only: only this rejection reason (repeatable)",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> tuple[TailOptions, EventDecoder]:
    """The command line (and the config file, if given) -> what to read and how to decode."""
    if args.dead_letters and (args.status or args.call_type):
        raise ConfigError("--status and --call-type filter events, not dead letters")
    if args.reason and not args.dead_letters:
        raise ConfigError("--reason filters dead letters: add --dead-letters")
    if args.max_messages < 0:
        raise ConfigError("--max-messages must be >= 0")
    parse_start(args.start)  # reports a bad --from before connecting
    client: dict[str, str] = {}
    registry_conf: dict[str, Any] = {}
    if args.config is not None:
        kafka = load_kafka_settings(args.config, bootstrap_servers=args.bootstrap_servers)
        bootstrap = kafka.bootstrap_servers
        topic = args.topic or (kafka.dead_letter_topic if args.dead_letters else kafka.topic)
        client = {k: v for k, v in kafka.producer.items() if k.startswith(_CLIENT_SETTING_PREFIXES)}
        url = args.schema_registry_url or kafka.schema_registry_url
        if url and kafka.schema_registry_user:
            secret = kafka.schema_registry_password.reveal()
            registry_conf["basic.auth.user.info"] = f"{kafka.schema_registry_user}:{secret}"
    else:
        bootstrap = args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        if not bootstrap:
            raise ConfigError("give --config, --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS")
        topic = args.topic or (DEFAULT_DEAD_LETTER_TOPIC if args.dead_letters else DEFAULT_TOPIC)
        url = args.schema_registry_url or ""
    if url and args.schema_registry_user:
        secret = os.environ.get(SCHEMA_REGISTRY_PASSWORD_ENV, "")
        registry_conf["basic.auth.user.info"] = f"{args.schema_registry_user}:{secret}"
    registry = None
    if url:
        registry_conf.update({"url": url, "timeout": REGISTRY_TIMEOUT_S})
        registry = SchemaRegistryClient.new_client(registry_conf)
    options = TailOptions(
        topic=topic,
        consumer_config=consumer_config(
            bootstrap, read_committed=not args.read_uncommitted, client=client
        ),
        start=args.start,
        partitions=tuple(args.partition),
        follow=args.follow,
        max_messages=args.max_messages,
        dead_letters=args.dead_letters,
        output=args.output,
        filters=Filters(
            accounts=frozenset(args.account),
            feeds=frozenset(args.feed),
            statuses=frozenset(args.status),
            call_types=frozenset(args.call_type),
            reasons=frozenset(args.reason),
        ),
    )
    return options, EventDecoder(SchemaSet(args.schema), registry)


def run_tail(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """`cdr-streamer tail`: the exit code (0, or 4 when some messages could not be decoded)."""
    options, decoder = options_from_args(args)
    out = out if out is not None else sys.stdout
    started = time.monotonic()
    try:
        result = tail(options, decoder, out)
    except KafkaException as exc:
        raise FatalError(f"reading {options.topic}: {exc.args[0]}") from exc
    except BrokenPipeError:  # `| head`: the reader has seen enough
        # Python's own recipe: no second BrokenPipeError when the interpreter flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    out.flush()
    elapsed = time.monotonic() - started
    log.info(
        "%s: %d messages read, %d printed, %d undecodable in %.1f s",
        options.topic, result.read, result.printed, result.undecodable, elapsed,
    )  # fmt: skip
    return EXIT_UNDECODABLE if result.undecodable else EXIT_OK
