"""All the wiring: Settings -> components -> units of work, run until stopped.

A *unit of work* is what one thread runs: a feed, the file source (SFTP, FTP or FTPS)
paired with it and their one producer, or a file source on its own; in cluster mode,
the group assigns units to replicas (streamer/cluster.py). Components take plain arguments;
only this module (and `pipeline.py`) puts several of them together.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from streamer import cluster
from streamer.avro import make_encoder
from streamer.config import (
    FeedSettings,
    Secret,
    Settings,
    SftpSettings,
    feed_transactional_id,
    file_transactional_id,
    is_loopback_url,
    probe_transactional_id,
)
from streamer.cursor import (
    CursorStore,
    FileCursorStore,
    JsonCursorStore,
    JsonFileCursorStore,
    JsonKafkaCursorStore,
    KafkaCursorStore,
    MemoryCursorStore,
)
from streamer.cursor_table import CursorTable
from streamer.endpoint import Credentials, tls_context
from streamer.errors import ConfigError, DeliveryError, KafkaUnavailableError, TopicError
from streamer.health import HealthServer, KafkaCheck, Readiness
from streamer.limits import BodyLimits
from streamer.logs import LIBRDKAFKA, fields
from streamer.metrics import ClusterMetrics, FeedMetrics, Metrics, SftpMetrics, forget_feed
from streamer.pipeline import FeedPipeline, PollResult
from streamer.publisher import (
    Publisher,
    TimestampLimits,
    producer_config,
    provision_topic,
    timestamp_limits,
)
from streamer.reconcile import Reconciler, Reconciliation
from streamer.retry import Backoff
from streamer.running import FileLock, KafkaLease, lease_holder
from streamer.scheduler import FeedRunner, Runner, SftpRunner, run_together
from streamer.sink import Encoder, EventSink, PublisherSlot
from streamer.sources.base import FileServer
from streamer.sources.feed import FeedClient, FeedQuery, FeedTimeouts
from streamer.sources.files import FileCollector
from streamer.sources.ftp import FtpServer
from streamer.sources.sftp import SftpServer
from streamer.startup import StartingCursorStore, recover_cursor, resolve_start, wait_for_kafka
from streamer.status import StatusBoard
from streamer.workers import WorkerPool

log = logging.getLogger("streamer")

CONNECT_TIMEOUT_S = 5.0  # a metadata request at start: the broker answers, or we say so


@dataclass(frozen=True, slots=True)
class Unit:
    """One unit of work: sources that take turns in one thread, over one producer."""

    name: str
    runners: list[Runner]


def _provision(settings: Settings) -> TimestampLimits:
    """Create or check the topics; the event topic's timestamp limits.

    KafkaUnavailableError while the cluster does not answer (startup.wait_for_kafka retries).
    """
    k = settings.kafka
    admin = AdminClient({**k.producer, "bootstrap.servers": k.bootstrap_servers}, logger=LIBRDKAFKA)
    try:
        admin.list_topics(timeout=CONNECT_TIMEOUT_S)
    except KafkaException as exc:
        admin.poll(0)  # its queued log lines go to the folding logger, not into memory
        raise KafkaUnavailableError(
            f"no answer within {CONNECT_TIMEOUT_S:g} s: {exc.args[0].str()}"
        ) from exc
    try:
        return _provision_topics(admin, settings)
    finally:
        admin.poll(0)


def _provision_topics(admin: AdminClient, settings: Settings) -> TimestampLimits:
    k = settings.kafka
    for topic in (k.topic, k.dead_letter_topic):
        provision_topic(
            admin, topic, partitions=k.partitions, replication_factor=k.replication_factor,
            min_insync_replicas=k.min_insync_replicas, retention_ms=k.retention_ms,
        )  # fmt: skip
    if k.cursor_store == "kafka":
        provision_topic(
            admin, k.cursor_topic, partitions=1, replication_factor=k.replication_factor,
            min_insync_replicas=k.min_insync_replicas, compacted=True,
        )  # fmt: skip
    # A topic just created may not be known yet to the broker that answers describe_configs.
    deadline = time.monotonic() + 30.0
    while True:
        try:
            return timestamp_limits(admin, k.topic)
        except TopicError as exc:
            if "Unknown topic" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the polling period of the condition above


def _cursor_store(
    settings: Settings, feed: FeedSettings, table: CursorTable | None = None
) -> CursorStore:
    k = settings.kafka
    if k.cursor_store == "kafka":
        return KafkaCursorStore(
            k.bootstrap_servers, k.cursor_topic, feed.name,
            initial=feed.initial_cursor, client_config=k.producer, table=table,
        )  # fmt: skip
    return FileCursorStore(Path(feed.cursor_file), feed.name, feed.initial_cursor)


def feed_client(
    feed: FeedSettings,
    query: FeedQuery | None = None,
    *,
    stop: threading.Event | None = None,
    on_request: Callable[[str, float, int], None] | None = None,
) -> FeedClient:
    """The feed's HTTP client; `query` None: the feed's own format and filters."""
    if query is None:
        query = FeedQuery(
            format=feed.format, callsonly=feed.callsonly, servicesonly=feed.servicesonly
        )
    return FeedClient(
        feed.url,
        feed.login,
        feed.password,
        query=query,
        method=feed.method,
        timeouts=FeedTimeouts(feed.connect_timeout_s, feed.read_timeout_s, feed.request_deadline_s),
        max_attempts=1,  # one retry counter: the runner's (scheduler.py)
        stop=stop,
        on_request=on_request,
        name=feed.name,
        limits=BodyLimits(feed.max_body_bytes, feed.max_expansion_ratio),
        ca_file=feed.ca_file,
        encoding=feed.encoding,
    )


def cursor_store(settings: Settings, feed: FeedSettings) -> CursorStore:
    """A feed's cursor store as configured (file or Kafka), for the cursor command."""
    return _cursor_store(settings, feed)


