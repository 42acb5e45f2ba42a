"""The cursor and its stores.

A feed's cursor is the highest CDR ID such that its event, and the event or dead
letter of every lower ID fetched with it, is confirmed by Kafka. It is the
`fromid` of the next request. Stores only ever hold a committed cursor.
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import os
import re
import tempfile
import time
import uuid
import zlib
from array import array
from collections.abc import Iterator, Mapping, MutableSequence, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamer.errors import ConfigError, DeliveryError, TopicError

# librdkafka's lines go through logging (folded there: streamer/logs.py), not to stderr.
_librdkafka_log = logging.getLogger("librdkafka")
if TYPE_CHECKING:
    from streamer.cursor_table import CursorTable


@dataclass(frozen=True, slots=True)
class FeedCursor:
    """A feed's committed position: the cursor, and what is confirmed above it.

    `cursor` is the `fromid` of the next request. `confirmed` holds ranges of IDs above
    it whose events are confirmed in Kafka although a lower ID may still be missing (a
    response that broke off, or came unsorted): a retry skips them, so it publishes
    nothing twice. `without_id` holds digests of rows without a readable ID that were
    dead-lettered at this position, so that they are dead-lettered once, not per poll.
    """

    cursor: int
    confirmed: tuple[tuple[int, int], ...] = ()
    without_id: tuple[str, ...] = ()
    # The IDs published per recent provider-local hour, for reconciliation (None: off).
    published: PublishedHours | None = None

    def to_json(self, feed: str) -> dict[str, Any]:
        out: dict[str, Any] = {"feed": feed, "cursor": self.cursor}
        if self.confirmed:
            out["confirmed_above"] = [list(pair) for pair in self.confirmed]
        if self.without_id:
            out["dead_lettered_without_id"] = list(self.without_id)
        if self.published is not None:
            out["published"] = self.published.to_json()
        out["committed_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        return out

    @classmethod
    def from_json(cls, data: Any) -> FeedCursor:
        """ValueError, KeyError or TypeError if `data` is not a feed cursor."""
        cursor = data["cursor"]
        if not isinstance(cursor, int) or isinstance(cursor, bool) or cursor < 0:
            raise ValueError(cursor)
        confirmed = tuple((a, b) for a, b in IdRanges.of(data.get("confirmed_above", [])))
        without_id = data.get("dead_lettered_without_id", [])
        if not isinstance(without_id, list) or not all(isinstance(d, str) for d in without_id):
            raise ValueError("dead_lettered_without_id must be a list of strings")
        published = data.get("published")
        hours = None if published is None else PublishedHours.from_json(published)
        return cls(cursor, confirmed, tuple(without_id), hours)


_HOUR_KEY = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}\Z")


@dataclass(frozen=True, slots=True)
class PublishedHours:
    """The cursor record's account of what was published recently, hour by hour.

    For reconciliation (streamer/reconcile.py), which asks the provider for recent
    hours again and publishes what is missing: it must know what is not missing.
    `hours` holds, per provider-local hour ("YYYY-MM-DDTHH", the row's own Date and
    Time), how often that hour was checked and the IDs handled in it (`encode_ids`).
    IDs at or below `floor` predate the record and are never published by a check;
    no hour ending at or before `after` (Unix seconds) is kept or checked again, and
    an hour that ended before `since` (when the record began) only if it holds IDs.
    """

    floor: int
    after: float = 0.0
    hours: tuple[tuple[str, int, str], ...] = ()  # (hour, checks done, encoded IDs), sorted
    since: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "since": self.since,
            "after": self.after,
            "hours": {hour: [checks, ids] for hour, checks, ids in self.hours},
        }

    @classmethod
    def from_json(cls, data: Any) -> PublishedHours:
        """ValueError, KeyError or TypeError if `data` is not such a record."""
        floor, hours = data["floor"], data.get("hours", {})
        after, since = data.get("after", 0.0), data.get("since", 0.0)
        if type(floor) is not int or floor < 0:
            raise ValueError(f"published.floor must be a whole number >= 0, not {floor!r}")
        for name, value in (("after", after), ("since", since)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"published.{name} must be a time in seconds, not {value!r}")
        if not isinstance(hours, dict):
            raise ValueError("published.hours must be an object")
        out = []
        for hour, value in sorted(hours.items()):
            checks, ids = value
            if not _HOUR_KEY.match(hour) or type(checks) is not int or checks < 0:
                raise ValueError(f"published.hours has a bad entry {hour!r}: {value!r}")
            decode_ids(ids)  # refuse a damaged record now, not at the first check
            out.append((hour, checks, ids))
        return cls(floor, float(after), tuple(out), float(since))

    @property
    def size(self) -> int:
        """Roughly the bytes the record adds to the cursor record."""
        return sum(len(hour) + len(ids) + 8 for hour, _, ids in self.hours) + 40


class CursorStore(Protocol):
    """Where a feed's committed cursor lives."""

    def load_state(self) -> FeedCursor:
        """The committed position, or the initial cursor when nothing was committed yet."""
        ...

    def commit_state(self, state: FeedCursor) -> None:
        """Make `state` durable; it must survive a crash right after this returns."""
        ...

    def load(self) -> int:
        """The committed cursor alone."""
        ...


