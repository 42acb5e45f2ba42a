"""The metrics endpoint's server under idle, slow and greedy clients; credentials; TLS.

All on loopback, in process: the real server (streamer/endpoint.py) and real sockets.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry
from tls_cert import make_cert

from streamer.config import Secret
from streamer.endpoint import Credentials, HttpEndpoint, tls_context
from streamer.health import HealthServer
from streamer.metrics import Metrics

TOKEN = "t0ken-for/metrics+scrapes"
USER, PASSWORD = "prometheus", "scr&pe:pa ss"


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    body = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {environ['QUERY_STRING']}\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body.encode()]


@pytest.fixture
def endpoint() -> Iterator[Callable[..., HttpEndpoint]]:
    started: list[HttpEndpoint] = []

    def start(app: Callable[..., Iterable[bytes]] = hello, **kwargs: object) -> HttpEndpoint:
        server = HttpEndpoint(app, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], str]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def server_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("health-")]


def wait_closed_by_server(sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the server closed `sock` (recv sees EOF or a reset)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_answers_a_request_and_closes_the_connection(
    endpoint: Callable[..., HttpEndpoint],
) -> None:
    server = endpoint()
    status, headers, body = request(server.port, "/metrics?name%5B%5D=x")
    assert (status, body) == (200, "GET /metrics name%5B%5D=x\n")
    assert headers["Connection"] == "close"
    status, headers, body = request(server.port, "/x", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, "", str(len("HEAD /x \n")))


def test_three_hundred_idle_connections_neither_add_threads_nor_block_a_scrape(
    endpoint: Callable[..., HttpEndpoint],
) -> None:
    server = endpoint(workers=4, max_connections=512, idle_timeout_s=30, request_timeout_s=30)
    threads = server_threads()
    assert len(threads) == 1 + 4
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        half_sent = idle[:100]
        for sock in half_sent:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = time.monotonic()
        status, _, _ = request(server.port, "/metrics")
        answered_s = time.monotonic() - started
        assert status == 200
        assert server_threads() == threads
        # Not a timing test: the point is that the scrape did not wait for any idle
        # client's timeout (30 s here).
        assert answered_s < 10
    finally:
        for sock in idle:
            sock.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(
    endpoint: Callable[..., HttpEndpoint],
) -> None:
    server = endpoint(idle_timeout_s=0.5, request_timeout_s=30)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert wait_closed_by_server(sock, timeout_s=10) < 0.5 + 1


def test_a_slow_request_head_is_cut_off_at_the_request_timeout(
    endpoint: Callable[..., HttpEndpoint],
) -> None:
    server = endpoint(idle_timeout_s=5, request_timeout_s=1)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.monotonic()
        sent = 0
        try:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: slowloris\r\n" * 10:
                sock.sendall(bytes([byte]))  # one byte every 0.1 s: never idle for 5 s
                sent += 1
                time.sleep(0.1)  # the client's pace, not a wait for the server
        except (BrokenPipeError, ConnectionResetError):
            pass
        closed_after_s = time.monotonic() - started + wait_closed_by_server(sock, timeout_s=10)
    assert closed_after_s < 1 + 1
    assert sent < 40


def test_a_full_house_of_idle_connections_makes_room_for_a_new_one(
    endpoint: Callable[..., HttpEndpoint],
) -> None:
    server = endpoint(max_connections=10, idle_timeout_s=30, request_timeout_s=30)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    try:
        assert request(server.port, "/after")[0] == 200
        # The oldest idle one made room.
        assert wait_closed_by_server(idle[0], timeout_s=10) < 10
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize(
    "head",
    [b"NONSENSE\r\n\r\n", b"GET / SPDY/3\r\n\r\n", b"GET / HTTP/1.1\r\n bad: folded\r\n\r\n"],
)
def test_a_malformed_request_is_a_400(endpoint: Callable[..., HttpEndpoint], head: bytes) -> None:
    server = endpoint()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_an_oversized_request_head_is_dropped(endpoint: Callable[..., HttpEndpoint]) -> None:
    server = endpoint()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 64 * 1024)
        assert wait_closed_by_server(sock, timeout_s=10) < 10


# --- credentials and TLS, through the real /metrics /healthz /readyz app --------------------


@pytest.fixture
def health() -> Iterator[Callable[..., HealthServer]]:
    started: list[HealthServer] = []
    metrics = Metrics(CollectorRegistry())

    def start(**kwargs: object) -> HealthServer:
        server = HealthServer(metrics.registry, list, host="127.0.0.1", port=0, **kwargs)  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


BEARER = {"Authorization": f"Bearer {TOKEN}"}
BOTH = Credentials(USER, Secret(PASSWORD), Secret(TOKEN))


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"bearer {TOKEN}"}, 200),  # the scheme is case-insensitive
        (BEARER, 200),
        (basic(USER, PASSWORD), 200),
        (basic(USER, "wrong"), 401),
        (basic("someone", PASSWORD), 401),
        ({"Authorization": "Basic not-base64!"}, 401),
        ({"Authorization": TOKEN}, 401),
    ],
)
def test_metrics_needs_the_credentials(
    health: Callable[..., HealthServer], headers: dict[str, str], status: int
) -> None:
    server = health(credentials=BOTH)
    got, answer_headers, body = request(server.port, "/metrics", headers=headers)
    assert got == status
    if status == 401:
        assert answer_headers["WWW-Authenticate"].startswith(("Basic", "Bearer"))
        assert "cdr_streamer" not in body
    else:
        assert "cdr_streamer_build_info" in body


def test_every_path_but_the_probes_is_protected(health: Callable[..., HealthServer]) -> None:
    server = health(credentials=Credentials(bearer_token=Secret(TOKEN)))
    assert request(server.port, "/healthz")[0] == 200
    assert request(server.port, "/readyz")[0] == 200
    # Paths the app does not know (yet: /status) are protected too, not just /metrics.
    for path in ("/", "/status", "/metrics/", "/nope"):
        assert request(server.port, path)[0] == 401, path
    assert request(server.port, "/nope", headers=BEARER)[0] == 404


def test_auth_probes_protects_the_probes_too(health: Callable[..., HealthServer]) -> None:
    server = health(credentials=Credentials(bearer_token=Secret(TOKEN)), auth_probes=True)
    assert request(server.port, "/healthz")[0] == 401
    assert request(server.port, "/healthz", headers=BEARER)[0] == 200


def test_credentials_need_a_whole_pair_or_a_token() -> None:
    with pytest.raises(ValueError, match="both a user and a password"):
        Credentials("user")
    with pytest.raises(ValueError, match="give basic auth, a bearer token, or both"):
        Credentials()


def test_tls_serves_https_only(health: Callable[..., HealthServer], tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server = health(tls=tls_context(str(cert), str(key)), credentials=BOTH)
    client = ssl.create_default_context(cafile=str(cert))
    status, _, body = request(server.port, "/metrics", headers=BEARER, context=client)
    assert status == 200
    assert "cdr_streamer_build_info" in body
    assert request(server.port, "/metrics", context=client)[0] == 401
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        request(server.port, "/healthz")  # plain HTTP to the TLS port gets no answer


def test_a_client_that_never_finishes_the_tls_handshake_is_closed(
    endpoint: Callable[..., HttpEndpoint], tmp_path: Path
) -> None:
    cert, key = make_cert(tmp_path)
    server = endpoint(tls=tls_context(str(cert), str(key)), request_timeout_s=1)
    client = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert wait_closed_by_server(sock, timeout_s=10) < 1 + 1
    # ... and the server still answers whoever does the handshake.
    assert request(server.port, "/ok", context=client)[0] == 200


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ssl.SSLError):
        tls_context(str(cert), str(encrypted))