def sftp_cursor_store(settings: Settings, source: SftpSettings) -> JsonCursorStore:
    """An SFTP source's cursor store as configured, for the cursor command."""
    return _sftp_cursor_store(settings, source)


def transactional_id(settings: Settings, name: str, *, sftp: bool = False) -> str:
    """The transactional id of a feed's (or an unpaired SFTP source's) producer."""
    prefix = settings.kafka.transactional_id_prefix
    return f"{prefix}-sftp-{name}" if sftp else f"{prefix}-{name}"


def _starting_store(
    settings: Settings, feed: FeedSettings, client: FeedClient, table: CursorTable | None = None
) -> CursorStore:
    """The feed's store, deciding the first cursor when it holds none (startup.py)."""
    k = settings.kafka
    zone = ZoneInfo(feed.timezone)
    return StartingCursorStore(
        _cursor_store(settings, feed, table),
        feed=feed.name,
        start_from=feed.start_from,
        resolve=lambda start: resolve_start(client, start, zone),
        recover=lambda: recover_cursor(k.bootstrap_servers, k.producer, k.topic, feed.name),
    )


def _publisher_slot(
    settings: Settings, source_metrics: FeedMetrics, transactional_id: str | None
) -> PublisherSlot:
    """The producer of a unit of work; exactly-once, also a prober of its own id (sink.py)."""
    probe_factory = None
    if transactional_id is not None:
        probe_factory = _publisher_factory(settings, None, probe_transactional_id(transactional_id))
    return PublisherSlot(
        _publisher_factory(settings, source_metrics, transactional_id), probe_factory
    )


def _publisher_factory(
    settings: Settings, source_metrics: FeedMetrics | None, transactional_id: str | None
) -> Callable[[], Publisher]:
    k = settings.kafka
    config = producer_config(k.bootstrap_servers, k.producer)
    if source_metrics is not None and "client.id" not in k.producer:
        # librdkafka's log lines carry the client id: they name the feed too.
        config["client.id"] = f"cdr-streamer-{source_metrics.feed}"

    def new_publisher() -> Publisher:
        if source_metrics is None:
            return Publisher(config, transactional_id=transactional_id)
        publisher = Publisher(
            config, transactional_id=transactional_id, stats_cb=source_metrics.kafka_stats
        )
        source_metrics.watch_producer(publisher.poll)  # statistics stay current while idle
        return publisher

    return new_publisher


