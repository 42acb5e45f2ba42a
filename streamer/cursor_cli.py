"""`cdr-streamer cursor show|set|reset`: look at or move a feed's (or SFTP source's) cursor.

Like Kafka Connect's offsets API (KIP-875), for both cursor stores. A cursor is moved
only while its feed is not running (running.py says how that is known): a file store's
lock is held for the whole change, so a streamer that starts meanwhile refuses to run;
in the Kafka store a live lease refuses the change (`--force` overrides a lease that
belongs to a process known to be gone), and in exactly-once mode the new cursor is
committed in a transaction of the feed's own transactional id, which fences any
instance still running. `--dry-run` prints what would change and writes nothing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from streamer import app
from streamer.config import FeedSettings, Settings, SftpSettings
from streamer.cursor import FeedCursor, JsonKafkaCursorStore, KafkaCursorStore
from streamer.errors import ConfigError
from streamer.publisher import Publisher, producer_config
from streamer.running import FileLock, file_holder, lease_holder
from streamer.sources.files import FileCursor
from streamer.startup import load_committed, resolve_start

EXIT_OK, EXIT_REFUSED = 0, 1


def add_cursor_parser(sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `cursor` command and its show, set and reset actions."""
    cursor = sub.add_parser(
        "cursor",
        help="show, set or reset the cursor of a feed or SFTP source",
        description="Show where each feed (and SFTP source) stands, or move its cursor while "
        "it is stopped. A feed's cursor is the highest CDR ID confirmed in Kafka together "
        "with every ID before it: the next request asks for the IDs after it (fromid).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  cdr-streamer cursor show --config streamer.toml\n"
        "  cdr-streamer cursor set --config streamer.toml --feed main 123456 --dry-run\n"
        "  cdr-streamer cursor reset --config streamer.toml --feed main\n"
        "  cdr-streamer cursor set --config streamer.toml --feed main-files "
        "--not-done cdr_20240522.csv",
    )
    actions = cursor.add_subparsers(dest="cursor_action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print every cursor (or one, with --feed)")
    add_config_args(show)
    show.add_argument("--feed", metavar="NAME", help="only this feed or SFTP source")
    show.add_argument("--json", action="store_true", help="print JSON, one object per line")
    for name, text in (
        ("set", "move a stopped feed's cursor to an ID (SFTP: mark files done or not done)"),
        ("reset", "put a stopped feed back to its start_from (SFTP: forget every file)"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        add_config_args(action)
        action.add_argument(
            "--feed", metavar="NAME", help="the feed or SFTP source (default: the only one)"
        )
        action.add_argument(
            "--dry-run", action="store_true", help="print what would change, write nothing"
        )
        action.add_argument(
            "--force",
            action="store_true",
            help="Kafka store: go ahead although a lease says the feed runs (only when you "
            "know that process is gone; exactly-once fences it anyway)",
        )
        if name == "set":
            action.add_argument(
                "cursor",
                nargs="?",
                type=int,
                metavar="ID",
                help="a feed's new cursor: the next request asks for IDs after it",
            )
            action.add_argument(
                "--done",
                action="append",
                default=[],
                metavar="FILE",
                help="SFTP: mark this file done (not read); repeatable",
            )
            action.add_argument(
                "--not-done", action="append", default=[], metavar="FILE",
                help="SFTP: forget this file, so it is read again; repeatable",
            )  # fmt: skip


def run_cursor(settings: Settings, args: argparse.Namespace) -> int:
    """The `cursor` command; the exit code."""
    feeds = {f.name: f for f in settings.feeds}
    sources = {s.name: s for s in settings.sftp}
    known = [*feeds, *sources]
    if args.feed is not None and args.feed not in known:
        raise ConfigError(
            f"no feed or SFTP source named {args.feed!r} (configured: {', '.join(known)})"
        )
    if args.cursor_action == "show":
        names = [args.feed] if args.feed else known
        for name in names:
            shown = (
                _show_feed(settings, feeds[name])
                if name in feeds
                else _show_sftp(settings, sources[name])
            )
            print(json.dumps(shown) if args.json else _describe(shown))
        return EXIT_OK
    if args.feed is None:
        if len(known) != 1:
            raise ConfigError(
                "several feeds and sources are configured: choose one with --feed "
                f"({', '.join(known)})"
            )
        args.feed = known[0]
    if args.feed in feeds:
        return _change_feed(settings, feeds[args.feed], args)
    return _change_sftp(settings, sources[args.feed], args)


# --- show ------------------------------------------------------------------------------------


def _running(settings: Settings, owner: str, cursor_file: str) -> str | None:
    k = settings.kafka
    if k.cursor_store == "kafka":
        return lease_holder(k.bootstrap_servers, k.producer, k.cursor_topic, owner)
    return file_holder(Path(cursor_file))


def _show_feed(settings: Settings, feed: FeedSettings) -> dict[str, Any]:
    store = app.cursor_store(settings, feed)
    state = load_committed(store)
    return {
        "name": feed.name,
        "kind": "feed",
        "store": repr(store),
        "cursor": None if state is None else state.cursor,
        "confirmed_above": [] if state is None else [list(r) for r in state.confirmed],
        "start_from": str(feed.start_from),
        "running": _running(settings, feed.name, feed.cursor_file),
    }


def _sftp_store_value(settings: Settings, source: SftpSettings) -> tuple[Any, FileCursor | None]:
    store = app.sftp_cursor_store(settings, source)
    value = store.load()
    return store, None if value is None else FileCursor.from_json(value, repr(store))


def _show_sftp(settings: Settings, source: SftpSettings) -> dict[str, Any]:
    store, cursor = _sftp_store_value(settings, source)
    return {
        "name": source.name,
        "kind": "sftp",
        "store": repr(store),
        "cursor": None if cursor is None else _file_cursor_json(cursor),
        "running": _running(settings, f"sftp:{source.name}", source.cursor_file),
    }


def _file_cursor_json(cursor: FileCursor) -> dict[str, Any]:
    return {
        "files_done": sorted(n for n, s in cursor.files.items() if s == "done"),
        "files_quarantined": sorted(n for n, s in cursor.files.items() if s == "quarantined"),
        "current": cursor.current,
        "rows": cursor.rows,
    }


def _describe(shown: dict[str, Any]) -> str:
    running = f"; RUNNING ({shown['running']})" if shown["running"] else "; not running"
    cursor = shown["cursor"]
    if shown["kind"] == "feed":
        if cursor is None:
            start = shown["start_from"]
            what = f"no cursor committed yet (the first run begins at start_from = {start})"
        else:
            above = shown["confirmed_above"]
            what = f"cursor {cursor}" + (
                f", {len(above)} ID ranges confirmed above it" if above else ""
            )
        return f"feed {shown['name']}: {what}, in {shown['store']}{running}"
    if cursor is None:
        what = "no cursor committed yet (every matching file will be read)"
    else:
        what = f"{len(cursor['files_done'])} files done"
        if cursor["files_quarantined"]:
            what += f", {len(cursor['files_quarantined'])} quarantined"
        if cursor["current"]:
            what += f", reading {cursor['current']} (confirmed to row {cursor['rows']})"
    return f"sftp {shown['name']}: {what}, in {shown['store']}{running}"


# --- set and reset ---------------------------------------------------------------------------


def _refuse_if_running(
    settings: Settings, owner: str, cursor_file: str, what: str, force: bool
) -> None:
    holder = _running(settings, owner, cursor_file)
    if holder is None:
        return
    if settings.kafka.cursor_store == "kafka" and force:
        print(f"{what} has a live lease ({holder}); going ahead (--force)")
        return
    hint = (
        " (or --force if that process is gone for good)"
        if settings.kafka.cursor_store == "kafka"
        else ""
    )
    raise ConfigError(f"{what} is running ({holder}): stop it first{hint}; nothing was changed")


def _holding(settings: Settings, cursor_file: str, what: str) -> AbstractContextManager[Any]:
    """A file store's lock for the whole change: a streamer starting meanwhile refuses."""
    if settings.kafka.cursor_store == "kafka":
        return nullcontext()
    lock = FileLock(Path(cursor_file))

    class Held:
        def __enter__(self) -> None:
            lock.acquire(what)

        def __exit__(self, *exc: object) -> None:
            lock.release()

    return Held()


def _commit(
    settings: Settings,
    store: Any,
    message: tuple[str, bytes, bytes],
    plain: Callable[[], None],
    tid: str,
) -> None:
    """Exactly-once: one transaction of the feed's transactional id (fences a running one)."""
    if settings.kafka.delivery != "exactly_once" or not isinstance(
        store, KafkaCursorStore | JsonKafkaCursorStore
    ):
        plain()
        return
    k = settings.kafka
    publisher = Publisher(producer_config(k.bootstrap_servers, k.producer), transactional_id=tid)
    try:
        topic, key, value = message
        publisher.produce(topic, key, value)
        publisher.flush(k.flush_timeout_s)
    finally:
        publisher.close()


def _change_feed(settings: Settings, feed: FeedSettings, args: argparse.Namespace) -> int:
    what = f"feed {feed.name}"
    if args.cursor_action == "set" and (args.cursor is None or args.done or args.not_done):
        raise ConfigError(
            f"cursor set --feed {feed.name} needs an ID (and no --done / --not-done: "
            "those are for SFTP sources)"
        )
    if args.cursor_action == "set" and args.cursor < 0:
        raise ConfigError("a cursor is a CDR ID, 0 or more")
    _refuse_if_running(settings, feed.name, feed.cursor_file, what, args.force)
    with _holding(settings, feed.cursor_file, what):
        store = app.cursor_store(settings, feed)
        before = load_committed(store)
        if args.cursor_action == "set":
            target, why = args.cursor, "set"
        else:
            client = app.feed_client(feed)
            try:
                target = resolve_start(client, feed.start_from, ZoneInfo(feed.timezone))
            finally:
                client.close()
            why = f"reset to start_from = {feed.start_from}"
        old = "no cursor" if before is None else f"cursor {before.cursor}"
        effect = _effect(None if before is None else before.cursor, target)
        if args.dry_run:
            print(f"{what}: would move {old} -> {target} ({why}){effect}; dry run: nothing written")
            return EXIT_OK
        state = FeedCursor(target)
        tid = app.transactional_id(settings, feed.name)
        message = (
            store.message_state(state) if isinstance(store, KafkaCursorStore) else ("", b"", b"")
        )
        _commit(settings, store, message, lambda: store.commit_state(state), tid)
        print(f"{what}: {old} -> {target} ({why}){effect}")
    return EXIT_OK


def _effect(before: int | None, after: int) -> str:
    if before is None or before == after:
        return ""
    if after < before:
        return f": CDRs {after + 1}..{before} will be fetched and published again"
    return f": CDRs {before + 1}..{after} will be skipped (never fetched)"


def _change_sftp(settings: Settings, source: SftpSettings, args: argparse.Namespace) -> int:
    what = f"sftp {source.name}"
    owner = f"sftp:{source.name}"
    if args.cursor_action == "set" and (
        args.cursor is not None or not (args.done or args.not_done)
    ):
        raise ConfigError(
            f"cursor set --feed {source.name} (an SFTP source) takes --done FILE or "
            "--not-done FILE, not an ID"
        )
    _refuse_if_running(settings, owner, source.cursor_file, what, args.force)
    with _holding(settings, source.cursor_file, what):
        store, cursor = _sftp_store_value(settings, source)
        new = FileCursor() if cursor is None else cursor.copy()
        changes: list[str] = []
        if args.cursor_action == "reset":
            new = FileCursor(covered=new.covered)
            changes.append("every file forgotten: all matching files are read again")
        else:
            for name in args.done:
                new.files[name] = "done"
                if new.current == name:
                    new.current, new.rows = None, 0
                changes.append(f"{name} marked done")
            for name in args.not_done:
                if new.files.pop(name, None) is None and new.current != name:
                    changes.append(f"{name} was not done (unchanged)")
                    continue
                if new.current == name:
                    new.current, new.rows = None, 0
                changes.append(f"{name} will be read again")
        if args.dry_run:
            print(f"{what}: would change: {'; '.join(changes)}; dry run: nothing written")
            return EXIT_OK
        value = new.to_json()
        paired = source.pairs_with_feed
        tid = (
            app.transactional_id(settings, paired)
            if paired
            else app.transactional_id(settings, source.name, sftp=True)
        )
        message = (
            store.message(value) if isinstance(store, JsonKafkaCursorStore) else ("", b"", b"")
        )
        _commit(settings, store, message, lambda: store.commit(value), tid)
        print(f"{what}: {'; '.join(changes)}")
    return EXIT_OK
