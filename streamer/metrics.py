"""Every metric, defined once against an injected registry.

Names follow the Prometheus conventions: one prefix (`cdr_streamer_`), base units,
`_total` on counters. Labels are bounded: a feed's configured name, a source, an
outcome or reason from a fixed list, and Status/Direction/CallType folded to a
known set plus `other`. Never an account code, a number or an ID.
"""

from __future__ import annotations

import time
from collections import Counter as TallyCounter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from streamer import __version__

PREFIX = "cdr_streamer"

KNOWN_STATUSES = frozenset(
    {"Ok", "Busy", "No Answer", "Unallocated", "Error", "Rejected", "Congestion"}
)
KNOWN_DIRECTIONS = frozenset({"inbound", "outbound", "onnet"})
KNOWN_CALL_TYPES = frozenset(
    {
        "Local",
        "National",
        "Mobile",
        "International",
        "SMS",
        "Onnet",
        "0800",
        "0900",
        "Directory",
        "Service",
    }
)
# The Status values that count as errors in the error-rate ratio (everything but Ok).
ERROR_STATUSES = frozenset(KNOWN_STATUSES - {"Ok"})


def fold(value: str, known: frozenset[str]) -> str:
    """A label value from a fixed set: unknown values become `other`, never a new series."""
    return value if value in known else "other"


class Metrics:
    """All metric families of one process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        Info(f"{PREFIX}_build", "Version of cdr-streamer", registry=registry).info(
            {"version": __version__}
        )
        self.requests = Counter(
            f"{PREFIX}_feed_requests_total",
            "Feed requests by outcome.",
            ["feed", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_feed_request_duration_seconds",
            "Feed request time, headers to last byte.",
            ["feed"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )
        self.received_bytes = Counter(
            f"{PREFIX}_feed_received_bytes_total",
            "Body bytes received from the feed.",
            ["feed"],
            registry=registry,
        )
        self.published = Counter(
            f"{PREFIX}_events_published_total",
            "CDR events confirmed by Kafka, by the call's Status, Direction and CallType.",
            ["feed", "source", "status", "direction", "call_type"],
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_rows_rejected_total",
            "Rows that could not become events; each went to the dead-letter topic.",
            ["feed", "source", "reason"],
            registry=registry,
        )
        self.skipped = Counter(
            f"{PREFIX}_rows_skipped_total",
            "Rows not published again: at or below the cursor, or repeated in a response.",
            ["feed", "source", "why"],
            registry=registry,
        )
        self.cursor = Gauge(
            f"{PREFIX}_cursor",
            "The committed cursor (highest CDR ID confirmed).",
            ["feed"],
            registry=registry,
        )
        self.last_success = Gauge(
            f"{PREFIX}_last_successful_poll_timestamp_seconds",
            "When the feed was last polled without error (Unix time).",
            ["feed"],
            registry=registry,
        )
        self.newest_event = Gauge(
            f"{PREFIX}_newest_event_timestamp_seconds",
            "UTCDateTime of the newest CDR confirmed in Kafka (Unix time).",
            ["feed"],
            registry=registry,
        )
        self.event_lag = Gauge(
            f"{PREFIX}_event_lag_seconds",
            "Now minus the UTCDateTime of the newest CDR confirmed in Kafka.",
            ["feed"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_records_in_flight",
            "Records fetched but not yet confirmed by Kafka.",
            ["feed"],
            registry=registry,
        )
        self.poll_errors = Counter(
            f"{PREFIX}_poll_errors_total",
            "Polls that failed, by error class.",
            ["feed", "kind"],
            registry=registry,
        )
        self.delivery_errors = Counter(
            f"{PREFIX}_delivery_errors_total",
            "Events or dead letters Kafka did not confirm.",
            ["feed"],
            registry=registry,
        )
        self.feed_up = Gauge(
            f"{PREFIX}_feed_up",
            "1 while the feed runs, 0 once it stopped on a fatal error (e.g. bad credentials).",
            ["feed"],
            registry=registry,
        )

    def for_feed(self, feed: str, source: str = "feed") -> FeedMetrics:
        return FeedMetrics(self, feed, source)


class FeedMetrics:
    """One feed's view of the metrics; counts are held per batch and added once confirmed."""

    def __init__(self, metrics: Metrics, feed: str, source: str) -> None:
        self.metrics = metrics
        self.feed = feed
        self.source = source
        self._newest_event_s = 0.0
        m = metrics
        self.cursor = m.cursor.labels(feed)
        self.in_flight = m.in_flight.labels(feed)
        self.last_success = m.last_success.labels(feed)
        self.newest_event = m.newest_event.labels(feed)
        self.feed_up = m.feed_up.labels(feed)
        self.delivery_errors = m.delivery_errors.labels(feed)
        self.received_bytes = m.received_bytes.labels(feed)
        self.request_duration = m.request_duration.labels(feed)
        m.event_lag.labels(feed).set_function(self._lag)
        self.feed_up.set(1)

    def _lag(self) -> float:
        return time.time() - self._newest_event_s if self._newest_event_s else 0.0

    def request(self, outcome: str, seconds: float, nbytes: int) -> None:
        self.metrics.requests.labels(self.feed, outcome).inc()
        self.request_duration.observe(seconds)
        self.received_bytes.inc(nbytes)

    def confirmed(
        self,
        published: TallyCounter[tuple[str, str, str]],
        rejected: TallyCounter[str],
        newest_event_s: float,
    ) -> None:
        """A batch is confirmed by Kafka: add its counts."""
        for (status, direction, call_type), n in published.items():
            self.metrics.published.labels(
                self.feed,
                self.source,
                fold(status, KNOWN_STATUSES),
                fold(direction, KNOWN_DIRECTIONS),
                fold(call_type, KNOWN_CALL_TYPES),
            ).inc(n)
        for reason, n in rejected.items():
            self.metrics.rejected.labels(self.feed, self.source, reason).inc(n)
        if newest_event_s > self._newest_event_s:
            self._newest_event_s = newest_event_s
            self.newest_event.set(newest_event_s)

    def skip(self, why: str, n: int = 1) -> None:
        if n:
            self.metrics.skipped.labels(self.feed, self.source, why).inc(n)

    def poll_error(self, kind: str) -> None:
        self.metrics.poll_errors.labels(self.feed, kind).inc()
