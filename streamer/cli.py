"""Command line: arguments -> Settings -> components -> run; exit codes.

Exit codes: 0 stopped cleanly; 1 a fatal error (configuration, Kafka topics);
2 bad command-line usage; 3 every feed stopped on a fatal error (e.g. bad credentials).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from types import FrameType

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, start_http_server

from streamer import __version__
from streamer.avro import SingleObjectEncoder
from streamer.config import (
    FeedSettings,
    Settings,
    check_backfill_window,
    is_loopback_url,
    load_settings,
)
from streamer.cursor import CursorStore, FileCursorStore, MemoryCursorStore
from streamer.errors import ConfigError, FatalError
from streamer.feed import Backoff, FeedClient, FeedQuery, FeedTimeouts
from streamer.metrics import Metrics
from streamer.pipeline import FeedPipeline, FeedRunner
from streamer.publisher import Publisher, producer_config, provision_topic

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

    from streamer.simulator_cli import add_simulate_parser

    add_simulate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "simulate":
            from streamer.simulator_cli import run_simulate

            return run_simulate(args)
        settings = load_settings(args.config, bootstrap_servers=args.bootstrap_servers)
        if args.command == "check-config":
            print(settings)
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
    admin = AdminClient({"bootstrap.servers": k.bootstrap_servers})
    for topic in (k.topic, k.dead_letter_topic):
        provision_topic(
            admin,
            topic,
            partitions=k.partitions,
            replication_factor=k.replication_factor,
            min_insync_replicas=k.min_insync_replicas,
        )


def _build_pipeline(
    settings: Settings,
    feed: FeedSettings,
    metrics: Metrics,
    stop: threading.Event,
    *,
    query: FeedQuery,
    cursor_store: CursorStore,
) -> FeedPipeline:
    feed_metrics = metrics.for_feed(feed.name)
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
    )
    return FeedPipeline(
        name=feed.name,
        client=client,
        publisher=Publisher(
            producer_config(settings.kafka.bootstrap_servers, settings.kafka.producer)
        ),
        encoder=SingleObjectEncoder(),
        cursor_store=cursor_store,
        topic=settings.kafka.topic,
        dead_letter_topic=settings.kafka.dead_letter_topic,
        metrics=feed_metrics,
        checkpoint_every=settings.kafka.checkpoint_every,
        flush_timeout_s=settings.kafka.flush_timeout_s,
    )


def _run(settings: Settings, *, once: bool) -> int:
    if settings.kafka.delivery == "exactly_once":
        raise FatalError("delivery = 'exactly_once' is not available yet; use 'at_least_once'")
    stop = threading.Event()
    _stop_on_signals(stop)
    _provision(settings)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    if settings.metrics.port:
        start_http_server(settings.metrics.port, settings.metrics.host, registry)
        log.info("metrics on http://%s:%d/metrics", settings.metrics.host, settings.metrics.port)
    runners: list[FeedRunner] = []
    threads: list[threading.Thread] = []
    for feed in settings.feeds:
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
            cursor_store=FileCursorStore(Path(feed.cursor_file), feed.name, feed.initial_cursor),
        )
        runner = FeedRunner(
            pipeline,
            poll_interval_s=feed.poll_interval_s,
            poll_jitter_ratio=feed.poll_jitter_ratio,
            page_size=feed.page_size,
            backoff=Backoff(feed.backoff_base_s, feed.backoff_max_s),
        )
        runners.append(runner)
        thread = threading.Thread(
            target=runner.run,
            args=(stop,),
            kwargs={"once": once},
            name=f"feed-{feed.name}",
            daemon=True,
        )
        threads.append(thread)
        log.info(
            "feed %s: polling %s as %s from cursor %d",
            feed.name,
            feed.url,
            feed.login,
            pipeline.cursor_store.load(),
        )
        thread.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    for runner in runners:
        runner.pipeline.publisher.close()
        runner.pipeline.client.close()
    return _exit_code(runners)


def _exit_code(runners: Sequence[FeedRunner]) -> int:
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
    )
    runner = FeedRunner(pipeline, poll_interval_s=0, page_size=feed.page_size)
    window = f"{args.date}" + (f" hour {args.hour}" if args.hour is not None else "")
    log.info("backfill of feed %s for %s", feed.name, window)
    try:
        runner.run(stop, once=True)
    finally:
        pipeline.publisher.close()
        pipeline.client.close()
    log.info("backfill of feed %s for %s done", feed.name, window)
    return _exit_code([runner])
