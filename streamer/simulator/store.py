"""Which IDs exist (backlog + growth over time) and the feed query over them."""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day

from streamer.simulator.config import MAX_OFFSET, MIN_OFFSET, SERVICE_CALL_TYPE
from streamer.simulator.data import CdrGenerator

logger = logging.getLogger("streamer.simulator")  # one name for the whole simulator

# --- the feed --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedQuery:
    """One billing-feed query, parameters already validated."""

    from_id: int
    date: date | None = None  # NZ local Date
    hour: int | None = None  # of the local Time; only with date
    calls_only: bool = False
    services_only: bool = False


class LateIds:
    """Which IDs become visible late, and when: once `late_by` higher IDs exist."""

    def __init__(
        self,
        ranges: Sequence[tuple[int, int]] = (),
        *,
        rate: float = 0.0,
        seed: int = 1,
        late_by: int = 100,
    ) -> None:
        merged = sorted(ranges)
        self._starts = [first for first, _ in merged]
        self._ends = [last for _, last in merged]
        self.rate = rate
        self.late_by = late_by
        digest = hashlib.sha256(f"cdr-streamer late {seed}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big") << 64

    def is_late(self, cdr_id: int) -> bool:
        """Is this ID one that is inserted late (whether visible by now or not)?"""
        i = bisect.bisect_right(self._starts, cdr_id) - 1
        if i >= 0 and cdr_id <= self._ends[i]:
            return True
        return self.rate > 0 and random.Random(self._key | cdr_id).random() < self.rate

    def hidden(self, cdr_id: int, high_id: int) -> bool:
        """Is this ID still invisible while the highest ID is `high_id`?"""
        return high_id < cdr_id + self.late_by and self.is_late(cdr_id)


class FeedStore:
    """The CDRs that exist: IDs 1..high_id, growing with the clock and with `add`.

    With `late`, some of them stay invisible until enough higher IDs exist.
    """

    def __init__(
        self,
        generator: CdrGenerator,
        *,
        backlog: int,
        rate_per_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        max_rows: int | None = None,
        late: LateIds | None = None,
    ) -> None:
        self.generator = generator
        self.late = late
        self._backlog = backlog
        self._rate = rate_per_s
        self._clock = clock
        self._t0 = clock()
        self._added = 0
        self._max_rows = max_rows
        self._lock = threading.Lock()

    @property
    def high_id(self) -> int:
        """The highest ID that exists now (computed from the clock, no thread involved)."""
        grown = math.floor(self._rate * max(0.0, self._clock() - self._t0)) if self._rate else 0
        with self._lock:
            return self._backlog + self._added + grown

    def add(self, n: int) -> None:
        """Make `n` more CDRs exist."""
        if n < 0:
            raise ValueError("cannot remove CDRs")
        with self._lock:
            self._added += n

    def visible(self, cdr_id: int, high_id: int | None = None) -> bool:
        """Does the feed serve this ID now (it exists, and is not a late one still hidden)?"""
        high = self.high_id if high_id is None else high_id
        hidden = self.late is not None and self.late.hidden(cdr_id, high)
        return 1 <= cdr_id <= high and not hidden

    def select(self, query: FeedQuery) -> Iterator[tuple[int, dict[str, str]]]:
        """(ID, canonical row) for each matching CDR with ID > from_id, ascending, lazily."""
        high = self.high_id
        late = self.late
        first, last = query.from_id + 1, high
        want_date = want_hour = None
        if query.date is not None:
            local = datetime.combine(query.date, time_of_day(query.hour or 0), UTC)
            span = timedelta(days=1) if query.hour is None else timedelta(hours=1)
            window = self.generator.ids_between(local - MAX_OFFSET, local + span - MIN_OFFSET)
            first, last = max(first, window.start), min(last, window.stop - 1)
            want_date = query.date.isoformat()
            want_hour = None if query.hour is None else f"{query.hour:02d}"
        count = 0
        for cdr_id in range(first, last + 1):
            if late is not None and late.hidden(cdr_id, high):
                continue
            row = self.generator.row(cdr_id)
            if want_date is not None and row["Date"] != want_date:
                continue
            if want_hour is not None and row["Time"][:2] != want_hour:
                continue
            is_service = row["CallType"] == SERVICE_CALL_TYPE
            if (query.calls_only and is_service) or (query.services_only and not is_service):
                continue
            yield cdr_id, row
            count += 1
            if self._max_rows is not None and count >= self._max_rows:
                return
