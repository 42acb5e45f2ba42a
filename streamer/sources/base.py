"""What a source is to the rest of the streamer: the protocols its parts implement.

A file server (SFTP today, FTP/FTPS beside it) is a `FileServer` whose `connect()`
gives a `FileSession`; the one file collector (`sources/files.py`) drives any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One regular file in the listed directory."""

    name: str
    size: int
    mtime: int


class FileSession(Protocol):
    """One logged-in connection to a file server; its errors are already ours (errors.py)."""

    def __enter__(self) -> FileSession: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def list(self, directory: str, pattern: str) -> list[RemoteFile]:
        """The regular files in `directory` whose names match the glob `pattern`, by name."""
        ...

    def read(self, path: str, on_bytes: Callable[[int], object]) -> Iterator[bytes]:
        """The file's bytes as they arrive; FileNotFoundError if it went away."""
        ...

    def move(self, path: str, directory: str) -> None:
        """Move `path` into `directory` (created if missing)."""
        ...

    def remove(self, path: str) -> None: ...


class FileServer(Protocol):
    """How to reach and log in to one file server."""

    @property
    def address(self) -> str:
        """host:port, for messages."""
        ...

    def connect(self) -> FileSession:
        """Connect and log in; AuthError, HostKeyError or SftpUnavailableError if not."""
        ...
