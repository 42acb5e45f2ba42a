"""The SFTP collector: the provider's CDR files, from an SFTP server into the same pipeline.

The provider can also deliver CDRs as files over SFTP (CSV, tab, pipe or JSON; daily,
hourly or every 20 minutes; the web feed's fields). A poll of one SFTP source:

1. Load the committed cursor: which files are done (or quarantined), and how many
   rows of the file being read are confirmed in Kafka.
2. List the directory (files matching `pattern`). A file is taken only once it is
   complete: its size and mtime unchanged across listings for `settle_s` (measured
   between listings, never by sleeping), so a file still being written is not read.
3. Read each complete file in name order, streamed in windows of pipelined reads,
   parsed by `formats.parse_rows` (format configured, or from the extension) and
   typed by `records.to_record`; rows already confirmed are skipped.
4. Publish through the feed's own `EventSink`: the same Avro events keyed by
   AccountCode, dead letters, headers with source="sftp" (and `file`).
5. Every `checkpoint_every` rows and at the end of a file: flush and check every
   delivery report, then commit the cursor (in exactly-once mode the cursor record
   is in the same Kafka transaction). Only then is the file moved or deleted
   (`after = "move:DIR"` or `"delete"`; the default `"keep"` leaves it).

A crash mid-file resumes at the last committed row count: at-least-once publishes at
most the last unconfirmed batch again, exactly-once nothing. A file that cannot be read
as a feed file at all (not a header nor a row first, unclosed JSON, unreadable) is
quarantined: the rows before the fault stay published, one dead letter (reason
`bad_file`) describes the file, the cursor marks it done-with-error, and it is moved
to `quarantine_dir` if one is set. The other files go on.

Pairing with a web feed (`pairs_with_feed`), for one account delivered both ways:

- The feed and its SFTP source run in ONE thread, taking turns (`pipeline.run_together`),
  through ONE producer (one transactional id in exactly-once mode). So neither ever
  sees the other half-way through a batch.
- The SFTP source skips every ID at or below the feed's committed cursor (counted as
  `covered_by_feed`): the feed has confirmed it.
- The SFTP cursor also holds the IDs it published above the feed's cursor (compact
  ranges, pruned as the feed's cursor passes them). The feed skips those (counted as
  `covered_by_sftp`) and moves its cursor over them.
- At-least-once: each source commits its own cursor after its flush. A crash between
  a flush and the commit publishes that batch again; every ID is published at least
  once (the feed alone would see to that: it skips only IDs confirmed in Kafka).
- Exactly-once: each batch's events, dead letters and cursor record (the feed's, or
  the SFTP one with its published IDs) are one Kafka transaction, and the other source
  reads only what was committed; so every ID is published exactly once, across both
  sources, crashes included.

Limits: the paired feed must fetch every CDR (neither `callsonly` nor `servicesonly`),
or the SFTP rows it never fetches would be skipped below its cursor. The IDs within
one source are not compared across files when unpaired (the provider puts each CDR in
one file). A file is known by its name: a done file that changes is not read again,
and the names of done files are kept while they stay on the server (use `after =
"move:DIR"` or `"delete"` where thousands of files stay). Sources that take turns
delay each other by one poll at most.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import logging
import posixpath
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, NoReturn

import paramiko

from streamer.config import Secret, parse_after
from streamer.cursor import JsonFileCursorStore, JsonKafkaCursorStore
from streamer.errors import (
    AuthError,
    BadResponseError,
    ConfigError,
    HostKeyError,
    SftpUnavailableError,
    StreamerError,
)
from streamer.feed import Backoff
from streamer.formats import parse_rows
from streamer.limits import DEFAULT_MAX_BYTES, capped
from streamer.metrics import SftpSourceMetrics
from streamer.pipeline import Batch, EventSink, IdRanges, Runner
from streamer.publisher import Publisher
from streamer.records import CallRecord, Rejection, to_record

log = logging.getLogger(__name__)

READ_WINDOW_BYTES = 1 << 20  # pipelined reads per window: memory stays flat, latency is hidden
PROGRESS_EVERY_S = 10.0
EXTENSION_FORMATS: Mapping[str, str] = {
    ".csv": "csv",
    ".txt": "txt",
    ".tsv": "txt",
    ".tab": "txt",
    ".pipe": "pipe",
    ".psv": "pipe",
    ".json": "json",
}
FileState = Literal["done", "quarantined"]
SftpCursorStore = JsonFileCursorStore | JsonKafkaCursorStore


# --- the server ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One regular file in the listed directory."""

    name: str
    size: int
    mtime: int


