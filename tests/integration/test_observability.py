"""Observability against real services: a real Prometheus scraping a real `cdr-streamer run`.

One streamer process moves simulator CDRs into the real broker through three feeds
(`main`, a steady flow; `burst`, quiet until a burst of failed calls; `locked`, a wrong
password) while a real Prometheus scrapes it every second and evaluates
prometheus/alerts.yml every second. Then:

- every query of every Grafana panel (read from the dashboard JSON, `$feed` set to All)
  returns data through Prometheus's HTTP API;
- every rule of alerts.yml is loaded, evaluates without error and returns data. An alert's
  expression is only non-empty while it fires, so it is evaluated with `bool` added to
  each of its comparisons (`x > 7200` -> `x > bool 7200`): the same series, functions
  and label matching, one 0/1 sample per series instead of a filter. An `absent(x)`
  alert is empty while `x` has data, which is checked instead. That the alerts
  *fire* on the right input is prometheus/alerts_test.yml's job (promtool, below);
- the KPI counters (calls, answered, connected seconds, charges) add up to what the
  simulator's rows say;
- injected faults move their metrics: 5xx answers, a refused login, a burst of Busy and
  Unallocated calls, and (with a broker of the test's own) a stopped broker.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import sshd
from helpers import FEED_PASSWORD, REPO_ROOT, StreamerProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families

from streamer.metrics import VOICE_CALL_TYPES
from streamer.simulator import BillingFeedSimulator, SimulatorConfig, write_files

ALERTS = REPO_ROOT / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO_ROOT / "prometheus" / "alerts_test.yml"
COMPOSE_PROMETHEUS = REPO_ROOT / "prometheus" / "prometheus.yml"
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "cdr-streamer.json"
KAFKA_LOCAL = REPO_ROOT / "scripts" / "kafka-local"
JOB = "cdr-streamer"  # the job name alerts.yml matches on
# What Grafana would put in for a 1 s scrape interval ($__rate_interval >= 4 scrapes).
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "5m"}
BURST_BACKLOG = 1500  # CDRs of the `burst` feed before the burst: the usual mix of Status
BURST = 300  # then this many, every call of them Busy or Unallocated
READY_MAX_FAILING_S = 5
TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run scripts/bootstrap", pytrace=False)
    return path


def toml_table(header: str, values: dict[str, Any]) -> list[str]:
    """One TOML table; JSON's strings, numbers and booleans are valid TOML values."""
    return [header, *(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in values.items())]


def write_streamer_config(
    path: Path,
    *,
    bootstrap: str,
    topic: str,
    metrics_port: int,
    feeds: list[dict[str, Any]],
    producer: dict[str, str],
    ready_max_failing_s: float,
    sftp: list[dict[str, Any]] | None = None,
    **kafka: Any,
) -> Path:
    lines = toml_table(
        "[kafka]",
        {"bootstrap_servers": bootstrap, "topic": topic, "dead_letter_topic": f"{topic}-dlq",
         "partitions": 3, **kafka},
    )  # fmt: skip
    lines += toml_table("[kafka.producer]", producer)
    lines += toml_table(
        "[metrics]",
        {"host": "127.0.0.1", "port": metrics_port, "ready_max_failing_s": ready_max_failing_s},
    )
    for feed in feeds:
        lines += toml_table("[[feeds]]", feed)
    for source in sftp or []:
        lines += toml_table("[[sftp]]", source)
    path.write_text("\n".join(lines) + "\n")
    return path


def feed_settings(name: str, sim: BillingFeedSimulator, tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "url": sim.url, "login": "81234567", "poll_interval_s": 1,
        "cursor_file": str(tmp / f"cursor-{name}.json"), "backoff_base_s": 0.1,
        "backoff_max_s": 1, **extra,
    }  # fmt: skip


