"""`serve` as `cdr-streamer simulate` runs it: its own process, real HTTP, stopped by a signal."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

PASSWORD = "Monkey-123-s3cret"
REPO = Path(__file__).resolve().parents[2]
SCRIPT = (
    "from streamer.simulator import SimulatorConfig, serve\n"
    f"serve(SimulatorConfig(password={PASSWORD!r}, backlog=50))\n"
)


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`serve` in a child process, and the URL it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout=30)  # the deadline for the URL to appear
    if not ready:
        proc.kill()
        pytest.fail("serve printed no URL within 30 s")
    line = proc.stdout.readline()
    url = next(word for word in line.split() if word.startswith("http://"))
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_and_stops_cleanly_on_a_signal(
    served: tuple[subprocess.Popen[str], str], stop_signal: signal.Signals
) -> None:
    proc, url = served
    assert url.endswith("/billingfeed.php")
    response = httpx.post(url, data={"login": "81234567", "password": PASSWORD, "fromid": "40"})
    assert response.status_code == 200
    assert len(response.text.splitlines()) == 11  # header + IDs 41..50
    proc.send_signal(stop_signal)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert PASSWORD not in stdout + stderr
