"""One typed, frozen Settings object read from a TOML file and the environment, validated up front.

Every problem in a configuration is reported at once, in one `ConfigError`, so an
operator fixes the file in one go. Passwords never come from the command line
(they would show in `ps`): a feed's password comes from `password_env` (an
environment variable), `password_file` (e.g. a Docker secret) or `password` in
the file, in that order of preference.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from streamer import redact
from streamer.errors import ConfigError
from streamer.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_EXPANSION_RATIO
from streamer.sources.compression import MAX_DECOMPRESSED_BYTES

PROVIDER_MIN_POLL_INTERVAL_S = (
    600.0  # "A reasonable polling frequency would be 10 minutes or greater."
)
# Reconciliation keeps twice the horizon of hours in the cursor record: a week at most.
MAX_RECONCILE_HORIZON_H = 84.0
DEFAULT_PASSWORD_ENV = "CDR_FEED_PASSWORD"  # noqa: S105 - the variable's name, not a password
SCHEMA_REGISTRY_PASSWORD_ENV = "CDR_SCHEMA_REGISTRY_PASSWORD"  # noqa: S105 - likewise
# The metrics endpoint's address when [metrics] host is not set; the Docker image sets
# 0.0.0.0, a plain install listens on loopback only.
METRICS_HOST_ENV = "CDR_METRICS_HOST"
DEFAULT_METRICS_HOST = "127.0.0.1"

FeedFormat = Literal["csv", "txt", "pipe", "json"]
# The body's encoding; auto: UTF-8, and a row that is not UTF-8 is read as cp1252.
Encoding = Literal["utf-8", "cp1252", "latin-1", "auto"]
ENCODING_NAMES: tuple[str, ...] = ("utf-8", "cp1252", "latin-1", "auto")
SftpFormat = Literal["auto", "csv", "txt", "pipe", "json"]
FileProtocol = Literal["sftp", "ftp", "ftps"]
FILE_PROTOCOL_PORTS: Mapping[str, int] = {"sftp": 22, "ftp": 21, "ftps": 21, "ftps-implicit": 990}
AfterAction = Literal["keep", "delete", "move"]
Delivery = Literal["at_least_once", "exactly_once"]


class Secret:
    """A string that never shows itself in `repr`, `str`, a log line or a traceback.

    Made, it is registered with `streamer.redact`, so no log line or error message
    of the process shows it, in any encoding.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        redact.register(value)

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
class StartFrom:
    """Where a feed without a committed cursor begins: earliest, an ID, a date, or latest."""

    kind: Literal["earliest", "latest", "id", "date"] = "earliest"
    id: int = 0
    day: date | None = None

    def __str__(self) -> str:
        if self.kind == "id":
            return str(self.id)
        if self.kind == "date":
            return str(self.day)
        return self.kind

    @classmethod
    def parse(cls, value: object) -> StartFrom:
        """From the setting's value; ValueError with what is accepted."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return cls("id", id=value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("earliest", "latest"):
                return cls(text)  # type: ignore[arg-type]
            if text.isascii() and text.isdigit():
                return cls("id", id=int(text))
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
                try:
                    return cls("date", day=date.fromisoformat(text))
                except ValueError:
                    pass
        raise ValueError(
            "must be earliest, latest, a CDR ID (a whole number) or a date YYYY-MM-DD, "
            f"not {value!r}"
        )


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """One billing feed: where it is, who we are, how often to ask, where its cursor lives."""

    name: str
    url: str
    login: str
    password: Secret
    format: FeedFormat = "csv"
    encoding: Encoding = "utf-8"
    method: Literal["POST", "GET"] = "POST"
    callsonly: bool = False
    servicesonly: bool = False
    poll_interval_s: float = PROVIDER_MIN_POLL_INTERVAL_S
    poll_jitter_ratio: float = 0.1  # up to 10 % of the interval added, so feeds drift apart
    allow_fast_polling: bool = False
    page_size: int = 0  # 0: the provider sends everything in one response
    # The provider sends each response in ID order: the cursor may then be committed
    # every kafka.checkpoint_every records instead of only at the end of a response.
    ids_ascending: bool = False
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    request_deadline_s: float = 1800.0  # connect to last byte
    # A response over this many bytes (decoded) fails the poll; so does a compressed one
    # that expands more than max_expansion_ratio times (a decompression bomb).
    max_body_bytes: int = DEFAULT_MAX_BYTES
    max_expansion_ratio: float = DEFAULT_MAX_EXPANSION_RATIO
    max_attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    cursor_file: str = ""
    initial_cursor: int = 0  # the older spelling of start_from = ID
    # Where a feed without a committed cursor begins (startup.py).
    start_from: StartFrom = StartFrom()
    # The provider's local time zone: what its `date` and `hour` parameters mean.
    timezone: str = "Pacific/Auckland"
    # Reconciliation (streamer/reconcile.py): recent hours asked for again, to find CDRs
    # that became visible after the cursor had passed their ID.
    reconcile: bool = True
    reconcile_horizon_h: float = 24.0  # an hour's last check, this long after it ended
    reconcile_checks: int = 3  # checks per hour, from 1 h after its end to the horizon
    reconcile_min_interval_s: float = 0.0  # at most one check this often; 0: poll_interval_s
    reconcile_clock: str = "wall"  # or "feed": hours age with the newest CDR's time
    # HTTPS: the CA certificates (PEM) to trust for the feed instead of the public ones
    # (certifi's; or SSL_CERT_FILE / SSL_CERT_DIR). Verification cannot be turned off.
    ca_file: str = ""
    # Worker processes that parse, type and encode the body's rows (csv, txt, pipe);


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """The broker, the topics and the delivery mode."""

    bootstrap_servers: str
    topic: str = "cdr-events"
    dead_letter_topic: str = "cdr-dead-letters"
    partitions: int = 6
    replication_factor: int = 1
    min_insync_replicas: int = 1
    # Retention of the topics the streamer creates. Events carry the call's own time as
    # their timestamp, and Kafka's time retention judges by it: with 7 days, a first
    # sync or backfill of older CDRs would be deleted right after it was published.
    # -1 keeps events until you decide otherwise.
    retention_ms: int = -1
    delivery: Delivery = "at_least_once"
    # Where cursors live: "file" (cursor_file per feed) or "kafka" (a compacted topic,
    # so a container can restart on any host). Exactly-once needs "kafka".
    cursor_store: Literal["", "file", "kafka"] = ""  # "": kafka if exactly_once, else file
    cursor_topic: str = "cdr-streamer-cursors"
    transactional_id_prefix: str = "cdr-streamer"  # + "-" + the feed's name
    flush_timeout_s: float = 120.0
    checkpoint_every: int = 10_000
    # librdkafka settings; may hold secrets (sasl.password), so never in a repr.
    producer: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Producer settings that are secrets: given as NAME_env or NAME_file, or named so.
    producer_secrets: frozenset[str] = frozenset()
    # Set: Confluent Schema Registry framing, subject "<topic>-value"; empty: single-object.
    schema_registry_url: str = ""
    schema_registry_auto_register: bool = True
    schema_registry_user: str = ""  # basic auth; the password only from the environment
    schema_registry_password: Secret = field(default_factory=lambda: Secret(""))


# Exactly-once, a unit finds the messages Kafka refuses with aborted transactions of a
# second producer, under its own transactional id plus this (sink.py, EventSink.isolate).
PROBE_ID_SUFFIX = "-probe"


def feed_transactional_id(prefix: str, feed: str) -> str:
    """The transactional id of a feed's producer (and of its paired file source)."""
    return f"{prefix}-{feed}"


