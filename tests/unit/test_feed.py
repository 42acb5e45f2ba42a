"""The feed client's failure mapping: status or body -> error class, as one table.

In-process `httpx.MockTransport` stands in for the network here; the integration
tests drive the same client against the simulator over real HTTP.
"""

from __future__ import annotations

import gzip
import http.server
import logging
import select
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx
import pytest
from tls_cert import make_cert

from streamer.config import Secret
from streamer.errors import (
    AuthError,
    BadResponseError,
    FeedRequestError,
    FeedUnavailableError,
    StreamerError,
)
from streamer.limits import BodyLimits
from streamer.records import FIELDS, Row
from streamer.retry import Backoff, retry_after_s
from streamer.sources.feed import FeedClient, FeedQuery, FeedTimeouts

PASSWORD = "Monkey123-secret"
HEADER = ",".join(FIELDS) + "\n"
# What a PHP login check prints, wrapped in the page template; and a PHP error page about
# the provider's own database login, which is no refusal of ours.
HTML_PASSWORD_WRONG = (
    b"<!DOCTYPE html>\n<html><head><title>Billing Feed</title><style>p{color:red}</style>"
    b"</head>\n<body><h1>Billing Feed</h1><p class=error>Invalid login or password</p>"
    b"</body></html>\n"
)
HTML_DATABASE_LOGIN = (
    b"<html><body><b>Warning</b>: mysqli_connect(): (HY000/1045): Access denied for user "
    b"'billing'@'localhost' (using password: YES) in <b>/var/www/billingfeed.php</b></body></html>"
)


def client_for(handler: httpx.MockTransport, **kwargs: object) -> FeedClient:
    return FeedClient(
        "http://feed.test/billingfeed.php",
        "81234567",
        Secret(PASSWORD),
        transport=handler,
        backoff=Backoff(0.0, 0.0),
        **kwargs,  # type: ignore[arg-type]
    )


