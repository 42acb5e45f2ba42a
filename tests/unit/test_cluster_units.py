"""Cluster mode in process: its settings, the runner's view of a handover, the unit host.

The consumer group itself is exercised against the real broker by
tests/integration/test_cluster.py; here fake units stand in for feeds, so the rules
of starting, stopping, forgetting and restarting units are pinned down fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from streamer.cluster import UnitHost, UnitSpec, fingerprint, unit_names
from streamer.config import parse_settings
from streamer.errors import ConfigError, FencedError, StoppedError
from streamer.metrics import ClusterMetrics, Metrics, forget_feed
from streamer.retry import Backoff
from streamer.scheduler import Runner

FEED = {"name": "main", "url": "http://127.0.0.1:8080/billingfeed.php", "login": "81234567"}
ENV = {"CDR_FEED_PASSWORD": "pw"}


def settings(cluster: dict[str, object] | None, **kafka: object) -> dict[str, object]:
    data: dict[str, object] = {
        "kafka": {"bootstrap_servers": "127.0.0.1:9092", **kafka},
        "feeds": [FEED],
    }
    if cluster is not None:
        data["cluster"] = cluster
    return data


def test_cluster_mode_is_off_by_default_and_single_process_keeps_its_file_store() -> None:
    s = parse_settings(settings(None), env=ENV)
    assert not s.cluster.enabled
    assert s.kafka.cursor_store == "file"


def test_cluster_mode_keeps_cursors_in_kafka_and_names_its_topic() -> None:
    s = parse_settings(settings({"group_id": "billing"}), env=ENV)
    assert s.cluster.enabled
    assert s.kafka.cursor_store == "kafka"
    assert s.cluster.topic == "billing-assignment"
    assert (s.cluster.session_timeout_s, s.cluster.heartbeat_interval_s) == (45.0, 3.0)


def test_cluster_mode_refuses_a_file_cursor_store_and_says_what_to_do() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(settings({"group_id": "billing"}, cursor_store="file"), env=ENV)
    assert "kafka.cursor_store: cluster mode" in str(info.value)
    assert "set it to 'kafka'" in str(info.value)


@pytest.mark.parametrize(
    ("cluster", "problem"),
    [
        ({}, "cluster.group_id: is required"),
        ({"group_id": "g", "heartbeat_interval_s": 10, "session_timeout_s": 6},
         "cluster.heartbeat_interval_s: must be above 0 and below session_timeout_s"),
        ({"group_id": "g", "session_timeout_s": 0.5}, "cluster.session_timeout_s"),
        ({"group_id": "g", "group": "x"}, "cluster.group: unknown setting"),
        ({"group_id": "g", "handover_timeout_s": "long"}, "must be a number"),
    ],
)  # fmt: skip
def test_cluster_settings_are_checked(cluster: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_settings(settings(cluster), env=ENV)


def feed(name: str) -> dict[str, object]:
    return {**FEED, "name": name}


FILES = {"host": "h", "user": "u", "password": "p", "trust_unknown_host_key": True}


@pytest.mark.parametrize(
    ("feeds", "sources", "problem"),
    [
        # Feed "a"'s probe producer would fence feed "a-probe"'s producer, and back.
        (["a", "a-probe"], [], "feeds[a]: its probe transactional id 'cdr-streamer-a-probe' "
         "is also the transactional id of feeds[a-probe]"),
        (["sftp-x"], ["x"], "sftp[x]: its transactional id 'cdr-streamer-sftp-x' is also "
         "the transactional id of feeds[sftp-x]"),
        (["sftp-x-probe"], ["x"], "sftp[x]: its probe transactional id "
         "'cdr-streamer-sftp-x-probe' is also the transactional id of feeds[sftp-x-probe]"),
    ],
)  # fmt: skip
def test_units_whose_transactional_ids_would_fence_each_other_are_refused(
    feeds: list[str], sources: list[str], problem: str
) -> None:
    data = settings({"group_id": "g"}, delivery="exactly_once")
    data["feeds"] = [feed(name) for name in feeds]
    data["sftp"] = [{**FILES, "name": name} for name in sources]
    with pytest.raises(ConfigError) as info:
        parse_settings(data, env=ENV)
    assert problem in str(info.value)
    assert "rename one of them" in str(info.value)


def test_distinct_ids_pass_and_a_paired_source_has_no_id_of_its_own() -> None:
    data = settings({"group_id": "g"}, delivery="exactly_once")
    data["feeds"] = [feed("a"), feed("b-probe"), feed("sftp-y")]
    # Source "y" alone would have feed "sftp-y"'s id; paired with feed "a", it has no
    # producer of its own (it writes through feed a's), so nothing clashes.
    data["sftp"] = [{**FILES, "name": "x"}, {**FILES, "name": "y", "pairs_with_feed": "a"}]
    s = parse_settings(data, env=ENV)
    assert [f.name for f in s.feeds] == ["a", "b-probe", "sftp-y"]
    # At least once there are no transactional ids: only cursor keys must differ.
    data = settings({"group_id": "g"})
    data["feeds"] = [feed("a"), feed("a-probe"), feed("sftp-x")]
    data["sftp"] = [{**FILES, "name": "x"}]
    assert len(parse_settings(data, env=ENV).feeds) == 3


def test_units_sharing_a_cursor_key_are_refused() -> None:
    data = settings({"group_id": "g"})
    data["feeds"] = [feed("sftp:x")]
    data["sftp"] = [{**FILES, "name": "x"}]
    shared = r"sftp\[x\]: its cursor key 'sftp:x' is also the cursor key of feeds\[sftp:x\]"
    with pytest.raises(ConfigError, match=shared):
        parse_settings(data, env=ENV)
    data["kafka"] = {"bootstrap_servers": "h:1", "cursor_store": "file"}
    del data["cluster"]  # cursor files: no shared key
    assert parse_settings(data, env=ENV).feeds[0].name == "sftp:x"


def test_fingerprint_changes_with_the_units_and_their_order() -> None:
    base = fingerprint(["feed-a", "feed-b"], "cdr-events")
    assert base == fingerprint(["feed-a", "feed-b"], "cdr-events")
    assert base != fingerprint(["feed-b", "feed-a"], "cdr-events")
    assert base != fingerprint(["feed-a", "feed-b", "feed-c"], "cdr-events")
    assert base != fingerprint(["feed-a", "feed-b"], "other-topic")


def test_partitions_map_to_units_in_order_and_strangers_are_dropped() -> None:
    from confluent_kafka import TopicPartition

    units = ["feed-a", "feed-b", "sftp-c"]
    parts = [TopicPartition("t", 2), TopicPartition("t", 0), TopicPartition("t", 7)]
    assert unit_names(parts, units) == ["sftp-c", "feed-a"]


class FakeRunner(Runner):
    """A source whose polls do what the test says: succeed, stop mid-poll, be fenced, hang."""

    kind = "fake"

    def __init__(self, name: str, metrics: Metrics, behaviour: str = "ok") -> None:
        super().__init__(name, metrics.for_feed(name), Backoff(0.01, 0.01))
        self.behaviour = behaviour
        self.polls = 0
        self.closed = False
        self.stop: threading.Event | None = None

    def _poll(self, *, once: bool) -> float | None:
        self.polls += 1
        if self.behaviour == "fenced":
            raise FencedError("Kafka fenced transactional id 'x'")
        if self.behaviour == "stopped":
            raise StoppedError("stopped after 3 rows")
        if self.behaviour == "hang":
            time.sleep(0.5)  # a request that does not look at the stop event
        return 0.01

    def _position(self) -> str:
        return "cursor stays at 0"

    def close(self) -> None:
        self.closed = True


def test_a_stop_mid_poll_is_not_a_failure() -> None:
    runner = FakeRunner("main", Metrics(CollectorRegistry()), "stopped")
    assert runner.step() is None
    assert runner.error is None
    assert runner.metrics.feed_up._value.get() == 1
    assert runner.metrics.failing_for_s() == 0


def test_fenced_is_fatal_alone_and_a_handover_in_a_cluster() -> None:
    alone = FakeRunner("alone", Metrics(CollectorRegistry()), "fenced")
    assert alone.step() is None
    assert isinstance(alone.error, FencedError)
    assert alone.metrics.feed_up._value.get() == 0

    told: list[FencedError] = []
    clustered = FakeRunner("clustered", Metrics(CollectorRegistry()), "fenced")
    clustered.on_fenced = told.append
    assert clustered.step() is None
    assert clustered.error is None
    assert clustered.metrics.feed_up._value.get() == 1
    assert len(told) == 1


class Units:
    """Unit specs whose runners are FakeRunners; records every build."""

    def __init__(self, metrics: Metrics, behaviours: dict[str, str] | None = None) -> None:
        self.metrics = metrics
        self.behaviours = behaviours or {}
        self.built: list[FakeRunner] = []

    def spec(self, name: str) -> UnitSpec:
        def build(stop: threading.Event) -> Sequence[Runner]:
            runner = FakeRunner(name, self.metrics, self.behaviours.get(name, "ok"))
            runner.stop = stop
            self.built.append(runner)
            return [runner]

        return UnitSpec(f"feed-{name}", build, (name,))


def host_of(
    names: list[str], behaviours: dict[str, str] | None = None, **options: float
) -> tuple[UnitHost, Units, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    units = Units(metrics, behaviours)
    cluster_metrics = ClusterMetrics(registry, group="g", units=len(names), fingerprint="f")
    host = UnitHost(
        [units.spec(n) for n in names], cluster_metrics,
        forget=lambda series: [forget_feed(metrics, s) for s in series],
        handover_timeout_s=options.get("handover_timeout_s", 5.0),
        restart_fenced_after_s=options.get("restart_fenced_after_s", 60.0),
    )  # fmt: skip
    return host, units, registry


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # the polling period of the check


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_assigned_units_run_and_revoked_ones_stop_and_lose_their_series() -> None:
    host, units, registry = host_of(["a", "b"])
    host.assign(["feed-a", "feed-b"])
    wait_for(lambda: len(units.built) == 2 and all(r.polls for r in units.built), "polls")
    assert value(registry, "cdr_streamer_cluster_units_owned", group="g") == 2
    assigned = value(registry, "cdr_streamer_cluster_unit_assigned_timestamp_seconds",
                     group="g", unit="feed-a")  # fmt: skip
    assert assigned is not None
    assert abs(assigned - time.time()) < 60
    assert value(registry, "cdr_streamer_feed_up", feed="a") == 1

    host.revoke(["feed-a"], "revoked")
    a = next(r for r in units.built if r.name == "a")
    assert a.closed
    assert a.stop is not None
    assert a.stop.is_set()
    text = generate_latest(registry).decode()
    assert 'feed="a"' not in text  # every series of the unit that moved away is gone
    assert 'feed="b"' in text
    assert 'unit="feed-a"' not in text
    assert value(registry, "cdr_streamer_cluster_units_owned", group="g") == 1
    assert value(registry, "cdr_streamer_cluster_handovers_total", group="g", how="revoked") == 1
    assert value(registry, "cdr_streamer_cluster_handover_seconds_count", group="g") == 1
    host.stop_all()
    assert all(r.closed for r in units.built)


def test_a_unit_assigned_again_is_built_afresh() -> None:
    host, units, _ = host_of(["a"])
    host.assign(["feed-a"])
    wait_for(lambda: units.built and units.built[0].polls, "the first start's poll")
    host.revoke(["feed-a"], "revoked")
    host.assign(["feed-a"])
    wait_for(lambda: len(units.built) == 2 and units.built[1].polls, "the second start's poll")
    first, second = units.built
    assert first is not second
    assert first.closed
    assert not second.closed
    host.stop_all()


def test_a_lost_unit_is_stopped_without_waiting() -> None:
    host, units, registry = host_of(["a"], {"a": "hang"})
    host.assign(["feed-a"])
    wait_for(lambda: units.built and units.built[0].polls, "a poll")
    started = time.monotonic()
    host.revoke(["feed-a"], "lost", wait=False)
    assert time.monotonic() - started < 0.25  # the hanging poll is not waited for
    wait_for(lambda: units.built[0].closed, "the unit to stop after its poll")
    assert value(registry, "cdr_streamer_cluster_handovers_total", group="g", how="lost") == 1


def test_a_unit_that_does_not_stop_in_time_is_released_anyway(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host, units, _ = host_of(["a"], {"a": "hang"}, handover_timeout_s=0.05)
    host.assign(["feed-a"])
    wait_for(lambda: units.built and units.built[0].polls, "a poll")
    host.revoke(["feed-a"], "revoked")
    assert "has not stopped 0.05 s after it was revoked; releasing it anyway" in caplog.text
    wait_for(lambda: units.built[0].closed, "the unit to stop after its poll")


def test_a_fenced_unit_is_a_handover_and_restarts_only_if_still_owned_after_a_while() -> None:
    host, units, registry = host_of(["a"], {"a": "fenced"}, restart_fenced_after_s=0.2)
    host.assign(["feed-a"])
    wait_for(lambda: units.built and units.built[0].closed, "the fenced unit to stop")
    assert value(registry, "cdr_streamer_cluster_handovers_total", group="g", how="fenced") == 1
    assert value(registry, "cdr_streamer_feed_up", feed="a") == 1  # no outage
    host.tick()
    assert len(units.built) == 1  # too soon: a zombie gets a session timeout to find out
    time.sleep(0.25)  # past restart_fenced_after_s, the delay under test
    host.tick()
    wait_for(lambda: len(units.built) == 2, "the unit, still owned, to start again")
    host.revoke(["feed-a"], "revoked")
    time.sleep(0.25)
    host.tick()  # revoked: never started again
    wait_for(lambda: all(r.closed for r in units.built), "every start to be closed")
    count = len(units.built)
    time.sleep(0.25)
    host.tick()
    assert len(units.built) == count


def test_forget_feed_removes_only_that_feeds_series() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for name in ("a", "b"):
        feed = metrics.for_feed(name, poll_interval_s=60)
        feed.request("ok", 0.1, 100)
        feed.poll_error("DeliveryError")
    forget_feed(metrics, "a")
    text = generate_latest(registry).decode()
    assert 'feed="a"' not in text
    assert text.count('feed="b"') > 20
    assert "a" not in metrics.feeds


def test_file_sources_of_every_protocol_are_assigned_as_units_or_within_their_feeds() -> None:
    """An FTP or FTPS source is a unit like an SFTP one: alone, or inside its feed's unit."""
    from streamer.app import _unit_specs
    from streamer.metrics import SftpMetrics
    from streamer.publisher import TimestampLimits
    from streamer.scheduler import FeedRunner, SftpRunner
    from streamer.sources.ftp import FtpServer
    from streamer.sources.sftp import SftpServer

    data = settings({"group_id": "g"}, delivery="exactly_once")
    data["feeds"] = [feed("main"), feed("other")]
    ftp = {"host": "127.0.0.1", "user": "u", "password": "p"}
    data["sftp"] = [
        {**ftp, "name": "drop", "protocol": "ftp", "pairs_with_feed": "main"},
        {**ftp, "name": "archive", "protocol": "ftps"},
        {**FILES, "name": "files"},
    ]
    s = parse_settings(data, env=ENV)
    registry = CollectorRegistry()
    specs = _unit_specs(
        s, Metrics(registry), SftpMetrics(registry), limits=TimestampLimits(), table=None
    )
    by_name = {spec.name: spec for spec in specs}
    assert sorted(by_name) == ["feed-main", "feed-other", "sftp-archive", "sftp-files"]
    assert by_name["feed-main"].series == ("main", "drop")  # moved away: both forgotten
    assert by_name["sftp-archive"].series == ("archive",)

    # Built (as an assignment does; nothing connects before the first poll): the FTP
    # source runs in its feed's thread, through the feed's one transactional producer.
    stop = threading.Event()
    feed_runner, file_runner = by_name["feed-main"].build(stop)
    assert isinstance(feed_runner, FeedRunner)
    assert isinstance(file_runner, SftpRunner)
    assert isinstance(file_runner.collector.server, FtpServer)
    assert file_runner.collector.sink.slot is feed_runner.pipeline.slot
    assert file_runner.collector.abort_on_stop  # a revoke abandons a file mid-read
    (alone,) = by_name["sftp-archive"].build(stop)
    assert isinstance(alone, SftpRunner)
    assert isinstance(alone.collector.server, FtpServer)
    (sftp,) = by_name["sftp-files"].build(stop)
    assert isinstance(sftp, SftpRunner)
    assert isinstance(sftp.collector.server, SftpServer)
    for runner in (feed_runner, file_runner, alone, sftp):
        runner.close()