def file_transactional_id(prefix: str, source: str) -> str:
    """The transactional id of an unpaired SFTP/FTP source's producer."""
    return f"{prefix}-sftp-{source}"


def probe_transactional_id(transactional_id: str) -> str:
    """The transactional id of the producer that isolates refused messages for that one."""
    return transactional_id + PROBE_ID_SUFFIX


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Where /metrics, /healthz and /readyz listen, and who may read them; port 0: off."""

    host: str = DEFAULT_METRICS_HOST  # or CDR_METRICS_HOST when the file does not say
    port: int = 9108
    # /readyz answers 503 once a feed's polls have been failing for longer than this,
    ready_max_failing_s: float = 900.0
    # or once one poll has been running this long (the default deadline is 1800 s).
    ready_max_poll_s: float = 3600.0
    # Credentials for every path but /healthz and /readyz (those too with auth_probes):
    # basic auth (user + basic_auth_password_env/_file), a bearer token
    # (bearer_token_env/_file), or both.
    basic_auth_user: str = ""
    basic_auth_password: Secret | None = None
    bearer_token: Secret | None = None
    auth_probes: bool = False
    # HTTPS instead of HTTP: a PEM certificate (chain) and its private key.
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass(frozen=True, slots=True)
class SftpSettings:
    """One source of CDR files over SFTP, FTP or FTPS: the server, the login, the directory."""

    name: str
    host: str
    user: str
    protocol: FileProtocol = "sftp"
    port: int = 0  # 0: the protocol's (22 SFTP, 21 FTP and explicit FTPS, 990 implicit FTPS)
    password: Secret | None = None  # password_env, password_file or password
    key_file: str = ""  # a private key (OpenSSH or PEM); with or without a passphrase
    key_passphrase: Secret | None = None  # key_passphrase_env or key_passphrase_file
    known_hosts: str = "~/.ssh/known_hosts"
    # Accept an unknown host key on first contact (logged with its fingerprint) and
    # record it in known_hosts. Never a changed key.
    trust_unknown_host_key: bool = False
    # FTPS: AUTH TLS on the FTP port ("explicit"), or TLS from the first byte ("implicit").
    ftps_mode: Literal["explicit", "implicit"] = "explicit"
    ca_file: str = ""  # FTPS: PEM CA certificates to verify the server with ("": the system's)
    tls_verify: bool = True  # FTPS: false encrypts but trusts any certificate (logged)
    passive: bool = True  # FTP, FTPS: passive data connections; false: active (PORT)
    directory: str = "."
    pattern: str = "cdr_*"  # a glob on file names
    format: SftpFormat = "auto"  # auto: from the extension (.csv, .txt/.tsv, .pipe/.psv, .json)
    encoding: Encoding = "utf-8"
    settle_s: float = 60.0  # a file is complete once unchanged across listings this long
    poll_interval_s: float = 60.0
    after: str = "keep"  # keep, delete, or move:DIR (relative to directory)
    quarantine_dir: str = ""  # files that are not feed files go here (relative to directory)
    pairs_with_feed: str = ""  # a [[feeds]] name: the same account's web feed, deduplicated
    cursor_file: str = ""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    # A compressed file (.gz, .zip) inflating past this is quarantined: a bound on
    # what a corrupt or hostile archive can cost.
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES
    max_file_bytes: int = DEFAULT_MAX_BYTES  # a bigger file is quarantined


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Cluster mode: replicas of one config share its units of work through a consumer group.

    Off while `group_id` is empty. Every replica must run the same configuration.
    """

    group_id: str = ""
    assignment_topic: str = ""  # "": "<group_id>-assignment"
    # A replica that stops heartbeating for this long loses its units to the others
    # (the broker's group.min.session.timeout.ms, 6 s by default, is the floor).
    session_timeout_s: float = 45.0
    heartbeat_interval_s: float = 3.0
    # How long a revoked unit gets to abort its poll and stop before its work is
    # released to the next owner anyway (exactly-once: which then fences it).
    handover_timeout_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.group_id)

    @property
    def topic(self) -> str:
        """The assignment topic: one partition per unit of work."""
        return self.assignment_topic or f"{self.group_id}-assignment"


