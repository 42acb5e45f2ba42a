"""When each source polls: retries with backoff, fatal errors stop it, and sources that take turns.

A `Runner` polls one source until stopped; `run_together` runs several in one thread
(a feed and its paired SFTP source), one poll at a time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from streamer.errors import FatalError, FencedError, RetriableError, StoppedError, StreamerError
from streamer.logs import fields, polling
from streamer.metrics import FeedMetrics
from streamer.pipeline import FeedPipeline, PollResult
from streamer.retry import Backoff
from streamer.sources.files import FileCollector

log = logging.getLogger(__name__)

# A unit whose next poll is at least this far away closes its producer until then: a
# Kafka client (threads, buffers, a connection per broker) costs about 0.5 MiB, and
# a thousand feeds polled every ten minutes would hold a thousand of them for nothing.
RELEASE_IDLE_AFTER_S = 60.0


def _nothing() -> None:
    return None


class Runner(ABC):
    """Polls one source until stopped: retriable errors back off, fatal ones stop it."""

    kind = "source"  # the first word of its log lines: "feed", "sftp"

    def __init__(self, name: str, metrics: FeedMetrics, backoff: Backoff) -> None:
        self.name = name
        self.metrics = metrics
        self.backoff = backoff
        self.error: Exception | None = None
        self._failures = 0
        # With `once`: retriable failures in a row before this runner gives up.
        self.max_failures = 5
        # What the status page shows (status.py): the last poll, its outcome, the last error.
        self.last_poll_at: float | None = None  # Unix time
        self.last_poll_ok: bool | None = None
        self.last_summary = ""
        self.last_error_text = ""
        self.next_poll_at: float | None = None  # Unix time
        # Cluster mode: being fenced means another replica took this unit over (a
        # handover, not an outage); this is told, and the runner ends without an error.
        self.on_fenced: Callable[[FencedError], None] | None = None

    @property
    def failures(self) -> int:
        """Retriable failures in a row: the one retry counter (0 after a success)."""
        return self._failures

    @abstractmethod
    def _poll(self, *, once: bool) -> float | None:
        """Poll once and log it; the seconds until the next poll, or None when done (once)."""

    @abstractmethod
    def _position(self) -> str:
        """Where the source's committed cursor stands, for the log of a failed poll."""

    @abstractmethod
    def close(self) -> None:
        """Release the source's connections and producer."""

    def release(self) -> None:  # noqa: B027 - optional: by default a source keeps all
        """Idle for a while: free the producer; the next poll builds another."""

    def step(self, *, once: bool = False, max_failures: int | None = None) -> float | None:
        """One poll with its error handling: the seconds to wait, or None once this runner ends.

        With `once`, `max_failures` (default: the runner's own) retriable errors in a row end
        the run (recorded in `error`). Every line logged meanwhile names this source.
        """
        with polling(self.kind, self.name):
            delay = self._step(once=once, max_failures=max_failures or self.max_failures)
        self.next_poll_at = None if delay is None else time.time() + delay
        return delay

    def _step(self, *, once: bool, max_failures: int) -> float | None:
        label = f"{self.kind} {self.name}"
        self.metrics.poll_began()
        self.last_poll_at = time.time()
        try:
            delay = self._poll(once=once)
        except StoppedError as exc:
            # Cluster mode: the unit moves to another replica. Not a failure.
            log.info("%s: asked to stop mid-poll, %s; %s", label, exc, self._position())
            return None
        except FatalError as exc:
            if isinstance(exc, FencedError) and self.on_fenced is not None:
                log.info("%s: handed over: another replica fenced this one (%s)", label, exc)
                self.on_fenced(exc)
                return None
            self._failed(exc)
            log.error("%s stopped: %s", label, exc, extra=fields("stopped", error=str(exc)))
            self.metrics.poll_error(type(exc).__name__)
            self.metrics.feed_up.set(0)
            self.error = exc
            return None
        except RetriableError as exc:
            self.metrics.poll_error(type(exc).__name__)
            self._failures += 1
            self._failed(exc)
            if once and self._failures >= max_failures:
                log.error("%s: giving up after %d failures: %s", label, self._failures, exc)
                self.error = exc
                return None
            # The one retry counter: a source's client does not retry within a poll.
            delay = self.backoff.next_delay(getattr(exc, "retry_after_s", None) or 0.0)
            try:
                position = self._position()
            except StreamerError as error:  # e.g. Kafka down: the cursor cannot be read now
                position = f"cursor unknown ({error})"
            log.warning(
                "%s: %s; %s, retry %d in %.1f s", label, exc, position, self._failures, delay,
                extra=fields("retry", error=str(exc), attempt=self._failures, delay_s=delay),
            )  # fmt: skip
            return delay
        except Exception as exc:
            # A bug or an unforeseen error: this source stops, loudly, and the process
            # reports it in its exit code, instead of a thread dying unnoticed.
            self._failed(exc)
            log.exception("%s stopped on an unexpected error: %s", label, exc)
            self.metrics.poll_error(type(exc).__name__)
            self.metrics.feed_up.set(0)
            self.error = exc
            return None
        finally:
            self.metrics.poll_ended()
        self.backoff.reset()
        self._failures = 0
        self.last_poll_ok = True
        return delay

    def _failed(self, exc: Exception) -> None:
        self.last_poll_ok = False
        self.last_error_text = str(exc) or type(exc).__name__

    def run(
        self, stop: threading.Event, *, once: bool = False, max_failures: int | None = None
    ) -> None:
        """Poll until `stop` is set; with `once`, until the source has nothing more."""
        while not stop.is_set():
            delay = self.step(once=once, max_failures=max_failures)
            if delay is None:
                return
            if delay > 0:
                stop.wait(delay)


