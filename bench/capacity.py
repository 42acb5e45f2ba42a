"""Capacity of one replica: memory, CPU and polls per second from 10 to 1,000 feeds.

One `cdr-streamer run` process (at-least-once, cursors in Kafka, as cluster mode
needs) polls N feeds of one simulator (`cdr-streamer simulate`, its own process),
against a broker this benchmark starts for itself. Three loads:

- idle: every INTERVAL_S the feed has nothing new; every poll is an empty answer;
- busy: every INTERVAL_S; the simulator makes BUSY_RATE new CDRs per second, which
  every feed fetches (about INTERVAL_S rows a poll), publishes and commits;
- idle, 600 s: the provider's own interval; past the first poll nothing is due within
  the window, so it shows what a waiting feed costs (polls are not counted).

All feeds share the simulator's one login: what is measured is the streamer's cost
per feed, not the provider's. Once every feed has polled once (the ramp) and one more
interval has passed, WINDOW_S seconds are measured: the process's CPU time and RSS
(/proc, librdkafka's threads included), its threads and file descriptors, and the
polls and CDRs its log lines report.

"holds" means every feed finished its first poll within RAMP_TIMEOUT_S, the polls per
second reach 90 % of what the interval asks for (N / (interval x (1 + jitter/2))),
where counted, and the process needs less than one core.

Run alone: `python -m bench capacity`; CDR_BENCH_FEEDS="10,100" to choose the counts,
CDR_BENCH_LOADS="busy" the loads.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._services import LOGIN, PASSWORD, REPO_ROOT, broker, simulator

FEEDS = tuple(int(n) for n in os.environ.get("CDR_BENCH_FEEDS", "10,100,1000").split(","))
INTERVAL_S = 10.0
JITTER = 0.1  # the streamer's default poll_jitter_ratio
WINDOW_S = float(os.environ.get("CDR_BENCH_WINDOW_S", "60"))
BUSY_RATE = 1.0  # new CDRs per second, fetched by every feed
RAMP_TIMEOUT_S = 600.0
HOLDS_SHARE = 0.90
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
_POLL_LINE = re.compile(rb"feed (\S+): (\d+) rows in [\d.]+ s: (\d+) published")


@dataclass(frozen=True, slots=True)
class Load:
    name: str
    interval_s: float
    rate: float  # the simulator's new CDRs per second
    counts_polls: bool = True


LOADS = (
    Load("idle", INTERVAL_S, 0.0),
    Load("busy", INTERVAL_S, BUSY_RATE),
    Load("idle, 600 s", 600.0, 0.0, counts_polls=False),
)


@dataclass(frozen=True, slots=True)
class Measurement:
    feeds: int
    load: str
    ramp_s: float  # process start to every feed's first finished poll
    rss_mib: float
    threads: int
    fds: int
    cpu_share: float  # of one core, over the window
    polls_per_s: float
    expected_polls_per_s: float
    cdrs_per_s: float
    failed_polls: int
    ramped: int  # feeds that had polled by the end of the ramp (all of them, or it timed out)
    counts_polls: bool

    @property
    def holds(self) -> bool:
        polls_ok = (
            not self.counts_polls or self.polls_per_s >= HOLDS_SHARE * self.expected_polls_per_s
        )
        return self.ramped == self.feeds and polls_ok and self.cpu_share < 1

    @property
    def cpu_ms_per_poll(self) -> float:
        return 1000 * self.cpu_share / self.polls_per_s if self.polls_per_s else 0.0

    @property
    def cpu_us_per_cdr(self) -> float | None:
        return 1e6 * self.cpu_share / self.cdrs_per_s if self.cdrs_per_s else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(
    path: Path, bootstrap: str, url: str, feeds: int, port: int, interval_s: float
) -> Path:
    topic = f"cdr-capacity-{uuid.uuid4().hex[:8]}"
    lines = [
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        f'topic = "{topic}"',
        f'dead_letter_topic = "{topic}-dlq"',
        f'cursor_topic = "{topic}-cursors"',
        'cursor_store = "kafka"',
        "[metrics]",
        'host = "127.0.0.1"',
        f"port = {port}",
    ]
    for n in range(feeds):
        lines += [
            "[[feeds]]",
            f'name = "f{n:04d}"',
            f"url = {json.dumps(url)}",
            f'login = "{LOGIN}"',
            f"poll_interval_s = {interval_s}",
            f"poll_jitter_ratio = {JITTER}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def _polls(log: bytes) -> list[tuple[str, int]]:
    return [(m.group(1).decode(), int(m.group(3))) for m in _POLL_LINE.finditer(log)]


def measure(bootstrap: str, url: str, feeds: int, load: Load, tmp: Path) -> Measurement:
    """One streamer process with `feeds` feeds: the ramp, then WINDOW_S measured."""
    port = _free_port()
    stem = f"capacity-{feeds}-{load.name.replace(', ', '-').replace(' ', '')}"
    config = _config(tmp / f"{stem}.toml", bootstrap, url, feeds, port, load.interval_s)
    log_path = tmp / f"{stem}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(config)],
            env={**os.environ, "CDR_FEED_PASSWORD": PASSWORD},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        deadline = started + RAMP_TIMEOUT_S
        ramped = 0
        while ramped < feeds and time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{feeds} feeds ({load}): the streamer exited:\n{tail}")
            time.sleep(1.0)  # how often the log is looked at
            ramped = len({feed for feed, _ in _polls(log_path.read_bytes())})
        ramp_s = time.monotonic() - started
        if ramped == feeds and load.counts_polls:
            time.sleep(load.interval_s)  # one more interval: the feeds drift into their rhythm
        offset = log_path.stat().st_size
        cpu_before, at = _cpu_s(proc.pid), time.monotonic()
        time.sleep(WINDOW_S)  # the measured window
        cpu_after, elapsed = _cpu_s(proc.pid), time.monotonic() - at
        rss_mib = _status(proc.pid, "VmRSS") / 1024
        threads = _status(proc.pid, "Threads")
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        with log_path.open("rb") as f:
            f.seek(offset)
            window = f.read()
        polls = _polls(window)
        failed = window.count(b"next try in")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return Measurement(
        feeds=feeds,
        load=load.name,
        ramp_s=ramp_s,
        rss_mib=rss_mib,
        threads=threads,
        fds=fds,
        cpu_share=(cpu_after - cpu_before) / elapsed,
        polls_per_s=len(polls) / elapsed,
        expected_polls_per_s=feeds / (load.interval_s * (1 + JITTER / 2)),
        cdrs_per_s=sum(n for _, n in polls) / elapsed,
        failed_polls=failed,
        ramped=ramped,
        counts_polls=load.counts_polls,
    )


def render(results: Sequence[Measurement]) -> str:
    lines = [
        "## Capacity of one replica (feeds per process)",
        "",
        f"One process polls N feeds (jitter {JITTER:.0%}), at-least-once, cursors in "
        f"Kafka; idle: every {INTERVAL_S:g} s, empty answers; busy: every {INTERVAL_S:g} s, "
        f"{BUSY_RATE:g} new CDR/s fetched and published by every feed; idle, 600 s: the "
        f"provider's interval, the feeds waiting. Measured over {WINDOW_S:g} s after every "
        "feed polled once (and one more interval, where polls are counted). CPU is of one "
        "core; RSS and threads at the end of the window.",
        "",
        "| feeds | load | ramp s | RSS MiB | RSS KiB/feed | threads | fds | CPU % | CPU ms/poll "
        "| CPU-us/CDR | polls/s (asked) | CDR/s | failed polls | holds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_load: dict[str, list[Measurement]] = {}
    for m in results:
        by_load.setdefault(m.load, []).append(m)
    for load, ms in by_load.items():
        base = min(ms, key=lambda m: m.feeds)
        for m in ms:
            per_feed = (
                f"{(m.rss_mib - base.rss_mib) * 1024 / (m.feeds - base.feeds):.0f}"
                if m.feeds > base.feeds
                else "-"
            )
            per_cdr = f"{m.cpu_us_per_cdr:.0f}" if m.cpu_us_per_cdr is not None else "-"
            polls = (
                f"{m.polls_per_s:.1f} ({m.expected_polls_per_s:.1f})" if m.counts_polls else "-"
            )
            per_poll = f"{m.cpu_ms_per_poll:.1f}" if m.counts_polls else "-"
            ramp = f"{m.ramp_s:.0f}" if m.ramped == m.feeds else f"> {m.ramp_s:.0f} ({m.ramped})"
            lines.append(
                f"| {m.feeds} | {load} | {ramp} | {m.rss_mib:.0f} | {per_feed} | "
                f"{m.threads} | {m.fds} | {100 * m.cpu_share:.0f} | {per_poll} | "
                f"{per_cdr} | {polls} | "
                f"{m.cdrs_per_s:.0f} | {m.failed_polls} | {'yes' if m.holds else 'no'} |"
            )
    lines += [
        "",
        "ramp s: from the process's start until every feed finished its first poll; "
        f"\"> {RAMP_TIMEOUT_S:g} (K)\": only K feeds had by then (measured anyway). RSS "
        "KiB/feed: the growth over the smallest count, per added feed.",
    ]
    return "\n".join(lines) + "\n"


def run() -> str:
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="cdr-capacity-") as tmp:
        tmp_path = Path(tmp)
        with broker(tmp_path / "kafka") as bootstrap:
            chosen = os.environ.get("CDR_BENCH_LOADS")  # e.g. "busy": only those
            for load in LOADS:
                if chosen and load.name not in chosen.split(","):
                    continue
                with simulator(0, ["--rate-per-s", str(load.rate)]) as url:
                    for feeds in FEEDS:
                        print(f"capacity: {feeds} feeds, {load.name}", file=sys.stderr, flush=True)
                        results.append(measure(bootstrap, url, feeds, load, tmp_path))
                        print(results[-1], file=sys.stderr, flush=True)
    return render(results)


if __name__ == "__main__":
    print(run())
