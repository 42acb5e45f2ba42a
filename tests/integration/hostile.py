"""A hostile billing feed on loopback: each path answers in one hostile way (see BEHAVIOURS).

Raw sockets, one thread per connection, so an answer can be as slow, as large or as
broken as a hostile server (or a broken proxy) makes it. Every connection is
recorded: which case, what the request carried, and how long it lasted (from accept
until the client went away), so a test can check a deadline from the outside.
"""

from __future__ import annotations

import gzip
import html
import json
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote

from streamer.records import FIELDS


@dataclass
class Request:
    method: str
    path: str
    query: str  # raw, as sent
    body: str  # raw, as sent (the form of a POST)

    @property
    def params_raw(self) -> str:
        """The parameters exactly as they came over the wire (query or form)."""
        return self.query if self.method == "GET" else self.body

    @property
    def params(self) -> dict[str, str]:
        return dict(parse_qsl(self.params_raw, keep_blank_values=True))

    @property
    def case(self) -> str:
        return self.path.strip("/").split("/")[0]

    @property
    def tag(self) -> str:
        """What tells two feeds of one case apart: /CASE/TAG/billingfeed.php."""
        parts = self.path.strip("/").split("/")
        return parts[1] if len(parts) > 2 else ""


@dataclass
class Connection:
    case: str = ""
    tag: str = ""
    serial: int = 0  # the how-manieth request of this case and tag (from 0)
    request: Request | None = None
    accepted: float = 0.0
    lasted_s: float | None = None  # set once the connection is over
    sent_bytes: int = 0


class _GoneError(Exception):
    """The client closed or reset the connection."""


class _Client:
    """One accepted connection, with sends that notice the client leaving."""

    def __init__(self, sock: socket.socket, record: Connection) -> None:
        self.sock = sock
        self.record = record

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _GoneError from exc
        self.record.sent_bytes += len(data)

    def wait(self, seconds: float) -> None:
        """Wait, but return at once (raising _GoneError) if the client goes away meanwhile."""
        readable, _, _ = select.select([self.sock], [], [], seconds)
        if readable:
            try:
                data = self.sock.recv(1024)
            except OSError as exc:
                raise _GoneError from exc
            if not data:
                raise _GoneError

    def send_slowly(self, data: bytes, gap_s: float) -> None:
        for i in range(len(data)):
            self.send(data[i : i + 1])
            self.wait(gap_s)

    def stream(self, chunks: Iterator[bytes]) -> None:
        for chunk in chunks:
            self.send(chunk)