class _Streamed(httpx.SyncByteStream):
    """A body that arrives as a stream, as it does off the network (not read in advance)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        if self._body:
            yield self._body


def response(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(status, stream=_Streamed(body), headers=headers)


def answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: response(status, body, headers))


def fetch_all(client: FeedClient, fromid: int = 0) -> list[object]:
    with client.fetch(fromid) as rows:
        return list(rows)


@pytest.mark.parametrize(
    ("status", "body", "headers", "error"),
    [
        (401, b"", None, AuthError),
        (403, b"Forbidden", None, AuthError),
        (200, b"Invalid login or password", None, AuthError),
        (200, b"Error: incorrect password\n", None, AuthError),
        (200, b"Access denied", None, AuthError),
        (200, b"<html><form><input type=password name=p></form></html>", None, AuthError),
        (200, b"<html><body><p>Invalid login or password</p></body></html>", None, AuthError),
        (200, b"<!DOCTYPE html><title>x</title><h1>Login failed</h1>", None, AuthError),
        (200, HTML_PASSWORD_WRONG, None, AuthError),
        (200, b"<!DOCTYPE html><html><body>Maintenance</body></html>", None, BadResponseError),
        (200, HTML_DATABASE_LOGIN, None, BadResponseError),  # the provider's own database
        (200, b"No records found; database error 1045", None, BadResponseError),
        (200, b"<html><body>No records found</body></html>", None, BadResponseError),
        (200, b"all fine", {"Content-Type": "text/html"}, BadResponseError),
        (500, b"oops", None, FeedUnavailableError),
        (502, b"", None, FeedUnavailableError),
        (503, b"", {"Retry-After": "0"}, FeedUnavailableError),
        (429, b"slow down", {"Retry-After": "0"}, FeedUnavailableError),
        (400, b"bad fromid", None, FeedRequestError),
        (404, b"not here", None, FeedRequestError),
        (302, b"", {"Location": "https://other.example/login.php"}, FeedRequestError),
        (200, b'{"error": "x"}', None, BadResponseError),
    ],
)
def test_failure_mapping(
    status: int, body: bytes, headers: dict[str, str] | None, error: type[StreamerError]
) -> None:
    client = client_for(answer(status, body, headers), max_attempts=2)
    with pytest.raises(error) as info:
        fetch_all(client)
    assert PASSWORD not in str(info.value)
    assert "password=" not in str(info.value)


NO_RECORDS_TEXTS = [
    b"No records found", b"no records", b"NO DATA", b"No data found.\n", b"0 records",
    b"No new records", b"  no records to return\r\n", b'"No records found"', b"No CDRs found",
    b"Nothing found",
]  # fmt: skip


@pytest.mark.parametrize("body", [b"", b"\n", HEADER.encode(), b"\xef\xbb\xbf" + HEADER.encode()])
def test_no_records_bodies(body: bytes) -> None:
    assert fetch_all(client_for(answer(200, body))) == []


@pytest.mark.parametrize("fmt", ["csv", "txt", "pipe", "json"])
@pytest.mark.parametrize("body", NO_RECORDS_TEXTS)
def test_a_short_text_saying_no_records_is_no_records(fmt: str, body: bytes) -> None:
    outcomes: list[str] = []
    client = client_for(
        answer(200, body, {"Content-Type": "text/html"}),
        query=FeedQuery(format=fmt),  # type: ignore[arg-type]
        on_request=lambda outcome, seconds, nbytes: outcomes.append(outcome),
    )
    assert fetch_all(client) == []
    assert outcomes == ["ok"]


@pytest.mark.parametrize("body", [b"[]", b"null", b" null\n"])
def test_no_records_json(body: bytes) -> None:
    client = client_for(answer(200, body), query=FeedQuery(format="json"))
    assert fetch_all(client) == []


def test_204_no_content_is_no_records() -> None:
    outcomes: list[str] = []
    client = client_for(
        answer(204, b""), on_request=lambda outcome, seconds, nbytes: outcomes.append(outcome)
    )
    assert fetch_all(client) == []
    assert outcomes == ["ok"]


def test_an_html_page_refusing_the_login_is_an_auth_error_outcome() -> None:
    outcomes: list[str] = []
    client = client_for(
        answer(200, HTML_PASSWORD_WRONG),
        on_request=lambda outcome, seconds, nbytes: outcomes.append(outcome),
    )
    with pytest.raises(AuthError, match="check the login and password") as info:
        fetch_all(client)
    assert "Invalid login or password" in str(info.value)
    assert outcomes == ["auth_error"]


def test_the_body_is_read_in_the_feed_encoding() -> None:
    row = (
        "7,81234567,outbound,Mobile,2024-04-01,2024-03-05,13:45:12,2024-03-05 00:45:12,13,"
        + ",".join(["a"] * 3 + ["60", "42", "3", "0.33", "0.2875", "0"] + ["Café"] * 8)
    )
    body = (HEADER + row + "\n").encode("cp1252")
    (got,) = fetch_all(client_for(answer(200, body), encoding="cp1252"))
    assert isinstance(got, Row)
    assert got.values["Profile"] == "Café"


def test_connection_error_retried_then_raised() -> None:
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("Connection refused", request=request)

    with pytest.raises(FeedUnavailableError, match=r"cannot reach /billingfeed\.php"):
        fetch_all(client_for(httpx.MockTransport(refuse), max_attempts=3))
    assert len(calls) == 3


def test_5xx_then_success_is_retried() -> None:
    answers = iter([response(503), response(200)])
    outcomes: list[str] = []
    client = client_for(
        httpx.MockTransport(lambda request: next(answers)),
        on_request=lambda outcome, seconds, nbytes: outcomes.append(outcome),
    )
    assert fetch_all(client) == []
    assert outcomes == ["http_5xx", "ok"]


def test_post_sends_every_parameter_in_the_body() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response(200)

    query = FeedQuery(format="pipe", date=date(2024, 5, 22), hour=7, callsonly=True)
    fetch_all(client_for(httpx.MockTransport(record), query=query), fromid=42)
    request = seen[0]
    assert request.method == "POST"
    assert request.url.query == b""
    body = dict(httpx.QueryParams(request.content.decode()))
    assert body == {
        "login": "81234567",
        "password": PASSWORD,
        "fromid": "42",
        "format": "pipe",
        "date": "2024-05-22",
        "hour": "7",
        "callsonly": "1",
    }


def test_get_puts_parameters_in_query_and_logs_redact_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response(200)

    caplog.set_level(logging.DEBUG)
    # An in-process `cli.main` of an earlier test quiets httpx (logs.setup): hear it here.
    caplog.set_level(logging.DEBUG, logger="httpx")
    client = client_for(httpx.MockTransport(record), method="GET")
    fetch_all(client, fromid=3)
    assert seen[0].url.params["password"] == PASSWORD
    assert any("HTTP Request" in r.getMessage() for r in caplog.records)
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(client)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hour": 3}, "hour needs date"),
        ({"date": date(2024, 1, 1), "hour": 24}, "0-23"),
        ({"callsonly": True, "servicesonly": True}, "exclude each other"),
    ],
)
def test_query_refuses_what_the_provider_forbids(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeedQuery(**kwargs)  # type: ignore[arg-type]


def test_rows_come_back_parsed() -> None:
    row = (
        "7,81234567,outbound,Mobile,2024-04-01,2024-03-05,13:45:12,2024-03-05 00:45:12,13,"
        + ",".join(["a"] * 3 + ["60", "42", "3", "0.33", "0.2875", "0"] + ["x"] * 8)
    )
    rows = fetch_all(client_for(answer(200, (HEADER + row + "\n").encode())))
    assert len(rows) == 1
    assert isinstance(rows[0], Row)
    assert rows[0].values["ID"] == "7"


@pytest.mark.parametrize(("value", "seconds"), [("12", 12.0), (None, None), ("soon", None)])
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert retry_after_s(value) == seconds


def test_backoff_is_capped_full_jitter() -> None:
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next_delay() for _ in range(20)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert backoff.next_delay(at_least_s=30) >= 30  # Retry-After is honoured over the cap
    assert backoff.next_delay(at_least_s=10**12) == 3600.0  # up to an hour


def test_one_real_row_mentioning_authentication_is_not_a_refusal() -> None:
    # A quiet account's page may hold one call whose description trips the refusal words.
    values = [
        "7", "81234567", "outbound", "Mobile", "2024-04-01", "2024-03-05", "13:45:12",
        "2024-03-05 00:45:12", "13", "6493001234", "6421555123", "6493001234", "60", "42",
        "3", "0.33", "0.2875", "0", "Bank authentication code", "Invalid login attempt SMS",
        "0016", "Ok", "Plan", "Default", "Default", "Default",
    ]  # fmt: skip
    body = (HEADER + ",".join(values) + "\n").encode()
    assert len(body) < 512
    rows = fetch_all(client_for(answer(200, body)))
    assert len(rows) == 1


def test_corrupt_gzip_is_a_bad_response() -> None:
    client = client_for(answer(200, b"not gzip at all", {"Content-Encoding": "gzip"}))
    with pytest.raises(BadResponseError, match="cannot be decoded"):
        fetch_all(client)


@pytest.mark.parametrize("value", ["²", "Fri, 31 Dec 9999 23:59:59 GMT", "99999999999999999999"])
def test_outlandish_retry_after_is_capped(value: str) -> None:
    seconds = retry_after_s(value)
    assert seconds is None or Backoff(1.0, 300.0).next_delay(seconds) <= 3600.0


def test_password_echoed_in_an_error_page_is_not_repeated() -> None:
    page = f"<html><body>Bad request: login=81234567&password={PASSWORD}</body></html>"
    with pytest.raises(BadResponseError) as info:
        fetch_all(client_for(answer(200, page.encode())))
    assert PASSWORD not in str(info.value)


def gzip_blank_lines(n_mib: int) -> bytes:
    """n_mib MiB of newlines (blank lines the parser skips), gzipped: a bomb only limits stop."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b"\n" * (1 << 20)
    return b"".join([compressor.compress(block) for _ in range(n_mib)] + [compressor.flush()])


