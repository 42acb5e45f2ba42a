"""Every metric, defined once against an injected registry.

Names follow the Prometheus conventions: one prefix (`cdr_streamer_`), base units
(seconds, bytes), `_total` on counters, timestamps as `_timestamp_seconds` (Unix
time). Labels are bounded: a feed's configured name, a source, an outcome or reason
from a fixed list, and Status/Direction/CallType folded to a known set plus
`other`. Never an account code, a number or an ID.

Three kinds of metric live here:

- the pipeline's own (`Metrics`, seen per feed through `FeedMetrics`), updated as
  requests finish, batches are confirmed and polls succeed or fail;
- librdkafka's statistics (`KafkaStats`), parsed from the producer's `stats_cb` JSON
  and exposed per feed by a collector at scrape time;
- the process and Python runtime metrics of prometheus_client (`process_*`, `python_*`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Protocol

import confluent_kafka
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from streamer import __version__
from streamer.records import REASONS

log = logging.getLogger(__name__)

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
# A row is a *call* (an attempt, answered or not) when its CallType is a voice call
# type. SMS and service fees (number rental, broadband, credits: CallType "Service")
# are not calls, and neither is a CallType this list does not know: the provider adds
# fee types more often than call types, and a fee counted as an answered call would
# hide a falling ASR. The call counters (attempts, answered, seconds) count calls only.
VOICE_CALL_TYPES = frozenset(KNOWN_CALL_TYPES - {"SMS", "Service"})
# The Status of an answered call (ASR = answered / attempts).
ANSWERED_STATUS = "Ok"
# The `outcome` of a feed request (streamer/sources/feed.py decides which); `error` is the
# fallback for an exception nobody expected.
REQUEST_OUTCOMES = (
    "ok",
    "auth_error",
    "http_5xx",
    "http_429",
    "http_4xx",
    "timeout",
    "connection_error",
    "bad_response",
    "too_large",  # decoded body over max_body_bytes
    "too_compressed",  # compressed body expanding over max_expansion_ratio
)
KNOWN_OUTCOMES = frozenset({*REQUEST_OUTCOMES, "error"})
KNOWN_REASONS = frozenset(REASONS)
SKIP_REASONS = (
    "below_cursor", "duplicate", "covered_by_feed", "covered_by_sftp", "confirmed_before",
    "dead_lettered_before",
)  # fmt: skip
# What went wrong talking to an SFTP server (streamer/sources/sftp.py decides which).
SFTP_ERROR_KINDS = (
    "connection_error", "timeout", "auth_error", "host_key", "unreadable_file", "after_action",
)  # fmt: skip

# How late a CDR found by reconciliation was (its call time to its publication): ten
# minutes to a week, as hours are re-checked up to the horizon (24 h by default) and
# overdue checks later still.
LATENESS_BUCKETS = (600, 1800, 3600, 7200, 4 * 3600, 8 * 3600, 86_400, 2 * 86_400, 7 * 86_400)
RECONCILE_OUTCOMES = ("ok", "failed")

# librdkafka states a broker connection can be in; only UP can carry requests.
_BROKER_UP = "UP"


def fold(value: str, known: frozenset[str]) -> str:
    """A label value from a fixed set: unknown values become `other`, never a new series."""
    return value if value in known else "other"


def is_call(call_type: str) -> bool:
    """Whether a row of this CallType is a call (see VOICE_CALL_TYPES), not an SMS or a fee."""
    return call_type in VOICE_CALL_TYPES


class Usage(Protocol):
    """What the usage KPIs need of a call: a `CallRecord`, or the `events.Event` of one."""

    @property
    def direction(self) -> str: ...
    @property
    def call_type(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def seconds(self) -> int: ...
    @property
    def network_seconds(self) -> int: ...
    @property
    def charge(self) -> Decimal: ...


class UsageTally:
    """Seconds and money of one batch, by (Direction, CallType); added once confirmed.

    The call counts come from the batch's (Status, Direction, CallType) tally; this
    holds what that tally cannot: connected and billed seconds of calls, and charges.
    """

    __slots__ = ("by_key",)

    def __init__(self) -> None:
        # (direction, call_type) -> [connected s, billed s, charge, credit]
        self.by_key: dict[tuple[str, str], list[Any]] = {}

    def add_all(self, calls: Iterable[Usage]) -> None:
        """`add` for each of `calls` (a block of events), inlined: once per CDR."""
        by_key = self.by_key
        for call in calls:
            key = (call.direction, call.call_type)
            usage = by_key.get(key)
            if usage is None:
                usage = by_key[key] = [0, 0, _ZERO, _ZERO]
            if call.call_type in VOICE_CALL_TYPES:
                if call.status == ANSWERED_STATUS:
                    usage[0] += call.network_seconds
                usage[1] += call.seconds
            charge = call.charge
            if charge > 0:
                usage[2] += charge
            elif charge < 0:
                usage[3] -= charge

    def add(self, record: Usage) -> None:
        key = (record.direction, record.call_type)
        usage = self.by_key.get(key)
        if usage is None:
            usage = self.by_key[key] = [0, 0, _ZERO, _ZERO]
        if record.call_type in VOICE_CALL_TYPES:
            if record.status == ANSWERED_STATUS:
                usage[0] += record.network_seconds
            usage[1] += record.seconds
        charge = record.charge
        if charge > 0:
            usage[2] += charge
        elif charge < 0:  # a credit: counters only rise, so credits count on their own
            usage[3] -= charge


_ZERO = Decimal(0)


class Metrics:
    """All metric families of one process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.feeds: dict[str, FeedMetrics] = {}
        # No `<counter>_created` series: the text format would carry them as extra gauges
        # that double the series count and that no query here uses. (Process-wide setting.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # What prometheus_client's global registry has (process_*, python_*); ours is injected.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        Info(
            f"{PREFIX}_build", "Version of cdr-streamer and of librdkafka", registry=registry
        ).info({"version": __version__, "librdkafka_version": confluent_kafka.libversion()[0]})
        self.requests = Counter(
            f"{PREFIX}_feed_requests_total",
            "Feed requests by outcome: ok, auth_error, http_5xx, http_429, http_4xx, timeout, "
            "connection_error, bad_response, too_large, too_compressed.",
            ["feed", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_feed_request_duration_seconds",
            "Feed request time, request sent to last byte of the body (or to the failure).",
            ["feed"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )
        self.received_bytes = Counter(
            f"{PREFIX}_feed_received_bytes_total",
            "Body bytes received from the feed (after Content-Encoding is undone).",
            ["feed"],
            registry=registry,
        )
        self.published = Counter(
            f"{PREFIX}_events_published_total",
            "CDR events confirmed by Kafka, by the call's Status, Direction and CallType "
            "(each folded to a known set plus `other`).",
            ["feed", "source", "status", "direction", "call_type"],
            registry=registry,
        )
        call_labels = ["feed", "source", "direction", "call_type"]
        self.call_attempts = Counter(
            f"{PREFIX}_call_attempts_total",
            "Calls confirmed by Kafka, answered or not, by Status (a call: CallType Local, "
            "National, Mobile, International, Onnet, 0800, 0900 or Directory; not SMS or "
            "service fees).",
            ["feed", "source", "status", *call_labels[2:]],
            registry=registry,
        )
        self.calls_answered = Counter(
            f"{PREFIX}_calls_answered_total",
            "Calls confirmed by Kafka whose Status is Ok (ASR = answered / attempts).",
            call_labels,
            registry=registry,
        )
        self.call_connected_seconds = Counter(
            f"{PREFIX}_call_connected_seconds_total",
            "NetworkSeconds (connected time) of answered calls (ACD = this / answered).",
            call_labels,
            registry=registry,
        )
        self.call_billed_seconds = Counter(
            f"{PREFIX}_call_billed_seconds_total",
            "Seconds charged for calls (the provider may round a call up to the minute).",
            call_labels,
            registry=registry,
        )
        self.charge = Counter(
            f"{PREFIX}_charge_nzd_total",
            "Charge including GST (NZD) of the events confirmed by Kafka: calls, SMS and "
            "service fees; credits (negative charges) count in charge_credit_nzd_total.",
            call_labels,
            registry=registry,
        )
        self.charge_credit = Counter(
            f"{PREFIX}_charge_credit_nzd_total",
            "Credits: the amount (NZD incl. GST, as a positive number) of events with a "
            "negative Charge. Net charge = charge_nzd_total - charge_credit_nzd_total.",
            call_labels,
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_rows_rejected_total",
            "Rows that could not become events, confirmed on the dead-letter topic, by reason.",
            ["feed", "source", "reason"],
            registry=registry,
        )
        self.skipped = Counter(
            f"{PREFIX}_rows_skipped_total",
            "Rows not published again: at or below the cursor (below_cursor), repeated "
            "in one response (duplicate), already published by the paired feed "
            "(covered_by_feed) or SFTP source (covered_by_sftp), confirmed by a try of this "
            "cursor that broke off (confirmed_before), or a row without an ID dead-lettered "
            "before (dead_lettered_before).",
            ["feed", "source", "reason"],
            registry=registry,
        )
        self.cursor = Gauge(
            f"{PREFIX}_committed_cursor",
            "The committed cursor: the highest CDR ID confirmed in Kafka with all before it.",
            ["feed"],
            registry=registry,
        )
        self.last_success = Gauge(
            f"{PREFIX}_last_successful_poll_timestamp_seconds",
            "When a poll of the feed last succeeded (Unix time; 0 before the first).",
            ["feed"],
            registry=registry,
        )
        self.last_failure = Gauge(
            f"{PREFIX}_last_failed_poll_timestamp_seconds",
            "When a poll of the feed last failed (Unix time; 0 if none has).",
            ["feed"],
            registry=registry,
        )
        self.failing_since = Gauge(
            f"{PREFIX}_feed_failing_since_timestamp_seconds",
            "When the feed's current run of failed polls began (Unix time); 0 while its "
            "last poll succeeded.",
            ["feed"],
            registry=registry,
        )
        self.poll_started = Gauge(
            f"{PREFIX}_poll_started_timestamp_seconds",
            "When the poll in progress began (Unix time); 0 between polls. A stuck poll "
            "shows as an old value.",
            ["feed"],
            registry=registry,
        )
        self.poll_interval = Gauge(
            f"{PREFIX}_feed_poll_interval_seconds",
            "The feed's configured poll interval (for alerts on stalled feeds).",
            ["feed"],
            registry=registry,
        )
        self.newest_event = Gauge(
            f"{PREFIX}_newest_event_timestamp_seconds",
            "UTCDateTime of the newest CDR confirmed in Kafka (Unix time; 0 until this "
            "process confirmed one).",
            ["feed"],
            registry=registry,
        )
        self.event_lag = Gauge(
            f"{PREFIX}_event_lag_seconds",
            "Now minus the UTCDateTime of the newest CDR confirmed in Kafka (NaN until this "
            "process confirmed one).",
            ["feed"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_records_in_flight",
            "Records fetched and produced but not yet confirmed by Kafka.",
            ["feed"],
            registry=registry,
        )
        self.poll_errors = Counter(
            f"{PREFIX}_poll_errors_total",
            "Polls that failed, by error class (AuthError, FeedUnavailableError, "
            "DeliveryError, ...).",
            ["feed", "kind"],
            registry=registry,
        )
        self.delivery_errors = Counter(
            f"{PREFIX}_delivery_errors_total",
            "Events or dead letters Kafka did not confirm: each failed checkpoint adds the "
            "messages still unconfirmed when it gave up, at least 1.",
            ["feed"],
            registry=registry,
        )
        self.feed_up = Gauge(
            f"{PREFIX}_feed_up",
            "1 while the feed runs, 0 once it stopped on a fatal error (e.g. bad credentials).",
            ["feed"],
            registry=registry,
        )
        self.timestamps_replaced = Counter(
            f"{PREFIX}_timestamps_replaced_total",
            "Events whose call time Kafka would refuse as a message timestamp (reason: "
            "before_1970, too_old, in_future), published with the produce time instead.",
            ["feed", "source", "reason"],
            registry=registry,
        )
        self.repeated_failures = Gauge(
            f"{PREFIX}_feed_repeated_failures",
            "Polls in a row that failed the same way from the same cursor (0 after a "
            "success): a feed held by input that breaks every time.",
            ["feed"],
            registry=registry,
        )
        self.late_cdrs = Histogram(
            f"{PREFIX}_late_cdr_lateness_seconds",
            "CDRs found late by reconciliation (never published by the live poll: the "
            "cursor had passed their ID before they became visible), confirmed in Kafka, by "
            "how late: from the call's UTCDateTime to the check that found them. _count is "
            "the number of late CDRs found (events and dead letters).",
            ["feed"],
            buckets=LATENESS_BUCKETS,
            registry=registry,
        )
        self.reconcile_requests = Counter(
            f"{PREFIX}_reconcile_requests_total",
            "Requests of the reconciliation pass (one provider-local date and hour), by "
            "outcome: ok, failed (after the client's retries).",
            ["feed", "outcome"],
            registry=registry,
        )
        self.reconcile_windows = Counter(
            f"{PREFIX}_reconcile_windows_checked_total",
            "Hours checked by reconciliation to the end of their answer.",
            ["feed"],
            registry=registry,
        )
        self.reconcile_missed = Counter(
            f"{PREFIX}_reconcile_windows_missed_total",
            "Hours that aged out of reconciliation (twice the horizon) with checks still due: "
            "the request budget was behind, or the streamer was down.",
            ["feed"],
            registry=registry,
        )
        self.reconcile_hours = Gauge(
            f"{PREFIX}_reconcile_record_windows",
            "Windows (provider-local hours) in the feed's record of published IDs.",
            ["feed"],
            registry=registry,
        )
        self.reconcile_bytes = Gauge(
            f"{PREFIX}_reconcile_record_bytes",
            "Size of the record of published IDs in the committed cursor record.",
            ["feed"],
            registry=registry,
        )
        self.reconcile_due = Gauge(
            f"{PREFIX}_reconcile_checks_due",
            "Reconciliation checks due now and not yet made (more than 1: behind budget).",
            ["feed"],
            registry=registry,
        )
        registry.register(_KafkaStatsCollector(self))

    def for_feed(
        self, feed: str, source: str = "feed", *, poll_interval_s: float | None = None
    ) -> FeedMetrics:
        """The metrics of one feed; its series exist (at zero) from now on."""
        feed_metrics = FeedMetrics(self, feed, source)
        if poll_interval_s is not None:
            self.poll_interval.labels(feed).set(poll_interval_s)
        self.feeds[feed] = feed_metrics
        return feed_metrics


class RecentCounts:
    """Events and dead letters confirmed in the last hour, in one-minute buckets (status page)."""

    BUCKET_S = 60.0
    SPAN_S = 3600.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[int, list[int]] = {}  # minute -> [events, dead letters]

    def add(self, events: int, dead_letters: int) -> None:
        minute = int(self._clock() // self.BUCKET_S)
        with self._lock:
            bucket = self._buckets.setdefault(minute, [0, 0])
            bucket[0] += events
            bucket[1] += dead_letters
            oldest = minute - int(self.SPAN_S // self.BUCKET_S)
            for old in [m for m in self._buckets if m <= oldest]:
                del self._buckets[old]

    def last_hour(self) -> tuple[int, int]:
        """(events, dead letters) confirmed in the last hour."""
        oldest = int(self._clock() // self.BUCKET_S) - int(self.SPAN_S // self.BUCKET_S)
        with self._lock:
            kept = [b for m, b in self._buckets.items() if m > oldest]
        return sum(b[0] for b in kept), sum(b[1] for b in kept)


class FeedMetrics:
    """One feed's view of the metrics; counts are held per batch and added once confirmed."""

    def __init__(self, metrics: Metrics, feed: str, source: str) -> None:
        self.metrics = metrics
        self.feed = feed
        self.source = source
        self._newest_event_s = 0.0
        self._failing_since_s = 0.0
        self._poll_started_s = 0.0
        self.last_error = ""  # the error class of the last failed poll
        self.kafka: KafkaStats | None = None  # the producer's latest librdkafka statistics
        self.recent = RecentCounts()  # for the status page
        self._kafka_poll: Callable[[], object] | None = None
        m = metrics
        self.cursor = m.cursor.labels(feed)
        self.in_flight = m.in_flight.labels(feed)
        self.last_success = m.last_success.labels(feed)
        self.last_failure = m.last_failure.labels(feed)
        self.failing_since = m.failing_since.labels(feed)
        self.poll_started = m.poll_started.labels(feed)
        self.newest_event = m.newest_event.labels(feed)
        self.feed_up = m.feed_up.labels(feed)
        self.delivery_errors = m.delivery_errors.labels(feed)
        self.received_bytes = m.received_bytes.labels(feed)
        self.request_duration = m.request_duration.labels(feed)
        self.repeated_failures = m.repeated_failures.labels(feed)
        for reason in ("before_1970", "too_old", "in_future"):
            m.timestamps_replaced.labels(feed, source, reason)
        m.event_lag.labels(feed).set_function(self._lag)
        # Series of the bounded label sets exist from the start, at zero: a counter
        # that first appears at 1 would hide that increment from rate() and increase().
        for outcome in REQUEST_OUTCOMES:
            m.requests.labels(feed, outcome)
        for reason in sorted(KNOWN_REASONS):
            m.rejected.labels(feed, source, reason)
        for reason in SKIP_REASONS:
            m.skipped.labels(feed, source, reason)
        self.feed_up.set(1)

    def lag_s(self) -> float | None:
        """Now minus the newest confirmed CDR's UTCDateTime; None until one was confirmed."""
        return time.time() - self._newest_event_s if self._newest_event_s else None

    def _lag(self) -> float:
        return time.time() - self._newest_event_s if self._newest_event_s else math.nan

    def request(self, outcome: str, seconds: float, nbytes: int) -> None:
        """FeedClient's on_request hook: one request finished, with this outcome."""
        self.metrics.requests.labels(self.feed, fold(outcome, KNOWN_OUTCOMES)).inc()
        self.request_duration.observe(seconds)
        self.received_bytes.inc(nbytes)

    def confirmed(
        self,
        published: TallyCounter[tuple[str, str, str]],
        rejected: TallyCounter[str],
        newest_event_s: float,
        usage: UsageTally | None = None,
    ) -> None:
        """A batch is confirmed by Kafka: add its counts."""
        m = self.metrics
        self.recent.add(sum(published.values()), sum(rejected.values()))
        for (status, direction, call_type), n in published.items():
            labels = (
                fold(status, KNOWN_STATUSES),
                fold(direction, KNOWN_DIRECTIONS),
                fold(call_type, KNOWN_CALL_TYPES),
            )
            m.published.labels(self.feed, self.source, *labels).inc(n)
            if is_call(call_type):
                m.call_attempts.labels(self.feed, self.source, *labels).inc(n)
                if status == ANSWERED_STATUS:
                    m.calls_answered.labels(self.feed, self.source, *labels[1:]).inc(n)
        for (direction, call_type), (connected, billed, charge, credit) in (
            usage.by_key.items() if usage is not None else ()
        ):
            where = (
                self.feed,
                self.source,
                fold(direction, KNOWN_DIRECTIONS),
                fold(call_type, KNOWN_CALL_TYPES),
            )
            if is_call(call_type):
                m.call_connected_seconds.labels(*where).inc(connected)
                m.call_billed_seconds.labels(*where).inc(billed)
            if charge:
                m.charge.labels(*where).inc(float(charge))
            if credit:
                m.charge_credit.labels(*where).inc(float(credit))
        for reason, n in rejected.items():
            self.metrics.rejected.labels(self.feed, self.source, fold(reason, KNOWN_REASONS)).inc(n)
        if newest_event_s > self._newest_event_s:
            self._newest_event_s = newest_event_s
            self.newest_event.set(newest_event_s)

    def reconcile_series(self) -> None:
        """The reconciliation series of this feed, at zero from now on (reconciliation is on)."""
        m = self.metrics
        for outcome in RECONCILE_OUTCOMES:
            m.reconcile_requests.labels(self.feed, outcome)
        m.reconcile_windows.labels(self.feed)
        m.reconcile_missed.labels(self.feed)
        m.late_cdrs.labels(self.feed)

    def reconcile_request(self, outcome: str) -> None:
        """One reconciliation request ended (ok or failed)."""
        self.metrics.reconcile_requests.labels(self.feed, outcome).inc()

    def window_checked(self) -> None:
        self.metrics.reconcile_windows.labels(self.feed).inc()

    def late_found(self, lateness_s: Iterable[float]) -> None:
        """CDRs found late and confirmed in Kafka, each with how late it was."""
        histogram = self.metrics.late_cdrs.labels(self.feed)
        for seconds in lateness_s:
            histogram.observe(seconds)

    def reconcile_state(self, *, hours: int, record_bytes: int, due: int) -> None:
        m = self.metrics
        m.reconcile_hours.labels(self.feed).set(hours)
        m.reconcile_bytes.labels(self.feed).set(record_bytes)
        m.reconcile_due.labels(self.feed).set(due)

    def windows_missed(self, n: int) -> None:
        self.metrics.reconcile_missed.labels(self.feed).inc(n)

    def timestamp_replaced(self, reason: str) -> None:
        """One event published with the produce time as its timestamp, for `reason`."""
        self.metrics.timestamps_replaced.labels(self.feed, self.source, reason).inc()

    def skip(self, reason: str, n: int = 1) -> None:
        """`n` rows not published again, for `reason` (one of SKIP_REASONS)."""
        if n:
            self.metrics.skipped.labels(self.feed, self.source, reason).inc(n)

    def poll_succeeded(self, now: float | None = None) -> None:
        """A poll ended without error: the feed is no longer failing."""
        self.last_success.set(time.time() if now is None else now)
        self._failing_since_s = 0.0
        self.failing_since.set(0)

    def poll_error(self, kind: str, now: float | None = None) -> None:
        """A poll failed with an error of class `kind`."""
        now = time.time() if now is None else now
        self.metrics.poll_errors.labels(self.feed, kind).inc()
        self.last_failure.set(now)
        self.last_error = kind
        if not self._failing_since_s:
            self._failing_since_s = now
            self.failing_since.set(now)

    def poll_began(self, now: float | None = None) -> None:
        """A poll starts: until `poll_ended`, its age shows on /readyz and in metrics."""
        self._poll_started_s = time.time() if now is None else now
        self.poll_started.set(self._poll_started_s)

    def poll_ended(self) -> None:
        self._poll_started_s = 0.0
        self.poll_started.set(0)

    def polling_for_s(self, now: float | None = None) -> float:
        """How long the poll in progress has been running; 0 between polls."""
        if not self._poll_started_s:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self._poll_started_s)

    def failing_for_s(self, now: float | None = None) -> float:
        """How long the feed's polls have been failing; 0 while the last one succeeded."""
        if not self._failing_since_s:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self._failing_since_s)

    def kafka_stats(self, text: str) -> None:
        """The producer's `stats_cb`: keep its latest statistics. Never raises (a callback)."""
        try:
            stats = parse_kafka_stats(text)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("feed %s: unreadable librdkafka statistics: %r", self.feed, exc)
            return
        previous = self.kafka
        if previous is not None:
            # A window without requests has no round-trip times: keep the last ones seen.
            if stats.rtt_avg_s is None:
                stats = replace(stats, rtt_avg_s=previous.rtt_avg_s, rtt_p99_s=previous.rtt_p99_s)
            if stats.queue_latency_p99_s is None:
                stats = replace(stats, queue_latency_p99_s=previous.queue_latency_p99_s)
        self.kafka = stats

    def watch_producer(self, poll: Callable[[], object]) -> None:
        """Call `poll` before each scrape (e.g. the feed's current producer's `poll(0)`).

        librdkafka hands statistics over only when its client is polled; between two
        polls of the feed the producer idles, and without this the queue gauges would
        show the last busy moment for as long as the feed waits.
        """
        self._kafka_poll = poll

    def refresh(self) -> None:
        """Serve the producer's pending callbacks, so `kafka` is current."""
        poll = self._kafka_poll
        if poll is None:
            return
        try:
            poll()
        except Exception:  # a scrape must not fail because a producer is closing
            log.debug(
                "feed %s: polling the producer before a scrape failed", self.feed, exc_info=True
            )


@dataclass(frozen=True, slots=True)
class KafkaStats:
    """What the metrics take from one librdkafka statistics report (STATISTICS.md).

    Counters are the client's totals since it started; `None` round-trip and latency
    values mean that no request was measured in the report's window.
    """

    queue_messages: int  # msg_cnt: messages in the producer queue, sent or not, unconfirmed
    queue_bytes: int  # msg_size
    queue_max_messages: int  # msg_max: queue.buffering.max.messages
    queue_max_bytes: int  # msg_size_max: queue.buffering.max.kbytes in bytes
    transmitted_messages: int  # txmsgs
    transmitted_bytes: int  # txmsg_bytes
    request_errors: int  # sum of brokers' txerrs
    request_retries: int  # sum of brokers' txretries
    request_timeouts: int  # sum of brokers' req_timeouts
    disconnects: int  # sum of brokers' disconnects
    brokers_up: int  # broker connections (cluster brokers and bootstrap addresses) that are UP
    brokers_down: int  # broker connections in any other state (connecting, down, idle)
    rtt_avg_s: float | None  # the slowest broker's average round-trip time
    rtt_p99_s: float | None  # the slowest broker's 99th percentile round-trip time
    queue_latency_p99_s: float | None  # the worst 99th percentile time a message waited to be sent


def _window_max(brokers: Iterable[dict[str, Any]], window: str, field: str) -> float | None:
    """The largest `field` (microseconds) of a windowed statistic, in seconds."""
    values = [float(b[window][field]) for b in brokers if int(b.get(window, {}).get("cnt", 0)) > 0]
    return max(values) / 1e6 if values else None


def parse_kafka_stats(text: str) -> KafkaStats:
    """One librdkafka statistics JSON report -> KafkaStats (ValueError etc. if unreadable)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("statistics are not a JSON object")
    # Every connection but librdkafka's internal ones. Not only the cluster's brokers
    # (nodeid >= 0): when all of them are unreachable librdkafka forgets them and goes
    # back to the bootstrap addresses (nodeid -1), which then are what is down.
    connections = [
        b
        for b in data.get("brokers", {}).values()
        if b.get("source") not in ("internal", "logical")
    ]
    up = sum(1 for b in connections if b.get("state") == _BROKER_UP)
    return KafkaStats(
        queue_messages=int(data["msg_cnt"]),
        queue_bytes=int(data["msg_size"]),
        queue_max_messages=int(data["msg_max"]),
        queue_max_bytes=int(data["msg_size_max"]),
        transmitted_messages=int(data["txmsgs"]),
        transmitted_bytes=int(data["txmsg_bytes"]),
        request_errors=sum(int(b.get("txerrs", 0)) for b in connections),
        request_retries=sum(int(b.get("txretries", 0)) for b in connections),
        request_timeouts=sum(int(b.get("req_timeouts", 0)) for b in connections),
        disconnects=sum(int(b.get("disconnects", 0)) for b in connections),
        brokers_up=up,
        brokers_down=len(connections) - up,
        rtt_avg_s=_window_max(connections, "rtt", "avg"),
        rtt_p99_s=_window_max(connections, "rtt", "p99"),
        queue_latency_p99_s=_window_max(connections, "int_latency", "p99"),
    )


# (name without prefix, help, value) of the per-feed metrics taken from KafkaStats.
_KAFKA_GAUGES: tuple[tuple[str, str, Callable[[KafkaStats], float | None]], ...] = (
    (
        "kafka_queue_messages",
        "Messages in the Kafka producer's queue, not yet confirmed by the broker.",
        lambda s: s.queue_messages,
    ),
    (
        "kafka_queue_bytes",
        "Bytes of the messages in the Kafka producer's queue.",
        lambda s: s.queue_bytes,
    ),
    (
        "kafka_queue_max_messages",
        "Capacity of the Kafka producer's queue in messages (queue.buffering.max.messages).",
        lambda s: s.queue_max_messages,
    ),
    (
        "kafka_queue_max_bytes",
        "Capacity of the Kafka producer's queue in bytes (queue.buffering.max.kbytes).",
        lambda s: s.queue_max_bytes,
    ),
    (
        "kafka_broker_rtt_average_seconds",
        "Average request round-trip time of the slowest broker, in librdkafka's latest "
        "statistics window with requests.",
        lambda s: s.rtt_avg_s,
    ),
    (
        "kafka_broker_rtt_p99_seconds",
        "99th percentile request round-trip time of the slowest broker, in librdkafka's "
        "latest statistics window with requests.",
        lambda s: s.rtt_p99_s,
    ),
    (
        "kafka_queue_latency_p99_seconds",
        "99th percentile time a message waited in the producer's queue before it was sent, "
        "in librdkafka's latest statistics window with messages.",
        lambda s: s.queue_latency_p99_s,
    ),
)
_KAFKA_COUNTERS: tuple[tuple[str, str, Callable[[KafkaStats], int]], ...] = (
    (
        "kafka_transmitted_messages",
        "Messages the Kafka producer sent to brokers (retries included).",
        lambda s: s.transmitted_messages,
    ),
    (
        "kafka_transmitted_bytes",
        "Bytes of the messages the Kafka producer sent to brokers.",
        lambda s: s.transmitted_bytes,
    ),
    (
        "kafka_request_errors",
        "Requests to brokers that failed to be sent or answered (librdkafka txerrs).",
        lambda s: s.request_errors,
    ),
    (
        "kafka_request_retries",
        "Requests to brokers that were sent again (librdkafka txretries).",
        lambda s: s.request_retries,
    ),
    (
        "kafka_request_timeouts",
        "Requests to brokers that timed out (librdkafka req_timeouts).",
        lambda s: s.request_timeouts,
    ),
    (
        "kafka_broker_disconnects",
        "Connections to brokers that were lost or closed.",
        lambda s: s.disconnects,
    ),
)


class _KafkaStatsCollector(Collector):
    """Each feed's latest librdkafka statistics, as metrics labelled by feed."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()  # two concurrent scrapes poll the producers once each

    def describe(self) -> Iterable[Metric]:
        return []  # families appear only once statistics arrived; nothing to check upfront

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            feeds = list(self._metrics.feeds.values())
            for feed in feeds:
                feed.refresh()
        current = [(f.feed, f.kafka) for f in feeds if f.kafka is not None]
        if not current:
            return
        for name, help_text, gauge_value in _KAFKA_GAUGES:
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["feed"])
            for feed_name, stats in current:
                value = gauge_value(stats)
                if value is not None:
                    gauge.add_metric([feed_name], value)
            yield gauge
        for name, help_text, counter_value in _KAFKA_COUNTERS:
            counter = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=["feed"])
            for feed_name, stats in current:
                counter.add_metric([feed_name], counter_value(stats))
            yield counter
        brokers = GaugeMetricFamily(
            f"{PREFIX}_kafka_brokers",
            "The Kafka producer's broker connections (cluster brokers, or the bootstrap "
            "addresses while none is reachable), by state: up, or down (any other state).",
            labels=["feed", "state"],
        )
        for feed_name, stats in current:
            brokers.add_metric([feed_name, "up"], stats.brokers_up)
            brokers.add_metric([feed_name, "down"], stats.brokers_down)
        yield brokers


class SftpMetrics:
    """The file collectors' own metric families (SFTP, FTP and FTPS alike: the names keep
    "sftp" for the dashboards and alerts built on them), labelled by the source's name.

    Their events, dead letters and skipped rows count in the shared families through
    a `FeedMetrics` with source = the protocol ("sftp", "ftp", "ftps").
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.files_seen = Counter(
            f"{PREFIX}_sftp_files_seen_total",
            "Files matching the pattern seen on the file server (SFTP, FTP, FTPS) for the "
            "first time.",
            ["feed"],
            registry=registry,
        )
        self.files_done = Counter(
            f"{PREFIX}_sftp_files_done_total",
            "Files read to their end, every row's event or dead letter confirmed by Kafka.",
            ["feed"],
            registry=registry,
        )
        self.files_quarantined = Counter(
            f"{PREFIX}_sftp_files_quarantined_total",
            "Files that could not be read as feed files: set aside with a dead letter.",
            ["feed"],
            registry=registry,
        )
        self.files_waiting = Gauge(
            f"{PREFIX}_sftp_files_waiting",
            "Files seen but not yet taken: still changing, or not yet unchanged for settle_s.",
            ["feed"],
            registry=registry,
        )
        self.read_bytes = Counter(
            f"{PREFIX}_sftp_read_bytes_total",
            "Bytes read from files on the file server, as stored (compressed ones before "
            "inflating; a file read again after a restart counts again).",
            ["feed"],
            registry=registry,
        )
        self.errors = Counter(
            f"{PREFIX}_sftp_errors_total",
            "File server errors by kind: connection_error, timeout, auth_error, host_key (an "
            "SSH host key or TLS certificate), unreadable_file, after_action.",
            ["feed", "kind"],
            registry=registry,
        )

    def for_source(self, name: str) -> SftpSourceMetrics:
        """One SFTP source's series; they exist (at zero) from now on."""
        for kind in SFTP_ERROR_KINDS:
            self.errors.labels(name, kind)
        return SftpSourceMetrics(self, name)


class SftpSourceMetrics:
    """One SFTP source's view of `SftpMetrics`."""

    def __init__(self, metrics: SftpMetrics, name: str) -> None:
        self._metrics = metrics
        self.name = name
        self.files_seen = metrics.files_seen.labels(name)
        self.files_done = metrics.files_done.labels(name)
        self.files_quarantined = metrics.files_quarantined.labels(name)
        self.files_waiting = metrics.files_waiting.labels(name)
        self.read_bytes = metrics.read_bytes.labels(name)

    def error(self, kind: str) -> None:
        """An SFTP error of `kind` (one of SFTP_ERROR_KINDS; others count as `other`)."""
        self._metrics.errors.labels(self.name, fold(kind, _SFTP_ERROR_KINDS)).inc()


_SFTP_ERROR_KINDS = frozenset(SFTP_ERROR_KINDS)


def forget_feed(metrics: Metrics, name: str, sftp: SftpMetrics | None = None) -> None:
    """Remove every series of feed (or SFTP source) `name`: its unit moved to another replica.

    Each family labelled `feed` loses that label value's series, so a replica shows only
    the units it runs (Prometheus marks the removed series stale at the next scrape).
    """
    metrics.feeds.pop(name, None)
    for owner in (metrics, sftp):
        if owner is None:
            continue
        for family in list(vars(owner).values()):
            if not isinstance(family, MetricWrapperBase):
                continue
            try:
                family.remove_by_labels({"feed": name})
            except ValueError:  # a family without a `feed` label
                continue


# From a revocation to the unit stopped: a poll aborts at its next row, but a request
# that hangs may take up to the feed's read timeout.
HANDOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ClusterMetrics:
    """Cluster mode: which units this replica runs, rebalances and handovers.

    Labelled by the consumer group (`group`), so that replicas of several clusters can
    share one Prometheus job; units by their name (`unit`: feed-NAME or sftp-NAME), a
    bounded set from the configuration.
    """

    def __init__(
        self, registry: CollectorRegistry, *, group: str, units: int, fingerprint: str
    ) -> None:
        self.group = group
        Info(
            f"{PREFIX}_cluster",
            "This replica's consumer group, and the fingerprint of its configuration's units "
            "of work: equal on every replica of one cluster.",
            registry=registry,
        ).info({"group": group, "fingerprint": fingerprint})
        self.units = Gauge(
            f"{PREFIX}_cluster_units",
            "Units of work in this replica's configuration: the partitions of the assignment "
            "topic, each owned by exactly one replica of the group.",
            ["group"],
            registry=registry,
        )
        self.units.labels(group).set(units)
        self.units_owned = Gauge(
            f"{PREFIX}_cluster_units_owned",
            "Units of work the group assigned to this replica now.",
            ["group"],
            registry=registry,
        )
        self.units_owned.labels(group).set(0)
        self.unit_assigned = Gauge(
            f"{PREFIX}_cluster_unit_assigned_timestamp_seconds",
            "When this replica was assigned the unit (Unix time). The series exists while "
            "this replica owns the unit: one series per unit across the cluster.",
            ["group", "unit"],
            registry=registry,
        )
        self.rebalances = Counter(
            f"{PREFIX}_cluster_rebalances_total",
            "Rebalance events this replica took part in: assigned (a rebalance completed, "
            "whether or not it brought units), revoked (units taken away), lost (the "
            "session expired and the units with it).",
            ["group", "event"],
            registry=registry,
        )
        self.handovers = Counter(
            f"{PREFIX}_cluster_handovers_total",
            "Units this replica stopped running because another takes them: revoked (a "
            "rebalance moved it), lost (the session expired), fenced (exactly-once: the "
            "new owner's producer fenced this one's).",
            ["group", "how"],
            registry=registry,
        )
        self.handover_seconds = Histogram(
            f"{PREFIX}_cluster_handover_seconds",
            "From a unit's revocation (or loss) to its poll aborted and its producer closed, "
            "after which the next owner may start it.",
            ["group"],
            buckets=HANDOVER_BUCKETS,
            registry=registry,
        )
        self.members = Gauge(
            f"{PREFIX}_cluster_members",
            "Members of the consumer group, as seen after the last rebalance.",
            ["group"],
            registry=registry,
        )
        self.config_mismatch = Gauge(
            f"{PREFIX}_cluster_config_mismatch",
            "Members of the consumer group whose configuration (units of work) differs from "
            "this replica's, as seen after the last rebalance; 0 when all agree.",
            ["group"],
            registry=registry,
        )
        self.config_mismatch.labels(group).set(0)
        for event in ("assigned", "revoked", "lost"):
            self.rebalances.labels(group, event)
        for how in ("revoked", "lost", "fenced"):
            self.handovers.labels(group, how)
        self.handover_seconds.labels(group)
