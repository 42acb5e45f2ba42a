"""Command line: arguments -> Settings -> components -> run; exit codes.

Exit codes: 0 stopped cleanly; 1 a fatal error (configuration, Kafka topics);
2 bad command-line usage; 3 every feed (and SFTP source) stopped on a fatal error
(e.g. bad credentials).
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from types import FrameType

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from streamer import __version__, redact
from streamer.avro import make_encoder
from streamer.config import (
    FeedSettings,
    Settings,
    SftpSettings,
    check_backfill_window,
    is_loopback_url,
    is_secret_setting,
    load_settings,
)
from streamer.cursor import (
    CursorStore,
    FileCursorStore,
    JsonFileCursorStore,
    JsonKafkaCursorStore,
    KafkaCursorStore,
    MemoryCursorStore,
)
from streamer.endpoint import Credentials, tls_context
from streamer.errors import ConfigError, FatalError
from streamer.feed import Backoff, FeedClient, FeedQuery, FeedTimeouts
from streamer.health import HealthServer, KafkaCheck, Readiness
from streamer.limits import BodyLimits
from streamer.metrics import FeedMetrics, Metrics, SftpMetrics
from streamer.pipeline import (
    Encoder,
    EventSink,
    FeedPipeline,
    FeedRunner,
    PublisherSlot,
    Runner,
    run_together,
)
from streamer.publisher import Publisher, producer_config, provision_topic
from streamer.sftp import SftpCollector, SftpCursorStore, SftpRunner, SftpServer

log = logging.getLogger("streamer")

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_FEEDS_FAILED = 0, 1, 2, 3

CONFIG_HELP = """\
configuration file (TOML). A minimal one:

  [kafka]
  bootstrap_servers = "127.0.0.1:9092"   # or KAFKA_BOOTSTRAP_SERVERS
  topic = "cdr-events"

  [[feeds]]
  name = "main"
  url = "https://portal.example.net/billingfeed.php"
  login = "81234567"
  password_env = "CDR_FEED_PASSWORD"      # or password_file = "/run/secrets/feed"

