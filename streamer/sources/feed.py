"""The Billing Feed client: one request from a cursor -> a stream of rows; maps httpx errors.

What a response means is decided here, once:

- 200 with rows, or with one of the "no records" bodies the format parser accepts
  (empty, header only, `[]`, JSON `null`): a page of the feed.
- 204, or 200 with a short plain text saying so ("No records found", "no data",
  "0 records", ...: the whole body, any case): no records.
- 200 with a short text about a wrong login or password, an HTML login form or an
  HTML page whose text says the login or password is wrong, 401, 403: `AuthError`
  (fatal: retrying with the same password cannot help).
- 200 with another HTML page, or a body the parser cannot read as the requested
  format, or a body cut short: `BadResponseError` (retriable, never "no new records").
- Connection trouble, timeouts, 5xx, 429: `FeedUnavailableError`, retried here with
  capped exponential backoff and full jitter (429's Retry-After is honoured).
- Any other 4xx: `FeedRequestError` (fatal, the message says what to fix).
- A body over `BodyLimits` (decoded size, compression ratio): `BadResponseError`
  (`too_large`, `too_compressed`); one that outlasts `request_deadline_s`, counted from
  the connect to the last byte: `FeedUnavailableError` (timeout).

The password is sent in the POST body by default. With GET it must be in the
query string (that is the provider's API); `streamer.redact` removes it from every
log line (httpx's own included) and every error message, as it does every secret.
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
from streamer.deadline import RequestDeadline
from streamer.errors import (
    AuthError,
    BadResponseError,
    FeedRequestError,
    FeedUnavailableError,
)
from streamer.formats import FORMATS, parse_rows
from streamer.limits import ACCEPT_ENCODING, BodyLimits, decode_content
from streamer.records import FIELDS, Rejection, Row
from streamer.redact import excerpt
from streamer.retry import Backoff, retry_after_s
from streamer.workers import BodyParser, Encoded

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
# An HTML page is an error page anyway, so only plain words about *our* login count: a
# PHP error page may well say "Access denied for user ... (using password: YES)" about
# the provider's own database, which a retry can outlast.
_HTML_AUTH_TEXT = re.compile(
    rb"\b(invalid|incorrect|wrong|unknown|bad)\s+(login|password|user\s?name|credentials)\b"
    rb"|\b(login|password|username|credentials)(\s+\w+){0,4}\s+(is|are|was|were)\s+"
    rb"(invalid|incorrect|wrong)\b"
    rb"|\b(login|authentication|sign[- ]in)\s+failed\b",
    re.IGNORECASE,
)
_HTML_HIDDEN = re.compile(rb"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(rb"<[^>]*>")
# The whole of a short plain-text body that says there is nothing to send.
_NO_RECORDS_TEXT = re.compile(
    rb"\s*[\"']?(?:(?:no|zero|0)\s+(?:new\s+|more\s+|matching\s+)?(?:billing\s+|call\s+)?"
    rb"(?:records?|rows?|data|results?|cdrs?|calls?|entries)"
    rb"(?:\s+(?:found|available|returned|to\s+(?:return|display|show)))?"
    rb"|nothing\s+(?:found|to\s+return))\s*[.!]?[\"']?\s*",
    re.IGNORECASE,
)


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
def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """The TLS settings of feed clients: built once per process for each CA file.

    Certificates are always checked: against `ca_file` if given, else the public CAs
    (httpx's defaults: certifi's, or SSL_CERT_FILE / SSL_CERT_DIR). Each context holds
    its whole CA bundle (about 0.8 MiB): one per feed made a thousand feeds cost 800 MiB.
    A context is safe to share between clients and threads.
    """
    return ssl.create_default_context(cafile=ca_file) if ca_file else httpx.create_ssl_context()


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
        limits: BodyLimits | None = None,
        ca_file: str = "",
        transport: httpx.BaseTransport | None = None,
        name: str = "",
        encoding: str = "utf-8",
    ) -> None:
        self.name = name or (urlsplit(url).path or "/")  # the feed's name, for log lines
        self.url = url
        self.login = login
        self._password = password
        self.query = query or FeedQuery()
        self.method = method
        self.timeouts = timeouts or FeedTimeouts()
        self.max_attempts = max_attempts
        self.encoding = encoding  # of the body: one of formats.ENCODINGS
        self.backoff = backoff or Backoff(1.0, 300.0)
        self.limits = limits or BodyLimits()
        self._stop = stop or threading.Event()
        # Called once per request with (outcome, seconds, bytes received): metrics hook.
        self._on_request = on_request or (lambda outcome, seconds, nbytes: None)
        self._where = urlsplit(url).path or "/"  # errors name the path, never the query
        t = self.timeouts
        self._http = httpx.Client(
            timeout=httpx.Timeout(t.read_s, connect=min(t.connect_s, t.deadline_s)),
            # The body is decoded here, within self.limits (streamer/limits.py).
            headers={
                "User-Agent": f"cdr-streamer/{__version__}",
                "Accept-Encoding": ACCEPT_ENCODING,
            },
            follow_redirects=False,
            # A new connection per request: RequestDeadline watches the one it sees opened.
            limits=httpx.Limits(max_keepalive_connections=0),
            verify=tls_context(ca_file),  # shared: see tls_context
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"FeedClient(url={self.url!r}, login={self.login!r}, method={self.method!r})"

    def close(self) -> None:
        self._http.close()

    def _request(
        self, fromid: int, deadline: RequestDeadline, query: FeedQuery | None = None
    ) -> httpx.Request:
        params = {"login": self.login, "password": self._password.reveal(), "fromid": str(fromid)}
        params.update((query or self.query).params())
        extensions = {"trace": deadline.trace}
        if self.method == "POST":
            return self._http.build_request("POST", self.url, data=params, extensions=extensions)
        return self._http.build_request("GET", self.url, params=params, extensions=extensions)

    @contextmanager
    def fetch(
        self, fromid: int, window: FeedQuery | None = None, parse: BodyParser | None = None
    ) -> Iterator[Iterator[Row | Rejection | Encoded]]:
        """Open one page from `fromid` (exclusive), retrying what can be retried; yields its rows.

        `window`: this request's query instead of the feed's own (a date or hour window).
        `parse`: the body's chunks, format and encoding -> its rows, instead of
        `formats.parse_rows` (`workers.WorkerPool`: rows typed and encoded already).

        Rows are parsed as the body arrives. An error mid-body raises from the row
        iterator, after the rows before it: the caller decides what they mean.
        """
        self.backoff.reset()
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            deadline = RequestDeadline(self.timeouts.deadline_s)
            deadline.start()
            try:
                response = self._open(fromid, deadline, window)
            except FeedUnavailableError as exc:
                deadline.cancel()
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
                deadline.cancel()
                self._on_request(_outcome_of(exc), time.monotonic() - started, 0)
                raise
            break
        counter = _ByteCounter()
        outcome = "ok"
        try:
            yield (parse or parse_rows)(
                self._body(response, deadline, counter), self.query.format, self.encoding
            )
        except Exception as exc:
            outcome = _outcome_of(exc)
            raise
        finally:
            deadline.cancel()
            response.close()
            self._on_request(outcome, time.monotonic() - started, counter.n)

    def _open(
        self, fromid: int, deadline: RequestDeadline, window: FeedQuery | None = None
    ) -> httpx.Response:
        request = self._request(fromid, deadline, window)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise FeedUnavailableError(
                f"timed out reaching {self._where}", outcome="timeout"
            ) from exc
        except httpx.TransportError as exc:
            if deadline.expired:  # the deadline shut the socket down under the headers
                raise self._overdue() from exc
            raise FeedUnavailableError(
                f"cannot reach {self._where}: {type(exc).__name__}: {exc}"
            ) from exc
        status = response.status_code
        if status in (200, 204):  # 204 No Content: no records (its body is empty)
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

    def _overdue(self) -> FeedUnavailableError:
        return FeedUnavailableError(
            f"{self._where} took longer than {self.timeouts.deadline_s:g} s "
            "(request_deadline_s, from connect to the last byte)",
            outcome="timeout",
        )

    def _body(
        self, response: httpx.Response, deadline: RequestDeadline, counter: _ByteCounter
    ) -> Iterator[bytes]:
        """The body's bytes as they arrive, after checking its start is not an error page."""
        # Raw bytes, the Content-Encoding undone by us within self.limits: httpx would
        # undo it a whole chunk at a time, however far that chunk expands.
        chunks = decode_content(
            response.iter_raw(),
            response.headers.get("Content-Encoding", ""),
            self.limits,
            where=self._where,
        )
        head = b""
        try:
            # Step 1: hold back the first bytes until we know this is not an error text.
            for chunk in chunks:
                counter.n += len(chunk)
                head += chunk
                if len(head) >= _AUTH_SNIFF_BYTES:
                    break
            if deadline.expired:
                raise self._overdue()
            if self._sniff(head, complete=len(head) < _AUTH_SNIFF_BYTES):
                return  # the whole body says there are no records
            if head:
                yield head
            # Step 2: stream the rest; the deadline shuts the socket down when it passes.
            for chunk in chunks:
                counter.n += len(chunk)
                if deadline.expired:
                    raise self._overdue()
                yield chunk
            if deadline.expired:  # a body without a length ends where the shutdown cut it
                raise self._overdue()
        except httpx.TimeoutException as exc:
            raise FeedUnavailableError(
                f"timed out reading {self._where}", outcome="timeout"
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            if deadline.expired:
                raise self._overdue() from exc
            # An incomplete body (Content-Length not reached, chunked stream cut off).
            raise BadResponseError(
                f"{self._where} sent a truncated body after {counter.n} bytes", reason="truncated"
            ) from exc
        except httpx.TransportError as exc:
            if deadline.expired:
                raise self._overdue() from exc
            raise FeedUnavailableError(
                f"lost {self._where} while reading: {type(exc).__name__}"
            ) from exc

    def _sniff(self, head: bytes, *, complete: bool) -> bool:
        """What the start of a body is: raises for a refusal or an error page.

        True when the body (`complete`: all of it) is a text saying there are no records.
        """
        text = head.lstrip(b"\xef\xbb\xbf")
        # Markup decides, not Content-Type: PHP labels everything text/html by default.
        is_html = bool(_HTML_START.match(text))
        if is_html and _PASSWORD_FORM.search(text):
            raise AuthError(
                f"{self._where} answered with a login page: check the login and password"
            )
        if is_html:
            visible = _HTML_TAG.sub(b" ", _HTML_HIDDEN.sub(b" ", text))
            if _HTML_AUTH_TEXT.search(visible):
                raise AuthError(
                    f"{self._where} refused login {self.login!r} with an HTML page: "
                    f"{_shown(b' '.join(visible.split()))}: check the login and password"
                )
        # Refusal text is looked for only in a body without the feed's structure: a real
        # one-row page may well say "authentication" in a call's description.
        refused = complete and not is_html and not self._looks_like_feed(text)
        if refused and _NO_RECORDS_TEXT.fullmatch(text):
            return True
        if refused and _AUTH_TEXT.search(text):
            raise AuthError(
                f"{self._where} refused login {self.login!r}: {_shown(text)}: "
                "check the login and password"
            )
        if is_html:
            raise BadResponseError(
                f"{self._where} answered with an HTML page, not a feed: {_shown(text)}",
                reason="html",
            )
        return False

    def _looks_like_feed(self, text: bytes) -> bool:
        """A JSON array, or a first line with (nearly) the 26 documented fields."""
        if self.query.format == "json":
            return text.lstrip().startswith(b"[")
        delimiter = FORMATS[self.query.format].encode()
        first_line = text.split(b"\n", 1)[0]
        return first_line.count(delimiter) >= len(FIELDS) - 2


class _ByteCounter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _shown(data: bytes) -> str:
    """The start of a body for an error message (a password in it is redacted with it)."""
    return excerpt(data.decode("utf-8", "replace").strip())


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
        return exc.reason if exc.reason in ("too_large", "too_compressed") else "bad_response"
    if isinstance(exc, FeedRequestError):
        return "http_4xx"
    return "error"