def _encoder(settings: Settings) -> Encoder:
    k = settings.kafka
    return make_encoder(
        k.topic,
        registry_url=k.schema_registry_url,
        auto_register=k.schema_registry_auto_register,
        registry_user=k.schema_registry_user,
        registry_password=k.schema_registry_password,
    )


def _build_pipeline(
    settings: Settings,
    feed: FeedSettings,
    metrics: Metrics,
    stop: threading.Event,
    *,
    query: FeedQuery,
    cursor_store: CursorStore | None,
    exactly_once: bool,
    limits: TimestampLimits,
    headers: Sequence[tuple[str, str | bytes | None]] = (),
    reconcile: bool = False,
    abort_on_stop: bool = False,
    table: CursorTable | None = None,
    pool: WorkerPool | None = None,
) -> FeedPipeline:
    """`cursor_store` None: the feed's own store, deciding a first cursor if it has none."""
    feed_metrics = metrics.for_feed(feed.name, poll_interval_s=feed.poll_interval_s)
    client = feed_client(feed, query, stop=stop, on_request=feed_metrics.request)
    if cursor_store is None:
        cursor_store = _starting_store(settings, feed, client, table)
    k = settings.kafka
    transactional_id = (
        feed_transactional_id(k.transactional_id_prefix, feed.name) if exactly_once else None
    )
    pipeline = FeedPipeline(
        name=feed.name,
        client=client,
        publisher_slot=_publisher_slot(settings, feed_metrics, transactional_id),
        encoder=_encoder(settings),
        cursor_store=cursor_store,
        topic=k.topic,
        dead_letter_topic=k.dead_letter_topic,
        metrics=feed_metrics,
        checkpoint_every=k.checkpoint_every,
        flush_timeout_s=k.flush_timeout_s,
        exactly_once=exactly_once,
        ids_ascending=feed.ids_ascending,
        timestamp_limits=limits,
        timezone=feed.timezone,
        headers=headers,
        stop=stop if abort_on_stop else None,
        pool=pool,
    )
    if reconcile and feed.reconcile:
        pipeline.reconciler = Reconciler(
            name=feed.name,
            client=client,
            sink=pipeline.sink,
            store=cursor_store,
            metrics=feed_metrics,
            settings=Reconciliation(
                horizon_s=feed.reconcile_horizon_h * 3600,
                checks=feed.reconcile_checks,
                min_interval_s=feed.reconcile_min_interval_s or feed.poll_interval_s,
                clock="feed" if feed.reconcile_clock == "feed" else "wall",
            ),
            zone=pipeline.timezone,
            exactly_once=exactly_once,
            checkpoint_every=k.checkpoint_every,
            page_size=feed.page_size,
        )
    return pipeline


def run(settings: Settings, stop: threading.Event, *, once: bool) -> list[Runner]:
    """Run every unit of work until `stop` (or, with `once`, until each has nothing more).

    Waits for Kafka first (not ready meanwhile). Returns the runners, whose `error` says
    which stopped on a fatal error (none when stopped before Kafka answered). In cluster
    mode the units this replica runs come and go: none are returned.
    """
    if settings.cluster.enabled and once:
        raise ConfigError(
            "--once runs every feed in this process to its end; it does not go with cluster "
            "mode ([cluster] group_id): run it with a configuration without [cluster]"
        )
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    configured = [("feed", f.name) for f in settings.feeds] + [
        (s.protocol, s.name) for s in settings.sftp
    ]
    board = StatusBoard(metrics, configured, kafka_servers=settings.kafka.bootstrap_servers)
    claims = Claims(settings)
    claims.claim_files()  # a second instance on the same cursor files stops here
    health: HealthServer | None = None
    table: CursorTable | None = None
    pool = _worker_pool(settings)
    try:
        if settings.metrics.port:
            health = _start_health_server(settings, metrics, board)
        limits = wait_for_kafka(
            lambda: _provision(settings), stop,
            servers=settings.kafka.bootstrap_servers, on_waiting=board.waiting,
        )  # fmt: skip
        if limits is None:
            return []
        if not settings.cluster.enabled:
            # In cluster mode the consumer group says who runs what: no lease of our own.
            claims.claim_kafka()
        _warn_of_feed_settings(settings)
        k = settings.kafka
        sftp_metrics = SftpMetrics(registry) if settings.sftp else None
        # One reader of the cursor topic for the whole process (streamer/cursor_table.py).
        if k.cursor_store == "kafka":
            table = CursorTable(k.bootstrap_servers, k.cursor_topic, k.producer)
        specs = _unit_specs(settings, metrics, sftp_metrics, limits=limits, table=table, pool=pool)
        if settings.cluster.enabled:
            board.attach([])  # started: units appear on the board as they are assigned
            specs = [_on_board(spec, board) for spec in specs]
            _run_cluster(settings, specs, registry, metrics, sftp_metrics, stop, board)
            return []
        units = [Unit(spec.name, list(spec.build(stop))) for spec in specs]
        board.attach([member for unit in units for member in unit.runners])
        return _run_units(units, stop, once=once)
    finally:
        if pool is not None:
            pool.close()
        if table is not None:
            table.close()
        claims.release()
        if health is not None:
            health.stop()


