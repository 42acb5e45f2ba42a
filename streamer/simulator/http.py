"""The HTTP endpoint: parameters, auth, output variants, faults, request log."""

from __future__ import annotations

import hmac
import itertools
import logging
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

from streamer.simulator.config import AUTH_FAILURE_TEXT, FAULTS, FORMATS, PATH, SimulatorConfig
from streamer.simulator.data import CdrGenerator
from streamer.simulator.render import Part, Prerendered, Renderer, RowCount, batched
from streamer.simulator.store import FeedQuery, FeedStore

logger = logging.getLogger("streamer.simulator")  # one name for the whole simulator

# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the simulator received it, minus the password."""

    method: str
    path: str
    params: Mapping[str, str]  # effective parameters (POST over GET), password removed
    query: Mapping[str, str]  # from the URL, password removed
    form: Mapping[str, str]  # from the POST body, password removed
    password_in: tuple[str, ...]  # where a password was sent: "query" and/or "form"
    content_type: str
    status: int
    rows: int  # rows written, whole or (for a truncating fault) in part
    fault: str | None
    received_at: float  # time.monotonic() when the request had been read


class _BadRequestError(Exception):
    """A parameter the feed cannot serve; the message is the 400 body."""


def _form(text: str) -> dict[str, str]:
    """URL-encoded pairs; a repeated key keeps its last value, as PHP's $_GET and $_POST do."""
    return dict(parse_qsl(text, keep_blank_values=True, errors="replace"))


def _without_password(params: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if k.lower() != "password"}


def _parse_query(params: Mapping[str, str]) -> tuple[str, FeedQuery]:
    """(format, query) from the request parameters; _BadRequestError says what is wrong."""
    from_id = params.get("fromid")
    if from_id is None or from_id == "":
        raise _BadRequestError("Missing required parameter: fromid")
    if not (from_id.isascii() and from_id.isdigit()):
        raise _BadRequestError("Invalid fromid: it must be a whole number >= 0")
    fmt = (params.get("format") or "csv").lower()
    if fmt not in FORMATS:
        raise _BadRequestError("Invalid format: use csv, txt, pipe or json")
    day: date | None = None
    if params.get("date"):
        text = params["date"]
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise _BadRequestError("Invalid date: use YYYY-MM-DD")
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise _BadRequestError("Invalid date: use YYYY-MM-DD") from None
    hour: int | None = None
    if params.get("hour"):
        text = params["hour"]
        if not (text.isascii() and text.isdigit() and len(text) <= 2 and int(text) <= 23):
            raise _BadRequestError("Invalid hour: use 0 to 23")
        if day is None:
            raise _BadRequestError("Invalid hour: hour must be used together with date")
        hour = int(text)
    calls_only = params.get("callsonly") == "1"
    services_only = params.get("servicesonly") == "1"
    if calls_only and services_only:
        raise _BadRequestError("callsonly and servicesonly cannot both be set")
    return fmt, FeedQuery(int(from_id), day, hour, calls_only, services_only)


_CONTENT_TYPES: Mapping[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "txt": "text/plain; charset=utf-8",
    "pipe": "text/plain; charset=utf-8",
    "json": "application/json",
}
_HTML_ERROR = (
    "<!DOCTYPE html>\n<html>\n<head><title>Service temporarily unavailable</title></head>\n"
    "<body>\n<h1>Database error</h1>\n<p>The billing database is busy, please try again "
    "later.</p>\n</body>\n</html>\n"
)
_HTML_TYPE = "text/html; charset=UTF-8"  # what a PHP script sends when it sets nothing
# A PHP login check's message inside the site's page template.
_HTML_AUTH_FAILURE = (
    "<!DOCTYPE html>\n<html>\n<head><title>Billing Feed</title></head>\n<body>\n"
    f'<h1>Billing Feed</h1>\n<p class="error">{AUTH_FAILURE_TEXT}</p>\n</body>\n</html>\n'
)
_CHARSETS: Mapping[str, str] = {"utf-8": "utf-8", "cp1252": "windows-1252", "latin-1": "iso-8859-1"}
_FORM_TYPE = "application/x-www-form-urlencoded"
_MAX_FORM_BYTES = 1 << 20
_PRERENDERED_CHUNK_BYTES = 1 << 18  # chunked transfer of a prerendered answer
_REDACT = re.compile(r"(password=)[^&\s'\"]*", re.IGNORECASE)