class Endpoint:
    """The streamer's own /metrics, /healthz and /readyz."""

    def __init__(self, port: int) -> None:
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def close(self) -> None:
        self.http.close()

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample of the live exposition, or None if it is not there."""
        try:
            text = self.get("/metrics").text
        except httpx.TransportError:
            return None  # not listening yet
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return None


class Prometheus:
    """A real Prometheus server in a subprocess, and its HTTP API."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        port = free_port()
        config = tmp / "prometheus.yml"
        # JSON is YAML: no YAML library needed to write the configuration.
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.log_path = tmp / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: str) -> Any:
        response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a list of series)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a query that returns one series; None if it returns none."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(30)


@dataclass
class Stack:
    main: BillingFeedSimulator
    faults: BillingFeedSimulator
    streamer: StreamerProcess
    endpoint: Endpoint
    prometheus: Prometheus


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    metrics_port = free_port()
    main = BillingFeedSimulator(
        SimulatorConfig(
            password=FEED_PASSWORD, backlog=1000, rate_per_s=20, malformed_rate=0.02, seed=11
        )
    )
    faults = BillingFeedSimulator(
        SimulatorConfig(
            password=FEED_PASSWORD,
            backlog=BURST_BACKLOG,
            seed=12,
            status_fault_from_id=BURST_BACKLOG + 1,
        )
    )
    main.start()
    faults.start()
    # A real sshd serving one good CDR file and one that is not a feed file, so the
    # dashboard's SFTP panels have data too (files done, quarantined, errors).
    ssh_base = Path(tempfile.mkdtemp(prefix="cdr-sshd-obs-"))
    ssh, sshd_proc = sshd.start(ssh_base)
    files = ssh.new_directory()
    write_files(
        SimulatorConfig(password="-", seed=13), files, cadence="daily", fmt="csv", upto_id=200
    )
    (files / "cdr_20990101_0000.csv").write_text("<html>not a feed file</html>\n")
    sftp_password = tmp / "sftp-password"
    sftp_password.write_text(ssh.password)
    prometheus: Prometheus | None = None
    streamer: StreamerProcess | None = None
    endpoint = Endpoint(metrics_port)
    try:
        config = write_streamer_config(
            tmp / "config.toml",
            bootstrap=kafka_bootstrap,
            topic=f"cdr-{uuid4().hex[:8]}",
            metrics_port=metrics_port,
            feeds=[
                feed_settings("main", main, tmp),
                feed_settings("burst", faults, tmp),
                feed_settings("locked", faults, tmp, password="not the password"),
            ],
            # Statistics every second: the Kafka panels need a few within the test.
            producer={"statistics.interval.ms": "1000"},
            ready_max_failing_s=READY_MAX_FAILING_S,
            sftp=[
                {
                    "name": "files",
                    "host": ssh.host,
                    "port": ssh.port,
                    "user": ssh.user,
                    "password_file": str(sftp_password),
                    "known_hosts": str(ssh.known_hosts),
                    "directory": str(files),
                    "pattern": "cdr_*",
                    "settle_s": 0,
                    "poll_interval_s": 1,
                    "cursor_file": str(tmp / "sftp-cursor.json"),
                }
            ],
        )
        streamer = StreamerProcess(config, tmp / "streamer.log")
        prometheus = Prometheus(tmp, [f"127.0.0.1:{metrics_port}"])
        wait_until(prometheus.ready, "Prometheus to start", timeout_s=TIMEOUT_S)
        stack = Stack(main, faults, streamer, endpoint, prometheus)
        p = prometheus

        def scraped() -> bool:
            return (
                p.value(f'count_over_time(up{{job="{JOB}"}}[10s]) >= 5') is not None
                and p.value(f'min_over_time(up{{job="{JOB}"}}[5s])') == 1
                and p.value('cdr_streamer_kafka_broker_rtt_p99_seconds{feed="main"}') is not None
                and p.value('cdr_streamer:error_status_ratio:rate15m{feed="main"}') is not None
                and p.value('cdr_streamer:international_charge_nzd:rate15m{feed="main"}')
                is not None
            )

        streamer.wait_for(scraped, "Prometheus to scrape the streamer and evaluate the rules")
        yield stack
    finally:
        endpoint.close()
        if prometheus is not None:
            prometheus.stop()
        if streamer is not None:
            code = streamer.stop()
            assert code == 0, streamer.log()[-3000:]
        main.stop()
        faults.stop()
        sshd.stop(sshd_proc, ssh_base)