def _worker_pool(settings: Settings) -> WorkerPool | None:
    """The process's one pool of worker processes (they start when first needed)."""
    count = settings.processing.worker_count
    return WorkerPool(count) if count else None


def _warn_of_feed_settings(settings: Settings) -> None:
    for feed in settings.feeds:
        if feed.url.startswith("http://") and not is_loopback_url(feed.url):
            log.warning(
                "feed %s: %s is plain HTTP: the login and password cross the network "
                "unencrypted; use the provider's https:// address",
                feed.name, feed.url,
            )  # fmt: skip
        if feed.poll_interval_s < 600 and not is_loopback_url(feed.url):
            log.warning(
                "feed %s polls every %g s, under the provider's 600 s guidance",
                feed.name,
                feed.poll_interval_s,
            )


def _on_board(spec: cluster.UnitSpec, board: StatusBoard) -> cluster.UnitSpec:
    """`spec` whose runners, once built (assigned here), show on the status board."""
    build = spec.build

    def built(stop: threading.Event) -> list[Runner]:
        runners = list(build(stop))
        board.attach(runners)
        return runners

    return replace(spec, build=built)


def _run_units(units: list[Unit], stop: threading.Event, *, once: bool) -> list[Runner]:
    """Every unit in a thread of its own, until each ends."""
    threads: list[threading.Thread] = []
    for unit in units:
        thread = threading.Thread(
            target=run_together,
            args=(unit.runners, stop),
            kwargs={"once": once},
            name=unit.name,
            daemon=True,
        )
        threads.append(thread)
        thread.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    runners = [member for unit in units for member in unit.runners]
    for member in runners:
        member.close()
    return runners


def _unit_specs(
    settings: Settings,
    metrics: Metrics,
    sftp_metrics: SftpMetrics | None,
    *,
    limits: TimestampLimits,
    table: CursorTable | None,
    pool: WorkerPool | None = None,
) -> list[cluster.UnitSpec]:
    """Each unit of work as a recipe: built once (single process) or at each assignment."""
    clustered = settings.cluster.enabled
    paired = {s.pairs_with_feed: s for s in settings.sftp if s.pairs_with_feed}
    specs: list[cluster.UnitSpec] = []
    for feed in settings.feeds:
        source = paired.get(feed.name) if sftp_metrics is not None else None
        build = partial(
            _feed_unit, settings, feed, source, metrics, sftp_metrics,
            limits=limits, table=table, abort_on_stop=clustered, pool=pool,
        )  # fmt: skip
        series = (feed.name,) if source is None else (feed.name, source.name)
        specs.append(cluster.UnitSpec(f"feed-{feed.name}", build, series))
    for source in settings.sftp:
        if not source.pairs_with_feed and sftp_metrics is not None:
            build = partial(
                _sftp_unit, settings, source, metrics, sftp_metrics,
                limits=limits, table=table, abort_on_stop=clustered, pool=pool,
            )  # fmt: skip
            specs.append(cluster.UnitSpec(f"sftp-{source.name}", build, (source.name,)))
    return specs


