"""`cdr-streamer simulate`: one command-line flag per `SimulatorConfig` field, derived from it.

Deriving the flags keeps the simulator's options and its command line from drifting
apart. The password comes from CDR_SIMULATOR_PASSWORD or CDR_SIMULATOR_PASSWORD_FILE,
never from an argument, so it does not show in `ps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.errors import ConfigError
from streamer.simulator.config import FORMATS, SimulatorConfig
from streamer.simulator.files import CADENCES, COMPRESSIONS, write_files
from streamer.simulator.http import serve

PASSWORD_ENV = "CDR_SIMULATOR_PASSWORD"  # noqa: S105 - the variable's name
_NOT_FLAGS = {"password", "start"}
_HELP = {
    "backlog": "CDRs that exist at start (IDs 1..N), generated lazily: 10 million is fine",
    "rate_per_s": "new CDRs per second while running",
    "max_rows": "cap on rows per response, as a provider paging its answers would",
    "malformed_rate": "share of rows written broken (bad date, bad ID, wrong field count...)",
    "status_fault_from_id": "every call from this CDR ID on ends Busy or Unallocated (0: never)",
    "unsorted": "shuffle rows within each response",
    "auth_failure_style": "how a wrong password is answered: text200 (plain text, status 200) "
    "is the hardest case; html200 the same text in an HTML page",
    "transfer": "body framing: Content-Length, chunked, or close-delimited",
    "login": "the login to accept",
    "host": "address to listen on",
    "port": "port to listen on (0: any free port)",
    "seed": "data seed: the same seed gives the same CDRs",
    "mean_gap_s": "mean seconds between calls (the call times' spacing)",
    "jitter_s": "each call's time varies by up to this many seconds",
    "accounts": "number of distinct AccountCodes (Kafka keys)",
    "header": "write a header row in csv / txt / pipe",
    "date_style": "BillDate and Date layout: iso YYYY-MM-DD or nz DD/MM/YYYY",
    "datetime_style": "UTCDateTime layout",
    "json_numbers": "numeric fields as JSON numbers instead of strings",
    "json_pretty": "indent JSON output",
    "line_ending": "line ending of delimited formats",
    "bom": "start the body with a UTF-8 byte order mark",
    "quote_all": "quote every field, not only those that need it",
    "empty_style": "answer when there are no records: an empty body, the header row only, "
    "HTTP 204 (no_content), the text 'No records found' (text), or JSON null (null)",
    "encoding": "encoding of csv/txt/pipe bodies and files (macron vowels, which cp1252 and "
    "Latin-1 lack, written with a diaeresis)",
    "broken_row_ids": "IDs written broken on every request: a JSON element missing a comma, "
    "a delimited row with an opening quote that never closes",
    "long_row_ids": "IDs whose TextDesc1 is --long-row-chars characters long",
    "long_row_chars": "length of those TextDesc1 values",
    "batch_rows": "rows written to the socket at a time",
    "prerender": "render the backlog once at start in this format and serve it from memory "
    "(benchmarks: serving is then no bottleneck)",
    "latency_s": "delay before each answer",
    "error_rate": "share of requests answered 500 or 503",
    "rate_limit_rate": "share of requests answered 429 with Retry-After",
    "retry_after_s": "the Retry-After of those 429 answers",
    "truncate_rate": "share of bodies cut short",
    "html_error_rate": "share of requests answered with an HTML error page",
}
_ALIASES = {"rate_per_s": ["--rate"]}


def add_simulate_parser(sub: Any) -> None:
    """Register the `simulate` subcommand on the CLI's subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="serve a fake billingfeed.php with realistic CDRs (development, demos, tests)",
        description="A faithful fake of the provider's Billing Feed web service: login and "
        "password, every parameter and format, and faults on demand. The password it "
        f"expects comes from {PASSWORD_ENV} (or {PASSWORD_ENV}_FILE).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_flags(parser, lambda name: name not in _NOT_FLAGS)


