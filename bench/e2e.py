"""End to end: feed simulator -> `cdr-streamer run --once` -> Kafka, against Kafka's ceiling.

Everything runs on this machine, against a broker this benchmark starts for itself
(scripts/kafka-local, in a temporary directory, stopped at the end), for each feed
format (csv, json) in turn:

(a) The feed server alone. `cdr-streamer simulate --prerender FORMAT` (its own process)
    renders its backlog once and then serves slices of those bytes from memory. Its own
    ceiling is measured first: the largest response read by a plain HTTP client that
    only counts the bytes, so the figures below can be seen not to be the server's.
(b) The streamer end to end. `cdr-streamer run --once` (its own process) fetches N CDRs,
    publishes them with acks=all and commits its cursor, in at-least-once and in
    exactly-once mode (`ids_ascending = true`, the default `checkpoint_every`). The clock
    runs from the start of the streamer process to the log line of its finished poll,
    which is written after the cursor was committed; the cursor is then checked to be
    the last ID. CPU time is read from /proc at that log line: utime + stime of the
    streamer process and of every process under it (plus the children it already
    reaped, cutime + cstime), librdkafka's threads included, never wall time. Peak RSS
    is the sum of each of those processes' VmHWM.
(c) Kafka's own `org.apache.kafka.tools.ProducerPerformance` (the broker's jars) sending
    as many records of the streamer's mean message size (value + key + headers, measured
    on the topic of (b)) to the same broker with acks=all, idempotence and the streamer's
    compression and batching: the most this broker takes on this machine.
(d) Each stage alone, in a process of its own, over the same CDRs: fetch + parse (HTTP
    from the simulator), parse (body in memory), typing and encoding (the fused path,
    the path before it, and the reference path), produce + flush, and the whole chain in
    one loop, each as CPU µs per CDR (`time.process_time`: every thread of the process).

(e) A baseline, when CDR_BENCH_BASELINE names a git revision (e.g. the main branch before
    a change): that revision's `streamer/` (`git archive`, into the temporary directory)
    runs (b) beside this tree's, against the same server and broker, in the same
    benchmark, so a before/after comparison does not depend on how loaded the machine was
    on another day.

Worker processes (`[processing] workers`) are a dimension of (b): `WORKERS` holds the
counts (0 and 2 by default; CDR_BENCH_WORKERS), and `_config` writes the setting for
each run; the baseline runs with no [processing] section (its own default).

Run alone: `python -m bench e2e`. A quick look: CDR_BENCH_RUNS=1 CDR_BENCH_SIZES=20000
(sizes comma-separated; the largest is the backlog) CDR_BENCH_FORMATS=csv.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench._services import KAFKA_LOCAL, LOGIN, PASSWORD, REPO_ROOT, broker, simulator


def _env_tuple(name: str, default: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in os.environ.get(name, default).split(",") if part)


SIZES = tuple(int(n) for n in _env_tuple("CDR_BENCH_SIZES", "100000,1000000"))
FORMATS = _env_tuple("CDR_BENCH_FORMATS", "csv,json")
MODES = ("at_least_once", "exactly_once")
# Worker processes per streamer (issue 14, item 2; `[processing] workers`): 0 is parsing
# in the streamer's own process.
WORKERS = tuple(int(n) for n in _env_tuple("CDR_BENCH_WORKERS", "0,2"))
RUNS = int(os.environ.get("CDR_BENCH_RUNS", "3"))
BASELINE = os.environ.get("CDR_BENCH_BASELINE", "")  # a git revision to compare with, or none
STAGE_ROWS = min(100_000, max(SIZES))
PASSWORD_ENV = "CDR_BENCH_PASSWORD"  # noqa: S105 - the variable's name
FEED = "bench"
PARTITIONS = 6  # the streamer's default for the topics it creates
# Targets of issue 14, on a 2-core machine with the broker on the same box.
TARGET_CPU_US = 13.0
TARGET_CDR_PER_S = 80_000  # at-least-once, 1M csv, 2 workers
TARGET_EOS_SHARE = 0.90
TARGET_RSS_MIB = 200
TARGET_RSS_GROWTH = 1.20
# The finished poll's log line (FeedRunner's).
_DONE = re.compile(r"feed bench: (\d+) rows in ([\d.]+) s: (\d+) published.*cursor (\d+) -> (\d+)")
_PERF = re.compile(r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StreamerRun:
    fmt: str
    mode: str
    workers: int
    rows: int
    seconds: float  # process start -> cursor committed
    poll_seconds: float  # the poll itself, as the streamer logs it
    cpu_s: float  # every streamer process, at the finished poll's log line
    peak_rss_kib: int  # the sum of their peaks
    processes: int
    from_proc: bool  # False: /proc was gone, os.wait4's figures (one process, to its exit)


@dataclass(frozen=True, slots=True)
class CeilingRun:
    records: int
    per_s: float
    mb_per_s: float


@dataclass(frozen=True, slots=True)
class ServerCeiling:
    rows: int
    bytes: int
    seconds: float


# --- /proc: CPU and memory of a process tree --------------------------------------------------


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (field 3, the state, is [0])."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return f.read().rpartition(")")[2].split()


def _descendants(pid: int) -> list[int]:
    """`pid` and every live process under it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def _tree_usage(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, summed VmHWM KiB, processes) of `pid` and everything under it.

    CPU is utime + stime of each live process plus cutime + cstime: the children each
    one already waited for, so a worker that ended before now still counts.
    """
    cpu_ticks, hwm_kib, count = 0, 0, 0
    for member in _descendants(pid):
        try:
            fields = _stat(member)
            with open(f"/proc/{member}/status", encoding="ascii", errors="replace") as f:
                status = f.read()
        except OSError:
            continue
        # Fields 14-17 of stat: utime, stime, cutime, cstime (here at 11-14).
        cpu_ticks += sum(int(x) for x in fields[11:15])
        if m := re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE):
            hwm_kib += int(m[1])
        count += 1
    return cpu_ticks / _CLOCK_TICKS, hwm_kib, count


# --- (a) the feed server's own ceiling ----------------------------------------------------------


def serve_ceiling(url: str, fmt: str, fromid: int, rows: int) -> ServerCeiling:
    """Read one response of `rows` CDRs as fast as a plain client can, counting its bytes."""
    parts = urllib.parse.urlsplit(url)
    form = urllib.parse.urlencode(
        {"login": LOGIN, "password": PASSWORD, "fromid": fromid, "format": fmt}
    )
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
    started = time.perf_counter()
    try:
        conn.request(
            "POST", parts.path or "/", form, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the simulator answered {response.status}")
        size = 0
        while chunk := response.read(1 << 20):
            size += len(chunk)
    finally:
        conn.close()
    return ServerCeiling(rows, size, time.perf_counter() - started)


# --- (b) the streamer end to end ---------------------------------------------------------------


def _config(
    tmp: Path, bootstrap: str, url: str, fmt: str, mode: str, workers: int | None, first_id: int
) -> Path:
    """`workers` None: no [processing] section (a baseline tree may not know it)."""
    tag = uuid.uuid4().hex[:8]
    path = tmp / f"streamer-{tag}.toml"
    processing = "" if workers is None else f"[processing]\nworkers = {workers}\n"
    path.write_text(
        f"""{processing}
