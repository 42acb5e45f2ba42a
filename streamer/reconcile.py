"""Reconciliation: ask for recent hours again and publish the CDRs the fromid cursor skipped.

The provider's cursor means "IDs greater than this one". A row can become visible
after a higher ID was served (inserts committed out of order, a late-rated call, a
mediation batch loaded after the live stream); once the cursor has passed it, no
live poll ever fetches it. So, per feed:

1. Every CDR the live poll handles is noted in a `PublishedRecord`: per provider-local
   hour (the row's own Date and Time, what the provider's `date` and `hour` filter on),
   the IDs handled, as `IdRanges`. The record rides in the cursor record
   (`FeedCursor.published`), in the same transaction in exactly-once mode, and keeps
   only hours younger than twice the horizon.
2. A `Schedule` says which hour is due for a check: each hour is checked `checks`
   times as it ages, spaced geometrically from one hour after its end to `horizon_s`
   after it. Hours are dates and hours of the provider's zone, so the hour that
   repeats when clocks go back is one window (the provider's `hour` filter returns
   both), and the hour that clocks skip is asked for too (an account in another zone,
   such as the Chatham Islands, can have rows in it).
3. The `Reconciler` makes at most one such request per `min_interval_s` (the feed's
   poll interval by default), right after a successful poll: `date` and `hour`, the
   feed's own format and filters, `fromid` the record's floor. It publishes every
   row of the answer at or below the cursor that the record does not know (same
   event, same key, header `found_late`), notes it, and counts the check, all in
   one commit. Rows above the cursor are the live poll's; rows it knows are skipped.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Literal, Protocol, cast
from zoneinfo import ZoneInfo

from streamer.cursor import (
    CursorStore,
    FeedCursor,
    IdRanges,
    PublishedHours,
    TransactionalCursorStore,
    decode_ids,
    encode_ids,
)
from streamer.errors import BadResponseError, FeedUnavailableError
from streamer.events import Event
from streamer.metrics import FeedMetrics
from streamer.pipeline import Commit, Drive
from streamer.publisher import Publisher
from streamer.sink import EventSink
from streamer.sources.feed import FeedClient

log = logging.getLogger(__name__)

Window = tuple[date, int]  # a provider-local date and hour
FOUND_LATE_HEADER: tuple[tuple[str, str | bytes | None], ...] = (("found_late", b"true"),)
# The cursor record must stay well below Kafka's default message.max.bytes (1 MB).
MAX_RECORD_BYTES = 512 * 1024
_HOUR_S = 3600.0
# The feed clock ignores hours further ahead of the wall clock than this (clock skew).
_FUTURE_SLACK_S = 3600.0


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """How a feed re-checks recent hours (see the module docstring)."""

    horizon_s: float = 24 * _HOUR_S  # the last check of an hour, this long after its end
    checks: int = 3  # checks per hour
    min_interval_s: float = 600.0  # at most one reconciliation request this often
    # "wall": hours age with the wall clock. "feed": with the start of the newest hour the
    # feed published a CDR in (replays of old data, a provider running hours behind).
    clock: Literal["wall", "feed"] = "wall"

    def __post_init__(self) -> None:
        if not self.horizon_s > 0 or self.checks < 1 or self.min_interval_s < 0:
            raise ValueError("need horizon_s > 0, checks >= 1 and min_interval_s >= 0")


def check_ages(horizon_s: float, checks: int) -> tuple[float, ...]:
    """When an hour's checks fall due, in seconds after its end: geometric, 1 h to the horizon."""
    first = min(_HOUR_S, horizon_s)
    if checks == 1:
        return (horizon_s,)
    ratio = horizon_s / first
    return tuple(first * ratio ** (i / (checks - 1)) for i in range(checks))


def window_key(window: Window) -> str:
    day, hour = window
    return f"{day.isoformat()}T{hour:02d}"


def parse_window_key(key: str) -> Window:
    return date.fromisoformat(key[:10]), int(key[11:13])