See the README for every setting."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, metavar="FILE", help=CONFIG_HELP)
    parser.add_argument(
        "--bootstrap-servers",
        metavar="HOSTS",
        help="Kafka bootstrap servers, overriding the file and KAFKA_BOOTSTRAP_SERVERS",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdr-streamer",
        description="Turn a carrier's Billing Feed (billingfeed.php) into Avro events on Kafka, "
        "keyed by AccountCode, committing the feed's cursor only once Kafka confirms delivery.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Passwords are never taken as arguments: they would show in `ps`. "
        "Use an environment variable or a file (see --config).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="poll every configured feed and publish its CDRs until stopped",
        description="Poll every configured feed on its interval and publish new CDRs to Kafka. "
        "Stops cleanly on Ctrl-C or SIGTERM.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    _add_config_args(run)
    run.add_argument(
        "--once",
        action="store_true",
        help="poll each feed until it has nothing more, then exit (for cron and tests)",
    )

    backfill = sub.add_parser(
        "backfill",
        help="publish one date (or hour) again without moving the live cursor",
        description="Fetch one day (or one hour of it) from a feed and publish it again. The "
        "feed's live cursor is not read or moved; events are duplicates by design, each "
        "carrying its cdr_id header so consumers can tell.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    _add_config_args(backfill)
    backfill.add_argument("--feed", help="the feed's name (default: the only feed)")
    backfill.add_argument(
        "--date",
        required=True,
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="the day to fetch, in the provider's local time",
    )
    backfill.add_argument("--hour", type=int, metavar="0-23", help="only this hour of --date")
    only = backfill.add_mutually_exclusive_group()
    only.add_argument("--callsonly", action="store_true", help="calls only, no service fees")
    only.add_argument("--servicesonly", action="store_true", help="service fees only, no calls")

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file and print it (passwords hidden)",
    )
    _add_config_args(check)

    from streamer.simulator_cli import add_simulate_files_parser, add_simulate_parser

    add_simulate_parser(sub)
    add_simulate_files_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before the first log line: every record and uncaught traceback is redacted.
    redact.install()
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.log_level != "DEBUG":
        # paramiko logs every connection and failed login at INFO; our own lines say it.
        logging.getLogger("paramiko").setLevel(logging.WARNING)
    try:
        if args.command == "simulate":
            from streamer.simulator_cli import run_simulate

            return run_simulate(args)
        if args.command == "simulate-files":
            from streamer.simulator_cli import run_simulate_files

            return run_simulate_files(args)
        settings = load_settings(args.config, bootstrap_servers=args.bootstrap_servers)
        if args.command == "check-config":
            print(redact.redact(str(settings)))
            producer = {
                # "key" hides key paths too (ssl.key.location): shown, not secret, but private.
                k: "********" if is_secret_setting(k) or "key" in k else v
                for k, v in settings.kafka.producer.items()
            }
            print(redact.redact(f"kafka.producer={producer}"))
            return EXIT_OK
        if args.command == "backfill":
            return _backfill(settings, args)
        return _run(settings, once=args.once)
    except FatalError as exc:
        log.error("%s", exc)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return EXIT_OK


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        log.info(
            "%s received: finishing the current step, then stopping", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def _provision(settings: Settings) -> None:
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


def _cursor_store(settings: Settings, feed: FeedSettings) -> CursorStore:
    k = settings.kafka
    if k.cursor_store == "kafka":
        return KafkaCursorStore(
            k.bootstrap_servers, k.cursor_topic, feed.name,
            initial=feed.initial_cursor, client_config=k.producer,
        )  # fmt: skip
    return FileCursorStore(Path(feed.cursor_file), feed.name, feed.initial_cursor)


def _publisher_factory(
    settings: Settings, source_metrics: FeedMetrics, transactional_id: str | None
) -> Callable[[], Publisher]:
    k = settings.kafka
    config = producer_config(k.bootstrap_servers, k.producer)

    def new_publisher() -> Publisher:
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
        limits=BodyLimits(feed.max_body_bytes, feed.max_expansion_ratio),
        ca_file=feed.ca_file,
    )
    k = settings.kafka
    transactional_id = f"{k.transactional_id_prefix}-{feed.name}" if exactly_once else None
    return FeedPipeline(
        name=feed.name,
        client=client,
        publisher_factory=_publisher_factory(settings, feed_metrics, transactional_id),
        encoder=_encoder(settings),
        cursor_store=cursor_store,
        topic=k.topic,
        dead_letter_topic=k.dead_letter_topic,
        metrics=feed_metrics,
        checkpoint_every=k.checkpoint_every,
        flush_timeout_s=k.flush_timeout_s,
        exactly_once=exactly_once,
        ids_ascending=feed.ids_ascending,
    )


def _run(settings: Settings, *, once: bool) -> int:
    stop = threading.Event()
    _stop_on_signals(stop)
    _provision(settings)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    sftp_metrics = SftpMetrics(registry) if settings.sftp else None
    health: HealthServer | None = None
    if settings.metrics.port:
        health = _start_health_server(settings, metrics)
    exactly_once = settings.kafka.delivery == "exactly_once"
    # A feed and the SFTP source paired with it take turns in one thread (streamer/sftp.py).
    groups: list[tuple[str, list[Runner]]] = []
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
                settings, source, metrics, sftp_metrics, stop,
                slot=pipeline.slot, feed_cursor=pipeline.cursor_store.load,
            )  # fmt: skip
            pipeline.covered_by = collector.published_ids
            group.append(_sftp_runner(collector, source))
        groups.append((f"feed-{feed.name}", group))
    for source in settings.sftp:
        if not source.pairs_with_feed and sftp_metrics is not None:
            collector = _build_sftp(settings, source, metrics, sftp_metrics, stop)
            groups.append((f"sftp-{source.name}", [_sftp_runner(collector, source)]))
    threads: list[threading.Thread] = []
    for thread_name, group in groups:
        thread = threading.Thread(
            target=run_together,
            args=(group, stop),
            kwargs={"once": once},
            name=thread_name,
            daemon=True,
        )
        threads.append(thread)
        thread.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    runners = [member for _, group in groups for member in group]
    for member in runners:
        member.close()
    if health is not None:
        health.stop()
    return _exit_code(runners)