class TransactionalCursorStore(CursorStore, Protocol):
    """A cursor store whose record can ride in the events' own Kafka transaction."""

    def message_state(self, state: FeedCursor) -> tuple[str, bytes, bytes]: ...

    def committed_state(self, state: FeedCursor) -> None: ...


def is_transactional_store(store: object) -> bool:
    """Does `store` have what joining a Kafka transaction needs?"""
    return callable(getattr(store, "message_state", None)) and callable(
        getattr(store, "committed_state", None)
    )


class FileCursorStore:
    """A small JSON file, replaced atomically: temp file, fsync, rename, fsync of the directory."""

    def __init__(self, path: Path, feed: str, initial: int = 0) -> None:
        self.path = path
        self.feed = feed
        self.initial = initial

    def __repr__(self) -> str:
        return f"FileCursorStore({str(self.path)!r})"

    def load(self) -> int:
        return self.load_state().cursor

    def load_state(self) -> FeedCursor:
        state = self.load_committed()
        return FeedCursor(self.initial) if state is None else state

    def load_committed(self) -> FeedCursor | None:
        """The committed position, or None when nothing was committed yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read cursor file {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
            state = FeedCursor.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            # Guessing a cursor could skip or replay millions of CDRs: stop and ask.
            raise ConfigError(
                f"cursor file {self.path} is unreadable ({exc!r}); fix it or remove it "
                "to start from the feed's initial_cursor"
            ) from None
        if data.get("feed", self.feed) != self.feed:
            raise ConfigError(
                f"cursor file {self.path} belongs to feed {data['feed']!r}, not {self.feed!r}"
            )
        return state

    def commit(self, cursor: int) -> None:
        self.commit_state(FeedCursor(cursor))

    def commit_state(self, state: FeedCursor) -> None:
        try:
            write_atomically(self.path, json.dumps(state.to_json(self.feed)) + "\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot write cursor file {self.path}: {exc.strerror}; "
                "check cursor_file and the directory's permissions"
            ) from None


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: temp file, fsync, rename, fsync of the directory."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class MemoryCursorStore:
    """A cursor held in memory: for backfills, which must not move the live cursor, and tests."""

    def __init__(self, initial: int = 0) -> None:
        self.state = FeedCursor(initial)

    def load(self) -> int:
        return self.state.cursor

    def load_state(self) -> FeedCursor:
        return self.state

    def commit(self, cursor: int) -> None:
        self.state = FeedCursor(cursor)

    def commit_state(self, state: FeedCursor) -> None:
        self.state = state


class KafkaCursorStore:
    """A feed's cursor as the latest record, keyed by the feed's name, in a compacted topic.

    So a container can restart on any host. `load()` reads the topic to its end with
    `read_committed`, so a cursor written inside an aborted transaction is never seen.
    In exactly-once mode the pipeline produces `message_state()` inside its transaction
    and calls `committed_state()` after; otherwise `commit_state()` produces and waits.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        feed: str,
        *,
        initial: int = 0,
        client_config: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        table: CursorTable | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.feed = feed
        # The process's reader of the cursor topic: a load asks it by key instead of
        # reading the whole topic (streamer/cursor_table.py).
        self.table = table
        self.initial = initial
        self._client_config = dict(client_config or {})
        self.timeout_s = timeout_s
        self._state: FeedCursor | None = None
        self._producer: Producer | None = None

    def __repr__(self) -> str:
        return f"KafkaCursorStore(topic={self.topic!r}, feed={self.feed!r})"

    def message_state(self, state: FeedCursor) -> tuple[str, bytes, bytes]:
        """(topic, key, value) of the record that commits `state`."""
        value = json.dumps(state.to_json(self.feed)).encode()
        return self.topic, self.feed.encode("utf-8"), value

    def committed_state(self, state: FeedCursor) -> None:
        """Remember a position whose record was committed by someone else (a transaction)."""
        self._state = state

    def load(self) -> int:
        return self.load_state().cursor

    def load_state(self) -> FeedCursor:
        if self._state is None:
            self._state = self._read()
        return self._state

    def load_committed(self) -> FeedCursor | None:
        """The committed position read from Kafka, or None when nothing was committed yet."""
        if self._state is not None:
            return self._state
        value = self._latest()
        if value is None:
            return None
        self._state = self._parse(value)
        return self._state

    def forget(self) -> None:
        """Drop the cached cursor: the next `load()` reads it back from Kafka."""
        self._state = None

    def commit(self, cursor: int) -> None:
        self.commit_state(FeedCursor(cursor))

    def commit_state(self, state: FeedCursor) -> None:
        if self.table is not None:  # the process's one cursor producer
            self.table.send(self.message_state(state), self.timeout_s)
            self._state = state
            return
        if self._producer is None:
            self._producer = _cursor_producer(self.bootstrap_servers, self._client_config)
        _produce_and_wait(self._producer, self.message_state(state), self.timeout_s)
        self._state = state

    def _read(self) -> FeedCursor:
        value = self._latest()
        if value is None:
            return FeedCursor(self.initial)
        return self._parse(value)

    def _latest(self) -> bytes | None:
        """The feed's last committed record: by key from the process's table, if it has one."""
        if self.table is not None:
            return self.table.latest(self.feed, self.timeout_s)
        return _read_latest(
            self.bootstrap_servers, self._client_config, self.topic, self.feed, self.timeout_s
        )

    def _parse(self, value: bytes) -> FeedCursor:
        try:
            return FeedCursor.from_json(json.loads(value))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"unreadable cursor record in {self.topic}: {exc!r}") from None