def fingerprint(key: paramiko.PKey) -> str:
    """A host key's fingerprint as OpenSSH prints it: SHA256:base64, unpadded."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _UnknownHostKeyError(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"{hostname} not found in known_hosts")
        self.hostname = hostname
        self.key = key


class _RejectUnknownHostKey(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, keeping the key so the message can show its fingerprint."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise _UnknownHostKeyError(hostname, key)


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host key, loudly, and record it: only with trust_unknown_host_key."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        log.warning(
            "SFTP server %s is not in %s: trusting its %s host key %s on first contact "
            "(trust_unknown_host_key = true) and recording it there. Check this "
            "fingerprint with the provider",
            hostname, self.known_hosts, key.get_name(), fingerprint(key),
        )  # fmt: skip
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with self.known_hosts.open("a", encoding="utf-8") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class SftpServer:
    """How to reach and log in to one SFTP server; `connect()` opens a session.

    The host key is always checked against `known_hosts`; an unknown one is refused
    unless `trust_unknown_host_key`, which accepts it once and records it there.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        *,
        known_hosts: Path,
        password: Secret | None = None,
        key_file: Path | None = None,
        key_passphrase: Secret | None = None,
        trust_unknown_host_key: bool = False,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        if password is None and key_file is None:
            raise ConfigError(f"SFTP {user}@{host}: give a password or a key_file")
        self.host = host
        self.port = port
        self.user = user
        self.known_hosts = known_hosts
        self.password = password
        self.key_file = key_file
        self.key_passphrase = key_passphrase
        self.trust_unknown_host_key = trust_unknown_host_key
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s

    def __repr__(self) -> str:
        return f"SftpServer({self.user}@{self.host}:{self.port})"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _key(self) -> paramiko.PKey | None:
        if self.key_file is None:
            return None
        passphrase = self.key_passphrase.reveal() if self.key_passphrase is not None else None
        try:
            # paramiko hands the passphrase to cryptography, which takes bytes only
            # (types-paramiko says str).
            secret = passphrase.encode("utf-8") if passphrase else None
            return paramiko.PKey.from_path(self.key_file, secret)  # type: ignore[arg-type]
        except (paramiko.PasswordRequiredException, TypeError):
            # TypeError: cryptography's word for an OpenSSH-format key without its passphrase.
            raise ConfigError(
                f"key_file {self.key_file} is encrypted: set key_passphrase_env or "
                "key_passphrase_file"
            ) from None
        except (paramiko.SSHException, ValueError) as exc:
            raise ConfigError(
                f"cannot load key_file {self.key_file} ({exc}): check key_file and its passphrase"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read key_file {self.key_file}: {exc.strerror}") from None

    def connect(self) -> SftpSession:
        """Connect, check the host key, log in and open the SFTP channel."""
        pkey = self._key()
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(self.known_hosts))
        except FileNotFoundError:
            if not self.trust_unknown_host_key:
                raise HostKeyError(
                    f"known_hosts file {self.known_hosts} does not exist: create it with the "
                    f"SFTP server's host key (ssh-keyscan -p {self.port} {self.host}, checked "
                    "with the provider), or set trust_unknown_host_key = true to record it "
                    "on first contact"
                ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read known_hosts {self.known_hosts}: {exc}") from None
        client.set_missing_host_key_policy(
            _TrustOnFirstUse(self.known_hosts)
            if self.trust_unknown_host_key
            else _RejectUnknownHostKey()
        )
        try:
            client.connect(
                self.host,
                self.port,
                username=self.user,
                password=self.password.reveal() if self.password is not None else None,
                pkey=pkey,
                timeout=self.connect_timeout_s,
                banner_timeout=self.connect_timeout_s,
                auth_timeout=self.connect_timeout_s,
                channel_timeout=self.connect_timeout_s,
                allow_agent=False,
                look_for_keys=False,
            )
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(self.read_timeout_s)  # type: ignore[union-attr]
        except BaseException as exc:
            client.close()
            raise self._error("connect", exc) from exc
        return SftpSession(self, client, sftp)

    def _error(self, action: str, exc: BaseException) -> BaseException:
        """Our error for a paramiko or socket error while talking to this server."""
        where = f"SFTP server {self.address}"
        if isinstance(exc, StreamerError):
            return exc
        if isinstance(exc, paramiko.AuthenticationException):
            return AuthError(
                f"{where} refused to log in user {self.user!r}: check the SFTP user, "
                "password or key"
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostKeyError(
                f"{where} offered the {exc.key.get_name()} host key {fingerprint(exc.key)}, "
                f"but {self.known_hosts} holds {fingerprint(exc.expected_key)} for it: the "
                "key changed, or someone is in between. Not connecting; if the provider "
                "confirms a new key, replace its line in known_hosts"
            )
        if isinstance(exc, _UnknownHostKeyError):
            return HostKeyError(
                f"{where} is not in known_hosts {self.known_hosts} (its "
                f"{exc.key.get_name()} host key is {fingerprint(exc.key)}): add it after "
                "checking the fingerprint with the provider, or set "
                "trust_unknown_host_key = true to record it on first contact"
            )
        if isinstance(exc, TimeoutError):
            return SftpUnavailableError(f"{where}: timed out trying to {action}", kind="timeout")
        if isinstance(exc, paramiko.SSHException | EOFError | OSError):
            return SftpUnavailableError(f"{where}: cannot {action}: {exc or type(exc).__name__}")
        return exc


class SftpSession:
    """One logged-in SFTP connection; paramiko's errors become ours (see `SftpServer._error`)."""

    def __init__(
        self, server: SftpServer, client: paramiko.SSHClient, sftp: paramiko.SFTPClient
    ) -> None:
        self.server = server
        self._client = client
        self._sftp = sftp

    def __enter__(self) -> SftpSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        # A connection that already broke may fail to close: the error that matters is raised.
        with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
            self._sftp.close()
        self._client.close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, PermissionError):
            raise  # the server's answer about one path: the caller decides
        except Exception as exc:
            raise self.server._error(action, exc) from exc

    def list(self, directory: str, pattern: str) -> list[RemoteFile]:
        """The regular files in `directory` whose names match the glob `pattern`, by name."""
        try:
            with self._errors(f"list {directory}"):
                entries = self._sftp.listdir_attr(directory)
        except (FileNotFoundError, PermissionError) as exc:
            raise ConfigError(
                f"SFTP server {self.server.address}: cannot list directory {directory!r} "
                f"({exc.strerror or exc}): check directory and the user's rights"
            ) from None
        files = [
            RemoteFile(entry.filename, entry.st_size or 0, entry.st_mtime or 0)
            for entry in entries
            if entry.st_mode is not None
            and stat.S_ISREG(entry.st_mode)
            and fnmatch.fnmatchcase(entry.filename, pattern)
        ]
        return sorted(files, key=lambda f: f.name)

    def read(self, path: str, on_bytes: Callable[[int], object]) -> Iterator[bytes]:
        """The file's bytes in windows of pipelined requests; FileNotFoundError if it went."""
        with self._errors(f"open {path}"):
            f = self._sftp.open(path, "rb")
        try:
            with self._errors(f"read {path}"):
                size = f.stat().st_size or 0
            offset = 0
            while offset < size:
                want = min(READ_WINDOW_BYTES, size - offset)
                with self._errors(f"read {path}"):
                    data = b"".join(f.readv([(offset, want)]))
                if not data:
                    break  # shorter than it was: the parser sees the end it has
                offset += len(data)
                on_bytes(len(data))
                yield data
        finally:
            # If the connection is already gone, the error that matters is raised already.
            with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                f.close()

    def move(self, path: str, directory: str) -> None:
        """Move `path` into `directory` (created if missing), replacing a file of that name."""
        with self._errors(f"move {path} to {directory}"):
            try:
                self._sftp.stat(directory)
            except FileNotFoundError:
                self._sftp.mkdir(directory)
            target = posixpath.join(directory, posixpath.basename(path))
            try:
                self._sftp.posix_rename(path, target)
            except OSError:
                self._sftp.rename(path, target)  # a server without posix-rename@openssh.com

    def remove(self, path: str) -> None:
        with self._errors(f"delete {path}"):
            self._sftp.remove(path)


# --- when a file is complete -----------------------------------------------------------------


@dataclass(slots=True)
class _Sighting:
    size: int
    mtime: int
    since: float  # when this size and mtime were first listed


@dataclass(slots=True)
class Settled:
    """What one listing tells: files complete now, files still waiting, and what changed."""

    ready: list[RemoteFile] = field(default_factory=list)
    waiting: list[RemoteFile] = field(default_factory=list)
    new: list[RemoteFile] = field(default_factory=list)
    changed: list[RemoteFile] = field(default_factory=list)


class SettleTracker:
    """A file is complete once its size and mtime stay the same across listings for settle_s.

    Measured between listings, by the clock: nothing sleeps. With settle_s = 0 a file is
    taken as soon as it is listed (for a provider that writes to a temporary name and
    renames, or for tests).
    """

    def __init__(self, settle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_s = settle_s
        self._clock = clock
        self._seen: dict[str, _Sighting] = {}

    def observe(self, files: list[RemoteFile]) -> Settled:
        now = self._clock()
        out = Settled()
        seen: dict[str, _Sighting] = {}
        for f in files:
            before = self._seen.get(f.name)
            if before is None:
                sighting = _Sighting(f.size, f.mtime, now)
                out.new.append(f)
            elif (before.size, before.mtime) != (f.size, f.mtime):
                sighting = _Sighting(f.size, f.mtime, now)
                out.changed.append(f)
            else:
                sighting = before
            seen[f.name] = sighting
            ready = now - sighting.since >= self.settle_s
            (out.ready if ready else out.waiting).append(f)
        self._seen = seen  # a file gone from the listing is forgotten
        return out


# --- the cursor ------------------------------------------------------------------------------


@dataclass(slots=True)
class SftpCursor:
    """Which files are done, how far the current one is confirmed, and (paired) which IDs.

    `rows` counts the parser's items (rows and rejections) of `current` whose events or
    dead letters are confirmed. `covered` holds the IDs this source published above the
    paired feed's cursor.
    """

    files: dict[str, FileState] = field(default_factory=dict)
    current: str | None = None
    rows: int = 0
    covered: IdRanges = field(default_factory=IdRanges)

    def copy(self) -> SftpCursor:
        return SftpCursor(dict(self.files), self.current, self.rows, self.covered.copy())

    def to_json(self) -> dict[str, Any]:
        return {
            "files": dict(sorted(self.files.items())),
            "current": self.current,
            "rows": self.rows,
            "covered": [list(pair) for pair in self.covered],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None, where: str) -> SftpCursor:
        if data is None:
            return cls()
        try:
            files = data.get("files", {})
            current = data.get("current")
            rows = data.get("rows", 0)
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and v in ("done", "quarantined") for k, v in files.items()
            ):
                raise ValueError("files must map names to 'done' or 'quarantined'")
            if current is not None and not isinstance(current, str):
                raise ValueError("current must be a file name or null")
            if type(rows) is not int or rows < 0:
                raise ValueError("rows must be a whole number >= 0")
            covered = IdRanges.of(data.get("covered", []))
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{where} holds an unreadable SFTP cursor ({exc}); fix or remove it"
            ) from None
        return cls(files, current, rows, covered)