def with_bool(expr: str) -> str:
    """`expr` with `bool` after each comparison operator outside label matchers and strings."""
    out: list[str] = []
    depth, quote, i = 0, "", 0
    comparison = re.compile(r"==|!=|>=|<=|>|<")
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c in "{}":
            depth += 1 if c == "{" else -1
            out.append(c)
        elif depth == 0 and (m := comparison.match(expr, i)):
            has_bool = re.match(r"\s*bool\b", expr[m.end() :])
            out.append(m.group() if has_bool else f"{m.group()} bool")
            i = m.end()
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def test_with_bool_leaves_label_matchers_alone() -> None:
    assert (
        with_bool('a{status!="Ok", x=~"<>"} > 0.3 and b <= bool 2')
        == 'a{status!="Ok", x=~"<>"} > bool 0.3 and b <= bool 2'
    )


def grafana_expr(expr: str, feed: str = ".*") -> str:
    """A panel's query as Grafana sends it: variables replaced (`$feed` = All)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    expr = expr.replace("${feed}", feed).replace("$feed", feed)
    assert "$" not in expr, f"a variable this test does not know in {expr}"
    return expr


def test_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    for args in (
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(ALERTS_TEST)],
        ["check", "config", str(COMPOSE_PROMETHEUS)],
    ):
        result = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_live_exposition_passes_promtool_check_metrics(stack: Stack) -> None:
    exposition = stack.endpoint.get("/metrics").content
    assert b"cdr_streamer_kafka_queue_messages" in exposition  # statistics included
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == ""  # no lint remarks either


def test_every_dashboard_panel_query_returns_data(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cdr-streamer"
    # The cluster's panels need replicas in cluster mode: test_cluster.py runs them.
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if not panel["title"].startswith("Cluster: ")
    ]
    assert len(queries) >= 20
    empty = [
        (title, expr) for title, expr in queries if not stack.prometheus.query(grafana_expr(expr))
    ]
    assert not empty, "panels without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)


def test_dashboard_feed_variable_lists_every_feed(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "feed"]
    match = re.fullmatch(r"label_values\((\w+), feed\)", variable["definition"])
    assert match is not None
    feeds = stack.prometheus.api("label/feed/values", **{"match[]": match.group(1)})
    assert set(feeds) == {"main", "burst", "locked", "files"}  # "files": the SFTP source


def test_every_rule_is_loaded_healthy_and_returns_data(stack: Stack) -> None:
    groups = stack.prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    text = ALERTS.read_text()
    alerts = [r for r in rules if r["type"] == "alerting"]
    records = [r for r in rules if r["type"] == "recording"]
    assert len(alerts) == text.count("- alert:") >= 8
    assert len(records) == text.count("- record:")
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy
    # The cluster's rules need replicas in cluster mode: test_cluster.py runs them.
    cluster = {r["name"] for g in groups if g["name"] == "cdr-streamer-cluster" for r in g["rules"]}
    alerts = [r for r in alerts if r["name"] not in cluster]
    empty = [(r["name"], r["query"]) for r in records if not stack.prometheus.query(r["name"])]
    absent = [r for r in alerts if r["query"].startswith("absent(")]
    assert [r["name"] for r in absent] == ["CdrStreamerTargetMissing"]
    for rule in absent:
        # Not firing (empty) because what it looks for is there.
        assert stack.prometheus.query(rule["query"]) == [], rule["name"]
        inner = re.fullmatch(r"absent\((.*)\)", rule["query"].strip(), re.DOTALL)
        assert inner is not None
        if not stack.prometheus.query(inner.group(1)):
            empty.append((rule["name"], inner.group(1)))
    empty += [
        (r["name"], with_bool(r["query"]))
        for r in alerts
        if r not in absent and not stack.prometheus.query(with_bool(r["query"]))
    ]
    assert not empty, "rules without data:\n" + "\n".join(f"{n}: {q}" for n, q in empty)


def test_5xx_answers_count_as_http_5xx_and_the_feed_recovers(stack: Stack) -> None:
    p = stack.prometheus
    http_5xx = 'cdr_streamer_feed_requests_total{feed="main", outcome="http_5xx"}'
    ok = 'cdr_streamer_feed_requests_total{feed="main", outcome="ok"}'
    before, ok_before = p.value(http_5xx), p.value(ok)
    assert before is not None
    assert ok_before is not None
    stack.main.inject("500", 2)
    stack.main.inject("503", 1)
    stack.streamer.wait_for(
        lambda: (p.value(http_5xx) or 0) >= before + 3, "three http_5xx requests in Prometheus"
    )
    stack.streamer.wait_for(lambda: (p.value(ok) or 0) > ok_before, "the feed to recover")
    assert p.value('cdr_streamer_feed_up{feed="main"}') == 1


def test_refused_login_stops_its_feed_and_makes_the_streamer_unready(stack: Stack) -> None:
    p = stack.prometheus
    stack.streamer.wait_for(
        lambda: (
            p.value('cdr_streamer_feed_up{feed="locked"}') == 0
            and p.value('cdr_streamer_feed_requests_total{feed="locked", outcome="auth_error"}')
            == 1
            and p.value('cdr_streamer_poll_errors_total{feed="locked", kind="AuthError"}') == 1
        ),
        "the locked feed's auth error in Prometheus",
    )
    assert p.value('cdr_streamer_feed_up{feed="main"}') == 1
    # Not ready as soon as the feed stopped (issue 12), with its reason in words; the
    # failing-for-too-long reason follows once READY_MAX_FAILING_S have passed.
    stack.streamer.wait_for(
        lambda: stack.endpoint.get("/readyz").status_code == 503, "/readyz to turn 503"
    )
    body = stack.endpoint.get("/readyz").text
    assert body.startswith("not ready: feed locked stopped: ")
    assert "check the login and password" in body
    assert "Kafka" not in body  # the broker is fine
    assert "feed main" not in body
    assert stack.endpoint.get("/healthz").status_code == 200  # unready, but alive


def kpis_of_rows(rows: list[dict[str, str]]) -> dict[str, float]:
    """The KPI counters' totals computed from source rows, by the rule metrics.is_call states."""
    calls = [r for r in rows if r["CallType"] in VOICE_CALL_TYPES]
    answered = [r for r in calls if r["Status"] == "Ok"]
    return {
        "attempts": len(calls),
        "answered": len(answered),
        "connected_s": sum(int(r["NetworkSeconds"] or 0) for r in answered),
        "billed_s": sum(int(r["Seconds"] or 0) for r in calls),
        "international_nzd": float(
            sum(Decimal(r["Charge"]) for r in rows if r["CallType"] == "International")
        ),
        "sms_nzd": float(sum(Decimal(r["Charge"]) for r in rows if r["CallType"] == "SMS")),
    }


