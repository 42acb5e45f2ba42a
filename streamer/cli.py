"""Command line: arguments -> Settings -> components -> run; exit codes.

Exit codes: 0 stopped cleanly; 1 a fatal error (configuration, Kafka topics);
2 bad command-line usage; 3 every feed (and SFTP source) stopped on a fatal error
(e.g. bad credentials); 4 (`tail`) some messages could not be decoded.
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

from streamer import __version__, app, redact
from streamer.config import Settings, check_backfill_window, is_secret_setting, load_settings
from streamer.errors import ConfigError, FatalError
from streamer.scheduler import Runner

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

    from streamer.simulator.cli import add_simulate_files_parser, add_simulate_parser

    add_simulate_parser(sub)
    add_simulate_files_parser(sub)
    from streamer.tail import add_tail_parser

    add_tail_parser(sub)
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
            from streamer.simulator.cli import run_simulate

            return run_simulate(args)
        if args.command == "simulate-files":
            from streamer.simulator.cli import run_simulate_files

            return run_simulate_files(args)
        if args.command == "tail":
            from streamer.tail import run_tail

            return run_tail(args)
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
        stop = threading.Event()
        _stop_on_signals(stop)
        if args.command == "backfill":
            return _backfill(settings, args, stop)
        return _exit_code(app.run(settings, stop, once=args.once))
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


def _exit_code(runners: Sequence[Runner]) -> int:
    failed = [r for r in runners if r.error is not None]
    if failed and len(failed) == len(runners):
        return EXIT_FEEDS_FAILED
    return EXIT_OK


def _backfill(settings: Settings, args: argparse.Namespace, stop: threading.Event) -> int:
    check_backfill_window(args.date, args.hour)
    by_name = {f.name: f for f in settings.feeds}
    if args.feed is None and len(by_name) != 1:
        raise ConfigError(
            f"several feeds are configured: choose one with --feed ({', '.join(by_name)})"
        )
    feed = by_name.get(args.feed) if args.feed else settings.feeds[0]
    if feed is None:
        raise ConfigError(f"no feed named {args.feed!r} (configured: {', '.join(by_name)})")
    runner = app.backfill(
        settings, feed, stop, day=args.date, hour=args.hour,
        callsonly=args.callsonly, servicesonly=args.servicesonly,
    )  # fmt: skip
    return _exit_code([runner])