def window_end(window: Window, zone: ZoneInfo) -> float:
    """When the local hour ends, in Unix seconds: for an hour that occurs twice, the second."""
    day, hour = window
    start = datetime(day.year, day.month, day.day, hour, tzinfo=zone, fold=1)
    return start.timestamp() + _HOUR_S


def window_start(window: Window, zone: ZoneInfo) -> float:
    """When the local hour begins, in Unix seconds: for an hour that occurs twice, the first."""
    day, hour = window
    return datetime(day.year, day.month, day.day, hour, tzinfo=zone, fold=0).timestamp()


def window_of(ts: float, zone: ZoneInfo) -> Window:
    """The local hour holding the instant `ts`."""
    local = datetime.fromtimestamp(ts, zone)
    return local.date(), local.hour


def windows_ending_between(lo: float, hi: float, zone: ZoneInfo) -> list[tuple[float, Window]]:
    """(end, window) of every local hour of the zone whose end is in (lo, hi], by end.

    Every date and hour is listed, so that a DST change neither lists the repeated hour
    twice nor leaves out the skipped one.
    """
    if hi <= lo:
        return []
    day = datetime.fromtimestamp(lo, UTC).astimezone(zone).date() - timedelta(days=1)
    last = datetime.fromtimestamp(hi, UTC).astimezone(zone).date() + timedelta(days=1)
    out: list[tuple[float, Window]] = []
    while day <= last:
        for hour in range(24):
            end = window_end((day, hour), zone)
            if lo < end <= hi:
                out.append((end, (day, hour)))
        day += timedelta(days=1)
    out.sort()
    return out


class Notes(Protocol):
    """What the drive loop tells about each CDR it handled (published or dead-lettered)."""

    def add(self, event: Event) -> None: ...

    def add_id(self, cdr_id: int) -> None: ...


class _Hour:
    """One hour of the record: the IDs handled in it, its checks, its encoding (cached)."""

    __slots__ = ("checks", "encoded", "ids")

    def __init__(self, ids: IdRanges, checks: int = 0, encoded: str | None = None) -> None:
        self.ids = ids
        self.checks = checks
        self.encoded = encoded