def _feed_unit(
    settings: Settings,
    feed: FeedSettings,
    source: SftpSettings | None,
    metrics: Metrics,
    sftp_metrics: SftpMetrics | None,
    stop: threading.Event,
    *,
    limits: TimestampLimits,
    table: CursorTable | None,
    abort_on_stop: bool,
    pool: WorkerPool | None = None,
) -> list[Runner]:
    """A feed and the file source paired with it: they take turns in one thread."""
    pipeline = _build_pipeline(
        settings,
        feed,
        metrics,
        stop,
        query=FeedQuery(
            format=feed.format, callsonly=feed.callsonly, servicesonly=feed.servicesonly
        ),
        cursor_store=None,
        exactly_once=settings.kafka.delivery == "exactly_once",
        limits=limits,
        reconcile=True,
        abort_on_stop=abort_on_stop,
        table=table,
        pool=pool,
    )
    runner = FeedRunner(
        pipeline,
        poll_interval_s=feed.poll_interval_s,
        poll_jitter_ratio=feed.poll_jitter_ratio,
        page_size=feed.page_size,
        backoff=Backoff(feed.backoff_base_s, feed.backoff_max_s),
    )
    runner.max_failures = feed.max_attempts
    group: list[Runner] = [runner]
    # The cursor is read by the first poll: in exactly-once mode only after the
    # transactional producer has fenced any older instance.
    log.info(
        "feed %s: polling %s as %s every %g s, %s, cursor in %r, %s",
        feed.name, feed.url, feed.login, feed.poll_interval_s,
        settings.kafka.delivery.replace("_", "-"), pipeline.cursor_store,
        f"reconciling the last {feed.reconcile_horizon_h:g} h ({feed.reconcile_checks} "
        f"checks per hour, {feed.reconcile_clock} clock)"
        if feed.reconcile else "reconciliation off",
    )  # fmt: skip
    if source is not None and sftp_metrics is not None:
        collector = _build_sftp(
            settings, source, metrics, sftp_metrics, stop, limits=limits,
            slot=pipeline.slot, feed_cursor=pipeline.cursor_store.load, table=table,
            abort_on_stop=abort_on_stop, pool=pool,
        )  # fmt: skip
        pipeline.covered_by = collector.published_ids
        group.append(_sftp_runner(collector, source))
    return group


def _sftp_unit(
    settings: Settings,
    source: SftpSettings,
    metrics: Metrics,
    sftp_metrics: SftpMetrics,
    stop: threading.Event,
    *,
    limits: TimestampLimits,
    table: CursorTable | None,
    abort_on_stop: bool,
    pool: WorkerPool | None = None,
) -> list[Runner]:
    """A file source (SFTP, FTP or FTPS) on its own."""
    collector = _build_sftp(
        settings, source, metrics, sftp_metrics, stop, limits=limits, table=table,
        abort_on_stop=abort_on_stop, pool=pool,
    )  # fmt: skip
    return [_sftp_runner(collector, source)]


def _run_cluster(
    settings: Settings,
    specs: list[cluster.UnitSpec],
    registry: CollectorRegistry,
    metrics: Metrics,
    sftp_metrics: SftpMetrics | None,
    stop: threading.Event,
    board: StatusBoard,
) -> None:
    """Cluster mode: run the units the consumer group assigns to this replica, until `stop`."""
    k, c = settings.kafka, settings.cluster
    specs = sorted(specs, key=lambda spec: spec.name)  # partition i runs the i-th unit
    names = [spec.name for spec in specs]
    fingerprint = cluster.fingerprint(
        names, k.topic, k.cursor_topic, k.delivery, k.transactional_id_prefix
    )
    admin = AdminClient({**k.producer, "bootstrap.servers": k.bootstrap_servers})
    cluster.provision_assignment_topic(
        admin, c.topic, len(specs), replication_factor=k.replication_factor,
        min_insync_replicas=k.min_insync_replicas,
    )  # fmt: skip
    cluster_metrics = ClusterMetrics(
        registry, group=c.group_id, units=len(specs), fingerprint=fingerprint
    )

    def forget(series: Sequence[str]) -> None:
        board.detach(series)
        for name in series:
            forget_feed(metrics, name, sftp_metrics)

    host = cluster.UnitHost(
        specs, cluster_metrics, forget=forget, handover_timeout_s=c.handover_timeout_s,
        restart_fenced_after_s=c.session_timeout_s,
    )  # fmt: skip
    membership = cluster.Membership(
        host, cluster_metrics, bootstrap_servers=k.bootstrap_servers, client_config=k.producer,
        group_id=c.group_id, topic=c.topic, units=names, fingerprint=fingerprint,
        session_timeout_s=c.session_timeout_s, heartbeat_interval_s=c.heartbeat_interval_s,
        handover_timeout_s=c.handover_timeout_s,
    )  # fmt: skip
    thread = threading.Thread(
        target=membership.run, args=(stop,), name="cluster-membership", daemon=True
    )
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if membership.error is not None:
        raise membership.error


