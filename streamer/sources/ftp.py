"""FTP and FTPS, the provider's "more traditional FTP collection process": log in and read files.

`FtpServer.connect()` opens an `FtpSession` with what `sources/files.py`'s collector
needs (list a directory, stream a file, move or delete it), as `sources/sftp.py` does
for SFTP. ftplib's errors become ours here (see `FtpServer._error`).

- **TLS**: `tls = "explicit"` sends `AUTH TLS` before logging in (RFC 4217), `"implicit"`
  speaks TLS from the first byte (port 990); both then protect every data connection
  (`PBSZ 0`, `PROT P`) with the control connection's TLS session resumed, which
  vsftpd's and ProFTPD's defaults require. The certificate is verified against the
  system's CAs or `ca_file`, host name included. A server that refuses `AUTH TLS` is
  never talked to in the clear instead.
- **Passive** data connections by default (to the control connection's address, not
  the one the server names: a server behind NAT often names a private one).
- **Listing**: `MLSD` (RFC 3659: exact size and UTC mtime per entry, types told
  apart) when the server's `FEAT` offers `MLST`; else `NLST`, then `SIZE` and `MDTM`
  for each name matching the pattern (two round trips a file: with thousands of files
  kept on the server, use `after = "move:DIR"` or `"delete"`). A name that `SIZE`
  refuses is a directory or not readable, and is not listed.
- **Reading**: one `RETR` per file, in binary, streamed. Only the server's final 226
  reply says a file was sent whole (FTP ends a transfer by closing the connection,
  so a cut connection looks like an end): anything else fails the poll, and the
  collector reads the file again from its committed row. A file is always read from
  its first byte (no `REST`): the collector skips the rows already confirmed, which
  also works for compressed files.
- **Names** are UTF-8 (`OPTS UTF8 ON` where offered); a listed name that is not is
  logged and passed over. Server replies are decoded leniently: a Latin-1 banner
  must not stop a source.

Why the standard library's `ftplib`: it speaks all of the above, is maintained with
Python, and needs only the small subclass below: implicit TLS, lenient replies, and TLS
session reuse on data connections (ftplib lacks it, CPython issue 63699; so does aioftp,
its issue 186, the asyncio client that would be the alternative; the other clients on
PyPI are layers over ftplib).
The password is sent once, in `PASS`, and never logged: ftplib's debug output stays
off (debugging = 0), and our messages name the user only.
"""

from __future__ import annotations

import builtins
import calendar
import contextlib
import fnmatch
import ftplib
import logging
import posixpath
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from streamer.config import Secret
from streamer.errors import (
    AuthError,
    ConfigError,
    SftpUnavailableError,
    StreamerError,
    TlsCertificateError,
)
from streamer.sources.base import RemoteFile

log = logging.getLogger(__name__)

Tls = Literal["none", "explicit", "implicit"]
READ_CHUNK_BYTES = 1 << 18  # one recv() from the data connection at most
MAX_LISTING_LINE = 8192  # an MLSD or NLST line longer than this is not a file of ours
MLST_FACTS = "type;size;modify;"