MAX_WORKERS = 64


def default_workers() -> int:
    """`[processing] workers = "auto"`: 2 where this process may use 2 or more cores, else 0."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 2 if (cores or 1) >= 2 else 0


@dataclass(frozen=True, slots=True)
class ProcessingSettings:
    """[processing]: how this process spends its cores (streamer/workers.py)."""

    # Worker processes that parse, type and encode bodies and files of more than one
    # block, shared by every feed and source; 0: all in the feeds' threads. "auto" (the
    # default): 2 where this process may use 2 or more cores, else 0.
    workers: int | str = "auto"

    @property
    def worker_count(self) -> int:
        return default_workers() if self.workers == "auto" else int(self.workers)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `cdr-streamer run` needs, checked before anything starts."""

    kafka: KafkaSettings
    feeds: tuple[FeedSettings, ...]
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    sftp: tuple[SftpSettings, ...] = ()
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)


# librdkafka settings whose values are secrets (sasl.password, ssl.key.password,
# ssl.keystore.password, sasl.oauthbearer.client.secret, ssl.key.pem, ...).
_SECRET_SETTING_WORDS = ("password", "secret", "token", "credential", "jaas")
_SECRET_SETTINGS = frozenset({"ssl.key.pem", "sasl.oauthbearer.config"})


def is_secret_setting(name: str) -> bool:
    """Whether a librdkafka setting's value is a secret, never to be shown."""
    name = name.lower()
    return name in _SECRET_SETTINGS or any(word in name for word in _SECRET_SETTING_WORDS)


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
            elif not math.isfinite(value):
                problems.add(f"{where}.{key}", f"must be a finite number, not {value!r}")
            elif value < 0 and not (key == "retention_ms" and value == -1):
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
    base_dir: Path | None = None,
) -> Settings:
    """Build Settings from parsed TOML; `bootstrap_servers` (CLI or env) overrides the file.

    `base_dir` (the config file's folder): relative paths in the file are relative to it.
    """
    env = os.environ if env is None else env
    problems = _Problems()
    data = apply_env_overrides(data, env, problems)
    if base_dir is not None:
        data = _resolve_paths(data, base_dir)
    for key in data:
        if key not in {"kafka", "feeds", "metrics", "sftp", "cluster", "processing"}:
            problems.add(
                key, "unknown section (known: kafka, feeds, sftp, metrics, cluster, processing)"
            )
    cluster_args = _take(data.get("cluster", {}), ClusterSettings, "cluster", problems, set())

    servers, kafka_args = _kafka_args(data, env, bootstrap_servers, problems)

    feeds: list[FeedSettings] = []
    tables = data.get("feeds", [])
    if not tables and not data.get("sftp"):
        problems.add("feeds", "no [[feeds]] (or [[sftp]]) configured")
    names: set[str] = set()
    feed_tables: dict[str, dict[str, Any]] = {}
    for i, table in enumerate(tables):
        where = f"feeds[{i}]"
        args = _take(
            table, FeedSettings, where, problems, _PASSWORD_KEYS | {"start_from", "workers"}
        )
        if "workers" in table:
            problems.add(
                f"{where}.workers",
                "moved to [processing] workers: one pool of worker processes serves every "
                "feed and file source",
            )
        name = str(args.get("name", ""))
        where = f"feeds[{name or i}]"
        for required in ("name", "url", "login"):
            if not args.get(required):
                problems.add(where, f"{required} is required")
        if name in names:
            problems.add(where, "two feeds share this name; each needs its own cursor and label")
        names.add(name)
        args["password"] = _password(table, where, env, problems)
        feed_tables[name] = args
        _check_feed(args, where, problems)
        _start_from(table, args, where, problems)
        if not problems.items:
            default_cursor = Path(f"var/cursor-{name}.json")
            if base_dir is not None:
                default_cursor = base_dir / default_cursor
            args.setdefault("cursor_file", str(default_cursor))
            feeds.append(FeedSettings(**args))

    sftp = _sftp_sources(
        data.get("sftp", []), feed_tables, names, env, problems, base=base_dir or Path()
    )
    metrics_args = _metrics(data.get("metrics", {}), env, problems)
    _check_unique_ids(kafka_args, feeds, sftp, problems)
    if "cluster" in data:
        _check_cluster(cluster_args, problems)
    processing_args = _processing(data.get("processing", {}), problems)
    problems.raise_if_any(source)
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=str(servers), **kafka_args),
        feeds=tuple(feeds),
        metrics=MetricsSettings(**metrics_args),
        sftp=tuple(sftp),
        cluster=ClusterSettings(**cluster_args),
        processing=ProcessingSettings(**processing_args),
    )


