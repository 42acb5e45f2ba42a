"""Issue 11's "done when": every hostile case against the real CLI, at DEBUG, in one process.

One `cdr-streamer run` process (as an operator runs it) polls one [[feeds]] per case
of a hostile feed server on loopback (tests/integration/hostile.py): answers that
echo the request and its password (text, JSON, HTML, a refusal after the sniffed
bytes or in slow pieces, a redirect whose Location repeats the query), decompression
bombs (1 GiB and 3 GiB in a few kB, gzip twice), bodies without end, pathological
JSON and CSV, and servers that send one byte a second (headers or body). Its metrics
endpoint runs with TLS and a bearer token, and gets 300 idle connections.

Then, from the outside: no secret (feed passwords, a Kafka SASL password, the registry
password, the metrics token) in any form (raw, URL/form-encoded, JSON, HTML, repr,
cut to a 4-character prefix or suffix) in the log, /metrics, /healthz, /readyz,
/proc/PID/cmdline, check-config, the cursor files or the topics; every poll failed
with the right outcome and left the cursor alone; every slow request ended within its
deadline + 1 s; a stuck poll showed on /readyz; and the process's own peak RSS
(VmHWM) stayed far below what one bomb would have taken.

The JSON log format (issue 12) does not exist yet; the redaction sits in a LogRecord
factory, before any formatter, so it will apply there too.
"""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from helpers import REPO_ROOT, read_topic, write_config
from hostile import CUT_VARIANTS, TAIL_VARIANTS, HostileFeed
from prometheus_client.parser import text_string_to_metric_families
from tls_cert import make_cert

LOGIN = "81234567"
# & = % + both quotes, a backslash, and non-ASCII of 2, 3 and 4 UTF-8 bytes.
PASSWORD_A = "Qx9&p+w=%41\"'\\é€😀 zü Vj4"
PASSWORD_B = "Rm5%26=+&'\"ß漢字 Wt8"
KAFKA_SECRET = "S4sl-Kf&Pw=%2Bq"
REGISTRY_SECRET = "Rq1stry+Pw&ü"
METRICS_TOKEN = "Mz7x/T0ken+=="
SECRETS = [PASSWORD_A, PASSWORD_B, KAFKA_SECRET, REGISTRY_SECRET, METRICS_TOKEN]
ENV = {"HOSTILE_PW_A": PASSWORD_A, "HOSTILE_PW_B": PASSWORD_B}

DEADLINE_S = 3.0
HUGE_CAP = 16 << 20

# (feed name, hostile case, settings of its [[feeds]] table)
FEEDS: list[tuple[str, str, dict[str, Any]]] = [
    ("echo-text", "echo-text", {}),
    ("echo-text-get", "echo-text", {"method": "GET", "password_env": "HOSTILE_PW_B"}),
    ("echo-json", "echo-json", {"format": "json", "password_env": "HOSTILE_PW_B"}),
    ("echo-json-get", "echo-json", {"format": "json", "method": "GET"}),
    ("echo-json-array", "echo-json-array", {"format": "json"}),
    ("echo-html", "echo-html", {"method": "GET", "password_env": "HOSTILE_PW_B"}),
    ("late-auth-text", "late-auth-text", {}),
    ("slow-auth-text", "slow-auth-text", {"method": "GET", "password_env": "HOSTILE_PW_B"}),
    # Echoes cut by the client's 80-character excerpt: a prefix, or a suffix after a cut.
    ("cut-a", "echo-cut", {}),
    ("cut-b", "echo-cut", {"method": "GET", "password_env": "HOSTILE_PW_B"}),
    ("tail-a", "echo-tail", {"format": "json"}),
    ("tail-b", "echo-tail", {"format": "json", "method": "GET", "password_env": "HOSTILE_PW_B"}),
    ("redirect-echo", "redirect-echo", {"method": "GET"}),
    ("redirect-echo-post", "redirect-echo", {"password_env": "HOSTILE_PW_B"}),
    ("bomb-1g", "bomb-gzip-gzip-1g", {}),
    ("bomb-3g", "bomb-gzip-gzip-3g", {"method": "GET"}),
    ("huge-body", "huge-body", {"max_body_bytes": HUGE_CAP}),
    ("endless-line", "endless-line", {}),
    ("nested-brackets", "nested-brackets", {"format": "json"}),
    ("many-fields", "many-fields", {}),
    ("many-json-keys", "many-json-keys", {"format": "json"}),
    ("slow-headers", "slow-headers", {"request_deadline_s": DEADLINE_S}),
    ("slow-body", "slow-body", {"method": "GET", "request_deadline_s": DEADLINE_S}),
]
FATAL = {
    "slow-auth-text": "auth_error",
    "redirect-echo": "http_4xx",
    "redirect-echo-post": "http_4xx",
}
OUTCOME = {
    "bomb-1g": {"too_compressed"},
    "bomb-3g": {"too_compressed", "bad_response"},  # 3 GiB of zeros: the parser may stop it first
    "huge-body": {"too_large"},
    "slow-headers": {"timeout"},
    "slow-body": {"timeout"},
}
# Answers to wait for per feed (fatal ones stop after their first); cut cases cycle.
ANSWERS = {"echo-cut": len(CUT_VARIANTS), "echo-tail": len(TAIL_VARIANTS)}
PEAK_RSS_LIMIT_MIB = 300  # one bomb alone would be 1,000 to 3,000 MiB; measured ~120


