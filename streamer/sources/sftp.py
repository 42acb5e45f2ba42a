"""SFTP, the provider's secure file delivery: log in over SSH (host key checked) and read files.

`SftpServer.connect()` opens an `SftpSession` with what `sources/files.py`'s collector
needs: list a directory, read a file in pipelined windows, move or delete it.
paramiko's errors become ours here (see `SftpServer._error`).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import logging
import posixpath
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import paramiko

from streamer.config import Secret
from streamer.errors import (
    AuthError,
    ConfigError,
    HostKeyError,
    SftpUnavailableError,
    StreamerError,
)
from streamer.sources.base import RemoteFile

log = logging.getLogger(__name__)

READ_WINDOW_BYTES = 1 << 20  # pipelined reads per window: memory stays flat, latency is hidden


# --- the server ------------------------------------------------------------------------------


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
