"""Cluster mode against the real broker: replicas as separate processes share 12 feeds.

Each replica is `cdr-streamer run` in a process of its own, with the same configuration;
what each one runs is read from its own /metrics (`cdr_streamer_cluster_unit_assigned_
timestamp_seconds`, one series per unit it owns). The simulators (one login each) run in
this process, and a thread keeps adding CDRs to them, so the replicas work mid-stream
when one of them is killed.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import FEED_PASSWORD, StreamerProcess, read_topic, wait_until, write_config
from prometheus_client.parser import text_string_to_metric_families
from test_observability import DASHBOARD, Prometheus, free_port, grafana_expr, with_bool

from streamer.simulator import BillingFeedSimulator, SimulatorConfig

FEEDS = 12
BACKLOG = 2000
CHECKPOINT_EVERY = 200
POLL_INTERVAL_S = 1.0
SESSION_TIMEOUT_S = 6.0
HEARTBEAT_S = 1.0
# What "resumed within session.timeout.ms plus one poll" allows on top of the session
# timeout: the survivors learn of the rebalance at their next heartbeat and rejoin (two
# heartbeats), then the unit's first poll: its producer fenced the dead one's, the
# cursor read, everything published since the kill confirmed, on a shared 2-core box.
FIRST_POLL_ALLOWANCE_S = 10.0
RESUME_DEADLINE_S = SESSION_TIMEOUT_S + 2 * HEARTBEAT_S + POLL_INTERVAL_S + FIRST_POLL_ALLOWANCE_S
ADD_EVERY_S = 0.1
ADD_PER_FEED = 5  # 50 new CDRs per second per feed while the stream runs


class Replica:
    """One streamer process of the cluster, and what its /metrics say it runs."""

    def __init__(self, name: str, config: Path, tmp_path: Path, port: int) -> None:
        self.name = name
        self.port = port
        # The same configuration on every replica; only the metrics port is its own.
        own = tmp_path / f"{name}.toml"
        own.write_text(
            config.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {self.port}")
        )
        self.process = StreamerProcess(own, tmp_path / f"{name}.log")

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The samples of metric family `name`, by their labels (none before it listens)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        except ConnectionRefusedError:
            return {}
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                return {}
            raise
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    out[tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def owned(self) -> dict[str, float]:
        """unit -> when this replica was assigned it (Unix time)."""
        samples = self.samples("cdr_streamer_cluster_unit_assigned_timestamp_seconds")
        return {dict(labels)["unit"]: value for labels, value in samples.items()}

    def by_feed(self, name: str) -> dict[str, float]:
        return {dict(labels)["feed"]: v for labels, v in self.samples(name).items()}

    def starts(self) -> Counter[str]:
        """How often each unit was started on this replica (from its log)."""
        return Counter(re.findall(r"cluster: unit (\S+) started", self.process.log()))


class Stream:
    """Adds CDRs to every simulator from a thread, until stopped."""

    def __init__(self, sims: list[BillingFeedSimulator]) -> None:
        self.sims = sims
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(ADD_EVERY_S):
            for sim in self.sims:
                sim.add(ADD_PER_FEED)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def simulators() -> Iterator[list[BillingFeedSimulator]]:
    sims = [
        BillingFeedSimulator(
            SimulatorConfig(
                password=FEED_PASSWORD, login=f"8200{n:04d}", backlog=BACKLOG, seed=100 + n
            )
        )
        for n in range(FEEDS)
    ]
    for sim in sims:
        sim.start()
    yield sims
    for sim in sims:
        sim.stop()


def cluster_config(
    tmp_path: Path, bootstrap: str, topic: str, sims: list[BillingFeedSimulator], delivery: str
) -> Path:
    feeds = [
        {
            "name": f"f{n:02d}",
            "url": sim.url,
            "login": sim.config.login,
            "poll_interval_s": POLL_INTERVAL_S,
            "poll_jitter_ratio": 0.0,
            "ids_ascending": True,
            "backoff_base_s": 0.2,
            "backoff_max_s": 2,
        }
        for n, sim in enumerate(sims)
    ]
    config = write_config(
        tmp_path / "cluster.toml", bootstrap=bootstrap, topic=topic, feeds=feeds,
        delivery=delivery, cursor_topic=f"{topic}-cursors", checkpoint_every=CHECKPOINT_EVERY,
    )  # fmt: skip
    with config.open("a") as f:
        f.write(
            f'[cluster]\ngroup_id = "{topic}"\nsession_timeout_s = {SESSION_TIMEOUT_S}\n'
            f"heartbeat_interval_s = {HEARTBEAT_S}\nhandover_timeout_s = 20\n"
        )
    return config


def ownership(replicas: list[Replica]) -> dict[str, list[str]]:
    """unit -> the replicas that say they own it now."""
    owners: dict[str, list[str]] = defaultdict(list)
    for replica in replicas:
        for unit in replica.owned():
            owners[unit].append(replica.name)
    return owners


def wait_balanced(replicas: list[Replica], per_replica: int) -> dict[str, str]:
    """Wait until every unit has exactly one owner and each replica owns `per_replica`."""
    units = {f"feed-f{n:02d}" for n in range(FEEDS)}
    seen: list[dict[str, list[str]]] = []

    def balanced() -> bool:
        for replica in replicas:
            assert replica.process.proc.poll() is None, replica.process.log()[-3000:]
        owners = ownership(replicas)
        seen.append(owners)
        counts = Counter(o[0] for o in owners.values() if len(o) == 1)
        return (
            set(owners) == units
            and all(len(o) == 1 for o in owners.values())
            and all(counts[r.name] == per_replica for r in replicas)
        )

    what = f"each of {len(replicas)} replicas to own {per_replica} units"
    try:
        wait_until(balanced, what, timeout_s=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {dict(seen[-1]) if seen else None}") from None
    return {unit: o[0] for unit, o in seen[-1].items()}


UNOWNED = "CdrStreamerUnitUnowned"


def check_prometheus(prometheus: Prometheus, killed_at: float, moved: int) -> None:
    wait_until(prometheus.ready, "Prometheus to start")
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["title"].startswith("Cluster: ")
        for target in panel["targets"]
    ]
    assert len(queries) >= 5
    empty = [(t, e) for t, e in queries if not prometheus.query(grafana_expr(e))]
    assert not empty, f"cluster panels without data: {empty}"
    rules = prometheus.api("rules", type="alert")
    cluster = [
        r for g in rules["groups"] if g["name"] == "cdr-streamer-cluster" for r in g["rules"]
    ]
    assert len(cluster) == 3
    assert all(r["health"] == "ok" for r in cluster), cluster
    # Each rule's inputs are there (as a comparison with `bool`, it answers 0 or 1).
    assert all(prometheus.query(with_bool(r["query"])) for r in cluster), cluster
    (rule,) = [r for r in cluster if r["name"] == UNOWNED]
    # Between the kill and the end of the session timeout the victim's units had no owner.
    during = prometheus.api("query", query=rule["query"], time=f"{killed_at + 3:.3f}")
    assert [float(r["value"][1]) for r in during["result"]] == [moved], during
    assert not prometheus.query(rule["query"]), "units are still unowned"


def cursors(replicas: list[Replica]) -> dict[str, float]:
    out: dict[str, float] = {}
    for replica in replicas:
        out.update(replica.by_feed("cdr_streamer_committed_cursor"))
    return out


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_three_replicas_share_feeds_fail_over_and_scale_out(
    delivery: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    simulators: list[BillingFeedSimulator],
) -> None:
    config = cluster_config(tmp_path, kafka_bootstrap, topic_name, simulators, delivery)
    ports = {name: free_port() for name in "abcd"}
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{port}" for port in ports.values()])
    stream = Stream(simulators)
    replicas = [Replica(name, config, tmp_path, ports[name]) for name in "abc"]
    extra: Replica | None = None
    try:
        # 1. Every feed owned by exactly one replica, 4 each.
        owner = wait_balanced(replicas, FEEDS // 3)
        # Past the backlog: from here on each poll has the second's new CDRs.
        wait_until(
            lambda: len(cursors(replicas)) == FEEDS and min(cursors(replicas).values()) >= BACKLOG,
            "every feed to publish its backlog",
        )

        # 2. kill -9 one replica mid-stream: its feeds resume on the others.
        victim = replicas[1]
        moved = sorted(u for u, r in owner.items() if r == victim.name)
        survivors = [r for r in replicas if r is not victim]
        kept_before = {r.name: r.owned() for r in survivors}
        killed_at = time.time()
        victim.process.kill()
        resumed: dict[str, float] = {}

        def all_resumed() -> bool:
            for r in survivors:
                owned = r.owned()
                polled = r.by_feed("cdr_streamer_last_successful_poll_timestamp_seconds")
                for unit in moved:
                    feed = unit.removeprefix("feed-")
                    if unit in owned and polled.get(feed, 0) > killed_at:
                        resumed.setdefault(unit, time.time())
            return len(resumed) == len(moved)

        wait_until(all_resumed, "the killed replica's feeds to resume elsewhere", timeout_s=60)
        slowest = max(resumed.values()) - killed_at
        print(f"{delivery}: the killed replica's {len(moved)} feeds resumed {slowest:.1f} s after")
        assert slowest <= RESUME_DEADLINE_S, (
            f"feeds resumed {slowest:.1f} s after the kill (allowed {RESUME_DEADLINE_S:g} s)"
        )
        owner = wait_balanced(survivors, FEEDS // 2)
        for r in survivors:  # what a survivor had, it kept: not restarted
            owned = r.owned()
            assert all(owned[u] == t for u, t in kept_before[r.name].items()), r.name

        # 3. A fourth replica (the third live one) takes some units without stopping the
        # others: 6 + 6 becomes 4 + 4 + 4.
        before = {r.name: r.owned() for r in survivors}
        extra = Replica("d", config, tmp_path, ports["d"])
        replicas.append(extra)
        owner = wait_balanced([*survivors, extra], FEEDS // 3)
        for r in survivors:
            owned = r.owned()
            stayed = set(owned) & set(before[r.name])
            assert len(stayed) == FEEDS // 3
            assert all(owned[u] == before[r.name][u] for u in stayed), (
                f"{r.name} restarted a unit it kept: {before[r.name]} -> {owned}"
            )
            assert all(v == 1 for v in r.by_feed("cdr_streamer_feed_up").values())
        given = {u for u, r in owner.items() if r == "d"}
        assert given
        assert all(u not in r.owned() for r in survivors for u in given)
        for r in survivors:
            # The moved units' series are gone from the replica that gave them up.
            feeds = set(r.by_feed("cdr_streamer_committed_cursor"))
            assert feeds == {u.removeprefix("feed-") for u in r.owned()}, r.name

        # 4. The stream ends; every feed's cursor reaches its last CDR.
        stream.stop()
        live = [r for r in replicas if r is not victim]
        high = {f"f{n:02d}": sim.high_id for n, sim in enumerate(simulators)}
        wait_until(lambda: cursors(live) == high, "every cursor to reach its feed's end")

        # 5. Prometheus saw it: the dashboard's cluster panels have data, and the rule for
        # units owned by nobody held while the killed replica's units had no owner, and
        # holds no more.
        check_prometheus(prometheus, killed_at, len(moved))
    finally:
        prometheus.stop()
        stream.stop()
        # All at once: one by one, each would hand its units to the next to stop.
        live = [r for r in replicas if r.process.proc.poll() is None]
        for r in live:
            r.process.proc.terminate()
        for r in live:
            assert r.process.proc.wait(60) == 0, r.process.log()[-3000:]

    # 6. What a read_committed consumer sees, feed by feed.
    ids: dict[str, Counter[int]] = defaultdict(Counter)
    for msg in read_topic(kafka_bootstrap, topic_name):
        feed = dict(msg.headers())["feed"].decode()
        ids[feed][int(dict(msg.headers())["cdr_id"])] += 1
    starts: Counter[str] = Counter()
    for r in replicas:
        starts += r.starts()
    total = sum(sum(n - 1 for n in c.values()) for c in ids.values())
    print(f"{delivery}: {sum(high.values())} CDRs, {total} published again")
    for feed, last in high.items():
        assert set(ids[feed]) == set(range(1, last + 1)), f"feed {feed} lost CDRs"
        duplicated = sum(n - 1 for n in ids[feed].values())
        if delivery == "exactly_once":
            assert duplicated == 0, f"feed {feed}: {duplicated} duplicates"
        else:
            # Each handover (every start after the first) may publish again the batch
            # that was not confirmed when it came: at most checkpoint_every CDRs.
            handovers = starts[f"feed-{feed}"] - 1
            assert duplicated <= handovers * CHECKPOINT_EVERY, (feed, duplicated, handovers)
    for r in replicas:
        log = r.process.log()
        assert " stopped: " not in log, r.name  # no feed stopped on a fatal error


def test_cluster_refuses_a_file_cursor_store(tmp_path: Path, kafka_bootstrap: str) -> None:
    from helpers import run_streamer

    config = write_config(
        tmp_path / "c.toml", bootstrap=kafka_bootstrap, topic="unused",
        feeds=[{"name": "f", "url": "http://127.0.0.1:1/billingfeed.php", "login": "1"}],
        cursor_store="file",
    )  # fmt: skip
    with config.open("a") as f:
        f.write('[cluster]\ngroup_id = "g"\n')
    done = run_streamer("run", "--config", str(config))
    assert done.returncode == 1
    assert "kafka.cursor_store: cluster mode" in done.stderr
    assert "set it to 'kafka'" in done.stderr