def _kafka_args(
    data: Mapping[str, Any],
    env: Mapping[str, str],
    bootstrap_servers: str | None,
    problems: _Problems,
) -> tuple[str | None, dict[str, Any]]:
    """The [kafka] table checked: (bootstrap servers, the other KafkaSettings arguments)."""
    cluster_table = data.get("cluster", {})
    # Cluster mode changes the default cursor store (every replica reads every cursor).
    clustered = isinstance(cluster_table, Mapping) and bool(cluster_table.get("group_id"))
    kafka_table = dict(data.get("kafka", {}))
    servers = (
        bootstrap_servers
        or env.get("KAFKA_BOOTSTRAP_SERVERS")
        or kafka_table.get("bootstrap_servers")
    )
    kafka_table.pop("bootstrap_servers", None)
    registry_password = _registry_secrets(kafka_table, env, problems)
    kafka_args = _take(kafka_table, KafkaSettings, "kafka", problems, set())
    if not servers:
        problems.add("kafka.bootstrap_servers", "not set (or set KAFKA_BOOTSTRAP_SERVERS)")
    delivery = kafka_args.get("delivery", "at_least_once")
    if delivery not in ("at_least_once", "exactly_once"):
        problems.add("kafka.delivery", "must be 'at_least_once' or 'exactly_once'")
    store = kafka_args.get("cursor_store", "")
    if store not in ("", "file", "kafka"):
        problems.add("kafka.cursor_store", "must be 'file' or 'kafka'")
    elif delivery == "exactly_once" and store == "file":
        problems.add(
            "kafka.cursor_store",
            "exactly_once keeps the cursor in Kafka, inside each transaction: "
            "remove cursor_store or set it to 'kafka'",
        )
    elif clustered and store == "file":
        problems.add(
            "kafka.cursor_store",
            "cluster mode ([cluster] group_id) moves feeds between replicas, so every "
            "replica must read every cursor: remove cursor_store or set it to 'kafka'",
        )
    elif not store:
        kafka_args["cursor_store"] = "kafka" if delivery == "exactly_once" or clustered else "file"
    producer = kafka_args.get("producer", {})
    if not isinstance(producer, Mapping):
        problems.add("kafka.producer", "must be a table of librdkafka settings")
    else:
        values, secret_keys = _producer_settings(producer, env, problems)
        kafka_args["producer"] = values
        kafka_args["producer_secrets"] = secret_keys
        for key in secret_keys:
            redact.register(values[key])
    _check_schema_registry(kafka_args, env, problems, registry_password)
    return servers, kafka_args


def load_kafka_settings(
    path: Path, *, env: Mapping[str, str] | None = None, bootstrap_servers: str | None = None
) -> KafkaSettings:
    """Only the [kafka] table of a configuration file: for tools that read the topics
    (`cdr-streamer tail`), which need no feed and none of the feeds' passwords."""
    env = os.environ if env is None else env
    problems = _Problems()
    servers, kafka_args = _kafka_args(_read_toml(path), env, bootstrap_servers, problems)
    problems.raise_if_any(str(path))
    return KafkaSettings(bootstrap_servers=str(servers), **kafka_args)


_METRICS_SECRET_KEYS = {
    "basic_auth_password", "basic_auth_password_env", "basic_auth_password_file",
    "bearer_token", "bearer_token_env", "bearer_token_file",
}  # fmt: skip


def _metrics(table: Any, env: Mapping[str, str], problems: _Problems) -> dict[str, Any]:
    """The [metrics] table: address, readiness limits, credentials and TLS files."""
    if not isinstance(table, Mapping):
        problems.add("metrics", "must be a table: [metrics]")
        return {}
    args = _take(table, MetricsSettings, "metrics", problems, _METRICS_SECRET_KEYS)
    args.setdefault("host", env.get(METRICS_HOST_ENV) or DEFAULT_METRICS_HOST)
    port = args.get("port", 9108)
    if isinstance(port, int) and port > 65535:
        problems.add("metrics.port", f"must be 0..65535, not {port}")
    for prefix in ("basic_auth_password", "bearer_token"):
        args[prefix] = _secret(table, prefix, "metrics", env, problems, in_file=False)
    user, password = str(args.get("basic_auth_user", "")), args["basic_auth_password"]
    if user and password is None:
        problems.add(
            "metrics.basic_auth_user", "has no password: set basic_auth_password_file or _env"
        )
    elif password is not None and not user:
        problems.add("metrics.basic_auth_password", "has no user: set basic_auth_user")
    elif password is not None:
        redact.register_basic_auth(user, password.reveal())  # the Authorization header too
    if args.get("auth_probes") and password is None and args["bearer_token"] is None:
        problems.add("metrics.auth_probes", "needs basic_auth_user or bearer_token_file / _env")
    cert, key = str(args.get("tls_cert_file", "")), str(args.get("tls_key_file", ""))
    if bool(cert) != bool(key):
        problems.add("metrics", "TLS needs both tls_cert_file and tls_key_file")
    for name, path in (("tls_cert_file", cert), ("tls_key_file", key)):
        if path and not Path(path).is_file():
            problems.add(f"metrics.{name}", f"{path} is not a readable file")
    return args


def _check_unique_ids(
    kafka_args: Mapping[str, Any],
    feeds: list[FeedSettings],
    sftp: list[SftpSettings],
    problems: _Problems,
) -> None:
    """No two units share a transactional id (probe ids included) or a cursor record's key.

    The names would allow it ("a" and "a-probe", "x" and "sftp-x"): exactly-once, one
    unit's producer would then fence the other's, an outage alone and, in cluster mode,
    taken for a handover that never ends; two units sharing a cursor key would each
    resume from the other's cursor.
    """
    units = [("feeds", f.name, "") for f in feeds]
    units += [("sftp", s.name, s.pairs_with_feed) for s in sftp]
    if kafka_args.get("delivery") == "exactly_once":
        prefix = str(kafka_args.get("transactional_id_prefix", "cdr-streamer"))
        # A paired file source writes through its feed's producer: no id of its own.
        ids = [
            (feed_transactional_id(prefix, name) if kind == "feeds"
             else file_transactional_id(prefix, name), f"{kind}[{name}]", "transactional id")
            for kind, name, paired in units if not paired
        ]  # fmt: skip
        ids += [
            (probe_transactional_id(tid), where, "probe transactional id")
            for tid, where, _ in list(ids)
        ]
        origin = "the names and kafka.transactional_id_prefix"
        _report_shared(ids, problems, origin, "would fence each other")
    if kafka_args.get("cursor_store") == "kafka":
        keys = [(name if kind == "feeds" else f"sftp:{name}", f"{kind}[{name}]", "cursor key")
                for kind, name, _ in units]  # fmt: skip
        _report_shared(keys, problems, "the names", "would resume from one cursor")


