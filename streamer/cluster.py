"""Cluster mode: replicas of one configuration share its units of work through a consumer group.

Kafka's group coordinator decides who runs what, as it does for Kafka Connect's
workers; there is no coordinator of our own. Each unit of work (a feed with its
paired SFTP source, or an SFTP source alone) is one partition of a small assignment
topic: the units sorted by name, the first is partition 0. Every replica subscribes
to that topic in one group with the cooperative-sticky assignor, and runs the units
whose partitions it is assigned. No message is ever read or written there; the
partitions are only the tokens the group hands out.

    assign  -> each unit built afresh (its own producer, client, cursor) and started
    revoke  -> its stop event set; its poll aborts at the next row, nothing committed
               past the last checkpoint; waited for up to `handover_timeout_s`, then
               the partition is released and the next owner starts from the cursor
    lost    -> the same, without waiting on the group: the session expired, so the
               units may already run elsewhere

In exactly-once mode the new owner's transactional producer (one id per feed) fences
a previous owner that is still busy; that is a handover (`Runner.on_fenced`), not an
outage. The group is polled from a thread of its own, so membership (and
max.poll.interval.ms) does not depend on feeds whose polls last minutes.

Every replica must run the same configuration: its fingerprint travels in the
consumer's client.id, and after each rebalance the group's members are compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

# Not re-exported by confluent_kafka.admin's typed interface (as NewTopic in publisher.py).
from confluent_kafka.cimpl import NewPartitions

from streamer.errors import ClusterError, FencedError, TopicError
from streamer.metrics import ClusterMetrics
from streamer.publisher import provision_topic
from streamer.scheduler import Runner, run_together

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("librdkafka")

CLIENT_ID_PREFIX = "cdr-streamer-"
_POLL_S = 0.5  # how often the membership thread serves the group (callbacks, heartbeats)


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """How to build one unit of work; built again, from scratch, each time it is assigned.

    `build(stop)` returns the unit's runners, their components watching `stop`.
    `series` names the metric series (`feed` label values) that belong to the unit.
    """

    name: str
    build: Callable[[threading.Event], Sequence[Runner]]
    series: tuple[str, ...]


def fingerprint(units: Sequence[str], *settings: str) -> str:
    """What every replica of one cluster must agree on: the units, in partition order."""
    text = json.dumps([list(units), *settings], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def provision_assignment_topic(
    admin: AdminClient,
    topic: str,
    units: int,
    *,
    replication_factor: int,
    min_insync_replicas: int,
    timeout_s: float = 30.0,
) -> None:
    """Create the assignment topic with one partition per unit; grow it if units were added."""
    provision_topic(
        admin, topic, partitions=units, replication_factor=replication_factor,
        min_insync_replicas=min_insync_replicas, timeout_s=timeout_s,
    )  # fmt: skip
    have = _partition_count(admin, topic, timeout_s)
    if have < units:
        future = admin.create_partitions([NewPartitions(topic, units)], request_timeout=timeout_s)[
            topic
        ]
        try:
            future.result()
        except KafkaException as exc:
            # Another replica may have grown it at the same moment.
            if _partition_count(admin, topic, timeout_s) < units:
                raise TopicError(
                    f"cannot add partitions to assignment topic {topic}: {exc.args[0].str()}"
                ) from exc
        log.warning(
            "assignment topic %s grown from %d to %d partitions (one per unit of work): "
            "replicas still running the old configuration map partitions to other units "
            "until they restart with this one",
            topic, have, units,
        )  # fmt: skip
    elif have > units:
        log.error(
            "assignment topic %s has %d partitions but this configuration has %d units of "
            "work: partitions %d-%d run nothing here. Do all replicas run the same "
            "configuration? (Removing units needs a new [cluster] assignment_topic.)",
            topic, have, units, units, have - 1,
        )  # fmt: skip


def unit_names(partitions: Sequence[TopicPartition], units: Sequence[str]) -> list[str]:
    """The units of these assignment-topic partitions; partitions without one are logged."""
    names = []
    for tp in partitions:
        if 0 <= tp.partition < len(units):
            names.append(units[tp.partition])
        else:
            log.error(
                "cluster: assigned partition %d of %s, but this configuration has only %d "
                "units of work: do all replicas run the same configuration?",
                tp.partition, tp.topic, len(units),
            )  # fmt: skip
    return names


def _partition_count(admin: AdminClient, topic: str, timeout_s: float) -> int:
    """The topic's partitions, once its metadata shows them (a new topic takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(topic, timeout=timeout_s)
        described = metadata.topics.get(topic)
        if described is not None and described.error is None and described.partitions:
            return len(described.partitions)
        if time.monotonic() >= deadline:
            raise TopicError(f"assignment topic {topic} does not show in Kafka's metadata")
        time.sleep(0.1)  # the interval of asking again, until the deadline


