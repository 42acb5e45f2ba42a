"""Before the first poll: Kafka reachable, and where a feed without a committed cursor begins.

- `wait_for_kafka`: while the cluster does not answer, one plain line says so (what,
  where, what to check), the process stays not ready, and it tries again with backoff
  until Kafka answers or the process is stopped.
- `StartingCursorStore`: a feed's cursor store, which on first use, when nothing was
  ever committed, decides the first cursor and commits it at once:
  1. the event topic already holds events of this feed (headers `feed` = its name,
     `source` = `feed`, no `replay`): the cursor is *recovered* from them
     (`recover_cursor`: the last poll's `fromid` header and how far each partition got),
     so a lost or moved cursor file never re-publishes history, nor skips a CDR;
  2. otherwise `start_from`: earliest (cursor 0: everything), an ID, a date (the first
     ID of that day, found with the feed's `date` and `hour` parameters, never fetching
     what came before it), or latest (the newest CDR now available, found the same way).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamer.config import StartFrom
from streamer.cursor import CursorStore, FeedCursor
from streamer.errors import ConfigError, DeliveryError, KafkaUnavailableError
from streamer.logs import LIBRDKAFKA, fields
from streamer.records import CallRecord, Row, to_record
from streamer.retry import Backoff
from streamer.sources.feed import FeedClient

log = logging.getLogger(__name__)

T = TypeVar("T")
STILL_WAITING_EVERY_S = 60.0
LATEST_LOOKBACK_DAYS = 31  # how far back `latest` looks for the newest CDR
SCAN_WINDOW = 20_000  # messages per partition read at a time, from the end backwards
# How far back per partition: a new feed on a topic of millions of events must not
# read them all before its first poll. Events of a feed that stopped publishing
# longer ago than this are not found (the feed then begins at start_from, as logged).
SCAN_LIMIT = 200_000


def wait_for_kafka(
    connect: Callable[[], T],
    stop: threading.Event,
    *,
    servers: str,
    backoff: Backoff | None = None,
    on_waiting: Callable[[str | None], None] | None = None,
) -> T | None:
    """`connect()` until it stops failing for want of Kafka; None if `stop` is set first.

    `on_waiting(reason)` is told each failure, and None once Kafka answered.
    """
    backoff = backoff or Backoff(1.0, 30.0)
    since = time.monotonic()
    next_note = 0.0
    attempts = 0
    while not stop.is_set():
        try:
            attempts += 1
            result = connect()
        except (KafkaException, KafkaUnavailableError) as exc:
            reason = _reason(exc)
            if on_waiting is not None:
                on_waiting(
                    f"waiting for Kafka at {servers} for {time.monotonic() - since:.0f} s, "
                    f"{attempts} tries ({reason})"
                )
            delay = backoff.next_delay()
            now = time.monotonic()
            if not next_note:
                log.warning(
                    "Kafka at %s does not answer (%s): check kafka.bootstrap_servers (or "
                    "KAFKA_BOOTSTRAP_SERVERS), that the broker runs and is reachable from here, "
                    "and [kafka.producer] security settings; not ready, trying again with "
                    "backoff", servers, reason,
                    extra=fields("kafka_unreachable", servers=servers, reason=reason),
                )  # fmt: skip
                next_note = now + STILL_WAITING_EVERY_S
            elif now >= next_note:
                log.info(
                    "still waiting for Kafka at %s after %.0f s (%s)", servers, now - since, reason
                )
                next_note = now + STILL_WAITING_EVERY_S
            stop.wait(delay)
            continue
        if next_note:
            log.info(
                "Kafka at %s answers after %.0f s: starting", servers, time.monotonic() - since
            )
        if on_waiting is not None:
            on_waiting(None)
        return result
    return None


def _reason(exc: Exception) -> str:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return str(exc.args[0].str())
    return str(exc)


# --- where a feed without a cursor begins ----------------------------------------------------


class StartingCursorStore:
    """A cursor store that decides (and commits) the first cursor of a feed that has none.

    Every other call goes to the store it wraps (`inner`), including what exactly-once
    needs (`message_state`, `committed_state`, `forget`).
    """

    def __init__(
        self,
        inner: CursorStore,
        *,
        feed: str,
        start_from: StartFrom,
        resolve: Callable[[StartFrom], int],
        recover: Callable[[], int | None],
    ) -> None:
        self.inner = inner
        self.feed = feed
        self.start_from = start_from
        self._resolve = resolve
        self._recover = recover
        self._checked = False

    def __repr__(self) -> str:
        return repr(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self) -> int:
        return self.load_state().cursor

    def commit_state(self, state: FeedCursor) -> None:
        self.inner.commit_state(state)

    def load_state(self) -> FeedCursor:
        if self._checked:
            return self.inner.load_state()
        committed = load_committed(self.inner)
        if committed is None:
            cursor, found = self._first_cursor()
            committed = FeedCursor(cursor)
            # Until a first commit the store hands out this cursor (also after `forget()`).
            if hasattr(self.inner, "initial"):
                self.inner.initial = cursor
            if found:
                # Committed now: a position recovered, or found by date or `latest`, must
                # not be looked for again (and found elsewhere) after a restart before any
                # new CDR. (earliest and an ID give the same cursor every time.)
                self.inner.commit_state(committed)
        self._checked = True
        return committed

    def _first_cursor(self) -> tuple[int, bool]:
        """The first cursor, and whether it was found (recovered, by date, latest)."""
        recovered = self._recover()
        if recovered is not None:
            log.warning(
                "feed %s: no committed cursor in %r, but the event topic holds events of this "
                "feed: recovered cursor %d from them, so history is not published again (the "
                "last poll's CDRs above it may be, at least once; none is skipped). To choose "
                "another: cdr-streamer cursor set",
                self.feed, self.inner, recovered,
                extra=fields("cursor_recovered", cursor=recovered),
            )  # fmt: skip
            return recovered, True
        cursor = self._resolve(self.start_from)
        log.info(
            "feed %s: no committed cursor yet; start_from %s gives cursor %d",
            self.feed, self.start_from, cursor,
            extra=fields("cursor_first", start_from=str(self.start_from), cursor=cursor),
        )  # fmt: skip
        return cursor, self.start_from.kind in ("date", "latest")


def load_committed(store: CursorStore) -> FeedCursor | None:
    """The store's committed cursor, or None when nothing was committed yet."""
    method = getattr(store, "load_committed", None)
    if callable(method):
        state: FeedCursor | None = method()
        return state
    return store.load_state()  # a store that cannot tell (memory): what it holds