class PublishedRecord:
    """The IDs handled per provider-local hour: the working copy of `FeedCursor.published`.

    `add` is on the hot path (once per published CDR): it switches hours only when the
    row's hour differs from the previous row's, and `IdRanges.add` of an ascending ID
    is an append or an increment. Hours older than `Schedule.keep_s` are not kept, and
    an hour's IDs are dropped once its last check is made.
    """

    def __init__(
        self,
        schedule: Schedule,
        floor: int,
        after: float = 0.0,
        hours: dict[Window, _Hour] | None = None,
        since: float = 0.0,
    ) -> None:
        self.schedule = schedule
        self.floor = floor
        self.after = after
        # When the record began (0: not yet known): an hour that ended before is checked
        # only if the first poll found CDRs in it (not, say, the hours before initial_cursor).
        self.since = since
        self.hours: dict[Window, _Hour] = hours or {}
        self.missed = 0  # hours dropped with checks still due (metrics take and reset it)
        self.committed: PublishedHours | None = None  # the snapshot last made durable
        self._fetched: set[Window] = set()  # hours first fetched since the last snapshot
        self._day: date | None = None
        self._hour = -1
        self._current: _Hour | None = None
        self._newest: Window | None = max(self.hours) if self.hours else None
        self._keep_from = schedule.keep_from(self)
        self._most_hours = int(4 * schedule.keep_s / _HOUR_S) + 64

    @classmethod
    def load(cls, schedule: Schedule, state: FeedCursor) -> PublishedRecord:
        """The working record of a committed state; a state without one starts it at its cursor."""
        snapshot = state.published
        if snapshot is None:
            return cls(schedule, state.cursor)
        hours = {
            parse_window_key(key): _Hour(decode_ids(ids), checks, ids)
            for key, checks, ids in snapshot.hours
        }
        record = cls(schedule, snapshot.floor, snapshot.after, hours, snapshot.since)
        record.committed = snapshot
        return record

    # --- noting what was handled ------------------------------------------------------------

    def add(self, event: Event) -> None:
        """Note a CDR handled in its own hour (the hot path)."""
        if event.hour != self._hour or event.day != self._day:
            self._switch(event.day, event.hour)
        current = self._current
        if current is not None:
            current.ids.add(event.cdr_id)

    def add_id(self, cdr_id: int, window: Window | None = None, *, fetched: bool = True) -> None:
        """Note an ID whose hour is not known (a dead letter): in `window`, else the newest.

        `fetched=False`: found by a check of `window` (which counts that check itself).
        """
        self._bucket(window, fetched).ids.add(cdr_id)

    def add_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Note IDs another source published (the paired SFTP source's), in the newest hour."""
        for first, last in ranges:
            if last > self.floor:
                self._bucket(None).ids.add_range(max(first, self.floor + 1), last)

    def _bucket(self, window: Window | None, fetched: bool = True) -> _Hour:
        # The newest hour is kept longest: an ID of an older hour is still known in it.
        if window is None:
            window = self._newest or window_of(self.schedule.now(self), self.schedule.zone)
        entry = self.hours.get(window)
        if entry is None:
            entry = self._new_hour(window, fetched)
        entry.encoded = None
        return entry

    def _new_hour(self, window: Window, fetched: bool = True) -> _Hour:
        entry = self.hours[window] = _Hour(IdRanges())
        if fetched:
            self._fetched.add(window)
        self._newer(window)
        return entry

    def _switch(self, day: date, hour: int) -> None:
        self._day, self._hour = day, hour
        window = (day, hour)
        entry = self.hours.get(window)
        if entry is None:
            if window < self._keep_from:
                self._current = None  # too old to be checked again: not worth keeping
                return
            entry = self._new_hour(window)
        entry.encoded = None
        self._current = entry

    def _newer(self, window: Window) -> None:
        if self._newest is not None and window <= self._newest:
            return
        self._newest = window
        if self.schedule.settings.clock == "feed":
            self._keep_from = self.schedule.keep_from(self)
        if len(self.hours) > self._most_hours:  # e.g. a first sync of months of backlog
            for old in [w for w in self.hours if w < self._keep_from]:
                del self.hours[old]

    # --- what reconciliation asks ------------------------------------------------------------

    def handled(self, cdr_id: int, window: Window) -> bool:
        """Was this ID handled: in its hour, or (a dead letter, an SFTP file) in any other."""
        entry = self.hours.get(window)
        if entry is not None and cdr_id in entry.ids:
            return True
        return any(cdr_id in e.ids for e in self.hours.values())

    def knows(self, cdr_id: int) -> bool:
        """Was this ID handled, in any hour held, or is it at or below the floor?"""
        return cdr_id <= self.floor or any(cdr_id in e.ids for e in self.hours.values())

    def checks(self, window: Window) -> int:
        entry = self.hours.get(window)
        return entry.checks if entry is not None else 0

    def checked(self, window: Window) -> None:
        entry = self.hours.get(window)
        if entry is None:
            entry = self.hours[window] = _Hour(IdRanges())
        entry.checks += 1

    def newest_with_ids(self, before: float) -> float | None:
        """The start of the newest hour holding an ID and starting before `before`."""
        zone = self.schedule.zone
        for window in sorted(self.hours, reverse=True):
            if self.hours[window].ids:
                start = window_start(window, zone)
                if start <= before:
                    return start
        return None

    # --- the committed form ------------------------------------------------------------------

    def prune(self) -> None:
        """Forget hours too old to be checked again; count those with checks still due."""
        schedule = self.schedule
        now = schedule.now(self)
        if not self.since:
            self.since = now
        if self._fetched:
            # An hour that ended before the record began, fetched now for the first time (a
            # first sync): that fetch is as good as the checks that were due by now. (Not
            # for later hours: their rows below the cursor were never fetched at all.)
            for window in self._fetched:
                entry = self.hours.get(window)
                end = window_end(window, schedule.zone)
                if entry is not None and end <= self.since:
                    age = now - end
                    entry.checks = max(entry.checks, bisect.bisect_right(schedule.ages, age))
            self._fetched.clear()
        boundary = max(self.after, now - schedule.keep_s)
        total = len(schedule.ages)
        for window in [w for w in self.hours if window_end(w, schedule.zone) <= boundary]:
            if self.hours[window].checks < total:
                self.missed += 1
            del self.hours[window]
        for entry in self.hours.values():
            if entry.checks >= total and entry.ids:
                # Checked for the last time: its IDs are not asked about again (dead letters
                # and SFTP IDs are noted in a newer hour). The hour stays, as done, until
                # it ages out, so that no row of it starts its checks over.
                entry.ids = IdRanges()
                entry.encoded = None
        self.after = boundary
        self._keep_from = max(self._keep_from, window_of(boundary, schedule.zone))

    def snapshot(self) -> PublishedHours:
        """The record as the cursor record holds it (pruned; changed hours encoded again)."""
        self.prune()
        hours = []
        for window in sorted(self.hours):
            entry = self.hours[window]
            if entry.encoded is None:
                entry.encoded = encode_ids(entry.ids)
            hours.append((window_key(window), entry.checks, entry.encoded))
        for entry in self.hours.values():
            if entry is not self._current:  # the hour being added to stays quick to add to
                entry.ids.compact()
        # The next add re-opens its hour, so that the next snapshot encodes it again.
        self._hour = -1
        snapshot = PublishedHours(self.floor, self.after, tuple(hours), self.since)
        while snapshot.size > MAX_RECORD_BYTES and len(hours) > 1:
            # Bounded, whatever the feed: the oldest hours are given up first.
            oldest = parse_window_key(hours.pop(0)[0])
            self.missed += self.hours.pop(oldest).checks < len(self.schedule.ages)
            self.after = max(self.after, window_end(oldest, self.schedule.zone))
            snapshot = PublishedHours(self.floor, self.after, tuple(hours), self.since)
        return snapshot


class Schedule:
    """Which hour is due for a check, by which clock; what the record keeps."""

    def __init__(
        self, settings: Reconciliation, zone: ZoneInfo, wall: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.zone = zone
        self.wall = wall
        self.ages = check_ages(settings.horizon_s, settings.checks)
        # An hour is kept, and may still get a check that is due, until twice the horizon.
        self.keep_s = 2 * settings.horizon_s

    def now(self, record: PublishedRecord) -> float:
        """The clock the hours age by (Unix seconds)."""
        wall = self.wall()
        if self.settings.clock == "wall":
            return wall
        start = record.newest_with_ids(wall + _FUTURE_SLACK_S)
        return record.after if start is None else max(start, record.after)

    def keep_from(self, record: PublishedRecord) -> Window:
        """The oldest hour the record keeps."""
        boundary = max(record.after, self.now(record) - self.keep_s)
        return window_of(boundary, self.zone) if boundary > 0 else (date.min, 0)

    def due(self, record: PublishedRecord) -> tuple[Window, int, float] | None:
        """The most overdue check: (hour, checks done so far, when it fell due), or None."""
        now = self.now(record)
        best: tuple[Window, int, float] | None = None
        for end, window in self.hours(record, now):
            done = record.checks(window)
            if done < len(self.ages):
                at = end + self.ages[done]
                if at <= now and (best is None or at < best[2]):
                    best = (window, done, at)
        return best

    def pending(self, record: PublishedRecord) -> int:
        """How many checks are due now (more than one: the request budget is behind)."""
        now = self.now(record)
        count = 0
        for end, window in self.hours(record, now):
            done = record.checks(window)
            count += sum(1 for age in self.ages[done:] if end + age <= now)
        return count

    def hours(self, record: PublishedRecord, now: float) -> list[tuple[float, Window]]:
        """The hours that may be checked now, with their ends."""
        return [
            (end, window)
            for end, window in windows_ending_between(
                max(record.after, now - self.keep_s), now, self.zone
            )
            if end > record.since or window in record.hours
        ]


class _LateNotes:
    """A check's notes: into the record (in the checked hour), and how late each CDR was."""

    def __init__(self, record: PublishedRecord, window: Window, now: float) -> None:
        self.record = record
        self.window = window
        self.now = now
        self.lateness: list[float] = []  # of the events produced since the last checkpoint

    def add(self, event: Event) -> None:
        self.record.add_id(event.cdr_id, self.window, fetched=False)
        self.lateness.append(max(0.0, self.now - event.timestamp_ms / 1000))

    def add_id(self, cdr_id: int) -> None:
        self.record.add_id(cdr_id, self.window, fetched=False)
        ended = window_end(self.window, self.record.schedule.zone)
        self.lateness.append(max(0.0, self.now - ended))


class ReconcilePosition:
    """One hour's answer, row by row: only the CDRs never published pass (found late)."""

    def __init__(
        self,
        start: FeedCursor,
        store: CursorStore,
        record: PublishedRecord,
        window: Window,
        *,
        exactly_once: bool,
        covered: Container[int] | None,
    ) -> None:
        self.start = start
        self.store = store
        self.record = record
        self.window = window
        self.exactly_once = exactly_once
        self.covered = covered
        self.complete = False  # the whole answer was read: the check counts
        self.high = 0  # the highest ID in the answer (for the next page)
        self._seen = IdRanges()

    def admit(self, cdr_id: int | None, raw: str) -> str | None:
        if cdr_id is None:
            return "without_id"  # nothing to know it by: see the README's limits
        if cdr_id > self.high:
            self.high = cdr_id
        if cdr_id > self.start.cursor:
            return "above_cursor"  # the live poll's to fetch
        if cdr_id <= self.record.floor:
            return "before_record"
        if not self._seen.add(cdr_id):
            return "duplicate"
        if self.record.handled(cdr_id, self.window):
            return "published"
        if self.covered is not None and cdr_id in self.covered:
            return "covered_by_sftp"
        return None

    def checkpoint_safe(self) -> bool:
        return True  # the cursor does not move: every checkpoint only adds to the record

    def commit(self, *, broken: bool = False) -> Commit:
        published = self.record.snapshot()
        complete = self.complete and not broken
        if complete:
            published = _with_check(published, self.window)
        state = replace(self.start, published=published)
        on_confirmed = partial(self._committed, state, complete)
        if self.exactly_once:
            store = cast(TransactionalCursorStore, self.store)
            return Commit((store.message_state(state),), on_confirmed)
        return Commit((), on_confirmed)

    def _committed(self, state: FeedCursor, complete: bool) -> None:
        if self.exactly_once:
            cast(TransactionalCursorStore, self.store).committed_state(state)
        else:
            self.store.commit_state(state)
        if complete:
            self.record.checked(self.window)
        self.record.committed = state.published
        self.start = state


def _with_check(published: PublishedHours, window: Window) -> PublishedHours:
    """The snapshot with one more check of `window` (which may hold no ID yet)."""
    key = window_key(window)
    hours = dict((k, (c, ids)) for k, c, ids in published.hours)
    checks, ids = hours.get(key, (0, encode_ids(IdRanges())))
    hours[key] = (checks + 1, ids)
    entries = tuple((k, c, i) for k, (c, i) in sorted(hours.items()))
    return replace(published, hours=entries)


@dataclass
class CheckResult:
    """What one reconciliation check did."""

    window: Window
    check: int  # 1-based
    rows: int = 0
    late: int = 0  # late CDRs published
    late_dead_lettered: int = 0
    requests: int = 0
    complete: bool = False
    skipped: dict[str, int] = field(default_factory=dict)


class Reconciler:
    """The reconciliation pass of one feed: at most one hour's check per `min_interval_s`."""

    def __init__(
        self,
        *,
        name: str,
        client: FeedClient,
        sink: EventSink,
        store: CursorStore,
        metrics: FeedMetrics,
        settings: Reconciliation,
        zone: ZoneInfo,
        exactly_once: bool,
        checkpoint_every: int,
        page_size: int = 0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.client = client
        self.sink = sink
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.schedule = Schedule(settings, zone, wall)
        self.exactly_once = exactly_once
        self.checkpoint_every = checkpoint_every
        self.page_size = page_size
        self._monotonic = monotonic
        self._last_request = -math.inf
        metrics.reconcile_series()

    def record(self, state: FeedCursor) -> PublishedRecord:
        return PublishedRecord.load(self.schedule, state)

    def ready(self) -> bool:
        """Has `min_interval_s` passed since the last reconciliation request?"""
        return self._monotonic() - self._last_request >= self.settings.min_interval_s

    def observe(self, record: PublishedRecord) -> None:
        """The record's gauges, and hours that aged out with checks still due."""
        committed = record.committed
        self.metrics.reconcile_state(
            hours=len(record.hours),
            record_bytes=committed.size if committed is not None else 0,
            due=self.schedule.pending(record),
        )
        if record.missed:
            log.warning(
                "feed %s: %d hours aged out of reconciliation with checks still due (the "
                "request budget is behind, or the streamer was down)", self.name, record.missed,
            )  # fmt: skip
            self.metrics.windows_missed(record.missed)
            record.missed = 0

    def check(
        self,
        publisher: Publisher,
        start: FeedCursor,
        record: PublishedRecord,
        covered: Container[int] | None,
    ) -> CheckResult | None:
        """Check the most overdue hour, if any; None when no check is due."""
        due = self.schedule.due(record)
        if due is None:
            return None
        window, done, _ = due
        result = CheckResult(window, done + 1)
        position = ReconcilePosition(
            start, self.store, record, window, exactly_once=self.exactly_once, covered=covered
        )
        notes = _LateNotes(record, window, self.schedule.now(record))
        self._check(publisher, position, notes, result)
        self._log(result)
        return result

    def _check(
        self,
        publisher: Publisher,
        position: ReconcilePosition,
        notes: _LateNotes,
        result: CheckResult,
    ) -> None:
        day, hour = position.window
        window = replace(self.client.query, date=day, hour=hour)

        def confirmed() -> None:  # after each checkpoint: what Kafka confirmed is counted
            self.metrics.late_found(notes.lateness)
            notes.lateness = []

        drive = Drive(
            self.sink, publisher, position, checkpoint_every=self.checkpoint_every,
            headers=FOUND_LATE_HEADER, fromid=position.record.floor, published=notes,
            on_checkpoint=confirmed,
        )  # fmt: skip
        fromid = position.record.floor
        while True:
            rows_before = drive.tally.rows
            self._last_request = self._monotonic()
            result.requests += 1
            try:
                with self.client.fetch(fromid, window) as rows:
                    drive.run(rows)
            except (BadResponseError, FeedUnavailableError) as exc:
                self.metrics.reconcile_request("failed")
                # Keep what was published; the check stays due and is made again.
                drive.checkpoint(broken=True)
                log.warning(
                    "feed %s: reconciliation of %s failed (%s); it is tried again later",
                    self.name, _shown(position.window), exc,
                )  # fmt: skip
                self._tally(drive, result)
                return
            self.metrics.reconcile_request("ok")
            answer = drive.tally.rows - rows_before
            # A provider that caps its answers: the rest of the hour, from its highest ID.
            if not (self.page_size and answer >= self.page_size and position.high > fromid):
                break
            fromid = position.high
        position.complete = True
        drive.checkpoint()
        result.complete = True
        self.metrics.window_checked()
        self._tally(drive, result)

    @staticmethod
    def _tally(drive: Drive, result: CheckResult) -> None:
        tally = drive.tally
        result.rows = tally.rows
        result.late = tally.published
        result.late_dead_lettered = tally.dead_lettered
        result.skipped = dict(tally.skipped)

    def _log(self, result: CheckResult) -> None:
        if not result.complete:
            return
        late = result.late + result.late_dead_lettered
        log.log(
            logging.WARNING if late else logging.INFO,
            "feed %s: reconciled %s (check %d of %d): %d rows, %d found late%s",
            self.name, _shown(result.window), result.check, len(self.schedule.ages),
            result.rows, late,
            f" ({result.late} published with header found_late, "
            f"{result.late_dead_lettered} dead-lettered)" if late else "",
        )  # fmt: skip


def _shown(window: Window) -> str:
    return f"{window[0].isoformat()} hour {window[1]:02d}"