# --- every form a secret could take --------------------------------------------------------


def _pct_lower(text: str) -> str:
    return re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), text)


UNIT_FORMS: dict[str, Callable[[str], str]] = {
    "raw": lambda c: c,
    "url": lambda c: quote(c, safe=""),
    "url-lower": lambda c: _pct_lower(quote(c, safe="")),
    "form": quote_plus,
    "url-twice": lambda c: quote(quote(c, safe=""), safe=""),
    "json": lambda c: json.dumps(c)[1:-1],
    "html": html.escape,
    "repr": lambda c: repr(c)[1:-1] if c != "'" else "\\'",
    "bytes-repr": lambda c: repr(c.encode())[2:-1] if c != "'" else "\\'",
    "latin-1": lambda c: c.encode().decode("latin-1"),
}


def telltales(secret: str) -> set[str]:
    """Strings whose presence means a leak: the first and last 4 characters of each form.

    Any occurrence of a form, whole or cut to 4 or more characters at either end,
    contains one of these.
    """
    found = set()
    for form in UNIT_FORMS.values():
        units = [form(c) for c in secret]
        found.add("".join(units[:4]))
        found.add("".join(units[-4:]))
    return found


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        for telltale in telltales(secret):
            assert telltale not in text, f"{where} shows {telltale!r} of a secret"


