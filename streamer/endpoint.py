"""A small HTTP/1.1 server for one WSGI app that no client can tie up; and its access rules.

The metrics port faces the network, so (as Prometheus' own exporter toolkit does) it
must survive idle, slow and greedy clients, and may need credentials and TLS:

- One thread watches every connection at once (`selectors`): it accepts, does the TLS
  handshake and reads the request head without blocking. A connection that has not
  sent a whole head within `request_timeout_s` of connecting, or that sends nothing
  for `idle_timeout_s`, is closed. Idle or slow clients never hold a worker.
- A complete request goes to a fixed pool of `workers` threads, which run the app and
  write the answer within `write_timeout_s`, then close the connection (one request
  per connection; `Connection: close`). Threads never grow with connections.
- At most `max_connections` connections are open; a new one beyond that replaces the
  oldest that is still sending its head. The listen backlog is `backlog`.
- `protect` wraps the app so that every path but the open ones (by default the
  probes `/healthz` and `/readyz`) needs basic auth or a bearer token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import logging
import queue
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from streamer.config import Secret

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) from PEM certificate and key files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # An encrypted key fails here (ssl.SSLError) instead of OpenSSL asking on the terminal.
    context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    return context


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who may read protected paths: a basic-auth user and password, a bearer token, or both."""

    basic_user: str = ""
    basic_password: Secret | None = None
    bearer_token: Secret | None = None

    def __post_init__(self) -> None:
        if bool(self.basic_user) != (self.basic_password is not None):
            raise ValueError("basic auth needs both a user and a password")
        if not self.basic_user and self.bearer_token is None:
            raise ValueError("give basic auth, a bearer token, or both")

    def allows(self, authorization: str) -> bool:
        """Whether an Authorization header's value carries these credentials."""
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.bearer_token is not None:
            return hmac.compare_digest(value.encode(), self.bearer_token.reveal().encode())
        if scheme.lower() == "basic" and self.basic_password is not None:
            try:
                user, _, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            # Both compared, whatever the first gives: no early answer to time.
            user_ok = hmac.compare_digest(user, self.basic_user.encode())
            password_ok = hmac.compare_digest(password, self.basic_password.reveal().encode())
            return user_ok and password_ok
        return False

    def challenges(self) -> list[tuple[str, str]]:
        """The WWW-Authenticate headers of a 401."""
        out = []
        if self.basic_password is not None:
            out.append(("WWW-Authenticate", 'Basic realm="cdr-streamer", charset="UTF-8"'))
        if self.bearer_token is not None:
            out.append(("WWW-Authenticate", 'Bearer realm="cdr-streamer"'))
        return out


def protect(
    app: WSGIApplication, credentials: Credentials, *, open_paths: Collection[str] = ()
) -> WSGIApplication:
    """`app`, answering 401 on every path but `open_paths` without the `credentials`.

    It knows no route: a path added to the app later (/status) is protected too.
    """

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path in open_paths or credentials.allows(environ.get("HTTP_AUTHORIZATION", "")):
            return app(environ, start_response)
        log.debug("refused %s %s from %s: no valid credentials",
                  environ.get("REQUEST_METHOD"), path, environ.get("REMOTE_ADDR"))  # fmt: skip
        body = b"credentials required\n"
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                *credentials.challenges(),
            ],
        )
        return [body]

    return guarded


class _BadRequestError(Exception):
    """Internal: a request head we cannot read."""