def kpis_in_prometheus(p: Prometheus, feed: str) -> dict[str, float | None]:
    of = f'{{feed="{feed}"}}'
    return {
        "attempts": p.value(f"sum(cdr_streamer_call_attempts_total{of})"),
        "answered": p.value(f"sum(cdr_streamer_calls_answered_total{of})"),
        "connected_s": p.value(f"sum(cdr_streamer_call_connected_seconds_total{of})"),
        "billed_s": p.value(f"sum(cdr_streamer_call_billed_seconds_total{of})"),
        "international_nzd": p.value(
            f'sum(cdr_streamer_charge_nzd_total{{feed="{feed}", call_type="International"}})'
        ),
        "sms_nzd": p.value(f'sum(cdr_streamer_charge_nzd_total{{feed="{feed}", call_type="SMS"}})'),
    }


def wait_for_kpis(stack: Stack, feed: str, expected: dict[str, float]) -> None:
    """Until Prometheus holds `expected` (a scrape may catch a batch half added; see below)."""
    seen: list[dict[str, float | None]] = []

    def match() -> bool:
        seen.append(kpis_in_prometheus(stack.prometheus, feed))
        return bool(seen[-1] == pytest.approx(expected))

    try:
        stack.streamer.wait_for(match, "the KPI counters", timeout_s=30)
    except AssertionError:
        assert seen[-1] == pytest.approx(expected)  # the difference, not only a timeout
        raise