def resolve_start(
    client: FeedClient,
    start: StartFrom,
    zone: ZoneInfo,
    *,
    now: datetime | None = None,
) -> int:
    """The first cursor `start` stands for; date and latest ask the feed by date and hour."""
    if start.kind == "earliest":
        return 0
    if start.kind == "id":
        return start.id
    today = (now or datetime.now(zone)).astimezone(zone)
    if start.kind == "date":
        assert start.day is not None
        day = start.day
        while day <= today.date():
            if _any_row(client, day):
                for hour in range(24):
                    ids = _ids(client, day, hour)
                    if ids:
                        return min(ids) - 1
            day += timedelta(days=1)
        log.info("feed %s: no CDR since %s yet: starting after the newest", client.name, start.day)
    newest = _newest_id(client, today)
    if newest is None:
        raise ConfigError(
            f"feed {client.name}: start_from {start}: no CDR in the last {LATEST_LOOKBACK_DAYS} "
            "days to start after; set start_from to earliest (a new account) or to an ID"
        )
    return newest


def _newest_id(client: FeedClient, now: datetime) -> int | None:
    for back in range(LATEST_LOOKBACK_DAYS + 1):
        day = now.date() - timedelta(days=back)
        if not _any_row(client, day):
            continue
        # From the hour after now: an account in a zone ahead (the Chatham Islands, 45 min)
        # has its newest CDRs there. The newest hour with CDRs and the one before it hold
        # the newest CDR of every zone.
        last_hour = min(23, now.hour + 1) if back == 0 else 23
        for hour in range(last_hour, -1, -1):
            ids = _ids(client, day, hour)
            if ids:
                before = _ids(client, day, hour - 1) if hour else []
                return max(ids + before)
    return None


def _any_row(client: FeedClient, day: date) -> bool:
    """Does `day` hold any CDR? Reads the first row only, then closes the response."""
    window = replace(client.query, date=day, hour=None)
    with client.fetch(0, window) as rows:
        return next(iter(rows), None) is not None


def _ids(client: FeedClient, day: date, hour: int) -> list[int]:
    window = replace(client.query, date=day, hour=hour)
    found: list[int] = []
    with client.fetch(0, window) as rows:
        for row in rows:
            record = to_record(row) if isinstance(row, Row) else row
            if isinstance(record, CallRecord):
                found.append(record.id)
    return found


