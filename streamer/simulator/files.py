"""Files as the provider's SFTP/FTP delivery would write them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from streamer.errors import ConfigError
from streamer.simulator.config import FORMATS, SimulatorConfig
from streamer.simulator.data import CdrGenerator
from streamer.simulator.render import Renderer

logger = logging.getLogger("streamer.simulator")  # one name for the whole simulator

# --- files: the provider's SFTP delivery ----------------------------------------------------

Cadence = Literal["daily", "hourly", "20min"]
CADENCES: Mapping[str, timedelta] = {
    "daily": timedelta(days=1),
    "hourly": timedelta(hours=1),
    "20min": timedelta(minutes=20),
}


def file_name(period_start: datetime, fmt: str) -> str:
    """The name of the file of the period starting then: cdr_YYYYMMDD_HHMM.<format>."""
    return f"cdr_{period_start:%Y%m%d_%H%M}.{fmt}"


def write_files(
    config: SimulatorConfig,
    directory: Path,
    *,
    cadence: Cadence,
    fmt: str,
    upto_id: int | None = None,
) -> list[Path]:
    """Write the files the provider would deliver by SFTP, with the feed's data for the seed.

    CDRs 1..`upto_id` (default: `config.backlog`), one file per period of `cadence`
    (UTC, so no name repeats when the clocks go back) that holds any, by the call's
    UTCDateTime, rows in ID order, rendered as the feed renders `fmt` with the config's
    variants (header, date styles, malformed rows...). Each file is written under a
    temporary name (a dot first, so no glob on `cdr_*` matches it) and then renamed, so a
    reader never sees half a file. Returns the paths written, in period order.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if cadence not in CADENCES:
        raise ConfigError(f"cadence must be one of {', '.join(CADENCES)}, not {cadence!r}")
    last = config.backlog if upto_id is None else upto_id
    generator = CdrGenerator(
        config.seed,
        start=config.start,
        mean_gap_s=config.mean_gap_s,
        jitter_s=config.jitter_s,
        accounts=config.accounts,
        malformed_rate=config.malformed_rate,
        status_fault_from_id=config.status_fault_from_id,
        odd_rows=config.odd_row_map(),
    )
    directory.mkdir(parents=True, exist_ok=True)
    step = CADENCES[cadence]
    if last < 1:
        return []

    def utc_of(row: Mapping[str, str]) -> datetime:
        return datetime.strptime(row["UTCDateTime"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)

    def period_of(when: datetime) -> datetime:
        midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight + (when - midnight) // step * step

    slack = timedelta(seconds=config.jitter_s + 1)
    period = period_of(utc_of(generator.row(1)) - slack)
    end = utc_of(generator.row(last)) + slack
    written: list[Path] = []
    while period <= end:
        # Every ID whose call can fall in this period, kept if it does (jitter crosses edges).
        window = generator.ids_between(period, period + step)
        ids = range(max(1, window.start), min(last, window.stop - 1) + 1)
        rows = [
            (cdr_id, row)
            for cdr_id in ids
            if period <= utc_of(row := generator.row(cdr_id)) < period + step
        ]
        if rows:
            name = file_name(period, fmt)
            written.append(_write_file(directory / name, Renderer(fmt, config), generator, rows))
        period += step
    return written


def _write_file(
    path: Path,
    renderer: Renderer,
    generator: CdrGenerator,
    rows: list[tuple[int, dict[str, str]]],
) -> Path:
    """One file, written to a temporary name and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(renderer.preamble())
        for i, (cdr_id, row) in enumerate(rows):
            f.write(renderer.row(generator.wire_row(cdr_id, row), i == 0))
        f.write(renderer.trailer())
    tmp.replace(path)
    return path