def test_burst_of_busy_and_unallocated_calls_lowers_the_asr(stack: Stack) -> None:
    p = stack.prometheus
    attempts = 'cdr_streamer_call_attempts_total{feed="burst"'
    # The share of calls that are not Ok, over all the feed's calls so far. (A rate
    # window of a few seconds holds no baseline before a burst; over the process's life
    # this is the same share the dashboard takes over a window.)
    ratio = f'sum({attempts}, status!="Ok"}}) / sum({attempts}}})'
    failed = f'sum({attempts}, status=~"Busy|Unallocated"}}) or vector(0)'
    cursor = 'cdr_streamer_committed_cursor{feed="burst"}'
    stack.streamer.wait_for(lambda: p.value(cursor) == BURST_BACKLOG, "the backlog in Prometheus")
    backlog = [stack.faults.row(i) for i in range(1, BURST_BACKLOG + 1)]
    # The KPI counters hold exactly what the rows say (SMS and service fees are no calls).
    expected = kpis_of_rows(backlog)
    assert expected["attempts"] < sum(r["CallType"] != "Service" for r in backlog)
    wait_for_kpis(stack, "burst", expected)
    ratio_before, failed_before = p.value(ratio), p.value(failed)
    assert ratio_before is not None
    assert failed_before is not None
    assert ratio_before == pytest.approx(1 - expected["answered"] / expected["attempts"])
    burst_ids = range(BURST_BACKLOG + 1, BURST_BACKLOG + BURST + 1)
    burst = [stack.faults.row(i) for i in burst_ids]
    burst_calls = [r for r in burst if r["CallType"] in VOICE_CALL_TYPES]
    # Every call of the burst fails; its SMS and service fees stay Ok.
    assert all(r["Status"] in ("Busy", "Unallocated") for r in burst_calls)
    stack.faults.add(BURST)
    stack.streamer.wait_for(
        lambda: p.value(cursor) == BURST_BACKLOG + BURST, "the burst in Prometheus"
    )
    # One scrape can see the new cursor with the counters of before: prometheus_client
    # reads the families one by one while the feed's thread goes on. So wait for them.
    stack.streamer.wait_for(
        lambda: p.value(failed) == failed_before + len(burst_calls), "the burst's failed calls"
    )
    wait_for_kpis(stack, "burst", kpis_of_rows(backlog + burst))
    ratio_after = p.value(ratio)
    assert ratio_after is not None
    assert ratio_before < 0.2 < ratio_after
    # And the alert's own 15-minute ASR (a recording rule over rate()) shows it: before
    # the burst it had no increase to divide (NaN); its increase is the burst's failed
    # calls alone. (That the alert fires against the day's ASR is alerts_test.yml's part.)
    stack.streamer.wait_for(
        lambda: p.value('cdr_streamer:asr:rate15m{feed="burst"}') == 0, "the recorded ASR at 0"
    )


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A broker of this test's own, to stop and start again (scripts/kafka-local)."""
    broker_dir = tmp_path / "kafka"
    started = subprocess.run(
        [str(KAFKA_LOCAL), "start", "--dir", str(broker_dir)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        yield started.stdout.strip().splitlines()[-1], broker_dir
    finally:
        subprocess.run(
            [str(KAFKA_LOCAL), "stop", "--dir", str(broker_dir)],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip


def test_stopped_broker_shows_as_delivery_errors_and_unreadiness(
    tmp_path: Path, own_broker: tuple[str, Path]
) -> None:
    bootstrap, broker_dir = own_broker
    port = free_port()
    endpoint = Endpoint(port)
    with BillingFeedSimulator(
        SimulatorConfig(password=FEED_PASSWORD, backlog=200, rate_per_s=50, seed=13)
    ) as sim:
        config = write_streamer_config(
            tmp_path / "config.toml",
            bootstrap=bootstrap,
            topic=f"cdr-{uuid4().hex[:8]}",
            metrics_port=port,
            feeds=[feed_settings("main", sim, tmp_path)],
            # Kafka gives up on a message after 3 s; the statistics come every second.
            producer={
                "message.timeout.ms": "3000",
                "request.timeout.ms": "2000",
                "statistics.interval.ms": "1000",
            },
            ready_max_failing_s=300,  # only Kafka may make it unready here
            flush_timeout_s=10,
        )
        # --bootstrap-servers: this broker even when KAFKA_BOOTSTRAP_SERVERS names another.
        streamer = StreamerProcess(
            config, tmp_path / "streamer.log", "--bootstrap-servers", bootstrap
        )
        try:

            def ready() -> bool:
                return _status(endpoint, "/readyz") == 200

            streamer.wait_for(
                lambda: (
                    ready()
                    and (endpoint.metric("cdr_streamer_committed_cursor") or 0) >= 200
                    and endpoint.metric("cdr_streamer_kafka_brokers", state="up") == 1
                ),
                "the backlog published, /readyz 200 and the broker up in the statistics",
            )
            assert endpoint.metric("cdr_streamer_delivery_errors_total") == 0

            subprocess.run(
                [str(KAFKA_LOCAL), "stop", "--dir", str(broker_dir)],
                capture_output=True, timeout=120, check=True,
            )  # fmt: skip
            streamer.wait_for(
                lambda: (
                    (endpoint.metric("cdr_streamer_delivery_errors_total") or 0) > 0
                    and (
                        endpoint.metric("cdr_streamer_poll_errors_total", kind="DeliveryError") or 0
                    )
                    > 0
                    and (endpoint.metric("cdr_streamer_feed_failing_since_timestamp_seconds") or 0)
                    > 0
                    and endpoint.metric("cdr_streamer_kafka_brokers", state="down") == 1
                ),
                "delivery errors and a broker down in the metrics",
            )
            # /readyz asks the cluster itself, at most every 5 s: it follows within seconds.
            streamer.wait_for(
                lambda: _status(endpoint, "/readyz") == 503, "/readyz 503", timeout_s=TIMEOUT_S
            )
            assert endpoint.get("/readyz").text.startswith(
                "not ready: Kafka: no answer from the cluster within 2 s"
            )
            stuck = endpoint.metric("cdr_streamer_committed_cursor")

            # The same ports again (kafka-local keeps them per dir): the streamer carries on.
            subprocess.run(
                [str(KAFKA_LOCAL), "start", "--dir", str(broker_dir)],
                capture_output=True, timeout=300, check=True,
            )  # fmt: skip
            streamer.wait_for(
                lambda: (
                    ready()
                    and (endpoint.metric("cdr_streamer_committed_cursor") or 0) > (stuck or 0)
                    and endpoint.metric("cdr_streamer_feed_failing_since_timestamp_seconds") == 0
                ),
                "/readyz 200 and the cursor moving again after the broker restarted",
                timeout_s=120,
            )
        finally:
            endpoint.close()
            assert streamer.stop() == 0, streamer.log()[-3000:]


def _status(endpoint: Endpoint, path: str) -> int | None:
    try:
        return endpoint.get(path).status_code
    except httpx.TransportError:
        return None  # not listening yet
