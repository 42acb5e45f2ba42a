"""The cursor and its stores.

A feed's cursor is the highest CDR ID such that its event, and the event or dead
letter of every lower ID fetched with it, is confirmed by Kafka. It is the
`fromid` of the next request. Stores only ever hold a committed cursor.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from streamer.errors import ConfigError


class CursorStore(Protocol):
    """Where a feed's committed cursor lives."""

    def load(self) -> int:
        """The committed cursor, or the initial one when nothing was committed yet."""
        ...

    def commit(self, cursor: int) -> None:
        """Make `cursor` durable; it must survive a crash right after this returns."""
        ...


class FileCursorStore:
    """A small JSON file, replaced atomically: temp file, fsync, rename, fsync of the directory."""

    def __init__(self, path: Path, feed: str, initial: int = 0) -> None:
        self.path = path
        self.feed = feed
        self.initial = initial

    def __repr__(self) -> str:
        return f"FileCursorStore({str(self.path)!r})"

    def load(self) -> int:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self.initial
        try:
            data = json.loads(text)
            cursor = data["cursor"]
            if not isinstance(cursor, int) or cursor < 0:
                raise ValueError(cursor)
        except (ValueError, KeyError, TypeError) as exc:
            # Guessing a cursor could skip or replay millions of CDRs: stop and ask.
            raise ConfigError(
                f"cursor file {self.path} is unreadable ({exc!r}); fix it or remove it "
                "to start from the feed's initial_cursor"
            ) from None
        if data.get("feed", self.feed) != self.feed:
            raise ConfigError(
                f"cursor file {self.path} belongs to feed {data['feed']!r}, not {self.feed!r}"
            )
        return cursor

    def commit(self, cursor: int) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(
            {
                "feed": self.feed,
                "cursor": cursor,
                "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class MemoryCursorStore:
    """A cursor held in memory: for backfills, which must not move the live cursor, and tests."""

    def __init__(self, initial: int = 0) -> None:
        self.cursor = initial

    def load(self) -> int:
        return self.cursor

    def commit(self, cursor: int) -> None:
        self.cursor = cursor