class Claims:
    """This process runs these feeds and sources: cursor-file locks, Kafka leases (running.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._locks: list[FileLock] = []
        self._lease: KafkaLease | None = None

    def claim_files(self) -> None:
        if self.settings.kafka.cursor_store == "kafka":
            return
        try:
            for feed in self.settings.feeds:
                self._take(FileLock(Path(feed.cursor_file)), f"feed {feed.name}")
            for source in self.settings.sftp:
                self._take(FileLock(Path(source.cursor_file)), f"sftp {source.name}")
        except BaseException:
            self.release()
            raise

    def _take(self, lock: FileLock, what: str) -> None:
        try:
            lock.acquire(what)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock {lock.path}: {exc.strerror}") from exc
        self._locks.append(lock)

    def claim_kafka(self) -> None:
        k = self.settings.kafka
        if k.cursor_store != "kafka":
            return
        owners = [f.name for f in self.settings.feeds] + [
            f"sftp:{s.name}" for s in self.settings.sftp
        ]
        for owner in owners:
            try:
                holder = lease_holder(k.bootstrap_servers, k.producer, k.cursor_topic, owner)
            except DeliveryError as exc:
                # A lease is advice. The usual cause: a run killed mid-checkpoint left its
                # transaction open on the cursor topic; the feed's own producer fences it
                # when it starts (same transactional id), so going on is what ends it.
                log.info("%s: could not read its lease (%s); starting anyway", owner, exc)
                continue
            if holder is not None:
                log.warning(
                    "%s may be running elsewhere too (%s): only one cdr-streamer may run a feed%s",
                    owner, holder,
                    "; exactly-once fences the other" if k.delivery == "exactly_once" else "",
                )  # fmt: skip
        self._lease = KafkaLease(k.bootstrap_servers, k.producer, k.cursor_topic, owners)
        self._lease.start()

    def release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()
        if self._lease is not None:
            self._lease.stop()
            self._lease = None


def _sftp_cursor_store(
    settings: Settings, source: SftpSettings, table: CursorTable | None = None
) -> JsonCursorStore:
    k = settings.kafka
    owner = f"sftp:{source.name}"
    if k.cursor_store == "kafka":
        return JsonKafkaCursorStore(
            k.bootstrap_servers, k.cursor_topic, owner, client_config=k.producer, table=table
        )
    return JsonFileCursorStore(Path(source.cursor_file), owner)


def _build_sftp(
    settings: Settings,
    source: SftpSettings,
    metrics: Metrics,
    sftp_metrics: SftpMetrics,
    stop: threading.Event,
    *,
    limits: TimestampLimits,
    slot: PublisherSlot | None = None,
    feed_cursor: Callable[[], int] | None = None,
    table: CursorTable | None = None,
    abort_on_stop: bool = False,
    pool: WorkerPool | None = None,
) -> FileCollector:
    """One SFTP source; paired, it shares its feed's producer (`slot`) and reads its cursor."""
    k = settings.kafka
    exactly_once = k.delivery == "exactly_once"
    source_metrics = metrics.for_feed(
        source.name, source.protocol, poll_interval_s=source.poll_interval_s
    )
    if slot is None:
        transactional_id = (
            file_transactional_id(k.transactional_id_prefix, source.name) if exactly_once else None
        )
        slot = _publisher_slot(settings, source_metrics, transactional_id)
    server = _file_server(source)
    store = _sftp_cursor_store(settings, source, table)
    log.info(
        "%s %s: listing %s:%s on %s:%d as %s every %g s, %s%s, cursor in %r",
        source.protocol, source.name, source.directory, source.pattern, source.host,
        source.port, source.user, source.poll_interval_s, k.delivery.replace("_", "-"),
        f", paired with feed {source.pairs_with_feed}" if source.pairs_with_feed else "", store,
    )  # fmt: skip
    return FileCollector(
        name=source.name,
        server=server,
        directory=source.directory,
        pattern=source.pattern,
        fmt=source.format,
        encoding=source.encoding,
        settle_s=source.settle_s,
        after=source.after,
        quarantine_dir=source.quarantine_dir,
        max_decompressed_bytes=source.max_decompressed_bytes,
        sink=EventSink(
            name=source.name,
            source=source.protocol,
            slot=slot,
            encoder=_encoder(settings),
            topic=k.topic,
            dead_letter_topic=k.dead_letter_topic,
            metrics=source_metrics,
            flush_timeout_s=k.flush_timeout_s,
            timestamp_limits=limits,
        ),
        cursor_store=store,
        sftp_metrics=sftp_metrics.for_source(source.name),
        checkpoint_every=k.checkpoint_every,
        exactly_once=exactly_once,
        feed_cursor=feed_cursor,
        stop=stop,
        abort_on_stop=abort_on_stop,
        max_file_bytes=source.max_file_bytes,
        pool=pool,
    )


