"""Metrics: bounded labels, poll bookkeeping, librdkafka statistics, a clean exposition."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from cdr_samples import sample_records
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer.metrics import (
    VOICE_CALL_TYPES,
    FeedMetrics,
    Metrics,
    UsageTally,
    is_call,
    parse_kafka_stats,
)
from streamer.records import CallRecord

STATS_TIMEOUT_S = 30.0


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def feed(registry: CollectorRegistry) -> FeedMetrics:
    return Metrics(registry).for_feed("main", poll_interval_s=600)


def test_bounded_series_exist_at_zero_before_anything_happens(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    assert value(registry, "cdr_streamer_feed_requests_total", feed="main", outcome="http_5xx") == 0
    assert (
        value(
            registry,
            "cdr_streamer_rows_rejected_total",
            feed="main",
            source="feed",
            reason="bad_date",
        )
        == 0
    )
    assert value(registry, "cdr_streamer_delivery_errors_total", feed="main") == 0
    assert value(registry, "cdr_streamer_feed_up", feed="main") == 1
    assert value(registry, "cdr_streamer_feed_poll_interval_seconds", feed="main") == 600
    lag = value(registry, "cdr_streamer_event_lag_seconds", feed="main")
    assert lag is not None
    assert math.isnan(lag)
    (build,) = [k for k in samples(registry) if k[0] == "cdr_streamer_build_info"]
    assert dict(build[1])["version"]


def test_label_values_are_folded_to_known_sets(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    feed.request("some_new_outcome", 0.1, 10)
    feed.confirmed(
        Counter({("Busy", "outbound", "Mobile"): 2, ("Weird", "sideways", "Teleport"): 1}),
        Counter({"bad_id": 1, "a_reason_nobody_knows": 3}),
        newest_event_s=0,
    )
    names = {k for k in samples(registry) if k[0] == "cdr_streamer_events_published_total"}
    assert {dict(labels)["status"] for _, labels in names} == {"Busy", "other"}
    assert {dict(labels)["call_type"] for _, labels in names} == {"Mobile", "other"}
    assert value(registry, "cdr_streamer_feed_requests_total", feed="main", outcome="other") == 1
    assert (
        value(
            registry, "cdr_streamer_rows_rejected_total", feed="main", source="feed", reason="other"
        )
        == 3
    )


def test_request_hook_counts_outcome_latency_and_bytes(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    feed.request("ok", 0.3, 1000)
    feed.request("http_5xx", 0.01, 0)
    assert value(registry, "cdr_streamer_feed_requests_total", feed="main", outcome="ok") == 1
    assert value(registry, "cdr_streamer_feed_received_bytes_total", feed="main") == 1000
    assert value(registry, "cdr_streamer_feed_request_duration_seconds_count", feed="main") == 2
    assert (
        value(registry, "cdr_streamer_feed_request_duration_seconds_bucket", feed="main", le="0.5")
        == 2
    )


def test_event_lag_follows_the_newest_confirmed_event(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    newest = time.time() - 3600
    feed.confirmed(Counter(), Counter(), newest_event_s=newest)
    feed.confirmed(Counter(), Counter(), newest_event_s=newest - 100)  # older: ignored
    assert value(registry, "cdr_streamer_newest_event_timestamp_seconds", feed="main") == newest
    lag = value(registry, "cdr_streamer_event_lag_seconds", feed="main")
    assert lag is not None
    assert 3600 <= lag < 3700


def test_failing_since_starts_at_the_first_failure_and_clears_on_success(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    assert feed.failing_for_s(now=1000) == 0
    feed.poll_error("FeedUnavailableError", now=1000)
    feed.poll_error("DeliveryError", now=1300)
    assert feed.failing_for_s(now=1500) == 500
    assert feed.last_error == "DeliveryError"
    assert value(registry, "cdr_streamer_feed_failing_since_timestamp_seconds", feed="main") == 1000
    assert value(registry, "cdr_streamer_last_failed_poll_timestamp_seconds", feed="main") == 1300
    assert (
        value(registry, "cdr_streamer_poll_errors_total", feed="main", kind="FeedUnavailableError")
        == 1
    )
    feed.poll_succeeded(now=1600)
    assert feed.failing_for_s(now=1700) == 0
    assert value(registry, "cdr_streamer_feed_failing_since_timestamp_seconds", feed="main") == 0
    assert (
        value(registry, "cdr_streamer_last_successful_poll_timestamp_seconds", feed="main") == 1600
    )
    feed.poll_error("AuthError", now=2000)  # a new run of failures starts afresh
    assert feed.failing_for_s(now=2010) == 10


def stats_json(**top: Any) -> str:
    """A librdkafka statistics report with the fields parse_kafka_stats reads."""

    def window(cnt: int, avg: int = 0, p99: int = 0) -> dict[str, int]:
        return {"cnt": cnt, "avg": avg, "p99": p99, "min": 0, "max": p99}

    report: dict[str, Any] = {
        "msg_cnt": 120,
        "msg_size": 24_000,
        "msg_max": 100_000,
        "msg_size_max": 67_108_864,
        "txmsgs": 5000,
        "txmsg_bytes": 900_000,
        "brokers": {
            # librdkafka's internal broker is no connection; a bootstrap address is one.
            "127.0.0.1:9092/bootstrap": {
                "nodeid": -1, "source": "configured", "state": "DOWN", "txerrs": 1,
                "txretries": 0, "req_timeouts": 0, "disconnects": 1,
                "rtt": window(0), "int_latency": window(0),
            },
            ":0/internal": {
                "nodeid": -1, "source": "internal", "state": "UP", "txerrs": 50,
                "txretries": 50, "req_timeouts": 50, "disconnects": 50,
                "rtt": window(0), "int_latency": window(0),
            },
            "kafka-1:9092/1": {
                "nodeid": 1, "source": "learned", "state": "UP", "txerrs": 2, "txretries": 3,
                "req_timeouts": 1, "disconnects": 0,
                "rtt": window(10, avg=2_000, p99=9_000),
                "int_latency": window(100, avg=50, p99=700),
            },
            "kafka-2:9092/2": {
                "nodeid": 2, "source": "learned", "state": "UP", "txerrs": 0, "txretries": 1,
                "req_timeouts": 0, "disconnects": 2,
                "rtt": window(4, avg=5_000, p99=6_000),
                "int_latency": window(0),
            },
            "kafka-3:9092/3": {
                "nodeid": 3, "source": "learned", "state": "TRY_CONNECT", "txerrs": 0,
                "txretries": 0, "req_timeouts": 0, "disconnects": 4,
                "rtt": window(0), "int_latency": window(0),
            },
        },
    }  # fmt: skip
    report.update(top)
    return json.dumps(report)


def test_stats_are_aggregated_over_the_clusters_brokers() -> None:
    stats = parse_kafka_stats(stats_json())
    assert (stats.queue_messages, stats.queue_bytes) == (120, 24_000)
    assert (stats.queue_max_messages, stats.queue_max_bytes) == (100_000, 67_108_864)
    assert (stats.transmitted_messages, stats.transmitted_bytes) == (5000, 900_000)
    assert (stats.brokers_up, stats.brokers_down) == (2, 2)  # internal left out
    assert stats.request_errors == 3  # the bootstrap connection's error counts, internal's not
    assert (stats.request_retries, stats.request_timeouts, stats.disconnects) == (4, 1, 7)
    assert stats.rtt_avg_s == pytest.approx(0.005)  # the slowest broker
    assert stats.rtt_p99_s == pytest.approx(0.009)
    assert stats.queue_latency_p99_s == pytest.approx(0.0007)


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"msg_cnt": "many"}', "not json"])
def test_unreadable_stats_are_refused(text: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        parse_kafka_stats(text)


def test_stats_callback_keeps_last_round_trip_and_never_raises(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    feed.kafka_stats(stats_json())
    idle = json.loads(stats_json(msg_cnt=0))
    for broker in idle["brokers"].values():
        broker["rtt"]["cnt"] = broker["int_latency"]["cnt"] = 0
    feed.kafka_stats(json.dumps(idle))
    feed.kafka_stats("garbage")  # logged and ignored: a callback must not raise
    assert value(registry, "cdr_streamer_kafka_queue_messages", feed="main") == 0
    assert value(registry, "cdr_streamer_kafka_broker_rtt_p99_seconds", feed="main") == 0.009
    assert value(registry, "cdr_streamer_kafka_transmitted_messages_total", feed="main") == 5000
    assert value(registry, "cdr_streamer_kafka_brokers", feed="main", state="up") == 2
    assert value(registry, "cdr_streamer_kafka_brokers", feed="main", state="down") == 2


def test_no_kafka_series_before_the_first_statistics(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    assert not [k for k in samples(registry) if k[0].startswith("cdr_streamer_kafka_")]


def test_each_scrape_polls_the_feeds_producer_first(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    polls: list[int] = []

    def poll() -> None:
        polls.append(1)
        feed.kafka_stats(stats_json(msg_cnt=len(polls)))  # what a served stats_cb would do

    feed.watch_producer(poll)
    assert value(registry, "cdr_streamer_kafka_queue_messages", feed="main") == 1
    assert value(registry, "cdr_streamer_kafka_queue_messages", feed="main") == 2


def test_a_failing_producer_poll_does_not_fail_the_scrape(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    def poll() -> None:
        raise RuntimeError("closed")

    feed.watch_producer(poll)
    assert value(registry, "cdr_streamer_feed_up", feed="main") == 1


def test_real_librdkafka_statistics_parse() -> None:
    """A report from librdkafka itself: a producer whose broker is not there (loopback only)."""
    reports: list[str] = []
    producer = Producer(
        {
            "bootstrap.servers": "127.0.0.1:9",  # discard port: nothing listens
            "statistics.interval.ms": 100,
            "stats_cb": reports.append,
            "log_level": 0,
        }
    )
    for n in range(3):
        producer.produce("t", b"x" * 10, str(n).encode())
    deadline = time.monotonic() + STATS_TIMEOUT_S
    while not reports:
        assert time.monotonic() < deadline, "librdkafka sent no statistics"
        producer.poll(0.1)
    stats = parse_kafka_stats(reports[-1])
    producer.purge()
    assert stats.queue_messages == 3
    assert stats.queue_bytes >= 30
    assert (stats.brokers_up, stats.brokers_down) == (0, 1)  # the bootstrap address
    assert stats.rtt_avg_s is None


def test_exposition_passes_promtool(registry: CollectorRegistry, feed: FeedMetrics) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run scripts/bootstrap", pytrace=False)
    feed.request("ok", 0.2, 100)
    feed.confirmed(Counter({("Ok", "outbound", "Local"): 3}), Counter({"bad_id": 1}), 1.7e9)
    confirm(feed, [kpi_record("International"), kpi_record("Service", charge="-5")])
    feed.kafka_stats(stats_json())
    feed.poll_error("AuthError")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(registry),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- the telecom KPIs: calls, seconds, charges ------------------------------------------------


def kpi_record(
    call_type: str,
    status: str = "Ok",
    *,
    direction: str = "outbound",
    seconds: int = 60,
    network_seconds: int = 42,
    charge: str = "1.15",
) -> CallRecord:
    return replace(
        sample_records()[0],
        call_type=call_type,
        status=status,
        direction=direction,
        seconds=seconds,
        network_seconds=network_seconds,
        charge=Decimal(charge),
    )


def confirm(feed: FeedMetrics, records: list[CallRecord]) -> None:
    """What EventSink does: tally each published record, then confirm the batch."""
    published: Counter[tuple[str, str, str]] = Counter()
    usage = UsageTally()
    for r in records:
        published[(r.status, r.direction, r.call_type)] += 1
        usage.add(r)
    feed.confirmed(published, Counter(), 0, usage)


def test_only_voice_call_types_are_calls() -> None:
    assert {
        "Local", "National", "Mobile", "International", "Onnet", "0800", "0900", "Directory",
    } == VOICE_CALL_TYPES  # fmt: skip
    assert is_call("International")
    assert not is_call("SMS")
    assert not is_call("Service")
    assert not is_call("Broadband")  # a CallType the provider added: a fee until we know


def test_kpi_counters_count_calls_seconds_and_charges(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    confirm(
        feed,
        [
            kpi_record("International", charge="2.30", network_seconds=100, seconds=120),
            kpi_record("International", "Busy", charge="0", network_seconds=0, seconds=0),
            kpi_record("International", "No Answer", charge="0", network_seconds=0, seconds=0),
            kpi_record("Local", direction="inbound", network_seconds=30, seconds=30, charge="0"),
            kpi_record("SMS", charge="0.10", network_seconds=0, seconds=0),
            kpi_record("Service", charge="11.50", network_seconds=0, seconds=0),
            kpi_record("Service", charge="-11.50", network_seconds=0, seconds=0),  # a credit
        ],
    )
    intl = {"feed": "main", "source": "feed", "direction": "outbound", "call_type": "International"}
    assert value(registry, "cdr_streamer_call_attempts_total", status="Ok", **intl) == 1
    assert value(registry, "cdr_streamer_call_attempts_total", status="Busy", **intl) == 1
    assert value(registry, "cdr_streamer_call_attempts_total", status="No Answer", **intl) == 1
    assert value(registry, "cdr_streamer_calls_answered_total", **intl) == 1
    assert value(registry, "cdr_streamer_call_connected_seconds_total", **intl) == 100
    assert value(registry, "cdr_streamer_call_billed_seconds_total", **intl) == 120
    assert value(registry, "cdr_streamer_charge_nzd_total", **intl) == pytest.approx(2.30)
    local = {**intl, "direction": "inbound", "call_type": "Local"}
    assert value(registry, "cdr_streamer_calls_answered_total", **local) == 1
    assert value(registry, "cdr_streamer_call_connected_seconds_total", **local) == 30
    assert value(registry, "cdr_streamer_charge_nzd_total", **local) is None  # nothing charged
    # SMS and service fees are charged, but they are not calls.
    for call_type in ("SMS", "Service"):
        not_a_call = {**intl, "call_type": call_type}
        assert value(registry, "cdr_streamer_calls_answered_total", **not_a_call) is None
        assert value(registry, "cdr_streamer_call_billed_seconds_total", **not_a_call) is None
        attempts = [
            k for k in samples(registry)
            if k[0] == "cdr_streamer_call_attempts_total" and ("call_type", call_type) in k[1]
        ]  # fmt: skip
        assert attempts == []
    service = {**intl, "call_type": "Service"}
    assert value(registry, "cdr_streamer_charge_nzd_total", **service) == pytest.approx(11.50)
    assert value(registry, "cdr_streamer_charge_credit_nzd_total", **service) == pytest.approx(11.5)
    assert value(registry, "cdr_streamer_charge_nzd_total", **{**intl, "call_type": "SMS"}) == (
        pytest.approx(0.10)
    )


def test_kpi_counters_are_added_only_when_the_batch_is_confirmed(
    registry: CollectorRegistry, feed: FeedMetrics
) -> None:
    usage = UsageTally()
    usage.add(kpi_record("Mobile", charge="0.50"))
    labels = {"feed": "main", "source": "feed", "direction": "outbound", "call_type": "Mobile"}
    assert value(registry, "cdr_streamer_charge_nzd_total", **labels) is None
    feed.confirmed(Counter({("Ok", "outbound", "Mobile"): 1}), Counter(), 0, usage)
    assert value(registry, "cdr_streamer_charge_nzd_total", **labels) == pytest.approx(0.5)
    assert value(registry, "cdr_streamer_calls_answered_total", **labels) == 1


def test_kpi_labels_are_folded(registry: CollectorRegistry, feed: FeedMetrics) -> None:
    confirm(feed, [kpi_record("Teleport", direction="sideways", charge="3")])
    kpi_names = {
        "cdr_streamer_call_attempts_total", "cdr_streamer_calls_answered_total",
        "cdr_streamer_call_connected_seconds_total", "cdr_streamer_call_billed_seconds_total",
        "cdr_streamer_charge_nzd_total",
    }  # fmt: skip
    found = [dict(labels) for name, labels in samples(registry) if name in kpi_names]
    # An unknown CallType is not a call: only its charge counts, under `other`.
    assert found == [{"feed": "main", "source": "feed", "direction": "other", "call_type": "other"}]