def _head(status: str = "200 OK", content_type: str = "text/plain", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def _whole(client: _Client, body: bytes, **headers: str) -> None:
    client.send(_head(**headers, Content_Length=str(len(body))) + body)


def _endless(piece: bytes) -> Iterator[bytes]:
    chunk = piece * max(1, (64 * 1024) // len(piece))
    while True:
        yield chunk


# --- bombs, built in milliseconds -----------------------------------------------------------


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC-32 of A+B from crc(A), crc(B) and len(B)."""
    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = _gf2_square(odd)
    odd = _gf2_square(even)
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def _crc32_of_repeats(crc: int, length: int, n: int) -> int:
    """The CRC-32 of `n` copies of a block with CRC `crc` and `length` bytes (by doubling)."""
    total: int | None = None
    while n:
        if n & 1:
            total = crc if total is None else crc32_combine(total, crc, length)
        n >>= 1
        if n:
            crc, length = crc32_combine(crc, crc, length), length * 2
    assert total is not None
    return total


def gzip_of_repeated(byte: bytes, n_mib: int) -> bytes:
    """A valid gzip member of `n_mib` MiB of `byte`, without compressing all of it.

    After a sync flush, zlib's output for each further MiB of the same byte is the
    same bytes (the window holds only that byte), so the middle is one block repeated;
    the CRC comes from crc32_combine. Checked against zlib on a small size.
    """
    block = byte * (1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH)
    middle = compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert middle == again, "zlib's steady state changed: build the bomb the slow way"
    last = compressor.flush()
    crc = _crc32_of_repeats(zlib.crc32(block), len(block), n_mib)
    header = b"\x1f\x8b\x08\x00\0\0\0\0\x02\xff"
    trailer = struct.pack("<II", crc, (n_mib << 20) & 0xFFFFFFFF)
    return header + first + middle * (n_mib - 1) + last + trailer


def _check_bomb_builder() -> None:
    for byte, n in ((b"\0", 3), (b"\n", 5)):
        assert gzip.decompress(gzip_of_repeated(byte, n)) == byte * (n << 20)


# --- what each case does --------------------------------------------------------------------

Behaviour = Callable[[_Client, Request, "HostileFeed"], None]


def echo_text(client: _Client, request: Request, feed: HostileFeed) -> None:
    # A proxy's or the provider's error text, repeating the request back.
    p = request.params
    body = (
        f"Error: unsupported request: {request.params_raw}\n"
        f"login={p.get('login')} password={p.get('password')}\n"
    )
    _whole(client, body.encode())


def echo_json(client: _Client, request: Request, feed: HostileFeed) -> None:
    body = {"error": "unsupported request", "request": request.params, "raw": request.params_raw}
    _whole(client, json.dumps(body).encode(), content_type="application/json")


def echo_json_array(client: _Client, request: Request, feed: HostileFeed) -> None:
    body = [{"error": "unsupported request", "password": request.params.get("password")}]
    _whole(client, json.dumps(body, ensure_ascii=False).encode(), content_type="application/json")


def echo_html(client: _Client, request: Request, feed: HostileFeed) -> None:
    password = html.escape(request.params.get("password", ""))
    body = (
        f"<html><body><p>password={password}</p><h1>400 Bad Request</h1>"
        f"<pre>{html.escape(request.params_raw)}</pre></body></html>"
    )
    _whole(client, body.encode(), content_type="text/html")


def late_auth_text(client: _Client, request: Request, feed: HostileFeed) -> None:
    # The refusal comes after the 512 bytes the client sniffs for one: plain text then.
    body = "\n" * 600 + f"Error: invalid login or password ({request.params_raw})\n"
    _whole(client, body.encode())


def slow_auth_text(client: _Client, request: Request, feed: HostileFeed) -> None:
    # A short refusal arriving in pieces: the client must wait for all of it.
    body = f"Invalid password {request.params.get('password')} for login {request.params_raw}"
    data = body.encode()
    client.send(_head(Content_Length=str(len(data))))
    for i in range(0, len(data), len(data) // 3 + 1):
        client.send(data[i : i + len(data) // 3 + 1])
        client.wait(0.3)


ENCODINGS: dict[str, Callable[[str], str]] = {
    "raw": lambda text: text,
    "url": lambda text: quote(text, safe=""),
    "json": lambda text: json.dumps(text)[1:-1],
    "html": html.escape,
}
# (characters of the encoded password an 80-character excerpt shows, the encoding),
# one per request in turn; some cut inside an escape (url 9: "Qx9%26p%2").
CUT_VARIANTS = [(5, "raw"), (13, "raw"), (9, "url"), (20, "url"), (15, "json"), (12, "html")]
TAIL_VARIANTS = [(7, "raw"), (10, "url"), (9, "json"), (6, "html")]
EXCERPT_CHARS = 80  # as streamer/formats.py shows a body


def echo_cut(client: _Client, request: Request, feed: HostileFeed) -> None:
    # The first record is text echoing the password where the client's excerpt cuts it:
    # only its first few characters show, and no "password=" before them.
    shown, encoding = CUT_VARIANTS[client.record.serial % len(CUT_VARIANTS)]
    secret = ENCODINGS[encoding](request.params.get("password", ""))
    lead = "Error: unsupported request from 81234567 with credential "
    lead = (lead * 2)[: EXCERPT_CHARS - shown]
    _whole(client, f"{lead}{secret} (echoed)\n".encode())


def echo_tail(client: _Client, request: Request, feed: HostileFeed) -> None:
    # An unclosed JSON array: the client's message shows the body's last 80 characters,
    # which begin inside the echoed password (a suffix of it, after a cut).
    shown, encoding = TAIL_VARIANTS[client.record.serial % len(TAIL_VARIANTS)]
    secret = ENCODINGS[encoding](request.params.get("password", ""))
    if encoding != "json":
        secret = json.dumps(secret)[1:-1]  # a JSON string holds it, escaped as JSON
    tail = " " + "y" * (EXCERPT_CHARS - shown - 1)
    body = '[{"note": "' + "x" * 100 + secret + tail
    _whole(client, body.encode(), content_type="application/json")


def redirect_echo(client: _Client, request: Request, feed: HostileFeed) -> None:
    # A login redirect whose Location (and another header) repeat the query.
    target = quote(f"{request.path}?{request.params_raw}", safe="")
    client.send(
        _head(
            "302 Found",
            Location=f"/login?next={target}",
            X_Original_Request=request.params_raw,
            Content_Length="0",
        )
    )


def bomb_gzip_gzip_1g(client: _Client, request: Request, feed: HostileFeed) -> None:
    _whole(client, feed.bomb_1g, Content_Encoding="gzip, gzip")


def bomb_gzip_gzip_3g(client: _Client, request: Request, feed: HostileFeed) -> None:
    _whole(client, feed.bomb_3g, Content_Encoding="gzip, gzip")


def huge_body(client: _Client, request: Request, feed: HostileFeed) -> None:
    # Lines of spaces, which the parser skips, without end: only a cap can stop it.
    client.send(_head())
    client.stream(_endless(b" " * 1023 + b"\n"))


def endless_line(client: _Client, request: Request, feed: HostileFeed) -> None:
    client.send(_head())
    client.stream(_endless(b"A" * 1024))


def nested_brackets(client: _Client, request: Request, feed: HostileFeed) -> None:
    _whole(client, b"[" * (8 << 20), content_type="application/json")


def many_fields(client: _Client, request: Request, feed: HostileFeed) -> None:
    _whole(client, b"a," * 400_000 + b"\n")


def many_json_keys(client: _Client, request: Request, feed: HostileFeed) -> None:
    element = {f"k{i}": "v" for i in range(60_000)}
    _whole(client, json.dumps([element]).encode(), content_type="application/json")


def slow_headers(client: _Client, request: Request, feed: HostileFeed) -> None:
    client.send_slowly(_head(Content_Length="10") + b"0123456789", gap_s=1.0)


def slow_body(client: _Client, request: Request, feed: HostileFeed) -> None:
    header = ",".join(FIELDS).encode() + b"\n"
    client.send(_head(Content_Length=str(len(header) + 100_000)) + header)
    client.send_slowly(b"\n" * 100_000, gap_s=1.0)


BEHAVIOURS: dict[str, Behaviour] = {
    "echo-text": echo_text,
    "echo-json": echo_json,
    "echo-json-array": echo_json_array,
    "echo-html": echo_html,
    "late-auth-text": late_auth_text,
    "slow-auth-text": slow_auth_text,
    "redirect-echo": redirect_echo,
    "echo-cut": echo_cut,
    "echo-tail": echo_tail,
    "bomb-gzip-gzip-1g": bomb_gzip_gzip_1g,
    "bomb-gzip-gzip-3g": bomb_gzip_gzip_3g,
    "huge-body": huge_body,
    "endless-line": endless_line,
    "nested-brackets": nested_brackets,
    "many-fields": many_fields,
    "many-json-keys": many_json_keys,
    "slow-headers": slow_headers,
    "slow-body": slow_body,
}


@dataclass
class HostileFeed:
    """The server: `url(case)` is a billingfeed.php that behaves as BEHAVIOURS[case]."""

    connections: list[Connection] = field(default_factory=list)
    bomb_1g: bytes = b""
    bomb_3g: bytes = b""

    def __post_init__(self) -> None:
        _check_bomb_builder()
        # 1 GiB of newlines (the parser skips blank lines: only a limit can stop it) and
        # 3 GiB of zeros, each gzipped twice: about 2.5 kB and 7 kB on the wire.
        self.bomb_1g = gzip.compress(gzip_of_repeated(b"\n", 1024), 9)
        self.bomb_3g = gzip.compress(gzip_of_repeated(b"\0", 3072), 9)
        self._lock = threading.Lock()
        self._serials: dict[tuple[str, str], int] = {}
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="hostile-feed", daemon=True)
        self._thread.start()

    def url(self, case: str, tag: str) -> str:
        assert case in BEHAVIOURS, case
        return f"http://127.0.0.1:{self.port}/{case}/{tag}/billingfeed.php"

    def of(self, case: str, tag: str | None = None) -> list[Connection]:
        with self._lock:
            return [c for c in self.connections if c.case == case and tag in (None, c.tag)]

    def finished(self, case: str, tag: str | None = None) -> list[Connection]:
        return [c for c in self.of(case, tag) if c.lasted_s is not None]

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            record = Connection(accepted=time.monotonic())
            with self._lock:
                self.connections.append(record)
            threading.Thread(target=self._serve, args=(sock, record), daemon=True).start()

    def _serve(self, sock: socket.socket, record: Connection) -> None:
        with sock:
            try:
                request = _read_request(sock)
                if request is None:
                    return
                with self._lock:
                    key = (request.case, request.tag)
                    record.serial = self._serials.get(key, 0)
                    self._serials[key] = record.serial + 1
                    record.request, record.case, record.tag = request, request.case, request.tag
                behaviour = BEHAVIOURS.get(request.case)
                if behaviour is None:
                    _whole(_Client(sock, record), b"no such case\n", status="404 Not Found")
                    return
                client = _Client(sock, record)
                behaviour(client, request, self)
                # The answer is out: wait for the client to hang up (it closes after a body).
                client.wait(30)
            except _GoneError:
                pass
            finally:
                record.lasted_s = time.monotonic() - record.accepted


def _read_request(sock: socket.socket) -> Request | None:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    sock.settimeout(None)
    path, _, query = target.partition("?")
    return Request(method, path, query, body.decode("latin-1"))
