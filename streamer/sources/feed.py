"""The Billing Feed client: one request from a cursor -> a stream of rows; maps httpx errors.

What a response means is decided here, once:

- 200 with rows, or with one of the "no records" bodies the format parser accepts
  (empty, header only, `[]`): a page of the feed.
- 200 with a short text about a wrong login or password, 401, 403: `AuthError`
  (fatal: retrying with the same password cannot help).
- 200 with an HTML page, or a body the parser cannot read as the requested format,
  or a body cut short: `BadResponseError` (retriable, never "no new records").
- Connection trouble, timeouts, 5xx, 429: `FeedUnavailableError`, retried here with
  capped exponential backoff and full jitter (429's Retry-After is honoured).
- Any other 4xx: `FeedRequestError` (fatal, the message says what to fix).

The password is sent in the POST body by default. With GET it must be in the
query string (that is the provider's API), so httpx's own log lines are redacted.
"""

from __future__ import annotations

import functools
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Literal
from urllib.parse import urlsplit

import httpx

from streamer import __version__
from streamer.config import Secret
from streamer.errors import (
    AuthError,
    BadResponseError,
    FeedRequestError,
    FeedUnavailableError,
)
from streamer.formats import FORMATS, parse_rows
from streamer.records import FIELDS, Rejection, Row
from streamer.retry import Backoff, retry_after_s

log = logging.getLogger(__name__)

# A body this short that talks about the login is the provider saying "no" with status 200.
_AUTH_TEXT = re.compile(
    rb"(invalid|incorrect|wrong|bad|failed|unknown|denied)[^\n]{0,40}(login|password|user|credential)"
    rb"|(login|password|user|credential)[^\n]{0,40}(invalid|incorrect|wrong|failed|denied|required)"
    rb"|access denied|unauthori[sz]ed|authentication",
    re.IGNORECASE,
)
_AUTH_SNIFF_BYTES = 512
_HTML_START = re.compile(rb"\s*(<!doctype html|<html|<head|<body|<\?xml|<!--)", re.IGNORECASE)
_PASSWORD_FORM = re.compile(rb"type=[\"']?password", re.IGNORECASE)
_PASSWORD_IN_URL = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


class _RedactPasswords(logging.Filter):
    """Removes `password=...` from httpx's request log lines (GET puts it in the URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = _PASSWORD_IN_URL.sub(r"\1***", record.getMessage())
            record.args = ()
        elif isinstance(record.msg, str):
            record.msg = _PASSWORD_IN_URL.sub(r"\1***", record.msg)
        return True


for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).addFilter(_RedactPasswords())


@dataclass(frozen=True, slots=True)
class FeedQuery:
    """The documented optional parameters; `fromid` is the cursor and comes per request."""

    format: Literal["csv", "txt", "pipe", "json"] = "csv"
    date: date | None = None
    hour: int | None = None
    callsonly: bool = False
    servicesonly: bool = False

    def __post_init__(self) -> None:
        if self.hour is not None and self.date is None:
            raise ValueError("hour needs date: the provider filters an hour within a date")
        if self.hour is not None and not 0 <= self.hour <= 23:
            raise ValueError(f"hour must be 0-23, not {self.hour}")
        if self.callsonly and self.servicesonly:
            raise ValueError("callsonly and servicesonly exclude each other")

    def params(self) -> dict[str, str]:
        out: dict[str, str] = {"format": self.format}
        if self.date is not None:
            out["date"] = self.date.isoformat()
        if self.hour is not None:
            out["hour"] = str(self.hour)
        if self.callsonly:
            out["callsonly"] = "1"
        if self.servicesonly:
            out["servicesonly"] = "1"
        return out


@dataclass(frozen=True, slots=True)
class FeedTimeouts:
    connect_s: float = 10.0
    read_s: float = 60.0
    deadline_s: float = 1800.0  # the whole request, body included


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings of every feed's client: httpx's defaults, built once per process.

    Each context holds the whole CA bundle (about 0.8 MiB): one per feed made a thousand
    feeds cost 800 MiB. A context is safe to share between clients and threads.
    """
    return httpx.create_ssl_context()


