"""Files as the provider's SFTP or FTP delivery would write them, plain or compressed."""

from __future__ import annotations

import gzip
import logging
import zipfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from streamer.errors import ConfigError
from streamer.simulator.config import FORMATS, SimulatorConfig
from streamer.simulator.data import CdrGenerator
from streamer.simulator.render import Renderer

logger = logging.getLogger("streamer.simulator")  # one name for the whole simulator

# --- files: the provider's SFTP and FTP delivery --------------------------------------------

Cadence = Literal["daily", "hourly", "20min"]
CADENCES: Mapping[str, timedelta] = {
    "daily": timedelta(days=1),
    "hourly": timedelta(hours=1),
    "20min": timedelta(minutes=20),
}
Compress = Literal["none", "gz", "zip"]
COMPRESSIONS: tuple[str, ...] = ("none", "gz", "zip")


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
    compress: Compress = "none",
) -> list[Path]:
    """Write the files the provider would deliver by SFTP or FTP, with the feed's data.

    CDRs 1..`upto_id` (default: `config.backlog`), one file per period of `cadence`
    (UTC, so no name repeats when the clocks go back) that holds any, by the call's
    UTCDateTime, rows in ID order, rendered as the feed renders `fmt` with the config's
    variants (header, date styles, malformed rows...). Each file is written under a
    temporary name (a dot first, so no glob on `cdr_*` matches it) and then renamed, so a
    reader never sees half a file. `compress`: gzip each file (`.csv.gz`) or zip it alone
    (`.csv.zip`, the member named as the plain file). Returns the paths, in period order.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if cadence not in CADENCES:
        raise ConfigError(f"cadence must be one of {', '.join(CADENCES)}, not {cadence!r}")
    if compress not in COMPRESSIONS:
        raise ConfigError(f"compress must be one of {', '.join(COMPRESSIONS)}, not {compress!r}")
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
            renderer = Renderer(fmt, config)
            written.append(_write_file(directory / name, renderer, generator, rows, compress))
        period += step
    return written


def _write_file(
    path: Path,
    renderer: Renderer,
    generator: CdrGenerator,
    rows: list[tuple[int, dict[str, str]]],
    compress: Compress = "none",
) -> Path:
    """One file, written to a temporary name and renamed into place."""
    final = path if compress == "none" else path.with_name(f"{path.name}.{compress}")
    tmp = final.with_name(f".{final.name}.tmp")
    with tmp.open("wb") as raw:
        if compress == "gz":
            # mtime=0 and no name in the header: the same seed gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
                _render(f.write, renderer, generator, rows)
        elif compress == "zip":
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
                member = zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0))
                member.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(member, "w") as f:
                    _render(f.write, renderer, generator, rows)
        else:
            _render(raw.write, renderer, generator, rows)
    tmp.replace(final)
    return final


def _render(
    write: Callable[[bytes], object],
    renderer: Renderer,
    generator: CdrGenerator,
    rows: list[tuple[int, dict[str, str]]],
) -> None:
    write(renderer.preamble())
    for i, (cdr_id, row) in enumerate(rows):
        write(renderer.row(generator.wire_row(cdr_id, row), i == 0))
    write(renderer.trailer())
