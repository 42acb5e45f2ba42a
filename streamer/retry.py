"""Backoff and Retry-After: how long a source waits before trying again, shared by every source."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

RETRY_AFTER_MAX_S = 3600.0


class Backoff:
    """Capped exponential backoff with full jitter (sleep a random time in [0, cap))."""

    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self, at_least_s: float = 0.0) -> float:
        cap = min(self.max_s, self.base_s * (2 ** min(self.attempt, 62)))
        self.attempt += 1
        # A server's Retry-After is honoured, up to an hour: a far-future date must not
        # park the feed for days (or overflow the wait).
        return max(min(at_least_s, RETRY_AFTER_MAX_S), self._rng.uniform(0, cap))

    def reset(self) -> None:
        self.attempt = 0


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit alone accepts "²"
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None
