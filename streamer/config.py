"""One typed, frozen Settings object read from a TOML file and the environment, validated up front.

Every problem in a configuration is reported at once, in one `ConfigError`, so an
operator fixes the file in one go. Passwords never come from the command line
(they would show in `ps`): a feed's password comes from `password_env` (an
environment variable), `password_file` (e.g. a Docker secret) or `password` in
the file, in that order of preference.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from streamer.errors import ConfigError

PROVIDER_MIN_POLL_INTERVAL_S = (
    600.0  # "A reasonable polling frequency would be 10 minutes or greater."
)
DEFAULT_PASSWORD_ENV = "CDR_FEED_PASSWORD"  # noqa: S105 - the variable's name, not a password

FeedFormat = Literal["csv", "txt", "pipe", "json"]
Delivery = Literal["at_least_once", "exactly_once"]


class Secret:
    """A string that never shows itself in `repr`, `str`, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """One billing feed: where it is, who we are, how often to ask, where its cursor lives."""

    name: str
    url: str
    login: str
    password: Secret
    format: FeedFormat = "csv"
    method: Literal["POST", "GET"] = "POST"
    callsonly: bool = False
    servicesonly: bool = False
    poll_interval_s: float = PROVIDER_MIN_POLL_INTERVAL_S
    poll_jitter_ratio: float = 0.1  # up to 10 % of the interval added, so feeds drift apart
    allow_fast_polling: bool = False
    page_size: int = 0  # 0: the provider sends everything in one response
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    request_deadline_s: float = 1800.0
    max_attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    cursor_file: str = ""
    initial_cursor: int = 0


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """The broker, the topics and the delivery mode."""

    bootstrap_servers: str
    topic: str = "cdr-events"
    dead_letter_topic: str = "cdr-dead-letters"
    partitions: int = 6
    replication_factor: int = 1
    min_insync_replicas: int = 1
    delivery: Delivery = "at_least_once"
    flush_timeout_s: float = 120.0
    checkpoint_every: int = 10_000
    producer: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Where /metrics, /healthz and /readyz listen; port 0 disables the endpoint."""

    host: str = "0.0.0.0"  # noqa: S104 - a scrape target must be reachable from Prometheus
    port: int = 9108


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `cdr-streamer run` needs, checked before anything starts."""

    kafka: KafkaSettings
    feeds: tuple[FeedSettings, ...]
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


def is_loopback_url(url: str) -> bool:
    """True when the URL points at this machine (the simulator), where fast polling is harmless."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Problems:
    """Collects every configuration problem so they are reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self, source: str) -> None:
        if self.items:
            listing = "\n  - ".join(self.items)
            raise ConfigError(f"invalid configuration in {source}:\n  - {listing}")


