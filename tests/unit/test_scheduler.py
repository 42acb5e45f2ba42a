"""run_together: sources of one unit take turns; an idle unit holds no producer."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from streamer import scheduler
from streamer.metrics import Metrics
from streamer.retry import Backoff
from streamer.scheduler import Runner, run_together


class Scripted(Runner):
    """Polls return the delays it is given; counts releases; the last poll stops the run."""

    def __init__(self, delays: list[float], stop: threading.Event) -> None:
        super().__init__("main", Metrics(CollectorRegistry()).for_feed("main"), Backoff(1, 1))
        self.delays = delays
        self.stop = stop
        self.events: list[str] = []

    def _poll(self, *, once: bool) -> float | None:
        self.events.append("poll")
        if not self.delays:
            self.stop.set()
            return None
        return self.delays.pop(0)

    def _position(self) -> str:
        return ""

    def close(self) -> None:
        pass

    def release(self) -> None:
        self.events.append("release")


def test_a_unit_releases_its_producer_only_before_a_long_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler, "RELEASE_IDLE_AFTER_S", 0.05)
    stop = threading.Event()
    runner = Scripted([0.0, 0.01, 0.1, 0.06, 0.01], stop)
    run_together([runner], stop)
    # Released before the 0.1 s and the 0.06 s waits, once each; not before short ones.
    assert runner.events == [
        "poll", "poll", "poll", "release", "poll", "release", "poll", "poll",
    ]  # fmt: skip