class FeedClient:
    """Fetches pages of one feed from a cursor. Thread-confined: one per feed."""

    def __init__(
        self,
        url: str,
        login: str,
        password: Secret,
        *,
        query: FeedQuery | None = None,
        method: Literal["POST", "GET"] = "POST",
        timeouts: FeedTimeouts | None = None,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
        stop: threading.Event | None = None,
        on_request: Callable[[str, float, int], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        name: str = "",
    ) -> None:
        self.name = name or (urlsplit(url).path or "/")  # the feed's name, for log lines
        self.url = url
        self.login = login
        self._password = password
        self.query = query or FeedQuery()
        self.method = method
        self.timeouts = timeouts or FeedTimeouts()
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff(1.0, 300.0)
        self._stop = stop or threading.Event()
        # Called once per request with (outcome, seconds, bytes received): metrics hook.
        self._on_request = on_request or (lambda outcome, seconds, nbytes: None)
        self._where = urlsplit(url).path or "/"  # errors name the path, never the query
        self._http = httpx.Client(
            timeout=httpx.Timeout(self.timeouts.read_s, connect=self.timeouts.connect_s),
            headers={"User-Agent": f"cdr-streamer/{__version__}"},
            follow_redirects=False,
            transport=transport,
            verify=tls_context(),
        )

    def __repr__(self) -> str:
        return f"FeedClient(url={self.url!r}, login={self.login!r}, method={self.method!r})"

    def close(self) -> None:
        self._http.close()

    def _request(self, fromid: int, query: FeedQuery | None = None) -> httpx.Request:
        params = {"login": self.login, "password": self._password.reveal(), "fromid": str(fromid)}
        params.update((query or self.query).params())
        if self.method == "POST":
            return self._http.build_request("POST", self.url, data=params)
        return self._http.build_request("GET", self.url, params=params)

    @contextmanager
    def fetch(
        self, fromid: int, window: FeedQuery | None = None
    ) -> Iterator[Iterator[Row | Rejection]]:
        """Open one page from `fromid` (exclusive), retrying what can be retried; yields its rows.

        `window`: this request's query instead of the feed's own (a date or hour window).

        Rows are parsed as the body arrives. An error mid-body raises from the row
        iterator, after the rows before it: the caller decides what they mean.
        """
        self.backoff.reset()
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                response = self._open(fromid, window)
            except FeedUnavailableError as exc:
                self._on_request(_outcome_of(exc), time.monotonic() - started, 0)
                if attempt >= self.max_attempts or self._stop.is_set():
                    raise
                delay = self.backoff.next_delay(exc.retry_after_s or 0.0)
                log.warning(
                    "feed %s: %s; retry %d/%d in %.1f s",
                    self.name,
                    exc,
                    attempt,
                    self.max_attempts - 1,
                    delay,
                )
                if self._stop.wait(delay):
                    raise
                continue
            except Exception as exc:
                self._on_request(_outcome_of(exc), time.monotonic() - started, 0)
                raise
            break
        counter = _ByteCounter()
        outcome = "ok"
        try:
            yield parse_rows(self._body(response, started, counter), self.query.format)
        except Exception as exc:
            outcome = _outcome_of(exc)
            raise
        finally:
            response.close()
            self._on_request(outcome, time.monotonic() - started, counter.n)

    def _open(self, fromid: int, window: FeedQuery | None = None) -> httpx.Response:
        request = self._request(fromid, window)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise FeedUnavailableError(
                f"timed out reaching {self._where}", outcome="timeout"
            ) from exc
        except httpx.TransportError as exc:
            raise FeedUnavailableError(
                f"cannot reach {self._where}: {type(exc).__name__}: {exc}"
            ) from exc
        except httpx.DecodingError as exc:
            raise BadResponseError(
                f"{self._where} sent a body that cannot be decoded: {exc}", reason="bad_encoding"
            ) from exc
        status = response.status_code
        if status == 200:
            return response
        response.close()
        if status in (401, 403):
            raise AuthError(
                f"the feed at {self._where} refused login {self.login!r} (HTTP {status}): "
                "check the login and password"
            )
        if status == 429 or status >= 500:
            raise FeedUnavailableError(
                f"{self._where} answered HTTP {status}",
                outcome="http_429" if status == 429 else "http_5xx",
                retry_after_s=retry_after_s(response.headers.get("Retry-After")),
            )
        if 300 <= status < 400:
            raise FeedRequestError(
                f"{self._where} redirects (HTTP {status}) to {_path_of(response)}: "
                "set the feed's url to the final billingfeed.php address"
            )
        raise FeedRequestError(
            f"{self._where} rejected the request (HTTP {status}): check the url, "
            "format, date and hour settings"
        )

    def _body(
        self, response: httpx.Response, started: float, counter: _ByteCounter
    ) -> Iterator[bytes]:
        """The body's bytes as they arrive, after checking its start is not an error page."""
        deadline = started + self.timeouts.deadline_s
        # iter_bytes, not iter_raw: a gzip or deflate Content-Encoding is undone here.
        chunks = response.iter_bytes()
        head = b""
        try:
            # Step 1: hold back the first bytes until we know this is not an error text.
            for chunk in chunks:
                counter.n += len(chunk)
                head += chunk
                if len(head) >= _AUTH_SNIFF_BYTES:
                    break
            self._sniff(head, complete=len(head) < _AUTH_SNIFF_BYTES)
            if head:
                yield head
            # Step 2: stream the rest, enforcing the request's total deadline.
            for chunk in chunks:
                counter.n += len(chunk)
                if time.monotonic() > deadline:
                    raise FeedUnavailableError(
                        f"{self._where} took longer than {self.timeouts.deadline_s:g} s",
                        outcome="timeout",
                    )
                yield chunk
        except httpx.TimeoutException as exc:
            raise FeedUnavailableError(
                f"timed out reading {self._where}", outcome="timeout"
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            # An incomplete body (Content-Length not reached, chunked stream cut off).
            raise BadResponseError(
                f"{self._where} sent a truncated body after {counter.n} bytes", reason="truncated"
            ) from exc
        except httpx.DecodingError as exc:  # e.g. a corrupt gzip Content-Encoding
            raise BadResponseError(
                f"{self._where} sent a body that cannot be decoded: {exc}", reason="bad_encoding"
            ) from exc
        except httpx.TransportError as exc:
            raise FeedUnavailableError(
                f"lost {self._where} while reading: {type(exc).__name__}"
            ) from exc

    def _sniff(self, head: bytes, *, complete: bool) -> None:
        text = head.lstrip(b"\xef\xbb\xbf")
        # Markup decides, not Content-Type: PHP labels everything text/html by default.
        is_html = bool(_HTML_START.match(text))
        if is_html and _PASSWORD_FORM.search(text):
            raise AuthError(
                f"{self._where} answered with a login page: check the login and password"
            )
        # Refusal text is looked for only in a body without the feed's structure: a real
        # one-row page may well say "authentication" in a call's description.
        refused = complete and not is_html and not self._looks_like_feed(text)
        if refused and _AUTH_TEXT.search(text):
            raise AuthError(
                f"{self._where} refused login {self.login!r}: {self._shown(text)!r}: "
                "check the login and password"
            )
        if is_html:
            raise BadResponseError(
                f"{self._where} answered with an HTML page, not a feed: {self._shown(text)!r}",
                reason="html",
            )

    def _looks_like_feed(self, text: bytes) -> bool:
        """A JSON array, or a first line with (nearly) the 26 documented fields."""
        if self.query.format == "json":
            return text.lstrip().startswith(b"[")
        delimiter = FORMATS[self.query.format].encode()
        first_line = text.split(b"\n", 1)[0]
        return first_line.count(delimiter) >= len(FIELDS) - 2

    def _shown(self, text: bytes) -> str:
        """The start of a body for an error message, never the password (if echoed back)."""
        shown, password = _printable(text), self._password.reveal()
        return shown.replace(password, "***") if password else shown


class _ByteCounter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _printable(data: bytes, limit: int = 80) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _path_of(response: httpx.Response) -> str:
    location = response.headers.get("Location", "")
    return urlsplit(location).path or "?"


def _outcome_of(exc: BaseException) -> str:
    """The bounded `outcome` label of a failed request."""
    if isinstance(exc, FeedUnavailableError):
        return exc.outcome
    if isinstance(exc, AuthError):
        return "auth_error"
    if isinstance(exc, BadResponseError):
        return "bad_response"
    if isinstance(exc, FeedRequestError):
        return "http_4xx"
    return "error"