def test_a_compressed_body_is_decoded_within_the_limits() -> None:
    row = (
        "7,81234567,outbound,Mobile,2024-04-01,2024-03-05,13:45:12,2024-03-05 00:45:12,13,"
        + ",".join(["a"] * 3 + ["60", "42", "3", "0.33", "0.2875", "0"] + ["x"] * 8)
    )
    body = gzip.compress(gzip.compress((HEADER + row + "\n").encode()))
    rows = fetch_all(client_for(answer(200, body, {"Content-Encoding": "gzip, gzip"})))
    assert [r.values["ID"] for r in rows if isinstance(r, Row)] == ["7"]


@pytest.mark.parametrize(
    ("body", "encoding", "limits", "outcome"),
    [
        pytest.param(
            gzip.compress(gzip_blank_lines(64)), "gzip, gzip", BodyLimits(), "too_compressed"
        ),
        pytest.param(b"\n" * 3000, "", BodyLimits(max_bytes=2000), "too_large"),
    ],
    ids=["gzip-gzip-bomb", "over-max-bytes"],
)
def test_a_body_over_the_limits_fails_the_request_and_is_counted(
    body: bytes, encoding: str, limits: BodyLimits, outcome: str
) -> None:
    seen: list[tuple[str, int]] = []
    client = client_for(
        answer(200, body, {"Content-Encoding": encoding} if encoding else None),
        limits=limits,
        on_request=lambda outcome, seconds, nbytes: seen.append((outcome, nbytes)),
    )
    with pytest.raises(BadResponseError) as info:
        fetch_all(client)
    assert info.value.reason == outcome
    ((counted, nbytes),) = seen
    assert counted == outcome
    assert nbytes <= max(limits.max_bytes, 2 << 20)