def _report_shared(
    claims: list[tuple[str, str, str]], problems: _Problems, origin: str, outcome: str
) -> None:
    owners: dict[str, tuple[str, str]] = {}
    for value, where, what in claims:
        other, other_what = owners.setdefault(value, (where, what))
        if other != where:
            problems.add(
                where,
                f"its {what} {value!r} is also the {other_what} of {other} (both come "
                f"from {origin}): they {outcome}; rename one of them",
            )


def _processing(table: Mapping[str, Any], problems: _Problems) -> dict[str, Any]:
    """[processing]: `workers` is "auto" or a whole number 0 to MAX_WORKERS."""
    args = _take(table, ProcessingSettings, "processing", problems, {"workers"})
    if "workers" not in table:
        return args
    value = table["workers"]
    if isinstance(value, str) and value.strip().isdigit():  # from the environment
        value = int(value)
    if value == "auto" or (
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_WORKERS
    ):
        args["workers"] = value
    else:
        problems.add(
            "processing.workers",
            f'must be "auto" or a whole number 0 to {MAX_WORKERS} (0: all in-process), '
            f"not {value!r}",
        )
    return args


def _check_cluster(args: Mapping[str, Any], problems: _Problems) -> None:
    if not args.get("group_id"):
        problems.add("cluster.group_id", "is required in a [cluster] section (or remove it)")
    session = float(args.get("session_timeout_s", 45.0))
    heartbeat = float(args.get("heartbeat_interval_s", 3.0))
    if session < 1:
        problems.add("cluster.session_timeout_s", "must be at least 1 s (brokers ask for 6 s)")
    if not 0 < heartbeat < session:
        problems.add(
            "cluster.heartbeat_interval_s",
            f"must be above 0 and below session_timeout_s ({session:g} s); a third of it "
            "or less is usual",
        )


_SFTP_SECRET_KEYS = {
    "password", "password_env", "password_file",
    "key_passphrase", "key_passphrase_env", "key_passphrase_file",
}  # fmt: skip


def _secret(
    table: Mapping[str, Any],
    prefix: str,
    where: str,
    env: Mapping[str, str],
    problems: _Problems,
    *,
    in_file: bool,
) -> Secret | None:
    """A secret from `PREFIX_env`, `PREFIX_file` or (if `in_file`) `PREFIX`; None if none."""
    env_name = table.get(f"{prefix}_env")
    file_name = table.get(f"{prefix}_file")
    if env_name is not None:
        value = env.get(str(env_name))
        if not value:
            problems.add(f"{where}.{prefix}_env", f"environment variable {env_name} is not set")
        return Secret(value or "")
    if file_name is not None:
        try:
            return Secret(Path(str(file_name)).read_text(encoding="utf-8").strip())
        except OSError as exc:
            problems.add(f"{where}.{prefix}_file", f"cannot read {file_name}: {exc.strerror}")
            return Secret("")
    if prefix in table:
        if not in_file:
            problems.add(f"{where}.{prefix}", f"not in the file: use {prefix}_env or {prefix}_file")
            return None
        return Secret(str(table[prefix]))
    return None


def parse_after(after: str) -> tuple[AfterAction, str]:
    """The `after` setting as (keep | delete | move, directory); ValueError if malformed."""
    if after == "keep":
        return "keep", ""
    if after == "delete":
        return "delete", ""
    kind, _, directory = after.partition(":")
    if kind == "move" and directory.strip():
        return "move", directory.strip()
    raise ValueError(f"must be 'keep', 'delete' or 'move:DIRECTORY', not {after!r}")


def _sftp_sources(
    tables: Any,
    feeds: Mapping[str, Mapping[str, Any]],
    names: set[str],
    env: Mapping[str, str],
    problems: _Problems,
    *,
    base: Path = Path(),
) -> list[SftpSettings]:
    """The [[sftp]] tables, each checked against the feeds it may pair with."""
    if not isinstance(tables, list):
        problems.add("sftp", "must be an array of tables: [[sftp]]")
        return []
    sources: list[SftpSettings] = []
    paired: dict[str, str] = {}
    for i, table in enumerate(tables):
        args = _take(table, SftpSettings, f"sftp[{i}]", problems, _SFTP_SECRET_KEYS)
        name = str(args.get("name", ""))
        where = f"sftp[{name or i}]"
        for required in ("name", "host", "user"):
            if not args.get(required):
                problems.add(where, f"{required} is required")
        if name in names:
            problems.add(where, "a feed or another SFTP source has this name; each needs its own")
        names.add(name)
        args["password"] = _secret(table, "password", where, env, problems, in_file=True)
        args["key_passphrase"] = _secret(
            table, "key_passphrase", where, env, problems, in_file=False
        )
        _check_sftp(args, where, feeds, paired, problems)
        if not problems.items:
            args.setdefault("cursor_file", str(base / f"var/sftp-cursor-{name}.json"))
            sources.append(SftpSettings(**args))
    return sources


