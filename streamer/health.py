"""The process's HTTP endpoint: /metrics, /healthz and /readyz on the metrics port.

- `/metrics`: the registry in the Prometheus text format (or OpenMetrics, when the
  scraper asks for it), from prometheus_client's own WSGI app.
- `/healthz`: 200 while the process is alive enough to answer. A liveness probe.
- `/readyz`: 200 when the streamer can do its work: the Kafka cluster answers a
  metadata request (asked at most every few seconds), no feed's polls have been
  failing for longer than `ready_max_failing_s`, and no poll has been running for
  longer than `ready_max_poll_s` (a stuck one). Otherwise 503, and the body says why
  in one line of plain text.

The server (streamer/endpoint.py) has a fixed pool of worker threads and closes idle
and slow connections, so neither a slow readiness check nor hundreds of idle clients
hold up a scrape. With `credentials`, every path but the probes (or every path, with
`auth_probes`) needs them; with `tls`, it speaks HTTPS only.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, make_wsgi_app

from streamer.endpoint import Credentials, HttpEndpoint, protect
from streamer.metrics import Metrics

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("librdkafka")

_TEXT = [("Content-Type", "text/plain; charset=utf-8")]
PROBES = frozenset({"/healthz", "/readyz"})


class KafkaCheck:
    """Whether the Kafka cluster answers: a metadata request, its answer kept for `cache_s`.

    Called from /readyz; a probe that comes within `cache_s` of the last one gets the
    same answer without a request, so a busy prober cannot load the cluster.
    """

    def __init__(
        self,
        client_config: Mapping[str, str],
        *,
        timeout_s: float = 2.0,
        cache_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config: dict[str, str | int | float | bool] = dict(client_config)
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._admin: AdminClient | None = None
        self._checked_at: float | None = None
        self._problem: str | None = None

    def __call__(self) -> str | None:
        """None if the cluster answered, else what went wrong."""
        with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self.cache_s:
                self._problem = self._ask()
                self._checked_at = self._clock()
            return self._problem

    def _ask(self) -> str | None:
        if self._admin is None:
            # Built on first use: a process that is never probed opens no extra connection.
            self._admin = AdminClient(self._config, logger=_librdkafka_log)
        try:
            metadata = self._admin.list_topics(timeout=self.timeout_s)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            reason = error.str() if isinstance(error, KafkaError) else str(exc)
            return f"no answer from the cluster within {self.timeout_s:g} s ({reason})"
        if not metadata.brokers:
            return "the cluster answered without any broker"
        return None


class Readiness:
    """The /readyz verdict: every reason the process is not ready, or none."""

    def __init__(
        self,
        metrics: Metrics,
        kafka_check: Callable[[], str | None],
        *,
        max_failing_s: float,
        max_poll_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.kafka_check = kafka_check
        self.max_failing_s = max_failing_s
        self.max_poll_s = max_poll_s
        self._clock = clock

    def problems(self) -> list[str]:
        """What keeps the process from being ready; empty when it is."""
        found: list[str] = []
        kafka = self.kafka_check()
        if kafka is not None:
            found.append(f"Kafka: {kafka}")
        now = self._clock()
        for feed in list(self.metrics.feeds.values()):
            failing_s = feed.failing_for_s(now)
            if failing_s > self.max_failing_s:
                found.append(
                    f"feed {feed.feed}: polls failing for {failing_s:.0f} s "
                    f"(over {self.max_failing_s:g} s; last error {feed.last_error})"
                )
            polling_s = feed.polling_for_s(now)
            if polling_s > self.max_poll_s:
                found.append(
                    f"feed {feed.feed}: a poll has been running for {polling_s:.0f} s "
                    f"(over {self.max_poll_s:g} s): stuck?"
                )
        return found


class HealthServer:
    """Serves /metrics, /healthz and /readyz on one port, in background threads."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], list[str]],
        *,
        host: str = "127.0.0.1",
        port: int = 9108,
        credentials: Credentials | None = None,
        auth_probes: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._metrics_app = make_wsgi_app(registry)
        self._readiness = readiness
        app: WSGIApplication = self._app
        if credentials is not None:
            app = protect(app, credentials, open_paths=() if auth_probes else PROBES)
        self._endpoint = HttpEndpoint(app, host, port, tls=tls)

    @property
    def host(self) -> str:
        return self._endpoint.host

    @property
    def port(self) -> int:
        return self._endpoint.port

    def start(self) -> None:
        """Bind (port 0: a free one, then in `port`) and serve in daemon threads."""
        self._endpoint.start()

    def stop(self) -> None:
        """Stop serving and release the port. Safe to call twice."""
        self._endpoint.stop()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", "only GET and HEAD\n")
        body = self._route(environ.get("PATH_INFO") or "/", environ, start_response)
        return [] if method == "HEAD" else body

    def _route(
        self, path: str, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            try:
                problems = self._readiness()
            except Exception as exc:  # an unready answer, never a dropped connection
                log.exception("readiness check failed")
                problems = [f"readiness check failed: {type(exc).__name__}"]
            if problems:
                text = " ".join(f"not ready: {'; '.join(problems)}".split())  # one line
                return _text(start_response, "503 Service Unavailable", text + "\n")
            return _text(start_response, "200 OK", "ready\n")
        if path == "/":
            return _text(start_response, "200 OK", "cdr-streamer: /metrics /healthz /readyz\n")
        return _text(
            start_response, "404 Not Found", "not found: try /metrics, /healthz, /readyz\n"
        )


def _text(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    body = text.encode("utf-8")
    start_response(status, [*_TEXT, ("Content-Length", str(len(body)))])
    return [body]