def _add_config_flags(parser: argparse.ArgumentParser, wanted: Callable[[str], bool]) -> None:
    """One flag per `SimulatorConfig` field that `wanted` accepts, derived from the field."""
    hints = typing.get_type_hints(SimulatorConfig)
    for f in dataclasses.fields(SimulatorConfig):
        if not wanted(f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kwargs: dict[str, Any] = {
            "default": f.default,
            "help": _HELP.get(f.name, f.name.replace("_", " ")),
            "metavar": f.name.upper(),
        }
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            del kwargs["metavar"]
        elif choices:
            kwargs.update(choices=choices, metavar=None)
        elif f.name == "line_ending":
            kwargs.update(choices=["lf", "crlf"], default="lf", type=str, metavar=None)
        elif f.name == "max_rows":
            kwargs["type"] = int
        elif typing.get_origin(hint) is tuple:
            kwargs.update(type=_id_list, metavar="ID[,ID...]")
        else:
            kwargs["type"] = type(f.default)
        parser.add_argument(flag, *_ALIASES.get(f.name, []), dest=f"sim_{f.name}", **kwargs)


def _id_list(text: str) -> tuple[int, ...]:
    """'5,17' -> (5, 17), for flags that name CDR IDs."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of IDs: {text!r}") from None


def config_from_args(args: argparse.Namespace, env: typing.Mapping[str, str]) -> SimulatorConfig:
    password = env.get(PASSWORD_ENV)
    if not password and env.get(f"{PASSWORD_ENV}_FILE"):
        password = Path(env[f"{PASSWORD_ENV}_FILE"]).read_text(encoding="utf-8").strip()
    if not password:
        raise ConfigError(f"set {PASSWORD_ENV} (or {PASSWORD_ENV}_FILE) to the password to expect")
    values = {
        name[len("sim_") :]: value for name, value in vars(args).items() if name.startswith("sim_")
    }
    values["line_ending"] = "\r\n" if values.get("line_ending") == "crlf" else "\n"
    return SimulatorConfig(password=password, **values)


def run_simulate(args: argparse.Namespace) -> int:
    serve(config_from_args(args, os.environ))
    return 0


# What shapes the data and its text: the flags of `simulate-files` (no HTTP, no faults).
_FILE_FLAGS = frozenset(
    {
        "seed", "backlog", "mean_gap_s", "jitter_s", "accounts", "malformed_rate",
        "status_fault_from_id", "header", "date_style", "datetime_style", "json_numbers",
        "json_pretty", "line_ending", "bom", "quote_all", "encoding", "broken_row_ids",
        "long_row_ids", "long_row_chars",
    }
)  # fmt: skip


def add_simulate_files_parser(sub: Any) -> None:
    """Register the `simulate-files` subcommand: the provider's SFTP/FTP files, into a folder."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "simulate-files",
        help="write the CDR files the provider would deliver by SFTP or FTP into a folder",
        description="Write the files of the provider's SFTP or FTP delivery into a folder "
        "(the one an SFTP or FTP server serves): the same CDRs as `simulate` serves for the "
        "same seed, one file per period (UTC) named cdr_YYYYMMDD_HHMM.<format>[.gz|.zip], "
        "each written to a temporary name and renamed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="where to write the files")
    parser.add_argument(
        "--cadence", choices=list(CADENCES), default="hourly", help="one file per this period"
    )
    parser.add_argument(
        "--files-format", choices=FORMATS, default="csv", help="csv, txt (tab), pipe or json"
    )
    parser.add_argument(
        "--upto-id",
        type=int,
        metavar="N",
        help="write CDRs 1..N (default: --backlog)",
    )
    parser.add_argument(
        "--compress",
        choices=COMPRESSIONS,
        default="none",
        help="gz: gzip each file (.csv.gz); zip: each file alone in a zip (.csv.zip)",
    )
    _add_config_flags(parser, lambda name: name in _FILE_FLAGS)


def run_simulate_files(args: argparse.Namespace) -> int:
    values = {
        name[len("sim_") :]: value for name, value in vars(args).items() if name.startswith("sim_")
    }
    values["line_ending"] = "\r\n" if values.get("line_ending") == "crlf" else "\n"
    # The password is the web feed's; files need none.
    config = SimulatorConfig(password="-", **values)  # noqa: S106
    paths = write_files(
        config,
        args.directory,
        cadence=args.cadence,
        fmt=args.files_format,
        upto_id=args.upto_id,
        compress=args.compress,
    )
    last = config.backlog if args.upto_id is None else args.upto_id
    print(f"wrote {len(paths)} {args.cadence} files of CDRs 1..{last} to {args.directory}")
    return 0