def recover_cursor(
    bootstrap_servers: str,
    client_config: Mapping[str, str],
    topic: str,
    feed: str,
    *,
    timeout_s: float = 60.0,
) -> int | None:
    """A cursor under which every CDR of this feed is on `topic` (read_committed), or None.

    None when the topic holds no live event of the feed (headers `feed` = its name,
    `source` = `feed`, no `replay`, no `found_late`: reconciliation's finds lie below
    the cursor and carry no `fromid`). Each event carries `fromid`, the committed cursor its
    poll started from; the last poll is the one with the highest `fromid` (F). Its events
    went out in ID order, each partition keeping the order, so a crash left each
    partition holding a prefix of them: every ID up to the lowest of the partitions'
    highest IDs is there. A partition without an event of that poll stands at F. So:
    the cursor is the lowest, over all partitions, of (its highest ID of the last poll, or
    F). At least once: the events above it may be published again; none is skipped.

    Each partition is read from its end backwards, `SCAN_WINDOW` messages at a time, to the
    first window with events of the feed (at most `SCAN_LIMIT` messages back).
    """
    config: dict[str, Any] = {
        **client_config,
        "bootstrap.servers": bootstrap_servers,
        "group.id": f"cdr-streamer-recover-{uuid.uuid4().hex}",  # never commits offsets
        "enable.auto.commit": "false",
        "isolation.level": "read_committed",
        "enable.partition.eof": "true",
    }
    consumer = Consumer(config, logger=LIBRDKAFKA)
    wanted = feed.encode("utf-8")
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None:
            return None  # no topic yet: nothing was ever published
        tails = [
            _partition_tail(consumer, topic, partition, wanted, timeout_s)
            for partition in described.partitions
        ]
    except KafkaException as exc:
        raise DeliveryError(f"cannot read topic {topic}: {_reason(exc)}") from exc
    finally:
        consumer.close()
    found = [tail for tail in tails if tail is not None]
    if not found:
        return None
    if any(fromid is None for fromid, _ in found):
        highest = max(h for _, h in found)
        raise ConfigError(
            f"feed {feed}: no committed cursor, and topic {topic} holds events of this feed (up "
            f"to CDR {highest}) without a fromid header (published by an older cdr-streamer), "
            "so no cursor can be recovered safely. Choose one: cdr-streamer cursor set --feed "
            f"{feed} ID (e.g. {highest}, after the newest event; lower publishes again from "
            "there), or cursor set --feed NAME 0 to publish everything again"
        )
    last_poll = max(fromid for fromid, _ in found if fromid is not None)
    # Where each partition stands; one without an event of the last poll stands at its start.
    stands = [tail[1] if tail is not None and tail[0] == last_poll else last_poll for tail in tails]
    return max(last_poll, min(stands))


def _partition_tail(
    consumer: Consumer, topic: str, partition: int, wanted: bytes, timeout_s: float
) -> tuple[int | None, int] | None:
    """(highest fromid, highest cdr_id with it) of the feed's latest events in a partition."""
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
    low = max(low, high - SCAN_LIMIT)
    end = high
    deadline = time.monotonic() + max(timeout_s, 300.0)
    while end > low:
        start = max(low, end - SCAN_WINDOW)
        consumer.assign([TopicPartition(topic, partition, start)])
        best: tuple[int | None, int] | None = None
        while True:
            if time.monotonic() > deadline:
                raise DeliveryError(f"topic {topic} not read in time to recover a cursor")
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break
                raise DeliveryError(f"cannot read topic {topic}: {err.str()}")
            offset = msg.offset() or 0
            if offset >= end:
                break
            best = _better(best, dict(msg.headers() or []), wanted)
            if offset >= end - 1:
                break
        if best is not None:
            return best
        end = start
    return None


def _better(
    best: tuple[int | None, int] | None, headers: Mapping[str, Any], wanted: bytes
) -> tuple[int | None, int] | None:
    """`best` updated with one message: (highest fromid, its highest cdr_id)."""
    cdr_id, fromid = headers.get("cdr_id"), headers.get("fromid")
    if (
        headers.get("feed") != wanted
        or headers.get("source") != b"feed"
        or "replay" in headers
        or "found_late" in headers  # below the cursor by definition: says nothing of it
        or not isinstance(cdr_id, bytes)
    ):
        return best
    this = (int(fromid) if isinstance(fromid, bytes) else None, int(cdr_id))

    def key(t: tuple[int | None, int]) -> tuple[int, int]:
        return (-1 if t[0] is None else t[0], t[1])

    return this if best is None or key(this) > key(best) else best
