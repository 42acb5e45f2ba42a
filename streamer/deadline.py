"""A deadline for one whole HTTP request: connect, headers and the last byte of the body.

httpx's timeouts bound each network operation, not a request: a server that sends one
byte within every read timeout holds a request (and the poll) for as long as it likes.
`RequestDeadline` arms a timer when the request starts; at the deadline it shuts the
request's socket down, which makes the read (or write) in progress fail at once, in
whichever thread it blocks (`shutdown` wakes a blocked `recv`; `close` would not). The
caller then sees a transport error, or a body that ends early, and asks `expired` what
it means.

The socket is learnt from httpcore's `trace` extension (the `connect_tcp` event), so
the client must open a new connection per request (no keep-alive): a reused one would
not be seen.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any


class RequestDeadline:
    """Shuts down the request's socket `seconds` after `start()`; see the module docstring."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self._started = 0.0
        self.expired = False

    def start(self) -> None:
        self._started = time.monotonic()
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = "request-deadline"
        self._timer.start()

    def remaining_s(self) -> float:
        return max(0.0, self._started + self.seconds - time.monotonic())

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's `trace` extension: note the socket once it is connected."""
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._socket = sock
            if self.expired:  # the deadline passed while connecting
                _shut(sock)

    def cancel(self) -> None:
        """The request is over: disarm the timer and forget the socket."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._socket = None

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._socket is not None:
                _shut(self._socket)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already: the request ended on its own
        sock.shutdown(socket.SHUT_RDWR)