def _check_sftp(
    args: dict[str, Any],
    where: str,
    feeds: Mapping[str, Mapping[str, Any]],
    paired: dict[str, str],
    problems: _Problems,
) -> None:
    protocol = args.get("protocol", "sftp")
    if protocol not in ("sftp", "ftp", "ftps"):
        problems.add(f"{where}.protocol", f"must be sftp, ftp or ftps, not {protocol!r}")
    elif protocol == "sftp":
        _check_sftp_login(args, where, problems)
    else:
        _check_ftp_login(args, where, protocol, problems)
    port = args.get("port", 0)
    if isinstance(port, int) and not 0 <= port <= 65535:
        problems.add(f"{where}.port", f"must be 1..65535, not {port}")
    elif not port:
        implicit = protocol == "ftps" and args.get("ftps_mode") == "implicit"
        args["port"] = FILE_PROTOCOL_PORTS.get("ftps-implicit" if implicit else protocol, 22)
    if args.get("format", "auto") not in ("auto", "csv", "txt", "pipe", "json"):
        problems.add(f"{where}.format", "must be one of auto, csv, txt (tab), pipe, json")
    _check_encoding(args, where, problems)
    try:
        parse_after(str(args.get("after", "keep")))
    except ValueError as exc:
        problems.add(f"{where}.after", str(exc))
    if not float(args.get("poll_interval_s", 60.0)) > 0:
        problems.add(f"{where}.poll_interval_s", "must be more than 0")
    if not int(args.get("max_decompressed_bytes", MAX_DECOMPRESSED_BYTES)) > 0:
        problems.add(f"{where}.max_decompressed_bytes", "must be more than 0")
    _at_least_1(args, "max_file_bytes", where, problems)
    _check_pairing(args, where, feeds, paired, problems)


def _check_sftp_login(args: dict[str, Any], where: str, problems: _Problems) -> None:
    """SFTP: a password or a key, and the host key to check the server by."""
    for key in ("ftps_mode", "ca_file", "tls_verify", "passive"):
        if key in args:
            problems.add(f"{where}.{key}", 'only for protocol = "ftp" or "ftps"')
    key_file = str(args.get("key_file", ""))
    if args.get("password") is None and not key_file:
        problems.add(
            where,
            "no password or key: set key_file, or password_env (an environment variable's "
            "name) or password_file",
        )
    if key_file and not Path(key_file).expanduser().is_file():
        problems.add(f"{where}.key_file", f"{key_file} is not a readable file")
    if args.get("key_passphrase") is not None and not key_file:
        problems.add(f"{where}.key_passphrase_env", "a passphrase needs a key_file")
    known_hosts = Path(str(args.get("known_hosts", "~/.ssh/known_hosts"))).expanduser()
    args["known_hosts"] = str(known_hosts)
    if not known_hosts.is_file() and not args.get("trust_unknown_host_key"):
        problems.add(
            f"{where}.known_hosts",
            f"{known_hosts} does not exist: put the server's host key there (checked with "
            "the provider), or set trust_unknown_host_key = true to record it on first contact",
        )


def _check_ftp_login(args: dict[str, Any], where: str, protocol: str, problems: _Problems) -> None:
    """FTP and FTPS: a password, and (FTPS) how to speak TLS and whom to trust."""
    for key in ("key_file", "key_passphrase", "known_hosts", "trust_unknown_host_key"):
        if args.get(key) not in (None, "", False):
            problems.add(f"{where}.{key}", 'only for protocol = "sftp" (FTP logs in by password)')
    if args.get("password") is None:
        problems.add(
            where,
            "no password: set password_env (an environment variable's name) or password_file",
        )
    if protocol == "ftp":
        for key in ("ftps_mode", "ca_file", "tls_verify"):
            if key in args:
                problems.add(f"{where}.{key}", 'only for protocol = "ftps"')
        return
    if args.get("ftps_mode", "explicit") not in ("explicit", "implicit"):
        problems.add(f"{where}.ftps_mode", "must be 'explicit' (AUTH TLS) or 'implicit'")
    ca_file = str(args.get("ca_file", ""))
    if ca_file:
        path = Path(ca_file).expanduser()
        args["ca_file"] = str(path)
        if not path.is_file():
            problems.add(f"{where}.ca_file", f"{ca_file} is not a readable file")


def _check_pairing(
    args: dict[str, Any],
    where: str,
    feeds: Mapping[str, Mapping[str, Any]],
    paired: dict[str, str],
    problems: _Problems,
) -> None:
    feed = str(args.get("pairs_with_feed", ""))
    if feed:
        if feed not in feeds:
            problems.add(
                f"{where}.pairs_with_feed",
                f"no feed named {feed!r} (configured: {', '.join(feeds) or 'none'})",
            )
        elif feeds[feed].get("callsonly") or feeds[feed].get("servicesonly"):
            problems.add(
                f"{where}.pairs_with_feed",
                f"feed {feed!r} fetches only calls or only services: its cursor cannot "
                "vouch for every CDR in the files",
            )
        if feed in paired:
            problems.add(
                f"{where}.pairs_with_feed", f"feed {feed!r} already pairs with {paired[feed]!r}"
            )
        paired[feed] = str(args.get("name", ""))


def _check_schema_registry(
    args: dict[str, Any],
    env: Mapping[str, str],
    problems: _Problems,
    given: Secret | None = None,
) -> None:
    """The registry settings; its password, like a feed's, never sits in the file.

    `given`: the password from schema_registry_password_env or _file.
    """
    hint = (
        f"set schema_registry_user and the {SCHEMA_REGISTRY_PASSWORD_ENV} environment variable "
        "(or schema_registry_password_env / _file)"
    )
    if "schema_registry_password" in args:
        problems.add("kafka.schema_registry_password", f"not in the file: {hint}")
    password = given.reveal() if given is not None else env.get(SCHEMA_REGISTRY_PASSWORD_ENV, "")
    args["schema_registry_password"] = Secret(password)
    # The Authorization header made of it, should a registry or proxy echo it back.
    redact.register_basic_auth(str(args.get("schema_registry_user", "")), password)
    # One URL or several, comma separated; mock:// is confluent-kafka's in-process mock (tests).
    for url in filter(None, str(args.get("schema_registry_url", "")).split(",")):
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https", "mock") or not parts.netloc:
            problems.add("kafka.schema_registry_url", "must be http(s)://HOST[:PORT][/PATH]")
        elif "@" in parts.netloc:
            problems.add("kafka.schema_registry_url", f"must not carry credentials: {hint}")
    if args.get("schema_registry_user") and not password:
        problems.add("kafka.schema_registry_user", f"has no password: {hint}")