# --- the collector ---------------------------------------------------------------------------


@dataclass
class SftpPollResult:
    """What one poll of an SFTP source did."""

    listed: int = 0
    waiting: int = 0
    files_done: int = 0
    files_quarantined: int = 0
    rows: int = 0  # rows read past the committed position, skipped ones included
    published: int = 0
    dead_lettered: int = 0
    covered: int = 0  # at or below the paired feed's cursor
    duplicates: int = 0  # IDs this source had already published (paired only)
    read_bytes: int = 0
    seconds: float = 0.0


def format_of(name: str, configured: str) -> str | None:
    """The file's format: the configured one, or (auto) its extension's; None if unknown."""
    if configured != "auto":
        return configured
    return EXTENSION_FORMATS.get(posixpath.splitext(name)[1].lower())


class SftpCollector:
    """Moves one SFTP source's files into Kafka, one poll (listing) at a time.

    `feed_cursor`, when paired with a feed: the feed's committed cursor. Exactly-once:
    `cursor_store` is a `JsonKafkaCursorStore` and the sink's producer transactional.
    """

    def __init__(
        self,
        *,
        name: str,
        server: SftpServer,
        directory: str,
        sink: EventSink,
        cursor_store: SftpCursorStore,
        sftp_metrics: SftpSourceMetrics,
        pattern: str = "*",
        fmt: str = "auto",
        settle_s: float = 60.0,
        after: str = "keep",
        quarantine_dir: str = "",
        checkpoint_every: int = 10_000,
        exactly_once: bool = False,
        feed_cursor: Callable[[], int] | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_file_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if exactly_once and not isinstance(cursor_store, JsonKafkaCursorStore):
            raise TypeError("exactly-once needs the cursor in Kafka")
        self.name = name
        self.server = server
        self.directory = directory
        self.pattern = pattern
        self.fmt = fmt
        self.after, self.after_dir = parse_after(after)
        self.quarantine_dir = quarantine_dir
        self.sink = sink
        self.metrics = sink.metrics
        self.sftp_metrics = sftp_metrics
        self.cursor_store = cursor_store
        self.checkpoint_every = checkpoint_every
        self.exactly_once = exactly_once
        self.feed_cursor = feed_cursor
        self.stop = stop or threading.Event()
        self.tracker = SettleTracker(settle_s, clock)
        self.max_file_bytes = max_file_bytes
        self._committed: SftpCursor | None = None

    def close(self) -> None:
        self.sink.slot.close()

    def cursor(self) -> SftpCursor:
        """The committed cursor (read from its store on first use)."""
        if self._committed is None:
            self._committed = SftpCursor.from_json(
                self.cursor_store.load(), repr(self.cursor_store)
            )
        return self._committed

    @property
    def loaded_cursor(self) -> SftpCursor | None:
        """The committed cursor if it was read already, without reading it."""
        return self._committed

    def published_ids(self) -> IdRanges:
        """The IDs this source published above the paired feed's cursor (committed ones)."""
        self.sink.slot.get()  # exactly-once: fence older instances before reading the cursor
        return self.cursor().covered

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.directory, *parts)

    def poll(self) -> SftpPollResult:
        """List the directory once and read every complete file not done yet."""
        started = time.monotonic()
        # A transactional producer fences older instances first: the cursor read is final.
        publisher = self.sink.slot.get()
        # Step 1: the committed cursor.
        self.cursor()
        result = SftpPollResult()
        try:
            with self._counting_errors(), self.server.connect() as session:
                self._poll(session, publisher, result)
        except BaseException as exc:
            self.sink.recover(publisher, exc)
            raise
        self.metrics.skip("covered_by_feed", result.covered)
        self.metrics.skip("duplicate", result.duplicates)
        self.metrics.poll_succeeded()
        result.seconds = time.monotonic() - started
        return result

    @contextmanager
    def _counting_errors(self) -> Iterator[None]:
        try:
            yield
        except SftpUnavailableError as exc:
            self.sftp_metrics.error(exc.kind)
            raise
        except AuthError:
            self.sftp_metrics.error("auth_error")
            raise
        except HostKeyError:
            self.sftp_metrics.error("host_key")
            raise

    def _poll(self, session: SftpSession, publisher: Publisher, result: SftpPollResult) -> None:
        # Step 2: list; only files unchanged for settle_s are complete.
        files = session.list(self.directory, self.pattern)
        result.listed = len(files)
        settled = self.tracker.observe(files)
        committed = self.cursor()
        new = [f for f in settled.new if f.name not in committed.files]
        waiting = [f for f in settled.waiting if f.name not in committed.files]
        self.sftp_metrics.files_seen.inc(len(new))
        self.sftp_metrics.files_waiting.set(len(waiting))
        result.waiting = len(waiting)
        for f in new:
            log.info(
                "sftp %s: new file %s (%d bytes)%s", self.name, f.name, f.size,
                f", waiting {self.tracker.settle_s:g} s for it to settle"
                if self.tracker.settle_s else "",
            )  # fmt: skip
        for f in settled.changed:
            if f.name in committed.files:
                continue
            log.info("sftp %s: %s is still being written (%d bytes now)", self.name, f.name, f.size)
        listed = {f.name for f in files}
        # The file a crash left half-read comes first: starting another would drop its
        # position (one `current` file at a time). If it is listed but not settled, wait.
        ready = sorted(settled.ready, key=lambda f: (f.name != committed.current, f.name))
        half_read = committed.current in listed and committed.current not in committed.files
        if half_read and (not ready or ready[0].name != committed.current):
            return
        for f in ready:
            if self.stop.is_set():
                return
            state = committed.files.get(f.name)
            if state is not None:
                self._after(session, f.name, state)  # again, if it failed or a crash came first
                continue
            # Step 3: read the file from the committed position.
            self._read(session, publisher, f, listed, result)
            committed = self.cursor()

    def _read(
        self,
        session: SftpSession,
        publisher: Publisher,
        f: RemoteFile,
        listed: set[str],
        result: SftpPollResult,
    ) -> None:
        # The working cursor: committed at each checkpoint, dropped if the poll fails.
        state = self.cursor().copy()
        # Files gone from the server need no memory any more.
        state.files = {name: s for name, s in state.files.items() if name in listed}
        start = state.rows if state.current == f.name else 0
        state.current, state.rows = f.name, start
        if start:
            log.info("sftp %s: resuming %s after row %d", self.name, f.name, start)
        feed_cursor = self.feed_cursor() if self.feed_cursor is not None else None
        fmt = format_of(f.name, self.fmt)
        batch = Batch()
        headers: list[tuple[str, str | bytes | None]] = [("file", f.name.encode("utf-8"))]
        before = (result.published, result.dead_lettered)

        def count_bytes(n: int) -> None:
            result.read_bytes += n
            self.sftp_metrics.read_bytes.inc(n)

        try:
            if fmt is None:
                raise BadResponseError(
                    f"cannot tell the format of {f.name} from its extension: set format",
                    reason="unknown_format",
                )
            index = 0
            # A file over max_file_bytes is not a feed file: quarantined like any other.
            data = capped(
                session.read(self._path(f.name), count_bytes),
                self.max_file_bytes,
                where=f.name,
                setting="max_file_bytes",
            )
            for row in parse_rows(data, fmt):
                index += 1
                if index <= start:
                    continue  # confirmed before a restart
                result.rows += 1
                item = row if isinstance(row, Rejection) else to_record(row)
                cdr_id = item.id if isinstance(item, CallRecord) else item.cdr_id
                state.rows = index
                if feed_cursor is not None and cdr_id is not None:
                    if cdr_id <= feed_cursor:
                        result.covered += 1
                        continue
                    if cdr_id in state.covered:
                        result.duplicates += 1
                        continue
                    state.covered.add(cdr_id)
                # Step 4: the event or the dead letter, exactly as the feed's.
                if isinstance(item, CallRecord):
                    self.sink.publish(publisher, item, batch, headers)
                    result.published += 1
                else:
                    self.sink.dead_letter(publisher, item, batch, fromid=0, file=f.name)
                    result.dead_lettered += 1
                if batch.size >= self.checkpoint_every:
                    # Step 5 (mid-file): the rows so far, confirmed, then the position.
                    self._checkpoint(publisher, batch, state, feed_cursor)
                    batch = Batch()
        except FileNotFoundError:
            log.warning("sftp %s: %s went away while being read", self.name, f.name)
            self._checkpoint(publisher, batch, state, feed_cursor)
            return
        except (BadResponseError, PermissionError) as exc:
            self._quarantine(session, publisher, batch, state, f, exc, feed_cursor, result)
            return
        # Step 5: the whole file is confirmed -> done.
        state.files[f.name] = "done"
        state.current, state.rows = None, 0
        self._checkpoint(publisher, batch, state, feed_cursor)
        self.sftp_metrics.files_done.inc()
        result.files_done += 1
        log.info(
            "sftp %s: %s done: %d published, %d dead letters",
            self.name, f.name, result.published - before[0], result.dead_lettered - before[1],
        )  # fmt: skip
        self._after(session, f.name, "done")

    def _quarantine(
        self,
        session: SftpSession,
        publisher: Publisher,
        batch: Batch,
        state: SftpCursor,
        f: RemoteFile,
        exc: Exception,
        feed_cursor: int | None,
        result: SftpPollResult,
    ) -> None:
        """A file that is not a feed file: one dead letter for it, marked, set aside."""
        detail = str(exc) if isinstance(exc, BadResponseError) else f"cannot read it: {exc}"
        log.error(
            "sftp %s: quarantining %s after %d rows: %s", self.name, f.name, state.rows, detail
        )
        self.sftp_metrics.error("unreadable_file")
        rejection = Rejection("bad_file", f"{f.name}: {detail}"[:2000], f.name)
        self.sink.dead_letter(publisher, rejection, batch, fromid=0, file=f.name)
        result.dead_lettered += 1
        state.files[f.name] = "quarantined"
        state.current, state.rows = None, 0
        self._checkpoint(publisher, batch, state, feed_cursor)
        self.sftp_metrics.files_quarantined.inc()
        result.files_quarantined += 1
        self._after(session, f.name, "quarantined")

    def _checkpoint(
        self, publisher: Publisher, batch: Batch, state: SftpCursor, feed_cursor: int | None
    ) -> None:
        if feed_cursor is not None:
            state.covered.discard_through(feed_cursor)  # the feed's cursor covers those
        value = state.to_json()
        snapshot = state.copy()
        store = self.cursor_store
        if self.exactly_once:
            assert isinstance(store, JsonKafkaCursorStore)
            self.sink.confirm(
                publisher,
                batch,
                cursor_messages=(store.message(value),),
                on_confirmed=partial(self._committed_as, store.committed, value, snapshot),
            )
        else:
            self.sink.confirm(
                publisher,
                batch,
                on_confirmed=partial(self._committed_as, store.commit, value, snapshot),
            )

    def _committed_as(
        self, commit: Callable[[dict[str, Any]], None], value: dict[str, Any], state: SftpCursor
    ) -> None:
        commit(value)
        self._committed = state

    def _after(self, session: SftpSession, name: str, state: FileState) -> None:
        """Move or delete a file once its cursor is committed; a failure is retried next poll."""
        if state == "quarantined":
            if not self.quarantine_dir:
                return
            action, target = "move", self.quarantine_dir
        else:
            action, target = self.after, self.after_dir
        if action == "keep":
            return
        path = self._path(name)
        try:
            if action == "delete":
                session.remove(path)
            else:
                session.move(path, self._path(target))
        except (SftpUnavailableError, OSError) as exc:
            self.sftp_metrics.error("after_action")
            log.warning(
                "sftp %s: could not %s %s (%s); trying again next poll", self.name, action,
                name, exc,
            )  # fmt: skip
            if isinstance(exc, SftpUnavailableError):
                raise
            return
        log.info("sftp %s: %s %s", self.name, "deleted" if action == "delete" else "moved", name)