class _Conn:
    """One client connection, from accept to the end of its answer."""

    __slots__ = ("buf", "handshaking", "last", "opened", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str, now: float, *, tls: bool) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.opened = now
        self.last = now
        self.handshaking = tls

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _head_end(buf: bytearray) -> int:
    """The index just past the request head in `buf`, or -1 while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    end = buf.find(b"\n\n")  # a client that ends lines with LF alone
    return end + 2 if end >= 0 else -1


class HttpEndpoint:
    """Serves one WSGI app on host:port; see the module docstring for the bounds."""

    def __init__(
        self,
        app: WSGIApplication,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        workers: int = 4,
        backlog: int = 128,
        max_connections: int = 256,
        request_timeout_s: float = 10.0,
        idle_timeout_s: float = 5.0,
        write_timeout_s: float = 10.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.tls = tls
        self.workers = workers
        self.backlog = backlog
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._pending: dict[socket.socket, _Conn] = {}  # still sending their head, oldest first
        self._queue: queue.Queue[_Conn | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open = 0  # connections accepted and not yet closed
        self._stopping = False

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind (port 0: any free port, then in `port`) and serve in daemon threads."""
        if self._listener is not None:
            raise RuntimeError("the endpoint is already running")
        family, kind, proto, _, address = socket.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(self.backlog)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        wake = socket.socketpair()
        wake[0].setblocking(False)
        selector.register(wake[0], selectors.EVENT_READ)
        self._listener, self._selector, self._wake = listener, selector, wake
        self._stopping = False
        # Daemon threads: a client stuck in a write must not keep the process from exiting.
        loop = threading.Thread(
            target=self._loop, args=(selector, listener, wake[0]), name="health-server", daemon=True
        )
        self._threads = [loop]
        self._threads += [
            threading.Thread(target=self._work, name=f"health-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and release the port. Safe to call twice."""
        if self._listener is None or self._wake is None:
            return
        self._stopping = True
        self._wake[1].send(b"x")
        for _ in range(self.workers):
            self._queue.put(None)
        for thread in self._threads:
            thread.join(self.write_timeout_s + 1)
        for conn in self._pending.values():
            conn.close()
        self._pending.clear()
        if self._selector is not None:
            self._selector.close()
        self._listener.close()
        for end in self._wake:
            end.close()
        self._listener = self._selector = self._wake = None
        self._threads = []

    # --- the watching thread ------------------------------------------------------------

    def _loop(
        self, selector: selectors.BaseSelector, listener: socket.socket, wake: socket.socket
    ) -> None:
        while not self._stopping:
            events = selector.select(self._next_timeout_s())
            for key, _ in events:
                if key.fileobj is listener:
                    self._accept(listener, selector)
                elif key.fileobj is wake:
                    with contextlib.suppress(OSError):
                        wake.recv(64)
                else:
                    conn = self._pending.get(key.fileobj)  # type: ignore[call-overload]
                    if conn is not None:
                        self._advance(conn, selector)
            self._expire(selector)

    def _next_timeout_s(self) -> float:
        if not self._pending:
            return 1.0
        now = time.monotonic()
        soonest = min(self._deadline(conn) for conn in self._pending.values())
        return max(0.0, min(1.0, soonest - now))

    def _deadline(self, conn: _Conn) -> float:
        return min(conn.opened + self.request_timeout_s, conn.last + self.idle_timeout_s)

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: make room, and let the rest wait
                log.warning("metrics endpoint cannot accept a connection: %s", exc)
                if not self._drop_oldest(selector):
                    time.sleep(0.05)  # back off instead of spinning on a listener we cannot serve
                return
            with self._lock:
                full = self._open >= self.max_connections
            if full and not self._drop_oldest(selector):
                sock.close()  # every slot is a request being answered: this one waits for none
                continue
            sock.setblocking(False)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            conn = _Conn(sock, str(address[0]), time.monotonic(), tls=self.tls is not None)
            with self._lock:
                self._open += 1
            self._pending[sock] = conn
            selector.register(sock, selectors.EVENT_READ)

    def _drop_oldest(self, selector: selectors.BaseSelector) -> bool:
        """Close the connection that has waited longest for its head; False if none waits."""
        if not self._pending:
            return False
        self._drop(next(iter(self._pending.values())), selector)
        return True

    def _drop(self, conn: _Conn, selector: selectors.BaseSelector) -> None:
        self._pending.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn.sock)
        self._closed(conn)

    def _closed(self, conn: _Conn) -> None:
        conn.close()
        with self._lock:
            self._open -= 1

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn in [c for c in self._pending.values() if self._deadline(c) <= now]:
            log.debug("closing a connection from %s that sent no complete request", conn.peer)
            self._drop(conn, selector)

    def _advance(self, conn: _Conn, selector: selectors.BaseSelector) -> None:
        """Go on with the TLS handshake or the request head, as far as the data allows."""
        sock = conn.sock
        if conn.handshaking:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                selector.modify(sock, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                selector.modify(sock, selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", conn.peer, exc)
                self._drop(conn, selector)
                return
            conn.handshaking = False
            selector.modify(sock, selectors.EVENT_READ)
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                selector.modify(sock, selectors.EVENT_WRITE)
                return
            except OSError:
                self._drop(conn, selector)
                return
            if not data:  # the client left
                self._drop(conn, selector)
                return
            conn.buf += data
            conn.last = time.monotonic()
            if _head_end(conn.buf) >= 0:
                self._pending.pop(sock, None)
                selector.unregister(sock)
                self._queue.put(conn)
                return
            if len(conn.buf) > MAX_HEAD_BYTES:
                self._drop(conn, selector)
                return

    # --- the workers --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            try:
                self._serve(conn)
            except Exception as exc:  # a client that went away mid-answer, mostly
                log.debug("answering %s failed: %s", conn.peer, exc)
            finally:
                self._closed(conn)

    def _serve(self, conn: _Conn) -> None:
        deadline = time.monotonic() + self.write_timeout_s
        conn.sock.settimeout(self.write_timeout_s)
        try:
            environ = self._environ(conn)
        except _BadRequestError as exc:
            body = f"bad request: {exc}\n".encode()
            headers = [("Content-Type", "text/plain; charset=utf-8")]
            self._send(conn, "400 Bad Request", headers, body, deadline, head_only=False)
            return
        status, headers, body = self._call_app(environ)
        head_only = environ["REQUEST_METHOD"] == "HEAD"
        self._send(conn, status, headers, body, deadline, head_only=head_only)

    def _environ(self, conn: _Conn) -> WSGIEnvironment:
        end = _head_end(conn.buf)
        lines = bytes(conn.buf[:end]).decode("latin-1").split("\n")
        parts = lines[0].strip().split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequestError("not an HTTP/1.x request line")
        method, target, version = parts
        if target.startswith(("http://", "https://")):  # absolute form
            split = urlsplit(target)
            target = split.path + (f"?{split.query}" if split.query else "")
        path, _, query = target.partition("?")
        environ: WSGIEnvironment = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.host or "localhost",
            "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": version,
            "REMOTE_ADDR": conn.peer,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self.tls is not None else "http",
            "wsgi.input": io.BytesIO(bytes(conn.buf[end:])),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        headers = [line.rstrip("\r") for line in lines[1:] if line.strip()]
        if len(headers) > MAX_HEADERS:
            raise _BadRequestError("too many headers")
        for line in headers:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequestError("a malformed header line")
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = f"HTTP_{key}"
            value = value.strip()
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _call_app(self, environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]], bytes]:
        """(status, headers, body) of the app's answer."""
        status = "500 Internal Server Error"
        headers: list[tuple[str, str]] = []

        def start_response(
            answer_status: str, answer_headers: list[tuple[str, str]], exc_info: object = None
        ) -> Callable[[bytes], object]:
            nonlocal status, headers
            status, headers = answer_status, list(answer_headers)
            return lambda data: None  # the apps here return their body instead

        result = self.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return status, headers, body

    def _send(
        self,
        conn: _Conn,
        status: str,
        headers: list[tuple[str, str]],
        body: bytes,
        deadline: float,
        *,
        head_only: bool,
    ) -> None:
        names = {name.lower() for name, _ in headers}
        lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
        if "content-length" not in names and not head_only:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"answering {conn.peer} took over {self.write_timeout_s:g} s")
            conn.sock.settimeout(left)
            sent = conn.sock.send(view)
            view = view[sent:]