class _Client(ftplib.FTP_TLS):
    """ftplib's FTPS client with implicit TLS, TLS session reuse and lenient replies.

    Used for plain FTP too (then `AUTH TLS` is never sent and data connections stay
    plain); one class keeps one code path.
    """

    def __init__(self, context: ssl.SSLContext, *, implicit: bool, timeout: float) -> None:
        super().__init__(context=context, timeout=timeout)
        self.implicit = implicit
        self.protect_data = False

    def connect(
        self,
        host: str = "",
        port: int = 0,
        timeout: float = -999,
        source_address: tuple[str, int] | None = None,
    ) -> str:
        """ftplib's connect, with TLS from the first byte if implicit."""
        self.host, self.port = host, port
        if timeout != -999:
            self.timeout = timeout
        sock = socket.create_connection((host, port), self.timeout)
        try:
            if self.implicit:
                sock = self.context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.af = sock.family
        self.file = sock.makefile("r", encoding=self.encoding, errors="replace")
        self.welcome = self.getresp()
        return self.welcome

    def auth(self) -> str:
        """`AUTH TLS`, then the control connection is TLS (replies decoded leniently)."""
        resp = self.voidcmd("AUTH TLS")
        assert self.sock is not None  # connected: voidcmd answered
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)
        self.file = self.sock.makefile("r", encoding=self.encoding, errors="replace")
        return resp

    def prot_p(self) -> str:
        resp = super().prot_p()
        self.protect_data = True
        return resp

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, int | None]:
        """A data connection, TLS-protected by resuming the control connection's session."""
        # S321: plain FTP is what the provider offers customers without SFTP (config.py
        # and the log say so); over FTPS this data connection is TLS, as below.
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)  # noqa: S321
        if self.protect_data:
            session = self.sock.session if isinstance(self.sock, ssl.SSLSocket) else None
            try:
                conn = self.context.wrap_socket(conn, server_hostname=self.host, session=session)
            except BaseException:
                conn.close()
                raise
        return conn, size


def _code(exc: ftplib.Error) -> str:
    """The three-digit reply code of an ftplib error ('' if it has none)."""
    text = str(exc)
    return text[:3] if text[:3].isdigit() else ""


class FtpServer:
    """How to reach and log in to one FTP or FTPS server; `connect()` opens a session."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: Secret,
        *,
        tls: Tls = "explicit",
        ca_file: Path | None = None,
        verify: bool = True,
        passive: bool = True,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.tls = tls
        self.ca_file = ca_file
        self.verify = verify
        self.passive = passive
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._listing: str | None = None  # how the server lists, once told (for the log)

    def __repr__(self) -> str:
        return f"FtpServer({self.user}@{self.host}:{self.port}, tls={self.tls})"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _what(self) -> str:
        return "FTP" if self.tls == "none" else "FTPS"

    def _context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load ca_file {self.ca_file}: {exc}: it must hold PEM certificates"
            ) from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def connect(self) -> FtpSession:
        """Connect (TLS as configured), log in, protect data connections, learn the listing."""
        client = _Client(
            self._context(), implicit=self.tls == "implicit", timeout=self.connect_timeout_s
        )
        client.set_debuglevel(0)  # ftplib's debug output would show the commands
        client.set_pasv(self.passive)
        where = f"{self._what} server {self.address}"
        try:
            client.connect(self.host, self.port)
            if self.tls == "explicit":
                try:
                    client.auth()
                except ftplib.error_perm as exc:
                    raise ConfigError(
                        f"{where} does not offer explicit FTPS (AUTH TLS answered "
                        f"{_code(exc) or exc}): ask the provider whether it speaks implicit "
                        'FTPS (then ftps_mode = "implicit", port 990) or only plain FTP'
                    ) from None
            try:
                client.login(self.user, self.password.reveal(), secure=False)
            except ftplib.error_perm as exc:
                raise AuthError(
                    f"{where} refused to log in user {self.user!r} (reply {_code(exc) or '5xx'}): "
                    "check the FTP user and password"
                ) from None
            if self.tls != "none":
                try:
                    client.prot_p()
                except ftplib.error_perm as exc:
                    raise ConfigError(
                        f"{where} refused to encrypt data connections (PROT P answered "
                        f"{_code(exc) or exc}): the files would travel in the clear; ask the "
                        "provider"
                    ) from None
            assert client.sock is not None  # logged in over it
            client.sock.settimeout(self.read_timeout_s)
            client.timeout = self.read_timeout_s  # data connections get it too
            features = self._features(client)
            if "UTF8" in features:
                with contextlib.suppress(ftplib.Error):
                    client.sendcmd("OPTS UTF8 ON")
            mlsd = "MLST" in features
            if mlsd:
                with contextlib.suppress(ftplib.Error):
                    client.sendcmd(f"OPTS MLST {MLST_FACTS}")
            client.voidcmd("TYPE I")  # binary: the bytes as stored, and what SIZE counts
        except BaseException as exc:
            _close(client)
            raise self._error("connect", exc) from exc
        self._announce("MLSD" if mlsd else "NLST")
        return FtpSession(self, client, mlsd=mlsd)

    @staticmethod
    def _features(client: _Client) -> set[str]:
        """The FEAT reply's feature names, upper case; none if FEAT is not understood."""
        try:
            reply = client.sendcmd("FEAT")
        except ftplib.error_perm:
            return set()
        lines = reply.splitlines()[1:-1]  # "211-Features:" ... "211 End"
        return {line.strip().split(" ")[0].upper() for line in lines if line.strip()}

    def _announce(self, listing: str) -> None:
        if self._listing == listing:
            return
        self._listing = listing
        if listing == "MLSD":
            log.info("%s server %s lists with MLSD", self._what, self.address)
        else:
            log.info(
                "%s server %s does not offer MLSD (no MLST in FEAT): listing with NLST, "
                "then SIZE and MDTM for each matching file", self._what, self.address,
            )  # fmt: skip

    def _error(self, action: str, exc: BaseException) -> BaseException:
        """Our error for an ftplib, TLS or socket error while talking to this server."""
        where = f"{self._what} server {self.address}"
        if isinstance(exc, StreamerError):
            return exc
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TlsCertificateError(
                f"{where}: its TLS certificate is not trusted ({exc.verify_message}): set "
                "ca_file to the CA that signed it (ask the provider), and check that host "
                "is the name on the certificate"
            )
        if isinstance(exc, TimeoutError):
            return SftpUnavailableError(f"{where}: timed out trying to {action}", kind="timeout")
        if isinstance(exc, ssl.SSLError):
            reason = getattr(exc, "reason", None) or exc  # set where OpenSSL raised it
            return SftpUnavailableError(f"{where}: TLS failed trying to {action}: {reason}")
        if isinstance(exc, ftplib.Error | EOFError | OSError):
            detail = str(exc).strip() or type(exc).__name__
            return SftpUnavailableError(f"{where}: cannot {action}: {detail}")
        return exc