def _sftp_cursor_store(settings: Settings, source: SftpSettings) -> SftpCursorStore:
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
    slot: PublisherSlot | None = None,
    feed_cursor: Callable[[], int] | None = None,
) -> SftpCollector:
    """One SFTP source; paired, it shares its feed's producer (`slot`) and reads its cursor."""
    k = settings.kafka
    exactly_once = k.delivery == "exactly_once"
    source_metrics = metrics.for_feed(source.name, "sftp", poll_interval_s=source.poll_interval_s)
    if slot is None:
        transactional_id = (
            f"{k.transactional_id_prefix}-sftp-{source.name}" if exactly_once else None
        )
        slot = PublisherSlot(_publisher_factory(settings, source_metrics, transactional_id))
    server = SftpServer(
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
    store = _sftp_cursor_store(settings, source)
    log.info(
        "sftp %s: listing %s:%s on %s:%d as %s every %g s, %s%s, cursor in %r",
        source.name, source.directory, source.pattern, source.host, source.port, source.user,
        source.poll_interval_s, k.delivery.replace("_", "-"),
        f", paired with feed {source.pairs_with_feed}" if source.pairs_with_feed else "", store,
    )  # fmt: skip
    return SftpCollector(
        name=source.name,
        server=server,
        directory=source.directory,
        pattern=source.pattern,
        fmt=source.format,
        settle_s=source.settle_s,
        after=source.after,
        quarantine_dir=source.quarantine_dir,
        sink=EventSink(
            name=source.name,
            source="sftp",
            slot=slot,
            encoder=_encoder(settings),
            topic=k.topic,
            dead_letter_topic=k.dead_letter_topic,
            metrics=source_metrics,
            flush_timeout_s=k.flush_timeout_s,
        ),
        cursor_store=store,
        sftp_metrics=sftp_metrics.for_source(source.name),
        checkpoint_every=k.checkpoint_every,
        exactly_once=exactly_once,
        feed_cursor=feed_cursor,
        stop=stop,
        max_file_bytes=source.max_file_bytes,
    )


def _sftp_runner(collector: SftpCollector, source: SftpSettings) -> SftpRunner:
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


def _exit_code(runners: Sequence[Runner]) -> int:
    failed = [r for r in runners if r.error is not None]
    if failed and len(failed) == len(runners):
        return EXIT_FEEDS_FAILED
    return EXIT_OK


def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    check_backfill_window(args.date, args.hour)
    by_name = {f.name: f for f in settings.feeds}
    if args.feed is None and len(by_name) != 1:
        raise ConfigError(
            f"several feeds are configured: choose one with --feed ({', '.join(by_name)})"
        )
    feed = by_name.get(args.feed) if args.feed else settings.feeds[0]
    if feed is None:
        raise ConfigError(f"no feed named {args.feed!r} (configured: {', '.join(by_name)})")
    stop = threading.Event()
    _stop_on_signals(stop)
    _provision(settings)
    metrics = Metrics(CollectorRegistry())
    # The live cursor is neither read nor moved: the backfill keeps its own in memory.
    pipeline = _build_pipeline(
        settings,
        feed,
        metrics,
        stop,
        query=FeedQuery(
            format=feed.format,
            date=args.date,
            hour=args.hour,
            # --callsonly / --servicesonly replace the feed's own choice; else it applies.
            callsonly=args.callsonly or (feed.callsonly and not args.servicesonly),
            servicesonly=args.servicesonly or (feed.servicesonly and not args.callsonly),
        ),
        cursor_store=MemoryCursorStore(0),
        exactly_once=False,  # a backfill re-publishes on purpose; it has no cursor to protect
    )
    runner = FeedRunner(
        pipeline,
        poll_interval_s=0,
        page_size=feed.page_size,
        backoff=Backoff(feed.backoff_base_s, feed.backoff_max_s),
    )
    window = f"{args.date}" + (f" hour {args.hour}" if args.hour is not None else "")
    log.info("backfill of feed %s for %s", feed.name, window)
    try:
        runner.run(stop, once=True)
    finally:
        pipeline.close()
    log.info("backfill of feed %s for %s done", feed.name, window)
    return _exit_code([runner])