def _cursor_producer(bootstrap_servers: str, client_config: Mapping[str, str]) -> Producer:
    config = {**client_config, "bootstrap.servers": bootstrap_servers}
    config.update({"enable.idempotence": "true", "acks": "all"})
    return Producer(config, logger=_librdkafka_log)


def _produce_and_wait(
    producer: Producer, message: tuple[str, bytes, bytes], timeout_s: float
) -> None:
    """Produce one cursor record and wait for Kafka to confirm it."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    topic, key, value = message
    try:
        producer.produce(topic, value, key, on_delivery=on_delivery)
    except KafkaException as exc:
        raise DeliveryError(f"cursor not committed to {topic}: {exc.args[0].str()}") from exc
    if producer.flush(timeout_s) or errors:
        reason = errors[0].str() if errors else f"no answer within {timeout_s:g} s"
        raise DeliveryError(f"cursor not committed to {topic}: {reason}")


def _read_latest(
    bootstrap_servers: str,
    client_config: Mapping[str, str],
    topic_name: str,
    key: str,
    timeout_s: float,
) -> bytes | None:
    """The value of the latest committed record with `key` in the cursor topic, if any."""
    config = {
        **client_config,
        "bootstrap.servers": bootstrap_servers,
        "group.id": f"cdr-streamer-cursor-{uuid.uuid4().hex}",  # never commits offsets
        "enable.auto.commit": "false",
        "isolation.level": "read_committed",
        "enable.partition.eof": "true",
    }
    wanted = key.encode("utf-8")
    consumer = Consumer(config, logger=_librdkafka_log)
    try:
        return _read_to_end(consumer, config, topic_name, wanted, timeout_s)
    except KafkaException as exc:  # e.g. the broker unreachable: retriable, cursor unknown
        raise DeliveryError(f"cannot read cursor topic {topic_name}: {exc.args[0].str()}") from exc
    finally:
        consumer.close()


def _read_to_end(
    consumer: Consumer,
    config: Mapping[str, str],
    topic_name: str,
    wanted: bytes,
    timeout_s: float,
) -> bytes | None:
    """Read every partition of the cursor topic to its end; the last value of `wanted`."""
    metadata = consumer.list_topics(topic_name, timeout=timeout_s)
    topic = metadata.topics.get(topic_name)
    if topic is None or topic.error is not None:
        raise TopicError(f"cursor topic {topic_name} does not exist")
    partitions = list(topic.partitions)
    consumer.assign([TopicPartition(topic_name, p, OFFSET_BEGINNING) for p in partitions])
    at_end: dict[int, int] = {}  # partition -> the offset its EOF was reported at
    latest: bytes | None = None
    deadline = time.monotonic() + timeout_s
    # Read to the end of every partition (for read_committed: its last stable offset).
    while len(at_end) < len(partitions):
        if time.monotonic() > deadline:
            raise DeliveryError(f"cursor topic {topic_name} not read to its end in {timeout_s:g} s")
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                at_end[msg.partition() or 0] = msg.offset() or 0
                continue
            raise DeliveryError(f"cannot read cursor topic {topic_name}: {err.str()}")
        at_end.pop(msg.partition() or 0, None)
        if msg.key() == wanted:
            latest = msg.value()  # None for a tombstone: the key was deleted
    # read_committed stops at the last stable offset. Below the high watermark it
    # means another feed's transaction is still open there, and a newer cursor of
    # ours may sit behind it: better to retry than to start from an old cursor.
    # (The EOF comes with that offset; position() is undefined when nothing was read.
    # The high watermark must be asked as read_uncommitted: a read_committed client is
    # told the last stable offset instead.)
    probe = Consumer({**config, "isolation.level": "read_uncommitted"}, logger=_librdkafka_log)
    try:
        highs = {
            p: probe.get_watermark_offsets(TopicPartition(topic_name, p), timeout=timeout_s)[1]
            for p in at_end
        }
    finally:
        probe.close()
    for partition, eof_offset in at_end.items():
        if eof_offset < highs[partition]:
            raise DeliveryError(
                f"cursor topic {topic_name} has an open transaction at offset {eof_offset}; "
                "reading the cursor again once it ends"
            )
    return latest


class JsonFileCursorStore:
    """A cursor that is a JSON object (the SFTP collector's), in a file replaced atomically.

    `owner` names the source ("sftp:NAME"); a file written for another owner is refused.
    """

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner

    def __repr__(self) -> str:
        return f"JsonFileCursorStore({str(self.path)!r})"

    def load(self) -> dict[str, Any] | None:
        """The committed cursor, or None when nothing was committed yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read cursor file {self.path}: {exc.strerror}") from None
        return _parse_document(text.encode("utf-8"), self.owner, f"cursor file {self.path}")

    def commit(self, value: Mapping[str, Any]) -> None:
        try:
            write_atomically(self.path, _document_json(self.owner, value) + "\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot write cursor file {self.path}: {exc.strerror}; "
                "check cursor_file and the directory's permissions"
            ) from None


class JsonKafkaCursorStore:
    """A JSON-object cursor as the latest record keyed by `owner` in the compacted cursor topic.

    Like `KafkaCursorStore`: `message()` rides in the pipeline's transaction in
    exactly-once mode, `committed()` follows; otherwise `commit()` waits on its own.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        owner: str,
        *,
        client_config: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        table: CursorTable | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.owner = owner
        self.table = table  # as KafkaCursorStore's
        self._client_config = dict(client_config or {})
        self.timeout_s = timeout_s
        self._loaded = False
        self._value: dict[str, Any] | None = None
        self._producer: Producer | None = None

    def __repr__(self) -> str:
        return f"JsonKafkaCursorStore(topic={self.topic!r}, key={self.owner!r})"

    def load(self) -> dict[str, Any] | None:
        if not self._loaded:
            if self.table is not None:
                raw = self.table.latest(self.owner, self.timeout_s)
            else:
                raw = _read_latest(
                    self.bootstrap_servers, self._client_config, self.topic, self.owner,
                    self.timeout_s,
                )  # fmt: skip
            where = f"cursor topic {self.topic}"
            self._value = None if raw is None else _parse_document(raw, self.owner, where)
            self._loaded = True
        return self._value

    def message(self, value: Mapping[str, Any]) -> tuple[str, bytes, bytes]:
        """(topic, key, value) of the record that commits `value`."""
        return self.topic, self.owner.encode("utf-8"), _document_json(self.owner, value).encode()

    def committed(self, value: Mapping[str, Any]) -> None:
        """Remember a cursor whose record was committed by a transaction."""
        self._value = dict(value)
        self._loaded = True

    def commit(self, value: Mapping[str, Any]) -> None:
        if self.table is not None:  # the process's one cursor producer
            self.table.send(self.message(value), self.timeout_s)
            self.committed(value)
            return
        if self._producer is None:
            self._producer = _cursor_producer(self.bootstrap_servers, self._client_config)
        _produce_and_wait(self._producer, self.message(value), self.timeout_s)
        self.committed(value)


# The store of a file source's cursor (files done, row of the current file, IDs published).
JsonCursorStore = JsonFileCursorStore | JsonKafkaCursorStore


def _document_json(owner: str, value: Mapping[str, Any]) -> str:
    return json.dumps(
        {
            "owner": owner,
            **value,
            "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        separators=(",", ":"),
    )


def _parse_document(raw: bytes, owner: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        # Guessing a cursor could skip or replay files: stop and ask.
        raise ConfigError(f"{where} is unreadable ({exc!r}); fix it or remove it") from None
    if data.get("owner") != owner:
        raise ConfigError(f"{where} belongs to {data.get('owner')!r}, not {owner!r}")
    return data


class IdRanges:
    """The set of IDs handled in one response, as sorted closed ranges.

    Feed IDs are nearly contiguous, so a million IDs are usually one range: memory
    stays flat where a Python set would take tens of megabytes. Where they are not (a
    login that sees one ID in ten of a shared platform), `compact` packs ranges that
    are no longer added to into machine integers: 16 bytes a range instead of about 80.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: MutableSequence[int] = []
        self._ends: MutableSequence[int] = []

    def compact(self) -> None:
        """Hold the ranges as arrays of 64-bit integers (every operation still works)."""
        if isinstance(self._starts, list) and len(self._starts) > 1:
            self._starts, self._ends = array("q", self._starts), array("q", self._ends)

    def add(self, n: int) -> bool:
        """Add `n`; False if it was already there."""
        starts, ends = self._starts, self._ends
        if not ends or n > ends[-1] + 1:
            starts.append(n)
            ends.append(n)
            return True
        if n == ends[-1] + 1:
            ends[-1] = n
            return True
        i = bisect.bisect_right(starts, n) - 1
        if i >= 0 and n <= ends[i]:
            return False
        # A new ID below the highest one: join the neighbouring ranges where they touch.
        joins_left = i >= 0 and ends[i] + 1 == n
        joins_right = i + 1 < len(starts) and starts[i + 1] - 1 == n
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = n
        elif joins_right:
            starts[i + 1] = n
        else:
            starts.insert(i + 1, n)
            ends.insert(i + 1, n)
        return True

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int):
            return False
        i = bisect.bisect_right(self._starts, n) - 1
        return i >= 0 and n <= self._ends[i]

    def __len__(self) -> int:
        """The number of ranges (not of IDs)."""
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The ranges, as (first, last) pairs in ascending order."""
        return zip(self._starts, self._ends, strict=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdRanges) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def copy(self) -> IdRanges:
        ranges = IdRanges()
        ranges._starts, ranges._ends = list(self._starts), list(self._ends)
        return ranges

    def discard_through(self, n: int) -> None:
        """Forget every ID at or below `n`."""
        i = bisect.bisect_right(self._ends, n)
        del self._starts[:i], self._ends[:i]
        if self._starts and self._starts[0] <= n:
            self._starts[0] = n + 1

    @property
    def last(self) -> int | None:
        """The highest ID, or None when empty."""
        return self._ends[-1] if self._ends else None

    def add_range(self, first: int, last: int) -> None:
        """Add every ID from `first` to `last`."""
        if not self._ends or first > self._ends[-1] + 1:
            self._starts.append(first)
            self._ends.append(last)
            return
        merged = IdRanges.of([*self, (first, last)])
        self._starts, self._ends = merged._starts, merged._ends

    @classmethod
    def of(cls, pairs: Sequence[Sequence[int]]) -> IdRanges:
        """IdRanges from (first, last) pairs, in any order; ValueError if one is not a pair."""
        checked: list[tuple[int, int]] = []
        for pair in pairs:
            first, last = pair
            if not (type(first) is int and type(last) is int and 0 <= first <= last):
                raise ValueError(f"not an ID range: {pair!r}")
            checked.append((first, last))
        ranges = cls()
        for first, last in sorted(checked):
            if ranges._ends and first <= ranges._ends[-1] + 1:
                ranges._ends[-1] = max(ranges._ends[-1], last)
            else:
                ranges._starts.append(first)
                ranges._ends.append(last)
        return ranges


# Raw varints shorter than this are stored as they are: zlib's header would outweigh them.
_COMPRESS_FROM_BYTES = 48


def encode_ids(ranges: IdRanges) -> str:
    """IdRanges as compact text for the cursor record; `decode_ids` reverses it.

    Each range is two unsigned LEB128 varints, its distance from the end of the one
    before and its length, then zlib and base64: a few bytes for an hour of
    contiguous IDs, about two bytes an ID where a feed's IDs are sparse (a login
    that sees one ID in ten of a shared platform).
    """
    out = bytearray()
    previous = -1
    for first, last in ranges:
        for n in (first - previous - 1, last - first):
            while n >= 0x80:
                out.append((n & 0x7F) | 0x80)
                n >>= 7
            out.append(n)
        previous = last
    if len(out) >= _COMPRESS_FROM_BYTES:
        return "z" + base64.b64encode(zlib.compress(bytes(out), 6)).decode("ascii")
    return "v" + base64.b64encode(bytes(out)).decode("ascii")


def decode_ids(text: object) -> IdRanges:
    """IdRanges from `encode_ids` text; ValueError if it is not such text."""
    if not isinstance(text, str) or text[:1] not in ("v", "z"):
        raise ValueError(f"not encoded IDs: {str(text)[:20]!r}")
    try:
        data = base64.b64decode(text[1:], validate=True)
        if text[0] == "z":
            data = zlib.decompress(data)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"not encoded IDs: {exc}") from None
    numbers: list[int] = []
    n = shift = 0
    for byte in data:
        n |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            continue
        numbers.append(n)
        n = shift = 0
    if shift or len(numbers) % 2:
        raise ValueError("encoded IDs end in the middle of a range")
    ranges = IdRanges()
    previous = -1
    for i in range(0, len(numbers), 2):
        first = previous + 1 + numbers[i]
        last = first + numbers[i + 1]
        ranges._starts.append(first)
        ranges._ends.append(last)
        previous = last
    ranges.compact()
    return ranges
