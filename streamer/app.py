"""All the wiring: Settings -> components -> units of work, run until stopped.

A *unit of work* is what one thread runs: a feed, the SFTP source paired with it and
their one producer, or an SFTP source on its own. Components take plain arguments;
only this module (and `pipeline.py`) puts several of them together.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from streamer.avro import make_encoder
from streamer.config import FeedSettings, Secret, Settings, SftpSettings, is_loopback_url
from streamer.cursor import (
    CursorStore,
    FileCursorStore,
    JsonCursorStore,
    JsonFileCursorStore,
    JsonKafkaCursorStore,
    KafkaCursorStore,
    MemoryCursorStore,
)
from streamer.endpoint import Credentials, tls_context
from streamer.errors import ConfigError
from streamer.health import HealthServer, KafkaCheck, Readiness
from streamer.limits import BodyLimits
from streamer.metrics import FeedMetrics, Metrics, SftpMetrics
from streamer.pipeline import FeedPipeline
from streamer.publisher import (
    Publisher,
    TimestampLimits,
    producer_config,
    provision_topic,
    timestamp_limits,
)
from streamer.retry import Backoff
from streamer.scheduler import FeedRunner, Runner, SftpRunner, run_together
from streamer.sink import Encoder, EventSink, PublisherSlot
from streamer.sources.base import FileServer
from streamer.sources.feed import FeedClient, FeedQuery, FeedTimeouts
from streamer.sources.files import FileCollector
from streamer.sources.ftp import FtpServer
from streamer.sources.sftp import SftpServer

log = logging.getLogger("streamer")


@dataclass(frozen=True, slots=True)
class Unit:
    """One unit of work: sources that take turns in one thread, over one producer."""

    name: str
    runners: list[Runner]


def _provision(settings: Settings) -> TimestampLimits:
    """Create or check the topics; the event topic's timestamp limits."""
    k = settings.kafka
    admin = AdminClient({**k.producer, "bootstrap.servers": k.bootstrap_servers})
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
    return timestamp_limits(admin, k.topic)


def _cursor_store(settings: Settings, feed: FeedSettings) -> CursorStore:
    k = settings.kafka
    if k.cursor_store == "kafka":
        return KafkaCursorStore(
            k.bootstrap_servers, k.cursor_topic, feed.name,
            initial=feed.initial_cursor, client_config=k.producer,
        )  # fmt: skip
    return FileCursorStore(Path(feed.cursor_file), feed.name, feed.initial_cursor)


def _publisher_slot(
    settings: Settings, source_metrics: FeedMetrics, transactional_id: str | None
) -> PublisherSlot:
    """The producer of a unit of work; exactly-once, also a prober of its own id (sink.py)."""
    probe_factory = None
    if transactional_id is not None:
        probe_factory = _publisher_factory(settings, None, f"{transactional_id}-probe")
    return PublisherSlot(
        _publisher_factory(settings, source_metrics, transactional_id), probe_factory
    )


def _publisher_factory(
    settings: Settings, source_metrics: FeedMetrics | None, transactional_id: str | None
) -> Callable[[], Publisher]:
    k = settings.kafka
    config = producer_config(k.bootstrap_servers, k.producer)

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
    cursor_store: CursorStore,
    exactly_once: bool,
    limits: TimestampLimits,
) -> FeedPipeline:
    feed_metrics = metrics.for_feed(feed.name, poll_interval_s=feed.poll_interval_s)
    client = FeedClient(
        feed.url,
        feed.login,
        feed.password,
        query=query,
        method=feed.method,
        timeouts=FeedTimeouts(feed.connect_timeout_s, feed.read_timeout_s, feed.request_deadline_s),
        max_attempts=feed.max_attempts,
        backoff=Backoff(feed.backoff_base_s, feed.backoff_max_s),
        stop=stop,
        on_request=feed_metrics.request,
        name=feed.name,
        limits=BodyLimits(feed.max_body_bytes, feed.max_expansion_ratio),
        ca_file=feed.ca_file,
        encoding=feed.encoding,
    )
    k = settings.kafka
    transactional_id = f"{k.transactional_id_prefix}-{feed.name}" if exactly_once else None
    return FeedPipeline(
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
        workers=feed.workers,
    )


