"""Peak memory of fetching and parsing one feed response: does it stay flat with size?

The claim under test (streamer/formats.py): the body is parsed as it streams, so
memory does not grow with the size of a response. Each measurement is a fresh
process that fetches one response from the simulator with `FeedClient.fetch`, types
every row with `records.to_record` (no Kafka), and reports its peak RSS
(`VmHWM`): the whole process, interpreter and imports included, which is what
an operator sees. The simulator runs in a process of its own (`cdr-streamer
simulate`), so its memory is not counted.

Run alone: `python -m bench feed_memory`. One measurement by hand:
`python -m bench.feed_memory --url URL --fromid N` (password in CDR_BENCH_PASSWORD).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from bench._services import LOGIN, PASSWORD, REPO_ROOT, simulator

PASSWORD_ENV = "CDR_BENCH_PASSWORD"  # noqa: S105 - the variable's name
BASELINE_ROWS = 100_000
LARGE_ROWS = 1_000_000
RUNS = 3  # the median of three damps one noisy run
TARGET_RATIO = 1.20  # 1M rows within 20 % of 100k rows


@dataclass(frozen=True, slots=True)
class Measurement:
    rows: int
    rejected: int
    seconds: float
    peak_rss_kib: int


def measure(url: str, fromid: int, fmt: str) -> Measurement:
    """One fetch-and-parse in a fresh process (this module's `--url` entry point)."""
    args = ["--url", url, "--fromid", str(fromid), "--format", fmt]
    done = subprocess.run(
        [sys.executable, "-m", "bench.feed_memory", *args],
        env={**os.environ, PASSWORD_ENV: PASSWORD},
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement from {fromid} failed:\n{done.stderr}")
    return Measurement(**json.loads(done.stdout.splitlines()[-1]))


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def run() -> str:
    """Empty, 100k-row and 1M-row responses, each measured RUNS times; a markdown section."""
    fmt = "csv"
    cases = [("empty response", 0), ("100k rows", BASELINE_ROWS), ("1M rows", LARGE_ROWS)]
    results: dict[str, list[Measurement]] = {}
    with simulator(backlog=LARGE_ROWS) as url:
        for name, rows in cases:
            # fromid is exclusive: backlog - rows leaves exactly `rows` rows to send.
            results[name] = [measure(url, LARGE_ROWS - rows, fmt) for _ in range(RUNS)]
    for (name, rows), runs in zip(cases, results.values(), strict=True):
        if any(m.rows != rows or m.rejected for m in runs):
            raise RuntimeError(f"{name}: expected {rows} rows, none rejected; got {runs}")

    peak = {name: statistics.median(m.peak_rss_kib for m in runs) for name, runs in results.items()}
    base = peak["100k rows"]
    lines = [
        "## Feed client memory: fetch + parse + type one response (no Kafka)",
        "",
        f"Peak RSS of a fresh process per run (its own `VmHWM`), median of {RUNS} runs; {fmt} "
        "from `cdr-streamer simulate` in another process. Ratios are against the 100k-row "
        "run of this same report.",
        "",
        "| response | rows | peak RSS (MiB) | runs (MiB) | vs 100k | rows/s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, rows in cases:
        runs = results[name]
        speed = statistics.median(m.rows / m.seconds for m in runs) if rows else 0.0
        lines.append(
            f"| {name} | {rows:,} | {_mib(peak[name])} | "
            f"{', '.join(_mib(m.peak_rss_kib) for m in runs)} | {peak[name] / base:.3f} | "
            f"{f'{speed:,.0f}' if rows else '-'} |"
        )
    ratio = peak["1M rows"] / base
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    lines += [
        "",
        f"1M / 100k peak RSS: **{ratio:.3f}**: {verdict} the target (at most "
        f"{TARGET_RATIO:.2f}). Growth over the empty response: 100k rows "
        f"+{_mib(base - peak['empty response'])} MiB, 1M rows "
        f"+{_mib(peak['1M rows'] - peak['empty response'])} MiB.",
        "",
        "rows/s is for information only: the simulator renders every row on request and "
        "is usually the slower side, and on a machine with few CPUs the two processes "
        "compete for them.",
    ]
    return "\n".join(lines) + "\n"


def _fetch_and_parse(url: str, fromid: int, fmt: str) -> Measurement:
    # Imported here, in the measuring process only.
    from streamer.config import FeedFormat, Secret
    from streamer.records import Rejection, to_record
    from streamer.sources.feed import FeedClient, FeedQuery, FeedTimeouts

    client = FeedClient(
        url,
        LOGIN,
        Secret(os.environ[PASSWORD_ENV]),
        query=FeedQuery(format=cast(FeedFormat, fmt)),
        timeouts=FeedTimeouts(connect_s=10, read_s=120, deadline_s=1800),
        max_attempts=1,
    )
    rows = rejected = 0
    started = time.monotonic()
    try:
        with client.fetch(fromid) as stream:
            for row in stream:
                item = row if isinstance(row, Rejection) else to_record(row)
                rows += 1
                rejected += isinstance(item, Rejection)
    finally:
        client.close()
    seconds = time.monotonic() - started
    return Measurement(rows, rejected, seconds, _peak_rss_kib())


def _peak_rss_kib() -> int:
    """This process's own peak RSS: VmHWM, which exec starts afresh.

    Not ru_maxrss: Linux carries the parent's RSS at fork into a child's ru_maxrss
    across exec, so every child of a grown bench process would report the same floor.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: best effort


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--fromid", type=int, required=True)
    parser.add_argument("--format", default="csv", choices=["csv", "txt", "pipe", "json"])
    args = parser.parse_args(argv)
    m = _fetch_and_parse(args.url, args.fromid, args.format)
    print(json.dumps(dataclasses.asdict(m)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
