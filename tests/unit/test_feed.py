"""The feed client's failure mapping: status or body -> error class, as one table.

In-process `httpx.MockTransport` stands in for the network here; the integration
tests drive the same client against the simulator over real HTTP.
"""

from __future__ import annotations

import logging
from datetime import date

import httpx
import pytest

from streamer.config import Secret
from streamer.errors import (
    AuthError,
    BadResponseError,
    FeedRequestError,
    FeedUnavailableError,
    StreamerError,
)
from streamer.records import FIELDS, Row
from streamer.retry import Backoff, retry_after_s
from streamer.sources.feed import FeedClient, FeedQuery

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


def answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    return httpx.MockTransport(
        lambda request: httpx.Response(status, content=body, headers=headers)
    )


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
    answers = iter([httpx.Response(503), httpx.Response(200, content=b"")])
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
        return httpx.Response(200, content=b"")

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
        return httpx.Response(200, content=b"")

    caplog.set_level(logging.DEBUG)
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