def _file_server(source: SftpSettings) -> FileServer:
    """The server of one file source, by its protocol: SFTP, FTP or FTPS."""
    if source.protocol == "sftp":
        return SftpServer(
            source.host,
            source.port,
            source.user,
            known_hosts=Path(source.known_hosts),
            password=source.password,
            key_file=Path(source.key_file).expanduser() if source.key_file else None,
            key_passphrase=source.key_passphrase,
            trust_unknown_host_key=source.trust_unknown_host_key,
            connect_timeout_s=source.connect_timeout_s,
            read_timeout_s=source.read_timeout_s,
        )
    if source.protocol == "ftp" and not is_loopback_url(f"ftp://{source.host}/"):
        log.warning(
            "ftp %s: plain FTP sends the password and the CDRs unencrypted; use protocol = "
            '"ftps" if %s offers it', source.name, source.host,
        )  # fmt: skip
    if source.protocol == "ftps" and not source.tls_verify:
        log.warning(
            "ftps %s: tls_verify = false: the connection is encrypted, but to whoever answers "
            "as %s; set ca_file to the provider's CA instead", source.name, source.host,
        )  # fmt: skip
    return FtpServer(
        source.host,
        source.port,
        source.user,
        source.password or Secret(""),  # config.py requires one for FTP
        tls="none" if source.protocol == "ftp" else source.ftps_mode,
        ca_file=Path(source.ca_file) if source.ca_file else None,
        verify=source.tls_verify,
        passive=source.passive,
        connect_timeout_s=source.connect_timeout_s,
        read_timeout_s=source.read_timeout_s,
    )


def _sftp_runner(collector: FileCollector, source: SftpSettings) -> SftpRunner:
    return SftpRunner(
        collector,
        poll_interval_s=source.poll_interval_s,
        backoff=Backoff(source.backoff_base_s, source.backoff_max_s),
    )


def _start_health_server(settings: Settings, metrics: Metrics, board: StatusBoard) -> HealthServer:
    """/metrics, /healthz, /readyz, and the status (/status, /) on the metrics port."""
    k, m = settings.kafka, settings.metrics
    kafka_check = KafkaCheck({**k.producer, "bootstrap.servers": k.bootstrap_servers})
    readiness = Readiness(
        metrics,
        kafka_check,
        max_failing_s=m.ready_max_failing_s,
        max_poll_s=m.ready_max_poll_s,
        extra=board.problems,
    )
    credentials = None
    if m.basic_auth_user or m.bearer_token is not None:
        credentials = Credentials(m.basic_auth_user, m.basic_auth_password, m.bearer_token)
    tls = None
    if m.tls_cert_file:
        try:
            tls = tls_context(m.tls_cert_file, m.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use metrics.tls_cert_file {m.tls_cert_file} and tls_key_file "
                f"{m.tls_key_file}: {exc}"
            ) from exc
    health = HealthServer(
        metrics.registry,
        readiness.problems,
        host=m.host,
        port=m.port,
        credentials=credentials,
        auth_probes=m.auth_probes,
        tls=tls,
        pages=board.pages(),
    )
    try:
        health.start()
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {m.host}:{m.port}: {exc.strerror}") from exc
    scheme = "https" if tls is not None else "http"
    guarded = (
        "" if credentials is None else ", credentials required" + ("" if m.auth_probes else
        " except for the probes")
    )  # fmt: skip
    shown = "127.0.0.1" if m.host in ("0.0.0.0", "") else m.host  # noqa: S104 - where to look
    log.info(
        "status on %s://%s:%d/ (JSON: /status), metrics on /metrics, also /healthz and /readyz%s",
        scheme, shown, health.port, guarded,
        extra=fields("listening", host=m.host, port=health.port),
    )  # fmt: skip
    return health