[kafka]
bootstrap_servers = "{bootstrap}"
topic = "cdr-bench-{tag}"
dead_letter_topic = "cdr-bench-{tag}-dead"
delivery = "{mode}"
cursor_topic = "cdr-bench-{tag}-cursors"
transactional_id_prefix = "bench-{tag}"

[metrics]
port = 0

[[feeds]]
name = "{FEED}"
url = "{url}"
login = "{LOGIN}"
password_env = "{PASSWORD_ENV}"
format = "{fmt}"
ids_ascending = true
cursor_file = "{tmp / f"cursor-{tag}.json"}"
initial_cursor = {first_id}
read_timeout_s = 300
"""
    )
    return path


def _settings(path: Path) -> Any:
    from streamer.config import load_settings

    return load_settings(path, env={PASSWORD_ENV: PASSWORD})


def _committed_cursor(path: Path) -> int:
    from streamer.cursor import FileCursorStore, KafkaCursorStore

    settings = _settings(path)
    k, feed = settings.kafka, settings.feeds[0]
    if k.delivery == "exactly_once":
        return KafkaCursorStore(k.bootstrap_servers, k.cursor_topic, FEED).load()
    return FileCursorStore(Path(feed.cursor_file), FEED).load()


def run_streamer(
    tmp: Path,
    bootstrap: str,
    url: str,
    *,
    fmt: str,
    mode: str,
    workers: int | None,
    backlog: int,
    n: int,
    code: Path = REPO_ROOT,
) -> tuple[StreamerRun, Path]:
    """One `cdr-streamer run --once` over the last `n` CDRs of the backlog.

    `code`: the tree whose `streamer` package runs (this one, or a baseline's).
    """
    config = _config(tmp, bootstrap, url, fmt, mode, workers, backlog - n)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "--log-level", "INFO", "run", "--once",
         "--config", str(config)],
        env={**os.environ, PASSWORD_ENV: PASSWORD, "PYTHONPATH": str(code)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=code,
    )  # fmt: skip
    done: list[tuple[float, re.Match[str], tuple[float, int, int] | None]] = []
    log: list[str] = []

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if not done and (m := _DONE.search(line)):
                finished = time.monotonic()
                try:  # at once: the process ends soon after this line
                    usage: tuple[float, int, int] | None = _tree_usage(proc.pid)
                except OSError:
                    usage = None
                done.append((finished, m, usage))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(30)
    warnings = [line for line in log if " WARNING " in line or " ERROR " in line]
    tail = "".join(warnings[:5]) + "...\n" + "".join(log[-20:])
    if proc.returncode != 0 or not done:
        raise RuntimeError(
            f"cdr-streamer run ({fmt}, {mode}, {n}) failed ({proc.returncode}):\n{tail}"
        )
    finished, m, usage = done[0]
    published, cursor_after = int(m[3]), int(m[5])
    # With no CDRs to fetch (the start-up run) nothing is committed.
    cursor = _committed_cursor(config) if n else backlog
    if published != n or cursor_after != backlog or cursor != backlog:
        raise RuntimeError(
            f"{fmt}, {mode}, {n}: published {published}, cursor {cursor} (log: {cursor_after}); "
            f"expected {n} and {backlog}:\n{tail}"
        )
    # A zombie keeps its CPU times in /proc but no longer its memory: then os.wait4's.
    if usage is None or usage[1] == 0:
        usage = (rusage.ru_utime + rusage.ru_stime, rusage.ru_maxrss, 1)
        from_proc = False
    else:
        from_proc = True
    run = StreamerRun(
        fmt=fmt,
        mode=mode,
        workers=workers,
        rows=n,
        seconds=finished - started,
        poll_seconds=float(m[2]),
        cpu_s=usage[0],
        peak_rss_kib=usage[1],
        processes=usage[2],
        from_proc=from_proc,
    )
    return run, config


def _mean_message_bytes(bootstrap: str, topic: str, sample: int = 20_000) -> float:
    """Mean value + key + header bytes of the first `sample` events on `topic`."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
         "enable.auto.commit": "false", "auto.offset.reset": "earliest"}
    )  # fmt: skip
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        sizes: list[int] = []
        deadline = time.monotonic() + 60
        while len(sizes) < sample and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 1.0):
                if msg.error() is None:
                    headers = msg.headers() or []
                    size = len(msg.value() or b"") + len(msg.key() or b"")
                    sizes.append(size + sum(len(k) + len(v or b"") for k, v in headers))
        if not sizes:
            raise RuntimeError(f"no events to measure on {topic}")
        return statistics.fmean(sizes)
    finally:
        consumer.close()


