"""The processes a benchmark runs against: a local Kafka broker and the feed simulator.

Not a benchmark itself (the leading underscore keeps `python -m bench` from running it).
Each runs in a process of its own, so its CPU time and memory are not the measured
process's.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_LOCAL = REPO_ROOT / "scripts" / "kafka-local"
LOGIN = "81234567"
PASSWORD = "bench-Pa55word"  # noqa: S105 - the local simulator's, for benchmarks only


@contextmanager
def broker(directory: Path) -> Iterator[str]:
    """A fresh single-node broker (scripts/kafka-local) in `directory`; yields its bootstrap."""
    started = subprocess.run(
        [str(KAFKA_LOCAL), "start", "--dir", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        timeout=300,
    )
    try:
        if started.returncode != 0:
            raise RuntimeError(f"kafka-local start failed:\n{started.stderr}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(
            [str(KAFKA_LOCAL), "stop", "--dir", str(directory)],
            capture_output=True,
            check=False,
            cwd=REPO_ROOT,
            timeout=120,
        )


@contextmanager
def simulator(
    backlog: int, extra_args: Sequence[str] = (), *, ready_timeout_s: float = 30.0
) -> Iterator[str]:
    """`cdr-streamer simulate` in its own process; yields its URL once it serves."""
    args = ["--backlog", str(backlog), "--login", LOGIN, *extra_args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "--log-level", "WARNING", "simulate", *args],
        env={**os.environ, "CDR_SIMULATOR_PASSWORD": PASSWORD},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=ready_timeout_s):  # the deadline for the URL
                raise RuntimeError(f"the simulator printed no URL within {ready_timeout_s:g} s")
        line = proc.stdout.readline()
        yield next(word for word in line.split() if word.startswith("http://"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