def _content_type(fmt: str, config: SimulatorConfig) -> str:
    """The feed's Content-Type, naming the body's charset (json: always UTF-8 by RFC 8259)."""
    if fmt == "json" or config.encoding == "utf-8":
        return _CONTENT_TYPES[fmt]
    return _CONTENT_TYPES[fmt].replace("utf-8", _CHARSETS[config.encoding])


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], simulator: BillingFeedSimulator) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.simulator = simulator
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up in DNS (getfqdn): slow, and not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """One connection; every request goes through `_serve`."""

    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "Apache"  # what a PHP host says, rather than Python's version

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Requests are logged by `_record`, without the query string."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s", _REDACT.sub(r"\1***", format % args))

    @property
    def sim(self) -> BillingFeedSimulator:
        return cast(_Server, self.server).simulator

    # Step 1: read the parameters; Step 2: faults that preempt everything; Step 3: auth;
    # Step 4: validate; Step 5: stream the rows (with any body fault).
    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        query = _form(split.query)
        form: dict[str, str] = {}
        content_type = self.headers.get("Content-Type", "")
        length_text = self.headers.get("Content-Length") or "0"
        length = int(length_text) if length_text.isdigit() else -1
        if 0 < length <= _MAX_FORM_BYTES:
            body = self.rfile.read(length)  # read even for GET, or keep-alive loses its place
            is_form = content_type.split(";")[0].strip().lower() in ("", _FORM_TYPE)
            if method == "POST" and is_form:
                form = _form(body.decode("utf-8", "replace"))
        params = {**query, **form}  # "Post is given priority"
        self._incoming = RequestRecord(
            method=method,
            path=split.path,
            params=_without_password(params),
            query=_without_password(query),
            form=_without_password(form),
            password_in=tuple(
                where
                for where, got in (("query", query), ("form", form))
                if any(k.lower() == "password" for k in got)
            ),
            content_type=content_type,
            status=0,
            rows=0,
            fault=None,
            received_at=time.monotonic(),
        )
        try:
            if length < 0 or length > _MAX_FORM_BYTES:
                self.close_connection = True  # the body was not read
                self._send_text(413 if length > 0 else 400, "Bad Content-Length")
            else:
                self._respond(split.path, params)
        except ConnectionError:
            logger.debug("client went away during %s %s", method, split.path)
            self.close_connection = True

    def _respond(self, path: str, params: Mapping[str, str]) -> None:
        sim, cfg = self.sim, self.sim.config
        if path != PATH:
            self._send_text(404, "Not Found")
            return
        fault, fault_params = sim._take_fault()
        delay = cfg.latency_s + (fault_params.get("seconds", 1.0) if fault == "latency" else 0.0)
        if delay > 0:
            sim._stopping.wait(delay)
        if fault in ("500", "503"):
            text = "Internal Server Error" if fault == "500" else "Service Unavailable"
            self._send_text(int(fault), text, fault=fault)
            return
        if fault == "429":
            retry_after = int(fault_params.get("retry_after", cfg.retry_after_s))
            headers = (("Retry-After", str(retry_after)),)
            self._send_text(429, "Too Many Requests", headers=headers, fault=fault)
            return
        if fault == "html":
            status = int(fault_params.get("status", 200))
            self._send_text(status, _HTML_ERROR, content_type=_HTML_TYPE, fault=fault)
            return
        login_ok = hmac.compare_digest(params.get("login", "").encode(), cfg.login.encode())
        password_ok = hmac.compare_digest(
            params.get("password", "").encode(), cfg.password.encode()
        )
        if fault in ("auth_text200", "auth_html200") or not (login_ok and password_ok):
            style = fault.removeprefix("auth_") if fault else cfg.auth_failure_style
            status = int(style) if style.isdigit() else 200
            text = _HTML_AUTH_FAILURE if style == "html200" else AUTH_FAILURE_TEXT
            self._send_text(status, text, content_type=_HTML_TYPE, fault=fault)
            return
        try:
            fmt, query = _parse_query(params)
        except _BadRequestError as exc:
            self._send_text(400, str(exc), fault=fault)
            return
        body_fault = fault if fault in ("truncate", "truncate_chunked", "cut_last_line") else None
        prerendered = sim.prerendered
        if (
            body_fault is None
            and prerendered is not None
            and prerendered.serves(fmt, query, sim.store, cfg)
        ):
            self._send_prerendered(prerendered, query, fault)
            return
        self._send_feed(fmt, query, body_fault, fault)

    def _record(self, status: int, rows: int, fault: str | None) -> None:
        self.sim._record(replace(self._incoming, status=status, rows=rows, fault=fault))

    def _send_text(
        self,
        status: int,
        text: str,
        *,
        content_type: str = "text/plain; charset=utf-8",
        headers: tuple[tuple[str, str], ...] = (),
        fault: str | None = None,
    ) -> None:
        body = text.encode()
        self._record(status, 0, fault)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if status != 204:  # a 204 has no body, so no Content-Length either (RFC 9110)
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _parts(self, fmt: str, query: FeedQuery, counter: RowCount) -> Iterator[Part]:
        sim, cfg = self.sim, self.sim.config
        renderer = Renderer(fmt, cfg)
        generator = sim.generator
        shuffler = random.Random(f"unsorted {cfg.seed} {query.from_id}") if cfg.unsorted else None

        def batches() -> Iterator[list[bytes]]:
            first = True
            for batch in batched(sim.store.select(query), cfg.batch_rows):
                if shuffler is not None:
                    shuffler.shuffle(batch)
                pieces = []
                for cdr_id, row in batch:
                    pieces.append(renderer.row(generator.wire_row(cdr_id, row), first))
                    first = False
                counter.rows += len(batch)
                yield pieces

        rendered = batches()
        current = next(rendered, None)
        if current is None:
            yield Part([renderer.empty()], b"", True, 0)
            return
        # One batch ahead, so that the last part is known as the last (it gets the trailer).
        pieces, rows = [renderer.preamble(), *current], len(current)
        for following in rendered:
            yield Part(pieces, b"", False, rows)
            pieces, rows = following, len(following)
        yield Part(pieces, renderer.trailer(), True, rows)

    def _start(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_feed(
        self, fmt: str, query: FeedQuery, body_fault: str | None, fault: str | None
    ) -> None:
        sim, cfg = self.sim, self.sim.config
        le = cfg.line_ending.encode()
        counter = RowCount()
        parts = self._parts(fmt, query, counter)
        content_type = _content_type(fmt, cfg)
        head = next(parts)
        if head.rows == 0 and cfg.empty_style == "no_content":
            self._send_text(204, "", fault=fault)
            return
        parts = itertools.chain([head], parts)

        if body_fault in ("truncate", "truncate_chunked"):
            # Cut in the middle of a row of the first part, then hang up.
            part = next(parts)
            sent = part.cut(le)
            # The rows of this part only (the cut one included): `counter` is a batch ahead.
            self._record(200, part.rows, fault)
            self.close_connection = True
            if body_fault == "truncate":
                declared = len(part.data()) + 1024
                self._start(200, content_type, {"Content-Length": str(declared)})
                self.wfile.write(sent)
            else:
                self._start(200, content_type, {"Transfer-Encoding": "chunked"})
                self._write_chunk(sent)
            return

        if cfg.cut_after_rows:
            # Sent as rendered, up to the row that passes the limit, which is cut in half.
            pieces: list[bytes] = []
            total = 0
            for part in parts:
                rendered = part.pieces[len(part.pieces) - part.rows :]  # after any preamble
                preamble = part.pieces[: len(part.pieces) - part.rows]
                if total + part.rows > cfg.cut_after_rows:
                    keep = cfg.cut_after_rows - total
                    half = rendered[keep][: len(rendered[keep]) // 2]
                    pieces += [*preamble, *rendered[:keep], half]
                    self._record(200, cfg.cut_after_rows + 1, fault)
                    self.close_connection = True
                    body = b"".join(pieces)
                    self._start(200, content_type, {"Content-Length": str(len(body) + 1024)})
                    self.wfile.write(body)
                    return
                pieces.append(part.data())
                total += part.rows
            parts = iter([Part(pieces, b"", True, total)])

        cut = body_fault == "cut_last_line"
        chunks = (part.cut(le) if cut and part.last else part.data() for part in parts)
        first = next(chunks)
        second = next(chunks, None)
        if cfg.transfer == "length" or (cfg.transfer == "auto" and second is None):
            body = first + (second or b"") + b"".join(chunks)
            self._record(200, counter.rows, fault)
            self._start(200, content_type, {"Content-Length": str(len(body))})
            self.wfile.write(body)
            return
        pending = [first] if second is None else [first, second]
        try:
            write = self._start_streamed(content_type)
            for chunk in itertools.chain(pending, chunks):
                if sim._stopping.is_set():
                    self.close_connection = True
                    self._record(200, counter.rows, fault)
                    return
                write(chunk)
        except ConnectionError:
            # The client went away (it timed out, say): the request is logged all the same.
            self._record(200, counter.rows, fault)
            raise
        # Record before the final bytes: once a client has the whole body, the log has the request.
        self._record(200, counter.rows, fault)
        if cfg.transfer != "close":
            self.wfile.write(b"0\r\n\r\n")

    def _start_streamed(self, content_type: str) -> Callable[[bytes], object]:
        """Send the headers of a body of unknown length; the writer for its pieces."""
        if self.sim.config.transfer == "close":
            self.close_connection = True
            self._start(200, content_type, {"Connection": "close"})
            return self.wfile.write
        self._start(200, content_type, {"Transfer-Encoding": "chunked"})
        return self._write_chunk

    def _send_prerendered(
        self, prerendered: Prerendered, query: FeedQuery, fault: str | None
    ) -> None:
        sim, cfg = self.sim, self.sim.config
        preamble, rows, trailer, count = prerendered.response(query.from_id, cfg.max_rows)
        content_type = _content_type(prerendered.fmt, cfg)
        if cfg.transfer == "length" or (cfg.transfer == "auto" and count <= cfg.batch_rows):
            self._record(200, count, fault)
            size = len(preamble) + len(rows) + len(trailer)
            self._start(200, content_type, {"Content-Length": str(size)})
            self.wfile.write(preamble)
            self.wfile.write(rows)
            self.wfile.write(trailer)
            return
        write = self._start_streamed(content_type)
        try:
            write(preamble)
            for at in range(0, len(rows), _PRERENDERED_CHUNK_BYTES):
                if sim._stopping.is_set():
                    self.close_connection = True
                    self._record(200, count, fault)
                    return
                write(bytes(rows[at : at + _PRERENDERED_CHUNK_BYTES]))
            write(trailer)
        except ConnectionError:
            self._record(200, count, fault)
            raise
        self._record(200, count, fault)
        if cfg.transfer != "close":
            self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class BillingFeedSimulator:
    """A fake billingfeed.php on a local port, serving in a background thread."""

    def __init__(
        self, config: SimulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.generator = CdrGenerator(
            config.seed,
            start=config.start,
            mean_gap_s=config.mean_gap_s,
            jitter_s=config.jitter_s,
            accounts=config.accounts,
            malformed_rate=config.malformed_rate,
            status_fault_from_id=config.status_fault_from_id,
            odd_rows=config.odd_row_map(),
        )
        self.store = FeedStore(
            self.generator,
            backlog=config.backlog,
            rate_per_s=config.rate_per_s,
            clock=clock,
            max_rows=config.max_rows,
        )
        self._lock = threading.Lock()
        self._faults: deque[tuple[str, dict[str, float]]] = deque()
        self._dice = random.Random(f"cdr-streamer faults {config.seed}")
        self._turns: dict[str, int] = {}
        self._log: list[RequestRecord] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.prerendered: Prerendered | None = None
        if config.prerender != "none":
            started = time.monotonic()
            self.prerendered = Prerendered(config.prerender, config, self.generator)
            logger.info(
                "prerendered %d rows (%d bytes of %s) in %.1f s",
                config.backlog, len(self.prerendered.body), config.prerender,
                time.monotonic() - started,
            )  # fmt: skip

    def __enter__(self) -> BillingFeedSimulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind host:port (port 0: a free one) and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        self._stopping.clear()
        self._server = _Server((self.config.host, self.config.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="billingfeed-simulator",
            daemon=True,
        )
        self._thread.start()
        logger.info("billing feed simulator listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving; responses still streaming are cut off. Safe to call twice."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """The full URL of the endpoint, ending in /billingfeed.php."""
        if self._server is None:
            raise RuntimeError("the simulator is not running: call start()")
        host, port = self._server.server_address[:2]
        host_text = str(host)
        if ":" in host_text:
            host_text = f"[{host_text}]"  # IPv6
        return f"http://{host_text}:{port}{PATH}"

    @property
    def high_id(self) -> int:
        """The highest CDR ID that exists now."""
        return self.store.high_id

    def add(self, n: int) -> None:
        """Make `n` more CDRs exist."""
        self.store.add(n)

    def row(self, cdr_id: int) -> dict[str, str]:
        """CDR `cdr_id` as canonical text (what the feed writes unless the ID is malformed)."""
        return self.generator.row(cdr_id)

    def is_malformed(self, cdr_id: int) -> bool:
        """True if this ID's row is always written broken (see `malformed_rate`)."""
        return self.generator.is_malformed(cdr_id)

    def inject(self, fault: str, count: int = 1, **params: float) -> None:
        """Give the next `count` requests this fault (one of FAULTS), in order after earlier ones.

        Parameters: "429" retry_after (seconds; default `retry_after_s`), "latency" seconds
        (default 1), "html" status (default 200).
        """
        allowed = {"429": {"retry_after"}, "latency": {"seconds"}, "html": {"status"}}
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        unknown = set(params) - allowed.get(fault, set())
        if unknown:
            raise ValueError(f"fault {fault!r} takes no parameter {', '.join(sorted(unknown))}")
        with self._lock:
            self._faults.extend((fault, dict(params)) for _ in range(count))

    @property
    def requests(self) -> tuple[RequestRecord, ...]:
        """Every request answered so far, oldest first, without passwords.

        A request is logged once its answer is written (or the client has gone), so a
        slow answer is logged after quicker later ones: sorting restores arrival order.
        """
        with self._lock:
            return tuple(sorted(self._log, key=lambda record: record.received_at))

    @property
    def request_count(self) -> int:
        """How many requests have been received."""
        with self._lock:
            return len(self._log)

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)
        logger.info(
            "%s %s format=%s fromid=%s rows=%d status=%d%s",
            record.method,
            record.path,
            record.params.get("format") or "csv",
            record.params.get("fromid", "-"),
            record.rows,
            record.status,
            f" fault={record.fault}" if record.fault else "",
        )

    def _take_fault(self) -> tuple[str | None, dict[str, float]]:
        """The next injected fault, else one drawn with the configured rates."""
        cfg = self.config
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            rates = (
                ("error", cfg.error_rate),
                ("429", cfg.rate_limit_rate),
                ("html", cfg.html_error_rate),
                ("truncate", cfg.truncate_rate),
            )
            if not any(rate for _, rate in rates):
                return None, {}
            roll = self._dice.random()
            for kind, rate in rates:
                if roll < rate:
                    turn = self._turns[kind] = self._turns.get(kind, -1) + 1
                    if kind == "error":
                        return ("500", "503")[turn % 2], {}
                    if kind == "html":
                        return "html", {"status": (200, 500)[turn % 2]}
                    if kind == "truncate":
                        return ("truncate", "truncate_chunked")[turn % 2], {}
                    return "429", {}
                roll -= rate
        return None, {}


def serve(config: SimulatorConfig) -> None:
    """Run the simulator until KeyboardInterrupt or SIGTERM, printing its URL first."""
    stop = threading.Event()
    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if in_main:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with BillingFeedSimulator(config) as sim:
            print(f"Billing feed simulator on {sim.url} (login {config.login})", flush=True)
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
