"""Who runs a feed now: a lock beside each cursor file, a lease record in the cursor topic.

`cdr-streamer cursor set|reset` must not move a cursor under a running feed (that
feed's next commit would overwrite it). So a running streamer says it runs:

- **file cursor store**: it holds an exclusive `flock` on `<cursor_file>.lock` (the
  file names its pid and host) for as long as it runs. The kernel drops the lock when
  the process ends, however it ends, so a lock that cannot be taken means a live
  process. A second `cdr-streamer run` on the same cursor file is refused too.
- **Kafka cursor store**: it writes a lease record (key `running:<owner>`, owner the
  feed's name or `sftp:NAME`) to the compacted cursor topic at start and every
  `LEASE_RENEW_S`, and a `stopped` one when it stops cleanly. A lease renewed within
  `LEASE_TTL_S` means a live process (after a kill -9 the lease lapses by itself).
  In exactly-once mode the cursor command also commits the new cursor in a
  transaction of the feed's own transactional id, which fences any instance still
  running, whatever its lease said.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from streamer.cursor import _read_latest
from streamer.errors import ConfigError
from streamer.logs import LIBRDKAFKA

log = logging.getLogger(__name__)

LEASE_RENEW_S = 30.0
LEASE_TTL_S = 90.0


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


class FileLock:
    """An exclusive flock on `<cursor file>.lock`, held while this process runs the source."""

    def __init__(self, cursor_file: Path) -> None:
        self.path = cursor_file.with_name(cursor_file.name + ".lock")
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        """Take the lock; ConfigError naming the holder if another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{what} is already running ({describe_holder(self.path)} holds {self.path}): "
                "only one cdr-streamer may run a feed"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({**_me(), "started_at": time.time()}) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def file_holder(cursor_file: Path) -> str | None:
    """Who holds the lock of this cursor file now (a running streamer), or None."""
    path = cursor_file.with_name(cursor_file.name + ".lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return f"process {data['pid']} on {data['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def lease_key(owner: str) -> str:
    return f"running:{owner}"


class KafkaLease:
    """Lease records in the cursor topic for `owners`, renewed in a daemon thread."""

    def __init__(
        self,
        bootstrap_servers: str,
        client_config: Mapping[str, str],
        topic: str,
        owners: Sequence[str],
    ) -> None:
        self.topic = topic
        self.owners = list(owners)
        config: dict[str, Any] = {**client_config, "bootstrap.servers": bootstrap_servers}
        config.update({"enable.idempotence": "true", "acks": "all", "linger.ms": "0"})
        self._producer = Producer(config, logger=LIBRDKAFKA)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="cursor-lease", daemon=True)
        self._started_at = time.time()

    def start(self) -> None:
        self._write("running")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._write("stopped")

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            self._write("running")

    def _write(self, state: str) -> None:
        record = {
            **_me(),
            "state": state,
            "started_at": self._started_at,
            "renewed_at": time.time(),
        }
        try:
            for owner in self.owners:
                value = json.dumps({**record, "owner": owner}).encode()
                self._producer.produce(self.topic, value, lease_key(owner).encode())
            if self._producer.flush(10):
                log.debug("lease records not yet confirmed by Kafka")
        except Exception as exc:  # a lease is advice: it must never stop a feed
            log.debug("could not write the lease records: %s", exc)


def lease_holder(
    bootstrap_servers: str,
    client_config: Mapping[str, str],
    topic: str,
    owner: str,
    *,
    now: float | None = None,
    timeout_s: float = 30.0,
) -> str | None:
    """Who holds a live lease on `owner` (a running streamer), or None.

    DeliveryError when the cursor topic cannot be read to its end (e.g. a transaction
    is open on it): the caller decides whether not knowing is fatal."""
    raw = _read_latest(bootstrap_servers, client_config, topic, lease_key(owner), timeout_s)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        state, renewed_at = data["state"], float(data["renewed_at"])
    except (ValueError, KeyError, TypeError):
        return None
    age = (time.time() if now is None else now) - renewed_at
    if state != "running" or age > LEASE_TTL_S:
        return None
    return f"process {data.get('pid')} on {data.get('host')}, lease renewed {age:.0f} s ago"