def _close(client: _Client) -> None:
    """QUIT politely if the connection still works; close it in any case."""
    with contextlib.suppress(ftplib.Error, OSError, EOFError, ValueError):
        if client.sock is not None:
            client.quit()
    client.close()


def _mtime(text: str) -> int:
    """An MLSD `modify` fact or MDTM reply, YYYYMMDDHHMMSS[.sss] in UTC, as Unix seconds."""
    digits = text.strip()[:14]
    try:
        return calendar.timegm(time.strptime(digits, "%Y%m%d%H%M%S"))
    except ValueError:
        return 0  # unknown: the settle rule still watches the size


def parse_mlsd_line(line: str) -> tuple[str, dict[str, str]]:
    """An MLSD entry, `fact=value;fact=value; name`, as (name, facts with lower-case keys)."""
    if line.startswith(" "):
        return line[1:], {}
    facts_text, sep, name = line.partition("; ")
    if not sep:
        return line, {}
    facts: dict[str, str] = {}
    for fact in facts_text.split(";"):
        key, eq, value = fact.partition("=")
        if eq:
            facts[key.strip().lower()] = value
    return name, facts


class FtpSession:
    """One logged-in FTP connection; ftplib's errors become ours (see `FtpServer._error`).

    FTP has one transfer at a time per connection: a read left unfinished (the parser
    stopped at a fault) is ended before the next command, its reply read.
    """

    def __init__(self, server: FtpServer, client: _Client, *, mlsd: bool) -> None:
        self.server = server
        self._client = client
        self._mlsd = mlsd
        self._transfer: socket.socket | None = None
        self._made: set[str] = set()  # directories this session made or found

    def __enter__(self) -> FtpSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        # A connection that already broke may fail to end its transfer: the error that
        # matters is raised already.
        with contextlib.suppress(StreamerError):
            self._abandon_transfer()
        _close(self._client)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, PermissionError):
            raise  # the server's answer about one path: the caller decides
        except Exception as exc:
            raise self.server._error(action, exc) from exc

    @staticmethod
    def _path_error(exc: ftplib.error_perm, path: str) -> OSError:
        """A 5xx about one path: gone, or not ours to touch (servers word 550 both ways)."""
        text = str(exc)
        if "ermission" in text or "denied" in text.lower():
            return PermissionError(text if path in text else f"{path}: {text}")
        return FileNotFoundError(text if path in text else f"{path}: {text}")

    # --- transfers ---

    def _open(self, command: str) -> socket.socket:
        self._abandon_transfer()
        conn = self._client.transfercmd(command)
        self._transfer = conn
        return conn

    def _complete(self, conn: socket.socket) -> None:
        """The transfer's data is all in: close it and require the server's 2xx."""
        self._transfer = None
        if isinstance(conn, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError):
                conn.unwrap()  # close_notify, as ftplib does; a server may skip its own
        conn.close()
        self._client.voidresp()  # 226; 426/451 if the server knows it was cut short

    def _abandon_transfer(self) -> None:
        """End a transfer left half-read: close its connection and read the reply to it."""
        conn, self._transfer = self._transfer, None
        if conn is None:
            return
        conn.close()
        try:
            self._client.getresp()  # 426 (aborted) or 226 (it had all been sent)
        except (ftplib.error_temp, ftplib.error_perm):
            pass
        except (ftplib.Error, OSError, EOFError) as exc:
            # Out of step with the server: this connection cannot be trusted any more.
            self._client.close()
            raise self.server._error("end a transfer", exc) from exc

    def _lines(self, command: str) -> Iterator[str]:
        """The UTF-8 lines of a listing transfer; an undecodable one is logged and skipped."""
        conn = self._open(command)
        with conn.makefile("rb") as data:
            while raw := data.readline(MAX_LISTING_LINE + 1):
                text = raw.rstrip(b"\r\n")
                if not text or len(raw) > MAX_LISTING_LINE:
                    continue
                try:
                    yield text.decode("utf-8")
                except UnicodeDecodeError:
                    log.warning(
                        "%s server %s lists a name that is not UTF-8 (%r): passed over",
                        self.server._what, self.server.address, text[:200],
                    )  # fmt: skip
        self._complete(conn)

    # --- the FileSession protocol ---

    def list(self, directory: str, pattern: str) -> list[RemoteFile]:
        """The regular files in `directory` whose names match the glob `pattern`, by name."""
        try:
            with self._errors(f"list {directory}"):
                try:
                    files = (
                        self._list_mlsd(directory)
                        if self._mlsd
                        else self._list_nlst(directory, pattern)
                    )
                except ftplib.error_perm as exc:
                    if self._mlsd and _code(exc) in ("500", "501", "502"):
                        # FEAT said MLST, yet MLSD is not understood: list the other way.
                        self._mlsd = False
                        self.server._announce("NLST")
                        files = self._list_nlst(directory, pattern)
                    else:
                        raise self._path_error(exc, directory) from None
        except (FileNotFoundError, PermissionError) as exc:
            raise ConfigError(
                f"{self.server._what} server {self.server.address}: cannot list directory "
                f"{directory!r} ({exc}): check directory and the user's rights"
            ) from None
        matching = [f for f in files if fnmatch.fnmatchcase(f.name, pattern)]
        return sorted(matching, key=lambda f: f.name)

    def _list_mlsd(self, directory: str) -> builtins.list[RemoteFile]:
        files = []
        for line in self._lines(f"MLSD {directory}"):
            name, facts = parse_mlsd_line(line)
            if facts.get("type", "").lower() != "file" or "/" in name:
                continue  # cdir, pdir, dir, symlinks (OS.unix=slink...)
            size = facts.get("size")
            if size is None or not size.isdigit():
                size = str(self._size(posixpath.join(directory, name)) or 0)
            files.append(RemoteFile(name, int(size), _mtime(facts.get("modify", ""))))
        return files

    def _list_nlst(self, directory: str, pattern: str) -> builtins.list[RemoteFile]:
        try:
            names = [posixpath.basename(n.rstrip("/")) for n in self._lines(f"NLST {directory}")]
        except ftplib.error_temp as exc:
            if _code(exc) != "450":  # "No files found": ProFTPD's answer for an empty one
                raise
            names = []
        if not names:
            # vsftpd lists a directory that is not there as empty: say so instead.
            self._check_directory(directory)
        files = []
        for name in sorted(set(names)):
            if not fnmatch.fnmatchcase(name, pattern):
                continue  # two round trips a file: only for the candidates
            path = posixpath.join(directory, name)
            size = self._size(path)
            if size is None:
                continue  # a directory, or not for us to read
            files.append(RemoteFile(name, size, self._mdtm(path)))
        return files

    def _check_directory(self, directory: str) -> None:
        """Raise a path error if `directory` is not one we may enter."""
        here = self._client.pwd()
        try:
            self._client.cwd(directory)
        except ftplib.error_perm as exc:
            raise self._path_error(exc, directory) from None
        self._client.cwd(here)

    def _size(self, path: str) -> int | None:
        try:
            size = self._client.size(path)
        except ftplib.error_perm:
            return None
        return size if size is not None and size >= 0 else None

    def _mdtm(self, path: str) -> int:
        try:
            reply = self._client.sendcmd(f"MDTM {path}")
        except ftplib.error_perm:
            return 0  # MDTM not offered: the settle rule still watches the size
        return _mtime(reply[4:]) if reply.startswith("213") else 0

    def read(self, path: str, on_bytes: Callable[[int], object]) -> Iterator[bytes]:
        """The file's bytes as they arrive (`RETR`); FileNotFoundError if it went."""
        with self._errors(f"open {path}"):
            try:
                conn = self._open(f"RETR {path}")
            except ftplib.error_perm as exc:
                raise self._path_error(exc, path) from None
        try:
            while True:
                with self._errors(f"read {path}"):
                    data = conn.recv(READ_CHUNK_BYTES)
                if not data:
                    break
                on_bytes(len(data))
                yield data
            with self._errors(f"read {path} to its end"):
                self._complete(conn)  # only the 226 says the file came whole
        finally:
            if self._transfer is conn:
                self._abandon_transfer()  # stopped early: the parser found a fault

    def move(self, path: str, directory: str) -> None:
        """Move `path` into `directory` (created if missing), replacing a file of that name."""
        self._abandon_transfer()
        target = posixpath.join(directory, posixpath.basename(path))
        with self._errors(f"move {path} to {directory}"):
            if directory not in self._made:
                # Made, or there already (a 550 then); if neither, the rename says why.
                with contextlib.suppress(ftplib.error_perm):
                    self._client.mkd(directory)
                self._made.add(directory)
            try:
                self._client.rename(path, target)
            except ftplib.error_perm as exc:
                # Servers that refuse to rename onto an existing file: replace it, as SFTP does.
                if self._size(target) is None:
                    raise self._path_error(exc, path) from None
                try:
                    self._client.delete(target)
                    self._client.rename(path, target)
                except ftplib.error_perm as again:
                    raise self._path_error(again, path) from None

    def remove(self, path: str) -> None:
        self._abandon_transfer()
        with self._errors(f"delete {path}"):
            try:
                self._client.delete(path)
            except ftplib.error_perm as exc:
                raise self._path_error(exc, path) from None