# --- the run --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Endpoint:
    """The streamer's HTTPS metrics endpoint, as a scraper with the token sees it."""

    def __init__(self, port: int, cert: Path) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(cert))
        self.seen: list[str] = []  # every body read, for the secret check

    def get(self, path: str, *, token: str | None = METRICS_TOKEN) -> tuple[int, str]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=15, context=self.context)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read().decode()
        finally:
            conn.close()
        self.seen.append(body)
        return response.status, body

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics")
        assert status == 200, body
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def peak_rss_mib(pid: int) -> float:
    """The process's own peak RSS (VmHWM), as bench/feed_memory.py measures it."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileFeed]:
    server = HostileFeed()
    yield server
    server.close()


def config_for(
    tmp_path: Path,
    hostile: HostileFeed,
    bootstrap: str,
    topic: str,
    port: int,
    cert: Path,
    key: Path,
) -> Path:
    token = tmp_path / "metrics-token"
    token.write_text(METRICS_TOKEN + "\n")
    feeds = [
        {
            "name": name,
            "url": hostile.url(case, name),
            "login": LOGIN,
            "password_env": "HOSTILE_PW_A",
            "cursor_file": str(tmp_path / f"cursor-{name}.json"),
            "poll_interval_s": 1,
            "backoff_base_s": 0.5,
            "backoff_max_s": 1,
            "max_attempts": 1,  # one request per poll: the poll is the request
            "connect_timeout_s": 2,
            "read_timeout_s": 60,  # the deadline, not the read timeout, must end slow answers
            "request_deadline_s": 120,  # a loaded machine must not turn a cap into a timeout
            **settings,
        }
        for name, case, settings in FEEDS
    ]
    path = write_config(tmp_path / "config.toml", bootstrap=bootstrap, topic=topic, feeds=feeds)
    metrics = "\n".join(
        [
            "[metrics]",
            f"port = {port}",
            'host = "127.0.0.1"',
            "ready_max_poll_s = 1.5",
            f"bearer_token_file = {json.dumps(str(token))}",
            f"tls_cert_file = {json.dumps(str(cert))}",
            f"tls_key_file = {json.dumps(str(key))}",
        ]
    )
    # Ours instead of write_config's "[metrics] port = 0"; librdkafka secrets at the end
    # (unused on a PLAINTEXT broker, but the process knows them and must not show them).
    text = path.read_text()
    assert "[metrics]\nport = 0\n" in text
    text = text.replace("[metrics]\nport = 0\n", metrics + "\n")
    text += f'[kafka.producer]\n"sasl.password" = {json.dumps(KAFKA_SECRET)}\n'
    path.write_text(text)
    return path


def test_every_hostile_case_through_the_real_cli(
    tmp_path: Path, hostile: HostileFeed, kafka_bootstrap: str, topic_name: str
) -> None:
    cert, key = make_cert(tmp_path)
    port = free_port()
    config = config_for(tmp_path, hostile, kafka_bootstrap, topic_name, port, cert, key)
    env = {**os.environ, **ENV, "CDR_SCHEMA_REGISTRY_PASSWORD": REGISTRY_SECRET}
    env.pop("CDR_FEED_PASSWORD", None)
    log_path = tmp_path / "streamer.log"
    endpoint = Endpoint(port, cert)
    with log_path.open("wb") as log:
        command = ["--log-level", "DEBUG", "run", "--config", str(config)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", *command],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )  # fmt: skip
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        saw_stuck_poll = run_until_every_case_is_done(proc, hostile, endpoint, log_path)
        samples = endpoint.samples()
        idle_connections_do_not_add_threads(proc.pid, endpoint)
        peak_mib = peak_rss_mib(proc.pid)
        healthz = endpoint.get("/healthz", token=None)
        refused = endpoint.get("/metrics", token=None)
        wrong = endpoint.get("/metrics", token="not-the-token")
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    log = log_path.read_text(errors="replace")
    assert returncode == 0, log[-3000:]

    # What each case did, as the metrics count it; no poll moved a cursor.
    for name, _, _ in FEEDS:
        outcomes = {
            labels[1][1]: n
            for (metric, labels), n in samples.items()
            if metric == "cdr_streamer_feed_requests_total" and dict(labels)["feed"] == name and n
        }
        expected = {FATAL[name]} if name in FATAL else OUTCOME.get(name, {"bad_response"})
        assert outcomes, f"{name}: no request counted"
        assert set(outcomes) <= expected, f"{name}: {outcomes}"
        assert value(samples, "cdr_streamer_feed_up", feed=name) == (0 if name in FATAL else 1)
        assert not (tmp_path / f"cursor-{name}.json").exists(), f"{name} committed a cursor"
    for message in (
        "decompression bomb",
        f"holds more than {HUGE_CAP} bytes (max_body_bytes)",
        "(request_deadline_s, from connect to the last byte)",
        "answered with an HTML page",
        "refused login",
        "redirects (HTTP 302)",
        "none of the documented fields",
        "the JSON array is not closed",
        "receive_response_headers.complete",  # httpcore.http11's DEBUG lines are there
        "HTTP Request: GET",  # and httpx's, with GET's query
        "***",  # the echoes came back, redacted
    ):
        assert message in log, message
    assert "MemoryError" not in log

    # The deadline held from the outside: each slow request ended by deadline + 1 s.
    for case in ("slow-headers", "slow-body"):
        lasted = [c.lasted_s for c in hostile.finished(case)]
        assert len(lasted) >= 2, case
        assert max(lasted) <= DEADLINE_S + 1, (case, lasted)  # type: ignore[operator]
    assert saw_stuck_poll

    # POST never put the password in the URL.
    for connection in hostile.connections:
        request = connection.request
        if request is not None and request.method == "POST":
            assert "password" not in request.query
            assert "password=" in request.body

    # The endpoint: TLS, the token for /metrics, the probes open.
    assert healthz == (200, "ok\n")
    assert refused[0] == 401
    assert wrong[0] == 401

    print(f"peak RSS of the streamer: {peak_mib:.0f} MiB")
    assert peak_mib < PEAK_RSS_LIMIT_MIB, f"peak RSS {peak_mib:.0f} MiB"

    # No secret anywhere the process wrote or showed.
    check_config = subprocess.run(
        [sys.executable, "-m", "streamer", "check-config", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert check_config.returncode == 0, check_config.stderr
    messages = read_topic(kafka_bootstrap, topic_name) + read_topic(
        kafka_bootstrap, f"{topic_name}-dlq"
    )
    assert messages == []  # nothing published, nothing dead-lettered (so no echo in Kafka)
    outputs = {
        "the log": log,
        "/proc/PID/cmdline": cmdline,
        "check-config": check_config.stdout + check_config.stderr,
        "the endpoint": "\n".join(endpoint.seen),
        "the cursor files": "".join(p.read_text() for p in tmp_path.glob("cursor-*.json")),
    }
    for where, text in outputs.items():
        assert_no_secret(where, text)


def run_until_every_case_is_done(
    proc: subprocess.Popen[bytes], hostile: HostileFeed, endpoint: Endpoint, log_path: Path
) -> bool:
    """Wait until each case was answered twice (fatal ones once); watch /readyz meanwhile.

    True if /readyz ever showed a slow feed's poll as stuck while it ran.
    """
    deadline = time.monotonic() + 120
    saw_stuck = False
    while True:
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        pending = [
            name
            for name, case, _ in FEEDS
            if len(hostile.finished(case, name)) < (1 if name in FATAL else ANSWERS.get(case, 2))
        ]
        if not pending and saw_stuck:
            return True
        assert time.monotonic() < deadline, (
            f"cases not done: {pending}, stuck poll seen: {saw_stuck}"
        )
        try:
            status, body = endpoint.get("/readyz", token=None)
        except OSError:
            status, body = 0, ""  # the endpoint may not be up yet in the first second
        if status == 503 and re.search(r"feed slow-(headers|body): a poll has been running", body):
            samples = endpoint.samples()
            started = value(
                samples, "cdr_streamer_poll_started_timestamp_seconds", feed="slow-body"
            )
            started = started or value(
                samples, "cdr_streamer_poll_started_timestamp_seconds", feed="slow-headers"
            )
            saw_stuck = saw_stuck or started > 0
        time.sleep(0.2)  # the polling period of the conditions above


def idle_connections_do_not_add_threads(pid: int, endpoint: Endpoint) -> None:
    """300 idle connections to the endpoint: no thread per connection, and a scrape answers."""
    before = threads_of(pid)
    idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(300)]
    try:
        started = time.monotonic()
        status, body = endpoint.get("/metrics")
        answered_s = time.monotonic() - started
        during = threads_of(pid)
    finally:
        for sock in idle:
            sock.close()
    assert status == 200
    assert "cdr_streamer_build_info" in body
    # Threads come and go with requests (one deadline timer per request in flight, at
    # most one per feed); a thread per connection would add 300.
    assert during <= before + len(FEEDS), (before, during)
    assert answered_s < 10  # not waiting for any idle client's timeout