class FeedRunner(Runner):
    """Polls one feed until stopped: retriable errors back off, fatal ones stop it."""

    kind = "feed"

    def __init__(
        self,
        pipeline: FeedPipeline,
        *,
        poll_interval_s: float,
        poll_jitter_ratio: float = 0.0,
        page_size: int = 0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            pipeline.name,
            pipeline.metrics,
            backoff or Backoff(1.0, min(300.0, max(1.0, poll_interval_s))),
        )
        self.pipeline = pipeline
        self.poll_interval_s = poll_interval_s
        self.poll_jitter_ratio = poll_jitter_ratio
        self.page_size = page_size
        self._rng = rng or random.Random()

    def close(self) -> None:
        self.pipeline.close()

    def release(self) -> None:
        self.metrics.watch_producer(_nothing)  # a scrape must not keep the old one alive
        self.pipeline.slot.close()

    def _position(self) -> str:
        # No I/O here: this runs while Kafka (maybe holding the cursor) is failing.
        cursor = self.pipeline.last_cursor
        return "cursor not read yet" if cursor is None else f"cursor stays at {cursor}"

    def _poll(self, *, once: bool) -> float | None:
        result = self.pipeline.poll()
        self._log_poll(result)
        if result.more:  # a catch-up by date windows: the next window now
            return 0.0
        # A full page that moved the cursor: the provider has more, fetch it now. (One
        # that did not move it would be fetched again as it is: wait the interval.)
        if (
            self.page_size
            and result.rows >= self.page_size
            and result.cursor_after > result.cursor_before
        ):
            return 0.0
        if once:
            return None
        return self.poll_interval_s * (1 + self._rng.uniform(0, self.poll_jitter_ratio))

    def _log_poll(self, result: PollResult) -> None:
        self.last_summary = (
            f"{result.rows} rows, {result.published} published, "
            f"{result.dead_lettered} dead letters; cursor {result.cursor_before} -> "
            f"{result.cursor_after}"
        )
        log.info(
            "feed %s: %d rows in %.1f s: %d published, %d dead letters, %d skipped, "
            "%d duplicates%s%s; cursor %d -> %d",
            self.name, result.rows, result.seconds, result.published, result.dead_lettered,
            result.skipped, result.duplicates,
            f", {result.covered} published by its file source" if result.covered else "",
            f", {result.late} found late by reconciliation" if result.late else "",
            result.cursor_before, result.cursor_after,
            extra=fields(
                "poll", rows=result.rows, seconds=round(result.seconds, 3),
                published=result.published, dead_letters=result.dead_lettered,
                skipped=result.skipped, duplicates=result.duplicates, covered=result.covered,
                late=result.late,
                cursor_before=result.cursor_before, cursor_after=result.cursor_after,
            ),
        )  # fmt: skip