def _take(
    table: Mapping[str, Any], cls: type[Any], where: str, problems: _Problems, skip: set[str]
) -> dict[str, Any]:
    """Check a TOML table's keys against a dataclass's fields and the values' types."""
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in known:
            problems.add(f"{where}.{key}", f"unknown setting (known: {', '.join(sorted(known))})")
            continue
        default = known[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            problems.add(f"{where}.{key}", f"must be true or false, not {value!r}")
        elif isinstance(default, int | float) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.add(f"{where}.{key}", f"must be a number, not {value!r}")
            elif isinstance(default, int) and not isinstance(value, int):
                problems.add(f"{where}.{key}", f"must be a whole number, not {value!r}")
            elif value < 0:
                problems.add(f"{where}.{key}", f"must not be negative, not {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            problems.add(f"{where}.{key}", f"must be a string, not {value!r}")
        out[key] = value
    return out


def _password(
    table: Mapping[str, Any], where: str, env: Mapping[str, str], problems: _Problems
) -> Secret:
    env_name = table.get("password_env")
    file_name = table.get("password_file")
    if env_name is not None:
        value = env.get(str(env_name))
        if value:
            return Secret(value)
        problems.add(f"{where}.password_env", f"environment variable {env_name} is not set")
        return Secret("")
    if file_name is not None:
        try:
            return Secret(Path(str(file_name)).read_text(encoding="utf-8").strip())
        except OSError as exc:
            problems.add(f"{where}.password_file", f"cannot read {file_name}: {exc.strerror}")
            return Secret("")
    if "password" in table:
        return Secret(str(table["password"]))
    if env.get(DEFAULT_PASSWORD_ENV):
        return Secret(env[DEFAULT_PASSWORD_ENV])
    problems.add(
        where,
        "no password: set password_env (an environment variable's name), password_file "
        f"(e.g. a Docker secret) or the {DEFAULT_PASSWORD_ENV} environment variable",
    )
    return Secret("")


_PASSWORD_KEYS = {"password", "password_env", "password_file"}


def parse_settings(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    source: str = "configuration",
    bootstrap_servers: str | None = None,
) -> Settings:
    """Build Settings from parsed TOML; `bootstrap_servers` (CLI or env) overrides the file."""
    env = os.environ if env is None else env
    problems = _Problems()
    for key in data:
        if key not in {"kafka", "feeds", "metrics"}:
            problems.add(key, "unknown section (known: kafka, feeds, metrics)")

    kafka_table = dict(data.get("kafka", {}))
    servers = (
        bootstrap_servers
        or env.get("KAFKA_BOOTSTRAP_SERVERS")
        or kafka_table.get("bootstrap_servers")
    )
    kafka_table.pop("bootstrap_servers", None)
    kafka_args = _take(kafka_table, KafkaSettings, "kafka", problems, set())
    if not servers:
        problems.add("kafka.bootstrap_servers", "not set (or set KAFKA_BOOTSTRAP_SERVERS)")
    if kafka_args.get("delivery", "at_least_once") not in ("at_least_once", "exactly_once"):
        problems.add("kafka.delivery", "must be 'at_least_once' or 'exactly_once'")
    producer = kafka_args.get("producer", {})
    if not isinstance(producer, Mapping):
        problems.add("kafka.producer", "must be a table of librdkafka settings")
    else:
        kafka_args["producer"] = {str(k): str(v) for k, v in producer.items()}

    feeds: list[FeedSettings] = []
    tables = data.get("feeds", [])
    if not tables:
        problems.add("feeds", "no [[feeds]] configured")
    names: set[str] = set()
    for i, table in enumerate(tables):
        where = f"feeds[{i}]"
        args = _take(table, FeedSettings, where, problems, _PASSWORD_KEYS)
        name = str(args.get("name", ""))
        where = f"feeds[{name or i}]"
        for required in ("name", "url", "login"):
            if not args.get(required):
                problems.add(where, f"{required} is required")
        if name in names:
            problems.add(where, "two feeds share this name; each needs its own cursor and label")
        names.add(name)
        args["password"] = _password(table, where, env, problems)
        _check_feed(args, where, problems)
        if not problems.items:
            args.setdefault("cursor_file", f"var/cursor-{name}.json")
            feeds.append(FeedSettings(**args))

    metrics_args = _take(data.get("metrics", {}), MetricsSettings, "metrics", problems, set())
    problems.raise_if_any(source)
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=str(servers), **kafka_args),
        feeds=tuple(feeds),
        metrics=MetricsSettings(**metrics_args),
    )


def _check_feed(args: dict[str, Any], where: str, problems: _Problems) -> None:
    url = str(args.get("url", ""))
    if url and urlsplit(url).scheme not in ("http", "https"):
        problems.add(f"{where}.url", f"must be an http(s) URL, not {url!r}")
    if urlsplit(url).query:
        problems.add(f"{where}.url", "must not carry a query string: parameters are sent by us")
    if args.get("format", "csv") not in ("csv", "txt", "pipe", "json"):
        problems.add(f"{where}.format", "must be one of csv, txt (tab), pipe, json")
    if args.get("method", "POST") not in ("POST", "GET"):
        problems.add(f"{where}.method", "must be POST or GET")
    if args.get("callsonly") and args.get("servicesonly"):
        problems.add(where, "callsonly and servicesonly exclude each other: choose one")
    interval = float(args.get("poll_interval_s", PROVIDER_MIN_POLL_INTERVAL_S))
    if (
        interval < PROVIDER_MIN_POLL_INTERVAL_S
        and url
        and not is_loopback_url(url)
        and not args.get("allow_fast_polling")
    ):
        problems.add(
            f"{where}.poll_interval_s",
            f"{interval:g} s is under the provider's 600 s guidance; "
            "set allow_fast_polling = true if the provider has agreed to it",
        )
    if int(args.get("max_attempts", 5)) < 1:
        problems.add(f"{where}.max_attempts", "must be at least 1")


def load_settings(
    path: Path, *, env: Mapping[str, str] | None = None, bootstrap_servers: str | None = None
) -> Settings:
    """Read a TOML configuration file."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    return parse_settings(data, env=env, source=str(path), bootstrap_servers=bootstrap_servers)


def check_backfill_window(day: date | None, hour: int | None) -> None:
    """The provider's rule: `hour` only together with `date`, and 0-23."""
    if hour is not None and day is None:
        raise ConfigError("--hour needs --date: the provider only filters an hour within a date")
    if hour is not None and not 0 <= hour <= 23:
        raise ConfigError(f"--hour must be 0-23, not {hour}")