def backfill(
    settings: Settings,
    feed: FeedSettings,
    stop: threading.Event,
    *,
    day: date,
    hour: int | None,
    callsonly: bool,
    servicesonly: bool,
) -> Runner:
    """Publish one day (or hour) of `feed` again, without reading or moving its live cursor.

    Its events carry a `replay` header (`backfill:DAY` or `backfill:DAYTHH`).
    """
    limits = wait_for_kafka(
        lambda: _provision(settings), stop, servers=settings.kafka.bootstrap_servers
    )
    if limits is None:
        raise KeyboardInterrupt  # stopped while waiting for Kafka: nothing was done
    metrics = Metrics(CollectorRegistry())
    pool = _worker_pool(settings)
    window = f"{day}" + (f"T{hour:02d}" if hour is not None else "")
    # The live cursor is neither read nor moved: the backfill keeps its own in memory.
    pipeline = _build_pipeline(
        settings,
        feed,
        metrics,
        stop,
        query=FeedQuery(
            format=feed.format,
            date=day,
            hour=hour,
            # --callsonly / --servicesonly replace the feed's own choice; else it applies.
            callsonly=callsonly or (feed.callsonly and not servicesonly),
            servicesonly=servicesonly or (feed.servicesonly and not callsonly),
        ),
        cursor_store=MemoryCursorStore(0),
        exactly_once=False,  # a backfill re-publishes on purpose; it has no cursor to protect
        limits=limits,
        headers=[("replay", f"backfill:{window}".encode())],
        pool=pool,
    )
    runner = BackfillRunner(
        pipeline,
        poll_interval_s=0,
        page_size=feed.page_size,
        backoff=Backoff(feed.backoff_base_s, feed.backoff_max_s),
    )
    runner.window = window.replace("T", " hour ")
    runner.max_failures = feed.max_attempts
    log.info(
        "backfill of feed %s for %s: the live cursor is neither read nor moved",
        feed.name, runner.window,
    )  # fmt: skip
    try:
        runner.run(stop, once=True)
    finally:
        pipeline.close()
        if pool is not None:
            pool.close()
    log.info(
        "backfill of feed %s for %s done: %d rows, %d published, %d dead letters%s",
        feed.name, runner.window, runner.rows, runner.published, runner.dead_lettered,
        f", IDs up to {runner.highest}" if runner.highest else "",
        extra=fields(
            "backfill_done", window=window, rows=runner.rows, published=runner.published,
            dead_letters=runner.dead_lettered, highest_id=runner.highest,
        ),
    )  # fmt: skip
    return runner


class BackfillRunner(FeedRunner):
    """A feed runner whose log lines tell the backfill's window, not a cursor move."""

    kind = "feed"
    window = ""
    rows = published = dead_lettered = highest = 0

    def _log_poll(self, result: PollResult) -> None:
        self.rows += result.rows
        self.published += result.published
        self.dead_lettered += result.dead_lettered
        self.highest = max(self.highest, result.cursor_after)
        self.last_summary = f"backfill {self.window}: {result.rows} rows"
        log.info(
            "backfill of feed %s for %s: %d rows in %.1f s: %d published, %d dead letters, "
            "%d repeated in the response",
            self.name, self.window, result.rows, result.seconds, result.published,
            result.dead_lettered, result.duplicates,
        )  # fmt: skip