@dataclass(eq=False)
class _Running:
    """One start of a unit in this process, from its assignment until its thread ends."""

    spec: UnitSpec
    stop: threading.Event
    previous: _Running | None
    thread: threading.Thread | None = None
    runners: Sequence[Runner] = ()
    revoked_at: float | None = None  # monotonic
    fenced_at: float | None = None  # monotonic
    finished: bool = False
    forgotten: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class UnitHost:
    """Runs the units assigned to this replica, one thread each; stops them when revoked."""

    def __init__(
        self,
        specs: Sequence[UnitSpec],
        metrics: ClusterMetrics,
        *,
        forget: Callable[[Sequence[str]], None],
        handover_timeout_s: float,
        restart_fenced_after_s: float,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.metrics = metrics
        self.forget = forget
        self.handover_timeout_s = handover_timeout_s
        self.restart_fenced_after_s = restart_fenced_after_s
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}  # the latest start of each unit
        self.owned: set[str] = set()

    def assign(self, names: Sequence[str]) -> None:
        """Start these units (each with fresh components); quick, for a rebalance callback."""
        for name in names:
            with self._lock:
                current = self._running.get(name)
                if name in self.owned and current is not None and current.revoked_at is None:
                    continue  # already ours and running
                self.owned.add(name)
            self._start(name, current)
            self.metrics.unit_assigned.labels(self.metrics.group, name).set(time.time())
        self.metrics.units_owned.labels(self.metrics.group).set(len(self.owned))

    def _start(self, name: str, previous: _Running | None) -> None:
        running = _Running(self.specs[name], threading.Event(), previous)
        thread = threading.Thread(
            target=self._run, args=(running,), name=f"unit-{name}", daemon=True
        )
        running.thread = thread
        with self._lock:
            self._running[name] = running
        thread.start()

    def _run(self, running: _Running) -> None:
        name = running.spec.name
        try:
            if running.previous is not None:
                # The last start of this unit here must be gone (its series removed,
                # its producer closed) before the next one builds its own.
                running.previous.done.wait()
            if running.stop.is_set():
                return
            running.runners = running.spec.build(running.stop)
            for runner in running.runners:
                runner.on_fenced = partial(self._fenced, running)
            if running.stop.is_set():  # revoked while it was being built
                return
            log.info("cluster: unit %s started", name)
            run_together(running.runners, running.stop)
        except Exception:
            log.exception("cluster: unit %s failed", name)
        finally:
            for runner in running.runners:
                try:
                    runner.close()
                except Exception:
                    log.exception("cluster: closing unit %s failed", name)
            with self._lock:
                running.finished = True
                revoked = running.revoked_at is not None
            if revoked:
                self._forget(running)
            elif running.fenced_at is None:
                log.error(
                    "cluster: unit %s stopped on the errors above; it stays with this "
                    "replica (feed_up shows it) until a rebalance moves it",
                    name,
                )  # fmt: skip
            running.done.set()

    def _fenced(self, running: _Running, exc: FencedError) -> None:
        """A runner of `running` was fenced: the whole unit stops (its paired source too)."""
        self.metrics.handovers.labels(self.metrics.group, "fenced").inc()
        with self._lock:
            running.fenced_at = time.monotonic()
        running.stop.set()

    def _forget(self, running: _Running) -> None:
        with self._lock:
            if running.forgotten:
                return
            running.forgotten = True
        self.forget(running.spec.series)
        if running.revoked_at is not None:
            seconds = time.monotonic() - running.revoked_at
            self.metrics.handover_seconds.labels(self.metrics.group).observe(seconds)
            log.info("cluster: unit %s stopped %.1f s after it was revoked", running.spec.name,
                     seconds)  # fmt: skip

    def revoke(self, names: Sequence[str], how: str, *, wait: bool = True) -> None:
        """Stop these units; with `wait`, until each stopped or `handover_timeout_s` passed."""
        group = self.metrics.group
        stopping: list[_Running] = []
        now = time.monotonic()
        for name in names:
            with self._lock:
                self.owned.discard(name)
                running = self._running.get(name)
                if running is None or running.revoked_at is not None:
                    continue
                running.revoked_at = now
                finished = running.finished
            running.stop.set()
            self.metrics.handovers.labels(group, how).inc()
            self.metrics.unit_assigned.remove(group, name)
            if finished:
                self._forget(running)
            else:
                stopping.append(running)
        self.metrics.units_owned.labels(group).set(len(self.owned))
        if not wait:
            return
        deadline = now + self.handover_timeout_s
        for running in stopping:
            if not running.done.wait(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "cluster: unit %s has not stopped %g s after it was revoked; releasing it "
                    "anyway. Exactly-once, its next owner fences it; at-least-once, both may "
                    "publish the same CDRs until it stops (a hung request ends at the feed's "
                    "read_timeout_s)",
                    running.spec.name, self.handover_timeout_s,
                )  # fmt: skip

    def tick(self) -> None:
        """Start again a unit fenced while this replica still owns it, once that has lasted.

        Fenced and still ours means no other replica took it: a transaction that outlived
        transaction.timeout.ms, or a zombie that had not yet learned it lost the unit.
        Waiting a session timeout first lets a zombie (this one or another) find out.
        """
        now = time.monotonic()
        for name in sorted(self.owned):
            with self._lock:
                running = self._running.get(name)
                due = (
                    running is not None
                    and running.finished
                    and running.revoked_at is None
                    and running.fenced_at is not None
                    and now - running.fenced_at >= self.restart_fenced_after_s
                )
            if due:
                log.warning(
                    "cluster: unit %s was fenced although the group still gives it to this "
                    "replica; starting it again (do all replicas share one configuration?)",
                    name,
                )  # fmt: skip
                self._start(name, running)

    def stop_all(self) -> None:
        """Stop every unit still running (the process is stopping)."""
        with self._lock:
            names = [n for n, r in self._running.items() if r.revoked_at is None]
        self.revoke(names, "revoked")