class SftpRunner(Runner):
    """Polls one SFTP source until stopped: retriable errors back off, fatal ones stop it.

    With `once`, it polls until no file is left waiting to settle.
    """

    kind = "sftp"  # or the collector's protocol (ftp, ftps)

    def __init__(
        self,
        collector: FileCollector,
        *,
        poll_interval_s: float,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(
            collector.name,
            collector.metrics,
            backoff or Backoff(1.0, min(300.0, max(1.0, poll_interval_s))),
        )
        self.collector = collector
        self.kind = collector.kind  # sftp, ftp or ftps
        self.poll_interval_s = poll_interval_s

    def close(self) -> None:
        self.collector.close()

    def release(self) -> None:
        self.metrics.watch_producer(_nothing)
        self.collector.sink.slot.close()

    def _position(self) -> str:
        cursor = self.collector.loaded_cursor
        if cursor is None:  # reading it failed: do not wait on the store again just to log
            return "cursor not read yet"
        done = sum(1 for s in cursor.files.values() if s == "done")
        where = f", {cursor.current} confirmed to row {cursor.rows}" if cursor.current else ""
        return f"cursor stays at {done} files done{where}"

    def _poll(self, *, once: bool) -> float | None:
        result = self.collector.poll()
        self.last_summary = (
            f"{result.listed} files listed, {result.files_done} done, {result.waiting} waiting; "
            f"{result.published} published, {result.dead_lettered} dead letters"
        )
        level = logging.INFO if result.files_done or result.files_quarantined else logging.DEBUG
        log.log(
            level,
            "sftp %s: %d files listed, %d done, %d quarantined, %d waiting to settle; "
            "%d rows in %.1f s: %d published, %d dead letters, %d covered by the feed",
            self.name, result.listed, result.files_done, result.files_quarantined,
            result.waiting, result.rows, result.seconds, result.published,
            result.dead_lettered, result.covered,
        )  # fmt: skip
        if result.waiting:
            # Look again when the waiting files may have settled.
            return max(0.1, min(self.poll_interval_s, self.collector.tracker.settle_s))
        if once:
            return None
        return self.poll_interval_s


def run_together(
    runners: Sequence[Runner],
    stop: threading.Event,
    *,
    once: bool = False,
    max_failures: int | None = None,
) -> None:
    """Run several sources in this thread, each on its own schedule, one poll at a time.

    For a feed and its paired SFTP source: one poll never overlaps the other's, so
    each reads the other's committed progress, never a half-done one. While the next
    poll is RELEASE_IDLE_AFTER_S or more away, the sources hold no producer.
    """
    due = [0.0] * len(runners)
    active = list(range(len(runners)))
    released = True  # nothing to release before the first poll
    while active and not stop.is_set():
        index = min(active, key=lambda i: due[i])
        wait = due[index] - time.monotonic()
        if wait > 0:
            if wait >= RELEASE_IDLE_AFTER_S and not released:
                for i in active:
                    runners[i].release()
                released = True
            stop.wait(wait)
            continue
        released = False
        delay = runners[index].step(once=once, max_failures=max_failures)
        if delay is None:
            active.remove(index)
        else:
            due[index] = time.monotonic() + delay