# --- (c) Kafka's own producer --------------------------------------------------------------------


def _create_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient

    from streamer.publisher import provision_topic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    provision_topic(admin, topic, partitions=PARTITIONS, replication_factor=1,
                    min_insync_replicas=1)  # fmt: skip


def run_ceiling(bootstrap: str, n: int, record_bytes: int) -> CeilingRun:
    """Kafka's ProducerPerformance: `n` records of `record_bytes`, acks=all, our batching."""
    from streamer.publisher import DEFAULT_PRODUCER_CONFIG

    topic = f"perf-{uuid.uuid4().hex[:8]}"
    _create_topic(bootstrap, topic)
    props = [
        f"bootstrap.servers={bootstrap}", "acks=all", "enable.idempotence=true",
        f"compression.type={DEFAULT_PRODUCER_CONFIG['compression.type']}",
        f"linger.ms={DEFAULT_PRODUCER_CONFIG['linger.ms']}",
        "batch.size=1000000",  # librdkafka's default batch.size (bytes)
    ]  # fmt: skip
    done = subprocess.run(
        [str(KAFKA_LOCAL), "java", "org.apache.kafka.tools.ProducerPerformance",
         "--topic", topic, "--num-records", str(n), "--record-size", str(record_bytes),
         "--throughput", "-1", "--producer-props", *props],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=600,
    )  # fmt: skip
    found = _PERF.findall(done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(
            f"ProducerPerformance failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    records, per_s, mb_s = found[-1]
    return CeilingRun(int(records), float(per_s), float(mb_s))


# --- (d) stages in a process of their own ------------------------------------------------------

Stage = tuple[str, int, float, float]  # (name, CDRs, CPU seconds, wall seconds)


def _timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    # Inputs are built before the clock starts; gc.freeze() keeps the collector from
    # walking them again and again, which would be charged to the stage measured.
    gc.collect()
    gc.freeze()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        out = fn()
        return out, time.process_time() - cpu, time.perf_counter() - wall
    finally:
        gc.unfreeze()


def run_stages(url: str, bootstrap: str, backlog: int, fmt: str) -> dict[str, Any]:
    """Each stage over the last STAGE_ROWS CDRs of the backlog, and the caches' footprint."""
    import httpx

    from streamer import events
    from streamer.avro import SingleObjectEncoder, timestamp_ms
    from streamer.config import Secret
    from streamer.events import Event, RowEncoder, event_reference
    from streamer.formats import parse_rows
    from streamer.publisher import Publisher, producer_config
    from streamer.records import CallRecord, Rejection, Row, to_record
    from streamer.sources.feed import FeedClient, FeedQuery, FeedTimeouts

    n = STAGE_ROWS
    fromid = backlog - n
    stages: list[Stage] = []

    def stage(name: str, fn: Callable[[], int]) -> None:
        count, cpu, wall = _timed(fn)
        stages.append((name, count, cpu, wall))

    client = FeedClient(
        url, LOGIN, Secret(PASSWORD), query=FeedQuery(format=fmt),  # type: ignore[arg-type]
        timeouts=FeedTimeouts(connect_s=10, read_s=120, deadline_s=1800), max_attempts=1,
    )  # fmt: skip

    def fetch_and_parse() -> int:
        with client.fetch(fromid) as rows:
            return sum(1 for _ in rows)

    stage("fetch + parse (HTTP from the simulator)", fetch_and_parse)
    client.close()
    form = {"login": LOGIN, "password": PASSWORD, "fromid": str(fromid), "format": fmt}
    body = httpx.post(url, data=form, timeout=120).content
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    stage("parse (body in memory)", lambda: sum(1 for _ in parse_rows(chunks, fmt)))

    typed = [r for r in parse_rows(chunks, fmt) if isinstance(r, Row)]
    events.clear_caches()
    encoder = RowEncoder()
    stage(
        "typing + encoding, fused (`events.RowEncoder`)",
        lambda: len([encoder.encode(r) for r in typed]),
    )
    entries = sum(e for e, _ in events.cache_footprint().values())
    held = sum(b for _, b in events.cache_footprint().values())
    records_encoder = SingleObjectEncoder()

    def before(row: Row) -> object:
        """What the sink did for a row before the fused path."""
        record = to_record(row)
        if isinstance(record, Rejection):
            return record
        return (
            record.account_code.encode(),
            records_encoder.encode(record),
            timestamp_ms(record),
        )

    stage(
        "typing + encoding before it (`to_record` + `SingleObjectEncoder`)",
        lambda: len([before(r) for r in typed]),
    )
    stage(
        "typing + encoding, reference path (`event_reference`)",
        lambda: len([event_reference(r) for r in typed]),
    )
    made = [encoder.encode(r) for r in typed]
    messages = [e for e in made if isinstance(e, Event)]

    topic = f"stages-{uuid.uuid4().hex[:8]}"
    _create_topic(bootstrap, topic)
    publisher = Publisher(producer_config(bootstrap))
    headers_base = [("source", b"feed"), ("feed", FEED.encode())]

    def produce() -> int:
        for event in messages:
            publisher.produce(
                topic, event.key, event.value, timestamp_ms=event.timestamp_ms,
                headers=[("cdr_id", str(event.cdr_id).encode()), *headers_base],
            )  # fmt: skip
        publisher.flush(120)
        return len(messages)

    stage("produce + flush (to the broker, acks=all)", produce)

    def chain_fused() -> int:
        count = 0
        for row in parse_rows(chunks, fmt):
            item = row if isinstance(row, Rejection) else encoder.encode(row)
            if isinstance(item, Event):
                publisher.produce(
                    topic, item.key, item.value, timestamp_ms=item.timestamp_ms,
                    headers=[("cdr_id", str(item.cdr_id).encode()), *headers_base],
                )  # fmt: skip
                count += 1
        publisher.flush(120)
        return count

    def chain_before() -> int:
        count = 0
        for row in parse_rows(chunks, fmt):
            item = row if isinstance(row, Rejection) else to_record(row)
            if isinstance(item, CallRecord):
                publisher.produce(
                    topic, item.account_code.encode(), records_encoder.encode(item),
                    timestamp_ms=timestamp_ms(item),
                    headers=[("cdr_id", str(item.id).encode()), *headers_base],
                )  # fmt: skip
                count += 1
        publisher.flush(120)
        return count

    stage("whole chain in one loop, fused (parse, type + encode, produce)", chain_fused)
    stage("whole chain in one loop, before the fused path", chain_before)
    publisher.close()

    # The caches' worst case: every entry a text of the longest length kept. Measured on
    # two caches filled so (an account's entry holds the key too), the others as the text one.
    events.clear_caches()
    base = typed[0].values
    width = events.CACHE_TEXT_CHARS
    for i in range(events.CACHE_ENTRIES):
        text = f"{i:0{width}d}"
        encoder.encode(Row({**base, "TextDesc1": text, "AccountCode": text}, "raw"))
    full = events.cache_footprint()
    worst = full["AccountCode"][1] + full["TextDesc1"][1] * (len(full) - 1)
    return {
        "stages": stages,
        "cache": {"entries": entries, "bytes": held, "worst_bytes": worst, "caches": len(full)},
    }


def _baseline_tree(tmp: Path, revision: str) -> Path:
    """`revision`'s files (git archive: the repository is only read), to run its streamer."""
    target = tmp / "baseline"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision],
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def _stages_in_own_process(url: str, bootstrap: str, backlog: int, fmt: str) -> dict[str, Any]:
    """`run_stages` in a fresh process: its memory must not inflate this one."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--stages", url, bootstrap, str(backlog), fmt],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the stage measurements failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


# --- the run ------------------------------------------------------------------------------------


def _load() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def run() -> str:
    backlog = max(SIZES)
    load_before = _load()
    streamer: dict[tuple[str, str, int, int], list[StreamerRun]] = {}
    servers: dict[str, ServerCeiling] = {}
    stages: dict[str, dict[str, Any]] = {}
    startup: dict[tuple[str, str], StreamerRun] = {}
    # The baseline's runs (e): (format, mode, CDRs) -> runs; its start-up runs.
    before: dict[tuple[str, str, int], list[StreamerRun]] = {}
    before_startup: dict[tuple[str, str], StreamerRun] = {}
    sample_config: Path | None = None
    with tempfile.TemporaryDirectory(prefix="cdr-bench-") as tmp_name:
        tmp = Path(tmp_name)
        baseline = _baseline_tree(tmp, BASELINE) if BASELINE else None
        with broker(tmp / "kafka") as bootstrap:
            # A child's ru_maxrss starts from this process's peak (a fallback figure only).
            parent_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for fmt in FORMATS:
                args = ["--prerender", fmt]
                with simulator(backlog, args, ready_timeout_s=900) as url:
                    servers[fmt] = min(
                        (serve_ceiling(url, fmt, 0, backlog) for _ in range(3)),
                        key=lambda c: c.seconds,
                    )
                    print(f"  server {fmt}: {servers[fmt]}", file=sys.stderr, flush=True)
                    for mode in MODES:  # the cost of starting up: a run over no CDRs
                        startup[fmt, mode], _ = run_streamer(
                            tmp, bootstrap, url, fmt=fmt, mode=mode, workers=0,
                            backlog=backlog, n=0,
                        )  # fmt: skip
                    for n in SIZES:
                        for workers in WORKERS:
                            for mode in MODES:
                                runs = []
                                for _ in range(RUNS):
                                    result, config = run_streamer(
                                        tmp, bootstrap, url, fmt=fmt, mode=mode,
                                        workers=workers, backlog=backlog, n=n,
                                    )  # fmt: skip
                                    runs.append(result)
                                    sample_config = sample_config or config
                                streamer[fmt, mode, workers, n] = runs
                                print(f"  e2e {runs}", file=sys.stderr, flush=True)
                            if baseline is None:
                                continue
                            for mode in MODES:
                                if (fmt, mode) not in before_startup:
                                    before_startup[fmt, mode], _ = run_streamer(
                                        tmp, bootstrap, url, fmt=fmt, mode=mode, workers=None,
                                        backlog=backlog, n=0, code=baseline,
                                    )  # fmt: skip
                                before[fmt, mode, n] = [
                                    run_streamer(
                                        tmp, bootstrap, url, fmt=fmt, mode=mode, workers=None,
                                        backlog=backlog, n=n, code=baseline,
                                    )[0]
                                    for _ in range(RUNS)
                                ]  # fmt: skip
                                print(f"  baseline {before[fmt, mode, n]}", file=sys.stderr,
                                      flush=True)  # fmt: skip
                    stages[fmt] = _stages_in_own_process(url, bootstrap, backlog, fmt)
            assert sample_config is not None
            record_bytes = round(
                _mean_message_bytes(bootstrap, _settings(sample_config).kafka.topic)
            )
            ceiling = {
                n: [run_ceiling(bootstrap, n, record_bytes) for _ in range(RUNS)] for n in SIZES
            }
            print(f"  ceiling: {ceiling}", file=sys.stderr, flush=True)
    return _report(
        streamer,
        startup,
        ceiling,
        record_bytes,
        servers,
        stages,
        parent_kib,
        (load_before, _load()),
        (before, before_startup),
    )


# --- the report --------------------------------------------------------------------------------


def _versions() -> str:
    import confluent_kafka
    import fastavro

    kafka = (REPO_ROOT / "scripts" / "kafka-version").read_text().strip()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"confluent-kafka {confluent_kafka.version()[0]} / librdkafka "
        f"{confluent_kafka.libversion()[0]}; fastavro {fastavro.__version__}; "
        f"Kafka {kafka} (broker and ProducerPerformance, one node on this machine)"
    )


def _startup_text(startup: dict[tuple[str, str], StreamerRun]) -> str:
    return ", ".join(
        f"{fmt} {mode.replace('_', '-')} {run.cpu_s:.2f} s" for (fmt, mode), run in startup.items()
    )


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _report(
    streamer: dict[tuple[str, str, int, int], list[StreamerRun]],
    startup: dict[tuple[str, str], StreamerRun],
    ceiling: dict[int, list[CeilingRun]],
    record_bytes: int,
    servers: dict[str, ServerCeiling],
    stages: dict[str, dict[str, Any]],
    parent_kib: int,
    load: tuple[str, str],
    baseline: tuple[
        dict[tuple[str, str, int], list[StreamerRun]], dict[tuple[str, str], StreamerRun]
    ] = ({}, {}),
) -> str:
    lines = [
        "## End to end: simulator -> `cdr-streamer run --once` -> Kafka (acks=all)",
        "",
        f"Machine: {_versions()}. Load average (1, 5, 15 min) at the start: {load[0]}; "
        f"at the end: {load[1]}.",
        "",
        f"Medians of {RUNS} run(s) each. **CDR/s** counts from the start of the streamer "
        "process (imports, topic checks, producer start) to its cursor committed at the last "
        "ID; **poll CDR/s** is the poll alone as the streamer logs it. **CPU µs per CDR** is "
        "utime + stime from /proc, at the finished poll's log line, of the streamer process "
        "and every process under it (librdkafka's threads included; the broker and the "
        "simulator are processes of their own, not counted), start-up included; **less "
        "start-up** takes off the CPU of the same run over no CDRs (imports, config, "
        f"producer and topic checks: {_startup_text(startup)}); **peak RSS** is the sum of "
        "those processes' VmHWM. **Kafka ceiling** is Kafka's own ProducerPerformance "
        f"sending as many records of {record_bytes} bytes (the streamer's mean value + key + "
        "headers, measured on its topic) to the same broker, acks=all, idempotent, lz4, "
        "linger 20 ms: its own records/sec. **workers** is the number of worker processes "
        "(0: parsing, typing and encoding in the streamer's own process).",
        "",
        "| format | mode | workers | CDRs | CDR/s | poll CDR/s | CPU µs per CDR "
        "| less start-up | peak RSS MiB | processes | Kafka ceiling rec/s | CDR/s / ceiling "
        "| runs, CDR/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rate: dict[tuple[str, str, int, int], float] = {}
    cpu: dict[tuple[str, str, int, int], float] = {}
    rss: dict[tuple[str, str, int, int], float] = {}
    fallback = False
    for key, runs in streamer.items():
        fmt, mode, workers, n = key
        top = _median(c.per_s for c in ceiling[n])
        rate[key] = _median(r.rows / r.seconds for r in runs)
        poll = _median(r.rows / r.poll_seconds for r in runs)
        cpu[key] = _median(r.cpu_s / r.rows * 1e6 for r in runs)
        idle = startup[fmt, mode].cpu_s
        net = _median((r.cpu_s - idle) / r.rows * 1e6 for r in runs)
        rss[key] = _median(r.peak_rss_kib / 1024 for r in runs)
        processes = max(r.processes for r in runs)
        fallback = fallback or not all(r.from_proc for r in runs)
        each = ", ".join(f"{r.rows / r.seconds:,.0f}" for r in runs)
        lines.append(
            f"| {fmt} | {mode.replace('_', '-')} | {workers} | {n:,} | {rate[key]:,.0f} | "
            f"{poll:,.0f} | {cpu[key]:.1f} | {net:.1f} | {rss[key]:.1f} | {processes} | "
            f"{top:,.0f} | "
            f"{rate[key] / top:.2f} | {each} |"
        )
    if fallback:
        lines += [
            "",
            "Some runs had ended before /proc could be read: their CPU and memory are "
            "os.wait4's (the whole process to its exit; peak of the one process, counted "
            f"from this benchmark's own peak of {parent_kib / 1024:.1f} MiB).",
        ]
    lines += ["", "The feed server's own ceiling (a client that only counts the bytes):", ""]
    for fmt, server in servers.items():
        lines.append(
            f"- {fmt}: {server.rows:,} CDRs ({server.bytes / 1e6:,.0f} MB) in "
            f"{server.seconds:.2f} s: {server.rows / server.seconds:,.0f} CDR/s, "
            f"{server.bytes / server.seconds / 1e6:,.0f} MB/s"
        )
    lines += _baseline_table(streamer, startup, *baseline)
    lines += _targets(rate, cpu, rss)
    lines += _stage_tables(stages)
    return "\n".join(lines) + "\n"


def _baseline_table(
    streamer: dict[tuple[str, str, int, int], list[StreamerRun]],
    startup: dict[tuple[str, str], StreamerRun],
    before: dict[tuple[str, str, int], list[StreamerRun]],
    before_startup: dict[tuple[str, str], StreamerRun],
) -> list[str]:
    """This tree against the baseline revision, run in this same benchmark (e)."""
    if not before:
        return []
    lines = [
        "",
        f"Against the baseline `{BASELINE}` (its `streamer/` run the same way in this same "
        "benchmark, between this tree's runs, 0 workers): CPU µs per CDR, start-up "
        "included / less start-up, and CDR/s.",
        "",
        "| format | mode | CDRs | CPU µs/CDR before | after | less start-up before | after "
        "| CDR/s before | after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (fmt, mode, n), old in before.items():
        new = streamer[fmt, mode, 0, n]

        def per_cdr(runs: list[StreamerRun], idle: float = 0.0) -> float:
            return _median((r.cpu_s - idle) / r.rows * 1e6 for r in runs)

        lines.append(
            f"| {fmt} | {mode.replace('_', '-')} | {n:,} | {per_cdr(old):.1f} | "
            f"{per_cdr(new):.1f} | {per_cdr(old, before_startup[fmt, mode].cpu_s):.1f} | "
            f"{per_cdr(new, startup[fmt, mode].cpu_s):.1f} | "
            f"{_median(r.rows / r.seconds for r in old):,.0f} | "
            f"{_median(r.rows / r.seconds for r in new):,.0f} |"
        )
    return lines


def _targets(
    rate: dict[tuple[str, str, int, int], float],
    cpu: dict[tuple[str, str, int, int], float],
    rss: dict[tuple[str, str, int, int], float],
) -> list[str]:
    big, small = max(SIZES), min(SIZES)
    most = max(WORKERS)
    lines = ["", "Targets of issue 14 (2 cores, broker on the same machine):", ""]
    for fmt in FORMATS:
        worst = max(cpu[fmt, mode, most, big] for mode in MODES)
        lines.append(
            f"- CPU per CDR <= {TARGET_CPU_US:g} µs, {fmt}: {worst:.1f} at {big:,} CDRs, "
            f"{most} workers, the higher of the two modes ({_verdict(worst <= TARGET_CPU_US)})"
        )
    if "csv" in FORMATS:
        alo = rate["csv", "at_least_once", most, big]
        if 2 in WORKERS:
            lines.append(
                f"- at-least-once >= {TARGET_CDR_PER_S:,} CDR/s on {big:,} csv with 2 "
                f"workers: {alo:,.0f} ({_verdict(alo >= TARGET_CDR_PER_S)})"
            )
        else:
            lines.append(
                f"- at-least-once >= {TARGET_CDR_PER_S:,} CDR/s on {big:,} csv with 2 "
                f"workers: not measured, no worker processes yet (item 2); {alo:,.0f} "
                f"with {most}"
            )
    for fmt in FORMATS:
        alo, eos = rate[fmt, "at_least_once", most, big], rate[fmt, "exactly_once", most, big]
        lines.append(
            f"- exactly-once >= {TARGET_EOS_SHARE:.0%} of at-least-once, {fmt}: {eos / alo:.0%} "
            f"({_verdict(eos >= TARGET_EOS_SHARE * alo)})"
        )
    peak = max(rss.values())
    growth = max(rss[k] / rss[(*k[:3], small)] for k in rss if k[3] == big)
    lines.append(
        f"- peak RSS of all streamer processes <= {TARGET_RSS_MIB} MiB: {peak:.1f} MiB "
        f"({_verdict(peak <= TARGET_RSS_MIB)}); {big:,} / {small:,} at most "
        f"{TARGET_RSS_GROWTH:.2f}: {growth:.2f} ({_verdict(growth <= TARGET_RSS_GROWTH)})"
    )
    return lines


def _stage_tables(stages: dict[str, dict[str, Any]]) -> list[str]:
    formats = list(stages)
    lines = [
        "",
        "### Each stage alone, in one process",
        "",
        f"The last {STAGE_ROWS:,} CDRs of the same feed, one stage at a time, each over the "
        "previous stage's output held in memory (the collector kept off those lists). **CPU "
        "µs per CDR** is the process's CPU time (`time.process_time`, librdkafka's threads "
        "included) over the stage, divided by its CDRs. The fused path "
        "(`events.RowEncoder`: row text -> key, Avro value, timestamp) is tested byte for "
        "byte against the reference path (`records.to_record_reference` + fastavro with the "
        "real schema); *before it* is what the sink did until the fused path "
        "(`records.to_record` + `avro.SingleObjectEncoder`, themselves fast paths).",
        "",
        "| stage | " + " | ".join(f"{f} CDR/s | {f} CPU µs per CDR" for f in formats) + " |",
        "|---|" + "---:|---:|" * len(formats),
    ]
    names = [name for name, *_ in stages[formats[0]]["stages"]]
    for i, name in enumerate(names):
        cells = []
        for fmt in formats:
            _, count, cpu_s, wall_s = stages[fmt]["stages"][i]
            cells.append(f"{count / wall_s:,.0f} | {cpu_s / count * 1e6:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The fused path's caches (one per field, shared by the process):", ""]
    for fmt in formats:
        cache = stages[fmt]["cache"]
        lines.append(
            f"- after the {fmt} stage: {cache['entries']:,} entries, "
            f"{cache['bytes'] / 1024:,.0f} KiB (dicts, keys and values)"
        )
    cache = stages[formats[0]]["cache"]
    lines.append(
        f"- bound: {cache['caches']} caches of at most {_cache_limits()}: "
        f"{cache['worst_bytes'] / 2**20:,.1f} MiB if every one were full of texts of the "
        "longest length kept (measured on full caches)"
    )
    lines.append("")
    lines.append(
        "On this machine the streamer, librdkafka's threads, the broker and the simulator "
        "share two cores, so the end-to-end figures sit below the slowest stage alone."
    )
    return lines


def _cache_limits() -> str:
    from streamer.events import CACHE_ENTRIES, CACHE_TEXT_CHARS

    return f"{CACHE_ENTRIES:,} entries, texts of at most {CACHE_TEXT_CHARS} characters"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--stages"]:
        url, bootstrap, backlog, fmt = argv[1:5]
        print(json.dumps(run_stages(url, bootstrap, int(backlog), fmt)))
        return 0
    print(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