class SlowServer:
    """A loopback HTTP server that sends its answer one byte at a time, `gap_s` apart.

    `closed_after_s` is how long each connection lasted, from accept until the client
    went away (its socket read EOF or failed while we waited between bytes).
    """

    def __init__(self, answer: bytes, *, slow_from: int, gap_s: float = 0.25) -> None:
        self.answer = answer
        self.slow_from = slow_from  # bytes sent at once before the slow part
        self.gap_s = gap_s
        self.closed_after_s: list[float] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/billingfeed.php"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        accepted = time.monotonic()
        with conn:
            conn.recv(65536)  # the request (small: one read is enough on loopback)
            conn.sendall(self.answer[: self.slow_from])
            for i in range(self.slow_from, len(self.answer)):
                readable, _, _ = select.select([conn], [], [], self.gap_s)
                if readable and not conn.recv(1):
                    break  # the client shut the connection down
                try:
                    conn.send(self.answer[i : i + 1])
                except OSError:
                    break
        self.closed_after_s.append(time.monotonic() - accepted)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(10)


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"


@pytest.mark.parametrize(
    ("answer", "slow_from"),
    [
        pytest.param(HEAD + b"Content-Length: 10\r\n\r\n0123456789", 0, id="slow-headers"),
        pytest.param(
            HEAD + b"Content-Length: 4000\r\n\r\n" + b"\n" * 4000, len(HEAD) + 24, id="slow-body"
        ),
        pytest.param(
            HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n\n\r\n" * 4000,
            len(HEAD) + 30,
            id="slow-chunked-body",
        ),
        pytest.param(
            HEAD + b"Connection: close\r\n\r\n" + HEADER.encode() + b"\n" * 4000,
            len(HEAD) + 21 + len(HEADER),
            id="slow-body-without-length",
        ),
    ],
)
def test_the_deadline_covers_headers_and_the_whole_body(answer: bytes, slow_from: int) -> None:
    server = SlowServer(answer, slow_from=slow_from)
    client = FeedClient(
        server.url,
        "81234567",
        Secret(PASSWORD),
        timeouts=FeedTimeouts(connect_s=5, read_s=60, deadline_s=1.5),
        max_attempts=1,
    )
    started = time.monotonic()
    try:
        with pytest.raises(FeedUnavailableError, match="request_deadline_s") as info:
            fetch_all(client)
    finally:
        client.close()
        server.close()
    assert info.value.outcome == "timeout"
    assert time.monotonic() - started < 1.5 + 1
    assert len(server.closed_after_s) == 1
    assert server.closed_after_s[0] < 1.5 + 1


class _EmptyFeed(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_https_feed_is_verified_against_ca_file_or_the_public_cas(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), _EmptyFeed)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/billingfeed.php"
    try:
        trusted = FeedClient(url, "81234567", Secret(PASSWORD), ca_file=str(cert))
        assert fetch_all(trusted) == []
        # A certificate no trusted CA signed: refused, never accepted quietly.
        public = FeedClient(url, "81234567", Secret(PASSWORD), max_attempts=1)
        with pytest.raises(FeedUnavailableError, match="cannot reach"):
            fetch_all(public)
    finally:
        server.shutdown()
        server.server_close()