def run(settings: Settings, stop: threading.Event, *, once: bool) -> list[Runner]:
    """Run every unit of work until `stop` (or, with `once`, until each has nothing more).

    Returns the runners, whose `error` says which stopped on a fatal error.
    """
    limits = _provision(settings)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    sftp_metrics = SftpMetrics(registry) if settings.sftp else None
    health: HealthServer | None = None
    if settings.metrics.port:
        health = _start_health_server(settings, metrics)
    exactly_once = settings.kafka.delivery == "exactly_once"
    # A feed and the SFTP source paired with it take turns in one thread (sources/sftp.py).
    units: list[Unit] = []
    paired = {s.pairs_with_feed: s for s in settings.sftp if s.pairs_with_feed}
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
        pipeline = _build_pipeline(
            settings,
            feed,
            metrics,
            stop,
            query=FeedQuery(
                format=feed.format, callsonly=feed.callsonly, servicesonly=feed.servicesonly
            ),
            cursor_store=_cursor_store(settings, feed),
            exactly_once=exactly_once,
            limits=limits,
        )
        runner = FeedRunner(
            pipeline,
            poll_interval_s=feed.poll_interval_s,
            poll_jitter_ratio=feed.poll_jitter_ratio,
            page_size=feed.page_size,
            backoff=Backoff(feed.backoff_base_s, feed.backoff_max_s),
        )
        group: list[Runner] = [runner]
        # The cursor is read by the first poll: in exactly-once mode only after the
        # transactional producer has fenced any older instance.
        log.info(
            "feed %s: polling %s as %s every %g s, %s, cursor in %r",
            feed.name, feed.url, feed.login, feed.poll_interval_s,
            settings.kafka.delivery.replace("_", "-"), pipeline.cursor_store,
        )  # fmt: skip
        source = paired.get(feed.name)
        if source is not None and sftp_metrics is not None:
            collector = _build_sftp(
                settings, source, metrics, sftp_metrics, stop, limits=limits,
                slot=pipeline.slot, feed_cursor=pipeline.cursor_store.load,
            )  # fmt: skip
            pipeline.covered_by = collector.published_ids
            group.append(_sftp_runner(collector, source))
        units.append(Unit(f"feed-{feed.name}", group))
    for source in settings.sftp:
        if not source.pairs_with_feed and sftp_metrics is not None:
            collector = _build_sftp(settings, source, metrics, sftp_metrics, stop, limits=limits)
            units.append(Unit(f"sftp-{source.name}", [_sftp_runner(collector, source)]))
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
    if health is not None:
        health.stop()
    return runners


def _sftp_cursor_store(settings: Settings, source: SftpSettings) -> JsonCursorStore:
    k = settings.kafka
    owner = f"sftp:{source.name}"
    if k.cursor_store == "kafka":
        return JsonKafkaCursorStore(
            k.bootstrap_servers, k.cursor_topic, owner, client_config=k.producer
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
) -> FileCollector:
    """One SFTP source; paired, it shares its feed's producer (`slot`) and reads its cursor."""
    k = settings.kafka
    exactly_once = k.delivery == "exactly_once"
    source_metrics = metrics.for_feed(
        source.name, source.protocol, poll_interval_s=source.poll_interval_s
    )
    if slot is None:
        transactional_id = (
            f"{k.transactional_id_prefix}-sftp-{source.name}" if exactly_once else None
        )
        slot = _publisher_slot(settings, source_metrics, transactional_id)
    server = _file_server(source)
    store = _sftp_cursor_store(settings, source)
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
        max_file_bytes=source.max_file_bytes,
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


def _start_health_server(settings: Settings, metrics: Metrics) -> HealthServer:
    """/metrics, /healthz and /readyz on the metrics port."""
    k, m = settings.kafka, settings.metrics
    kafka_check = KafkaCheck({**k.producer, "bootstrap.servers": k.bootstrap_servers})
    readiness = Readiness(
        metrics,
        kafka_check,
        max_failing_s=m.ready_max_failing_s,
        max_poll_s=m.ready_max_poll_s,
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
    log.info(
        "metrics on %s://%s:%d/metrics, also /healthz and /readyz%s",
        scheme, m.host, health.port, guarded,
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
    """Publish one day (or hour) of `feed` again, without reading or moving its live cursor."""
    limits = _provision(settings)
    metrics = Metrics(CollectorRegistry())
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
    )
    runner = FeedRunner(
        pipeline,
        poll_interval_s=0,
        page_size=feed.page_size,
        backoff=Backoff(feed.backoff_base_s, feed.backoff_max_s),
    )
    window = f"{day}" + (f" hour {hour}" if hour is not None else "")
    log.info("backfill of feed %s for %s", feed.name, window)
    try:
        runner.run(stop, once=True)
    finally:
        pipeline.close()
    log.info("backfill of feed %s for %s done", feed.name, window)
    return runner