class Membership:
    """This replica's membership of the group: polled in its own thread, drives a UnitHost."""

    def __init__(
        self,
        host: UnitHost,
        metrics: ClusterMetrics,
        *,
        bootstrap_servers: str,
        client_config: Mapping[str, str],
        group_id: str,
        topic: str,
        units: Sequence[str],
        fingerprint: str,
        session_timeout_s: float,
        heartbeat_interval_s: float,
        handover_timeout_s: float,
    ) -> None:
        self.host = host
        self.metrics = metrics
        self.group_id = group_id
        self.topic = topic
        self.units = list(units)
        self.client_id = f"{CLIENT_ID_PREFIX}{fingerprint}"
        base: dict[str, str | int | float | bool] = {
            **dict(client_config),
            "bootstrap.servers": bootstrap_servers,
        }
        self._admin_config = base
        self._config: dict[str, object] = {
            **base,
            "group.id": group_id,
            # The fingerprint of our configuration, for the others to compare (describe).
            "client.id": self.client_id,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(session_timeout_s * 1000),
            "heartbeat.interval.ms": int(heartbeat_interval_s * 1000),
            # A revoke callback waits up to handover_timeout_s for the units to stop.
            "max.poll.interval.ms": max(300_000, int((2 * handover_timeout_s + 60) * 1000)),
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "auto.offset.reset": "latest",
            "error_cb": self._on_error,
        }
        self.error: BaseException | None = None
        self._failure: str | None = None  # a callback failed: the membership cannot go on
        self._check_members = False
        self._admin: AdminClient | None = None

    def run(self, stop: threading.Event) -> None:
        """Join the group and serve it until `stop`; then stop the units and leave."""
        try:
            consumer = Consumer(self._config, logger=_librdkafka_log)
        except KafkaException as exc:
            self.error = ClusterError(f"cannot create the group's consumer: {exc.args[0].str()}")
            return
        try:
            consumer.subscribe(
                [self.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            log.info(
                "cluster: joining group %s on %s (%d units of work, configuration %s)",
                self.group_id, self.topic, len(self.units), self.client_id,
            )  # fmt: skip
            while not stop.is_set():
                msg = consumer.poll(_POLL_S)  # serves heartbeats' results and the callbacks
                err = msg.error() if msg is not None else None
                if err is not None:
                    self._on_error(err)
                if self._failure is not None:
                    raise ClusterError(self._failure)
                self.host.tick()
                if self._check_members:
                    self._check_members = False
                    self._compare_members()
        except KafkaException as exc:
            self.error = ClusterError(f"consumer group {self.group_id}: {exc.args[0].str()}")
        except BaseException as exc:
            self.error = exc
        finally:
            try:
                consumer.close()  # revokes every unit (they stop), then leaves the group
            except (KafkaException, RuntimeError) as exc:
                log.warning("cluster: leaving group %s: %s", self.group_id, exc)
            self.host.stop_all()
            log.info("cluster: left group %s", self.group_id)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal() or err.code() in (
            KafkaError.GROUP_AUTHORIZATION_FAILED,
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.INVALID_SESSION_TIMEOUT,
        ):
            self._failure = f"consumer group {self.group_id}: {err.str()}"
            log.error("cluster: %s", self._failure)
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("cluster: all brokers are down; the units run on until the session ends")
        else:
            log.debug("cluster: %s", err.str())

    def _guarded(self, what: str, action: Callable[[], None]) -> None:
        # A callback must not raise (it would surface from poll() half done): note it,
        # and let the membership loop end the process.
        try:
            action()
        except Exception as exc:
            log.exception("cluster: %s failed", what)
            self._failure = f"handling a rebalance ({what}) failed: {exc!r}"

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels(self.group_id, "assigned").inc()
        names = unit_names(partitions, self.units)
        if names:
            log.info("cluster: assigned %s", ", ".join(names))
        self._guarded("assign", lambda: self.host.assign(names))
        self._check_members = True

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels(self.group_id, "revoked").inc()
        names = unit_names(partitions, self.units)
        if names:
            log.info("cluster: revoked %s; stopping them", ", ".join(names))
        self._guarded("revoke", lambda: self.host.revoke(names, "revoked"))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels(self.group_id, "lost").inc()
        names = unit_names(partitions, self.units)
        log.warning(
            "cluster: lost %s: the group's session expired (was this replica paused, or cut "
            "off from Kafka, for longer than session_timeout_s?); they may run elsewhere now",
            ", ".join(names) or "no units",
        )  # fmt: skip
        self._guarded("lost", lambda: self.host.revoke(names, "lost", wait=False))

    def _compare_members(self) -> None:
        """Log (and count) members whose configuration fingerprint differs from ours."""
        if self._admin is None:
            self._admin = AdminClient(self._admin_config, logger=_librdkafka_log)
        try:
            future = self._admin.describe_consumer_groups([self.group_id], request_timeout=10)
            members = future[self.group_id].result().members
        except KafkaException as exc:
            log.warning("cluster: cannot describe group %s: %s", self.group_id, exc)
            return
        others = [m for m in members if m.client_id != self.client_id]
        self.metrics.members.labels(self.group_id).set(len(members))
        self.metrics.config_mismatch.labels(self.group_id).set(len(others))
        if others:
            log.error(
                "cluster: %d of %d members of group %s run another configuration than this "
                "one (%s): %s. Units may then run twice or not at all: give every replica "
                "the same feeds and sftp sources",
                len(others), len(members), self.group_id, self.client_id,
                ", ".join(f"{m.client_id} on {m.host}" for m in others),
            )  # fmt: skip
        log.info(
            "cluster: group %s has %d members; this replica runs %d of %d units: %s",
            self.group_id, len(members), len(self.host.owned), len(self.units),
            ", ".join(sorted(self.host.owned)) or "none",
        )  # fmt: skip
