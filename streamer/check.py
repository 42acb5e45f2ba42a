"""`cdr-streamer check-config`: the configuration as the streamer reads it, and `--connect`.

The listing is TOML-like: every setting, defaults included, with secrets masked
(passwords, and every [kafka.producer] setting given as NAME_env / NAME_file or named
like a secret). `--connect` tries, once each: the Kafka cluster (a metadata request),
the schema registry (if set), each feed's login (one request with `fromid` at the
committed cursor, or for a feed without one a single hour of today, so that nothing
old is fetched) and each SFTP login (a directory listing). Nothing is published and
no cursor moves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields, is_dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streamer import app
from streamer.config import ENV_PREFIX, Secret, Settings, StartFrom
from streamer.errors import StreamerError
from streamer.logs import LIBRDKAFKA
from streamer.startup import load_committed

MASK = "********"


def _toml(value: Any) -> str:
    if isinstance(value, Secret):
        return f'"{MASK}"' if value.reveal() else '""  # not set'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, StartFrom):
        return str(value) if value.kind == "id" else json.dumps(str(value))
    if isinstance(value, frozenset | tuple | list):
        return "[" + ", ".join(_toml(v) for v in sorted(value)) + "]"
    return json.dumps(str(value))


def _key(name: str) -> str:
    return name if name.replace("_", "").isalnum() else json.dumps(name)


def _table(obj: Any, skip: tuple[str, ...] = ()) -> Iterator[str]:
    assert is_dataclass(obj)
    for f in fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if value is None:
            continue
        yield f"{_key(f.name)} = {_toml(value)}"


def render(settings: Settings, source: str) -> str:
    """The settings as a TOML-like listing, secrets masked."""
    k = settings.kafka
    lines = [
        f"# {source}: valid (feeds: {len(settings.feeds)}, SFTP sources: {len(settings.sftp)})",
        f"# (environment overrides: {ENV_PREFIX}KAFKA_<SETTING>, {ENV_PREFIX}METRICS_<SETTING>,",
        f"#  {ENV_PREFIX}PROCESSING_<SETTING>, {ENV_PREFIX}KAFKA_PRODUCER_<NAME>; secrets are",
        f"#  shown as {MASK})",
        "",
        "[kafka]",
        *_table(k, skip=("producer", "producer_secrets")),
        "",
        "[kafka.producer]",
    ]
    for name, value in sorted(k.producer.items()):
        shown = f'"{MASK}"' if name in k.producer_secrets else json.dumps(value)
        lines.append(f"{json.dumps(name)} = {shown}")
    lines += ["", "[metrics]", *_table(settings.metrics)]
    processing = settings.processing
    lines += ["", "[processing]", *_table(processing)]
    lines[-1] += f"  # {processing.worker_count} on this machine"
    if settings.cluster.enabled:
        lines += ["", "[cluster]", *_table(settings.cluster)]
    for feed in settings.feeds:
        lines += ["", "[[feeds]]", *_table(feed, skip=("initial_cursor",))]
    for sftp in settings.sftp:
        lines += ["", "[[sftp]]", *_table(sftp)]
    return "\n".join(lines) + "\n"


def connect(settings: Settings) -> int:
    """Try each connection once; print one line per check; 0 if all worked, else 1."""
    results: list[tuple[bool, str]] = []
    kafka_ok = _check_kafka(settings, results)
    if settings.kafka.schema_registry_url:
        _check_registry(settings, results)
    for feed in settings.feeds:
        _check_feed(settings, feed, kafka_ok, results)
    for source in settings.sftp:
        _check_sftp(settings, source, results)
    for ok, text in results:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    failed = sum(1 for ok, _ in results if not ok)
    print(f"{len(results) - failed} of {len(results)} checks passed; nothing was published")
    return 0 if not failed else 1


def _check_kafka(settings: Settings, results: list[tuple[bool, str]]) -> bool:
    k = settings.kafka
    admin = AdminClient({**k.producer, "bootstrap.servers": k.bootstrap_servers}, logger=LIBRDKAFKA)
    try:
        metadata = admin.list_topics(timeout=10)
    except KafkaException as exc:
        results.append(
            (
                False,
                f"kafka {k.bootstrap_servers}: no answer within 10 s ({exc.args[0].str()}): "
                "check bootstrap_servers, the network and [kafka.producer] security settings",
            )
        )
        return False
    finally:
        admin.poll(0)
    topics = []
    for topic in (k.topic, k.dead_letter_topic) + (
        (k.cursor_topic,) if k.cursor_store == "kafka" else ()
    ):
        topics.append(f"{topic} {'exists' if topic in metadata.topics else 'will be created'}")
    results.append(
        (
            True,
            f"kafka {k.bootstrap_servers}: brokers answering: {len(metadata.brokers)}; "
            f"topics: {', '.join(topics)}",
        )
    )
    return True


def _check_registry(settings: Settings, results: list[tuple[bool, str]]) -> None:
    import httpx

    k = settings.kafka
    url = k.schema_registry_url.split(",")[0].strip().rstrip("/")
    if url.startswith("mock://"):
        results.append((True, f"schema registry {url}: in-process mock"))
        return
    auth = (
        (k.schema_registry_user, k.schema_registry_password.reveal())
        if k.schema_registry_user
        else None
    )
    try:
        response = httpx.get(f"{url}/subjects", auth=auth, timeout=10)
    except httpx.HTTPError as exc:
        results.append((False, f"schema registry {url}: unreachable ({type(exc).__name__})"))
        return
    if response.status_code in (401, 403):
        results.append(
            (False, f"schema registry {url}: refused the credentials (HTTP {response.status_code})")
        )
    elif response.status_code != 200:
        results.append((False, f"schema registry {url}: answered HTTP {response.status_code}"))
    else:
        results.append((True, f"schema registry {url}: answers, {len(response.json())} subjects"))


def _check_feed(
    settings: Settings, feed: Any, kafka_ok: bool, results: list[tuple[bool, str]]
) -> None:
    cursor: int | None = None
    if kafka_ok or settings.kafka.cursor_store != "kafka":
        try:
            state = load_committed(app.cursor_store(settings, feed))
            cursor = None if state is None else state.cursor
        except StreamerError as exc:
            results.append((False, f"feed {feed.name}: cursor unreadable: {exc}"))
            return
    client = app.feed_client(feed)
    try:
        if cursor is not None:
            query, asked = None, f"fromid={cursor} (the cursor)"
        else:
            now = datetime.now(ZoneInfo(feed.timezone))
            query = replace(client.query, date=now.date(), hour=now.hour)
            asked = f"date={now.date()} hour={now.hour} (no cursor yet)"
        rows = 0
        with client.fetch(cursor or 0, query) as fetched:
            for _row in fetched:
                rows += 1
                if rows >= 1000:  # enough to know the login and format work
                    break
        results.append(
            (
                True,
                f"feed {feed.name}: login {feed.login} accepted at {feed.url} "
                f"({asked}: {rows}{'+' if rows >= 1000 else ''} rows)",
            )
        )
    except StreamerError as exc:
        results.append((False, f"feed {feed.name}: {exc}"))
    finally:
        client.close()


def _check_sftp(settings: Settings, source: Any, results: list[tuple[bool, str]]) -> None:
    from streamer.sources.sftp import SftpServer

    server = SftpServer(
        source.host, source.port, source.user, known_hosts=Path(source.known_hosts),
        password=source.password,
        key_file=Path(source.key_file).expanduser() if source.key_file else None,
        key_passphrase=source.key_passphrase, trust_unknown_host_key=False,
        connect_timeout_s=source.connect_timeout_s, read_timeout_s=source.read_timeout_s,
    )  # fmt: skip
    try:
        with server.connect() as session:
            files = session.list(source.directory, source.pattern)
        results.append(
            (
                True,
                f"sftp {source.name}: login {source.user} accepted at {source.host}:{source.port}; "
                f"{len(files)} files match {source.pattern} in {source.directory}",
            )
        )
    except StreamerError as exc:
        results.append((False, f"sftp {source.name}: {exc}"))