class SftpRunner(Runner):
    """Polls one SFTP source until stopped: retriable errors back off, fatal ones stop it.

    With `once`, it polls until no file is left waiting to settle.
    """

    kind = "sftp"

    def __init__(
        self,
        collector: SftpCollector,
        *,
        poll_interval_s: float,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(
            collector.name,
            collector.metrics,
            backoff or Backoff(1.0, min(300.0, max(1.0, poll_interval_s))),
        )
        self.collector = collector
        self.poll_interval_s = poll_interval_s

    def close(self) -> None:
        self.collector.close()

    def _position(self) -> str:
        cursor = self.collector.loaded_cursor
        if cursor is None:  # reading it failed: do not wait on the store again just to log
            return "cursor not read yet"
        done = sum(1 for s in cursor.files.values() if s == "done")
        where = f", {cursor.current} confirmed to row {cursor.rows}" if cursor.current else ""
        return f"cursor stays at {done} files done{where}"

    def _poll(self, *, once: bool) -> float | None:
        result = self.collector.poll()
        level = logging.INFO if result.files_done or result.files_quarantined else logging.DEBUG
        log.log(
            level,
            "sftp %s: %d files listed, %d done, %d quarantined, %d waiting to settle; "
            "%d rows in %.1f s: %d published, %d dead letters, %d covered by the feed",
            self.name, result.listed, result.files_done, result.files_quarantined,
            result.waiting, result.rows, result.seconds, result.published,
            result.dead_lettered, result.covered,
        )  # fmt: skip
        if result.waiting:
            # Look again when the waiting files may have settled.
            return max(0.1, min(self.poll_interval_s, self.collector.tracker.settle_s))
        if once:
            return None
        return self.poll_interval_s
