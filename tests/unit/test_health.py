"""The HTTP endpoint (/metrics, /healthz, /readyz) and the readiness verdict, on loopback."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from streamer.health import HealthServer, KafkaCheck, Readiness
from streamer.metrics import Metrics


def get(server: HealthServer, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, Content-Type, body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def serve(metrics: Metrics) -> Iterator[Callable[[Callable[[], list[str]]], HealthServer]]:
    servers: list[HealthServer] = []

    def start(readiness: Callable[[], list[str]]) -> HealthServer:
        server = HealthServer(metrics.registry, readiness, host="127.0.0.1", port=0)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_healthz_answers_while_the_process_lives(
    serve: Callable[[Callable[[], list[str]]], HealthServer],
) -> None:
    server = serve(lambda: ["Kafka: down"])  # not ready is still alive
    assert get(server, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")


def test_readyz_is_200_when_nothing_is_wrong_and_503_with_the_reasons_otherwise(
    serve: Callable[[Callable[[], list[str]]], HealthServer],
) -> None:
    problems: list[str] = []
    server = serve(lambda: problems)
    assert get(server, "/readyz") == (200, "text/plain; charset=utf-8", "ready\n")
    problems += ["Kafka: no answer\nat all", "feed main: polls failing for 1000 s"]
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert body == "not ready: Kafka: no answer at all; feed main: polls failing for 1000 s\n"


def test_readyz_is_503_when_the_check_itself_fails(
    serve: Callable[[Callable[[], list[str]]], HealthServer],
) -> None:
    def broken() -> list[str]:
        raise RuntimeError("bug")

    status, _, body = get(serve(broken), "/readyz")
    assert (status, body) == (503, "not ready: readiness check failed: RuntimeError\n")


def test_metrics_serves_the_registry(
    serve: Callable[[Callable[[], list[str]]], HealthServer], metrics: Metrics
) -> None:
    metrics.for_feed("main").request("ok", 0.1, 42)
    status, content_type, body = get(serve(list), "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'cdr_streamer_feed_received_bytes_total{feed="main"} 42.0' in body
    assert "cdr_streamer_build_info{" in body


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/metrics", 405),
        ("HEAD", "/healthz", 200),
        ("GET", "/", 200),
    ],
)
def test_other_paths_and_methods(
    serve: Callable[[Callable[[], list[str]]], HealthServer], method: str, path: str, status: int
) -> None:
    got, _, body = get(serve(list), path, method)
    assert got == status
    if method == "HEAD":
        assert body == ""


def test_stop_releases_the_port(serve: Callable[[Callable[[], list[str]]], HealthServer]) -> None:
    server = serve(list)
    port = server.port
    server.stop()
    server.stop()  # twice is fine
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


class FakeKafka:
    def __init__(self) -> None:
        self.problem: str | None = None

    def __call__(self) -> str | None:
        return self.problem


def test_readiness_needs_kafka_and_no_feed_failing_for_too_long(metrics: Metrics) -> None:
    kafka = FakeKafka()
    now = [10_000.0]
    readiness = Readiness(metrics, kafka, max_failing_s=900, clock=lambda: now[0])
    main, other = metrics.for_feed("main"), metrics.for_feed("other")
    assert readiness.problems() == []

    kafka.problem = "no answer from the cluster within 2 s"
    assert readiness.problems() == ["Kafka: no answer from the cluster within 2 s"]
    kafka.problem = None

    main.poll_error("FeedUnavailableError", now=9_500)  # failing for 500 s: still ready
    other.poll_succeeded(now=9_900)
    assert readiness.problems() == []
    now[0] = 10_500  # failing for 1000 s
    assert readiness.problems() == [
        "feed main: polls failing for 1000 s (over 900 s; last error FeedUnavailableError)"
    ]
    main.poll_succeeded(now=10_500)
    assert readiness.problems() == []


class CountingKafkaCheck(KafkaCheck):
    """KafkaCheck whose cluster request is replaced by a counter (the cache is under test)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__({"bootstrap.servers": "unused:9092"}, cache_s=5, clock=clock)
        self.asked = 0
        self.answer: str | None = None

    def _ask(self) -> str | None:
        self.asked += 1
        return self.answer


def test_kafka_check_asks_the_cluster_at_most_once_per_cache_period() -> None:
    now = [0.0]
    check = CountingKafkaCheck(clock=lambda: now[0])
    assert check() is None
    check.answer = "down"
    now[0] = 4.9
    assert check() is None  # the cached answer
    assert check.asked == 1
    now[0] = 5.0
    assert check() == "down"
    assert check.asked == 2


def test_kafka_check_reports_an_unreachable_cluster() -> None:
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = KafkaCheck({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": "0"}, timeout_s=0.5)
    problem = check()
    assert problem is not None
    assert problem.startswith("no answer from the cluster within 0.5 s")


def test_a_poll_running_too_long_makes_the_streamer_unready(metrics: Metrics) -> None:
    now = [10_000.0]
    readiness = Readiness(
        metrics, FakeKafka(), max_failing_s=900, max_poll_s=60, clock=lambda: now[0]
    )
    main = metrics.for_feed("main")
    main.poll_began(now=10_000)
    assert readiness.problems() == []
    started = "cdr_streamer_poll_started_timestamp_seconds"
    assert metrics.registry.get_sample_value(started, {"feed": "main"}) == 10_000
    now[0] = 10_061
    assert readiness.problems() == [
        "feed main: a poll has been running for 61 s (over 60 s): stuck?"
    ]
    main.poll_ended()
    assert readiness.problems() == []
    assert metrics.registry.get_sample_value(started, {"feed": "main"}) == 0