def _at_least_1(args: Mapping[str, Any], key: str, where: str, problems: _Problems) -> None:
    value = args.get(key)
    # A value of the wrong type is reported by _take already.
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 1:
        problems.add(f"{where}.{key}", f"must be at least 1, not {value!r}")


# Other spellings of the same codecs, as Python and the WHATWG encoding standard know them.
_ENCODING_ALIASES = {
    "utf8": "utf-8", "windows-1252": "cp1252", "latin1": "latin-1", "iso-8859-1": "latin-1",
}  # fmt: skip


def _check_encoding(args: dict[str, Any], where: str, problems: _Problems) -> None:
    encoding = str(args.get("encoding", "utf-8")).strip().lower()
    encoding = _ENCODING_ALIASES.get(encoding, encoding)
    if encoding not in ENCODING_NAMES:
        problems.add(
            f"{where}.encoding",
            "must be one of utf-8, cp1252 (Windows-1252), latin-1 (ISO-8859-1), or auto "
            "(UTF-8, and a row that is not UTF-8 read as cp1252)",
        )
    elif "encoding" in args:
        args["encoding"] = encoding


def _check_feed(args: dict[str, Any], where: str, problems: _Problems) -> None:
    url = str(args.get("url", ""))
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Said without repeating the URL: it holds a secret.
        problems.add(
            f"{where}.url",
            "must not contain credentials (user:password@): use login and password_env",
        )
    elif url and parts.scheme not in ("http", "https"):
        problems.add(f"{where}.url", f"must be an http(s) URL, not {url!r}")
    if urlsplit(url).query:
        problems.add(f"{where}.url", "must not carry a query string: parameters are sent by us")
    if args.get("format", "csv") not in ("csv", "txt", "pipe", "json"):
        problems.add(f"{where}.format", "must be one of csv, txt (tab), pipe, json")
    ca_file = args.get("ca_file")
    if isinstance(ca_file, str) and ca_file and not Path(ca_file).is_file():
        problems.add(f"{where}.ca_file", f"{ca_file} is not a readable file")
    _check_encoding(args, where, problems)
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
    horizon = float(args.get("reconcile_horizon_h", 24.0))
    if not 1 <= horizon <= MAX_RECONCILE_HORIZON_H:
        problems.add(
            f"{where}.reconcile_horizon_h",
            f"must be 1 to {MAX_RECONCILE_HORIZON_H:g} hours, not {horizon:g}",
        )
    checks = int(args.get("reconcile_checks", 3))
    if not 1 <= checks <= 24:
        problems.add(f"{where}.reconcile_checks", f"must be 1 to 24, not {checks}")
    if args.get("reconcile_clock", "wall") not in ("wall", "feed"):
        problems.add(f"{where}.reconcile_clock", "must be 'wall' or 'feed'")
    zone = str(args.get("timezone", "Pacific/Auckland"))
    try:
        ZoneInfo(zone)
    except (ValueError, ZoneInfoNotFoundError):
        problems.add(f"{where}.timezone", f"{zone!r} is not a time zone name (Pacific/Auckland)")
    _at_least_1(args, "max_body_bytes", where, problems)
    _at_least_1(args, "max_expansion_ratio", where, problems)


