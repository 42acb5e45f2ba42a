"""Run the benchmarks and write the markdown report: `python -m bench [MODULE ...]`.

Every module of this package whose name does not start with "_" is a benchmark: it
exposes `run() -> str`, a markdown section (a "## Title" heading, then its results).
They run one after another, in name order, so that none disturbs another's figures.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import bench

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def benchmark_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name[0] != "_")


def _revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def header() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        "# cdr-streamer benchmarks\n\n"
        f"- run: {datetime.now(UTC).isoformat(timespec='seconds')}\n"
        f"- revision: {_revision()}\n"
        f"- Python {platform.python_version()} on {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs ({cpu})\n\n"
        "Figures compare runs made on this machine in this run; absolute numbers from "
        "another machine or another day are not comparable.\n"
    )


def main(argv: Sequence[str]) -> int:
    known = benchmark_names()
    chosen = list(argv) or known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return 2
    sections = [header()]
    for name in chosen:
        started = time.monotonic()
        print(f"running bench.{name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"bench.{name}")
        run = cast(Callable[[], str], module.run)
        sections.append(run().strip() + "\n")
        print(f"bench.{name} took {time.monotonic() - started:.0f} s", file=sys.stderr)
    report = "\n".join(sections)
    RESULTS.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