def load_settings(
    path: Path, *, env: Mapping[str, str] | None = None, bootstrap_servers: str | None = None
) -> Settings:
    """Read a TOML configuration file; its relative paths are relative to its folder."""
    return parse_settings(
        _read_toml(path),
        env=env,
        source=str(path),
        bootstrap_servers=bootstrap_servers,
        base_dir=path.resolve().parent,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def check_backfill_window(day: date | None, hour: int | None) -> None:
    """The provider's rule: `hour` only together with `date`, and 0-23."""
    if hour is not None and day is None:
        raise ConfigError("--hour needs --date: the provider only filters an hour within a date")
    if hour is not None and not 0 <= hour <= 23:
        raise ConfigError(f"--hour must be 0-23, not {hour}")


# --- secrets by reference, environment overrides, paths --------------------------------------

ENV_PREFIX = "CDR_STREAMER_"
_REGISTRY_KEYS = ("schema_registry_url", "schema_registry_user", "schema_registry_password")


def _reference(
    ref: object, suffix: str, where: str, env: Mapping[str, str], problems: _Problems
) -> str:
    """The value a NAME_env (a variable's name) or NAME_file (a path) refers to."""
    if suffix == "_env":
        value = env.get(str(ref))
        if not value:
            problems.add(where, f"environment variable {ref} is not set")
        return value or ""
    try:
        return Path(str(ref)).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.add(where, f"cannot read {ref}: {exc.strerror}")
        return ""


def _producer_settings(
    table: Mapping[str, Any], env: Mapping[str, str], problems: _Problems
) -> tuple[dict[str, str], frozenset[str]]:
    """[kafka.producer]: NAME_env and NAME_file read into NAME; which settings are secrets."""
    values: dict[str, str] = {}
    secrets: set[str] = set()
    for key, value in table.items():
        key = str(key)
        for suffix in ("_env", "_file"):
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                if name in table:
                    problems.add(f"kafka.producer.{key}", f"{name} is given twice: keep one")
                values[name] = _reference(value, suffix, f"kafka.producer.{key}", env, problems)
                secrets.add(name)
                break
        else:
            values[key] = str(value)
            if is_secret_setting(key):
                secrets.add(key)
    return values, frozenset(secrets)


def _registry_secrets(
    table: dict[str, Any], env: Mapping[str, str], problems: _Problems
) -> Secret | None:
    """schema_registry_* given as NAME_env or NAME_file (popped from `table`); the password."""
    password: Secret | None = None
    for key in _REGISTRY_KEYS:
        for suffix in ("_env", "_file"):
            ref = table.pop(key + suffix, None)
            if ref is None:
                continue
            value = _reference(ref, suffix, f"kafka.{key}{suffix}", env, problems)
            if key == "schema_registry_password":
                password = Secret(value)
            else:
                table[key] = value
    return password


def _env_value(raw: str, default: object, where: str, problems: _Problems) -> object:
    """An environment variable's text as the type of the setting's default."""
    if isinstance(default, bool):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        problems.add(where, f"must be true or false, not {raw!r}")
        return default
    if isinstance(default, int | float):
        try:
            return int(raw) if isinstance(default, int) else float(raw)
        except ValueError:
            problems.add(where, f"must be a number, not {raw!r}")
            return default
    return raw


def _producer_name(text: str) -> str:
    """SASL_MECHANISM -> sasl.mechanism (Confluent's images: _ is a dot, __ an underscore)."""
    return ".".join(part.replace("\0", "_") for part in text.replace("__", "\0").lower().split("_"))


def apply_env_overrides(
    data: Mapping[str, Any], env: Mapping[str, str], problems: _Problems
) -> dict[str, Any]:
    """The file's settings with CDR_STREAMER_<SECTION>_<SETTING> variables applied over them.

    `CDR_STREAMER_KAFKA_TOPIC`, `CDR_STREAMER_METRICS_PORT`, ... set any [kafka],
    [metrics] or [processing] setting; `CDR_STREAMER_KAFKA_PRODUCER_SASL_MECHANISM` sets
    [kafka.producer] "sasl.mechanism" (`__` stands for an underscore in a name).
    """
    out: dict[str, Any] = dict(data)
    sections: dict[str, type[Any]] = {
        "KAFKA": KafkaSettings, "METRICS": MetricsSettings, "PROCESSING": ProcessingSettings,
    }  # fmt: skip
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX):
            continue
        rest, raw = variable[len(ENV_PREFIX) :], env[variable]
        if rest.startswith("KAFKA_PRODUCER_"):
            kafka = dict(out.get("kafka", {}))
            producer = dict(kafka.get("producer", {}))
            producer[_producer_name(rest[len("KAFKA_PRODUCER_") :])] = raw
            kafka["producer"] = producer
            out["kafka"] = kafka
            continue
        section, _, name = rest.partition("_")
        cls = sections.get(section)
        known = {f.name: f for f in fields(cls)} if cls is not None else {}
        key = name.lower()
        settable = key in known and key not in ("producer", "producer_secrets")
        if key in ("schema_registry_password",) and cls is KafkaSettings:
            problems.add(variable, f"use {SCHEMA_REGISTRY_PASSWORD_ENV} for the registry password")
            continue
        if key in ("basic_auth_password", "bearer_token") and cls is MetricsSettings:
            problems.add(variable, f"set [metrics] {key}_env or {key}_file in the file instead")
            continue
        if not settable:
            problems.add(
                variable,
                f"not a setting: use {ENV_PREFIX}KAFKA_<SETTING>, {ENV_PREFIX}METRICS_<SETTING>, "
                f"{ENV_PREFIX}PROCESSING_<SETTING> or {ENV_PREFIX}KAFKA_PRODUCER_<NAME>",
            )
            continue
        table = dict(out.get(section.lower(), {}))
        default = known[key].default
        table[key] = _env_value(raw, "" if default is MISSING else default, variable, problems)
        out[section.lower()] = table
    return out


_PATH_KEYS = {
    "feeds": ("cursor_file", "password_file"),
    "sftp": (
        "cursor_file",
        "password_file",
        "key_passphrase_file",
        "key_file",
        "known_hosts",
        "ca_file",
    ),
}


def _resolve_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """Relative file paths of the configuration, made relative to its folder `base`."""

    def resolved(value: object) -> object:
        if isinstance(value, str) and value and not value.startswith("~"):
            path = Path(value)
            return value if path.is_absolute() else str(base / path)
        return value

    out: dict[str, Any] = dict(data)
    for section, keys in _PATH_KEYS.items():
        tables = out.get(section)
        if isinstance(tables, list):
            out[section] = [
                {k: resolved(v) if k in keys else v for k, v in t.items()}
                if isinstance(t, Mapping)
                else t
                for t in tables
            ]
    metrics = out.get("metrics")
    if isinstance(metrics, Mapping):  # TLS files, basic_auth_password_file, bearer_token_file
        out["metrics"] = {
            k: resolved(v) if str(k).endswith("_file") else v for k, v in metrics.items()
        }
    kafka = out.get("kafka")
    if isinstance(kafka, Mapping):
        kafka = {k: resolved(v) if str(k).endswith("_file") else v for k, v in kafka.items()}
        producer = kafka.get("producer")
        if isinstance(producer, Mapping):
            kafka["producer"] = {
                k: resolved(v) if str(k).endswith("_file") else v for k, v in producer.items()
            }
        out["kafka"] = kafka
    return out


def _start_from(
    table: Mapping[str, Any], args: dict[str, Any], where: str, problems: _Problems
) -> None:
    """start_from (or the older initial_cursor) into a StartFrom."""
    if "start_from" in table and "initial_cursor" in table:
        problems.add(where, "start_from and initial_cursor say the same: keep start_from")
    value = table.get("start_from", table.get("initial_cursor", "earliest"))
    try:
        args["start_from"] = StartFrom.parse(value)
    except ValueError as exc:
        problems.add(f"{where}.start_from", str(exc))
