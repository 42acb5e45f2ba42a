"""End to end: feed simulator -> `cdr-streamer run --once` -> Kafka, against Kafka's ceiling.

Everything runs on this machine, against a broker this benchmark starts for itself
(scripts/kafka-local, in a temporary directory, stopped at the end):

(a) The streamer end to end. `cdr-streamer simulate --prerender csv` (its own process)
    renders its backlog once and then serves it from memory, so serving is not what is
    measured; `cdr-streamer run --once` (its own process) fetches N CDRs, publishes them
    with acks=all and commits its cursor, in at-least-once and in exactly-once mode
    (`ids_ascending = true`, the default `checkpoint_every`). The clock runs from the
    start of the streamer process to the log line of its finished poll, which is written
    after the cursor was committed; the cursor is then checked to be the last ID. CPU
    time and peak RSS are the streamer process's own (`os.wait4`, the per-child form of
    `getrusage(RUSAGE_CHILDREN)`), librdkafka's threads included.
(b) Kafka's own `org.apache.kafka.tools.ProducerPerformance` (the broker's jars) sending
    as many records of the streamer's mean message size (value + key + headers, measured
    on the topic of (a)) to the same broker with acks=all, idempotence and the streamer's
    compression and batching: the most this broker takes on this machine.
(c) Each stage alone, in this process, over the same CDRs: fetch + parse (HTTP from the
    simulator), parse (body bytes in memory), typing, Avro encoding, produce + flush; the
    whole chain in one loop; and, for comparison in the same run, the straightforward
    reference paths the fast ones are tested against.

Run alone: `python -m bench e2e`. Fewer runs (a quick look): CDR_BENCH_RUNS=1.
"""

from __future__ import annotations

import gc
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
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench._services import KAFKA_LOCAL, LOGIN, PASSWORD, REPO_ROOT, broker, simulator

SIZES = (100_000, 1_000_000)
MODES = ("at_least_once", "exactly_once")
RUNS = int(os.environ.get("CDR_BENCH_RUNS", "3"))
STAGE_ROWS = 100_000
PASSWORD_ENV = "CDR_BENCH_PASSWORD"  # noqa: S105 - the variable's name
FEED = "bench"
PARTITIONS = 6  # the streamer's default for the topics it creates
# Targets of the performance issue, on a 2-core machine with the broker on the same box.
TARGET_CDR_PER_S = 60_000
TARGET_EOS_SHARE = 0.80
TARGET_RSS_MIB = 150
TARGET_RSS_GROWTH = 1.20
# The finished poll's log line (streamer/pipeline.py, FeedRunner.run).
_DONE = re.compile(r"feed bench: (\d+) rows in ([\d.]+) s: (\d+) published.*cursor (\d+) -> (\d+)")
_PERF = re.compile(r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\)")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StreamerRun:
    rows: int
    seconds: float  # process start -> cursor committed
    poll_seconds: float  # the poll itself, as the streamer logs it
    cpu_s: float
    peak_rss_kib: int


@dataclass(frozen=True, slots=True)
class CeilingRun:
    records: int
    per_s: float
    mb_per_s: float


# --- (a) the streamer end to end ---------------------------------------------------------------


def _config(tmp: Path, bootstrap: str, url: str, mode: str, first_id: int) -> Path:
    tag = uuid.uuid4().hex[:8]
    path = tmp / f"streamer-{tag}.toml"
    path.write_text(
        f"""
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
format = "csv"
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
    tmp: Path, bootstrap: str, url: str, mode: str, backlog: int, n: int
) -> StreamerRun:
    """One `cdr-streamer run --once` over the last `n` CDRs of the backlog."""
    config = _config(tmp, bootstrap, url, mode, backlog - n)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "--log-level", "INFO", "run", "--once",
         "--config", str(config)],
        env={**os.environ, PASSWORD_ENV: PASSWORD},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )  # fmt: skip
    done: list[tuple[float, re.Match[str]]] = []
    log: list[str] = []

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if not done and (m := _DONE.search(line)):
                done.append((time.monotonic(), m))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(30)
    warnings = [line for line in log if " WARNING " in line or " ERROR " in line]
    tail = "".join(warnings[:5]) + "...\n" + "".join(log[-20:])
    if proc.returncode != 0 or not done:
        raise RuntimeError(f"cdr-streamer run ({mode}, {n}) failed ({proc.returncode}):\n{tail}")
    finished, m = done[0]
    published, cursor_after = int(m[3]), int(m[5])
    cursor = _committed_cursor(config)
    if published != n or cursor_after != backlog or cursor != backlog:
        raise RuntimeError(
            f"{mode}, {n}: published {published}, cursor {cursor} (log: {cursor_after}); "
            f"expected {n} and {backlog}:\n{tail}"
        )
    return StreamerRun(
        rows=n,
        seconds=finished - started,
        poll_seconds=float(m[2]),
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_kib=usage.ru_maxrss,
    )


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


# --- (b) Kafka's own producer --------------------------------------------------------------------


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


# --- (c) stages in this process -----------------------------------------------------------------


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    # Inputs are built before the clock starts; gc.freeze() keeps the collector from
    # walking them again and again, which would be charged to the stage measured.
    gc.collect()
    gc.freeze()
    try:
        started = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - started
    finally:
        gc.unfreeze()


def run_stages(url: str, bootstrap: str, backlog: int) -> list[tuple[str, int, float]]:
    """(stage, CDRs, seconds) for each stage over the last STAGE_ROWS CDRs of the backlog."""
    from streamer.avro import SingleObjectEncoder, encode_reference, timestamp_ms
    from streamer.config import Secret
    from streamer.formats import parse_rows
    from streamer.publisher import Publisher, producer_config
    from streamer.records import CallRecord, Row, to_record, to_record_reference
    from streamer.sources.feed import FeedClient, FeedQuery, FeedTimeouts

    n = STAGE_ROWS
    client = FeedClient(
        url, LOGIN, Secret(PASSWORD), query=FeedQuery(format="csv"),
        timeouts=FeedTimeouts(connect_s=10, read_s=120, deadline_s=1800), max_attempts=1,
    )  # fmt: skip
    fromid = backlog - n

    def fetch_and_parse() -> int:
        with client.fetch(fromid) as rows:
            return sum(1 for _ in rows)

    results: list[tuple[str, int, float]] = []
    count, seconds = _timed(fetch_and_parse)
    results.append(("fetch + parse (HTTP from the simulator)", count, seconds))
    client.close()

    import httpx

    body = httpx.post(
        url, data={"login": LOGIN, "password": PASSWORD, "fromid": str(fromid)}, timeout=120
    ).content
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]

    rows, seconds = _timed(lambda: list(parse_rows(chunks, "csv")))
    results.append(("parse (body in memory)", len(rows), seconds))
    count, seconds = _timed(lambda: len(list(parse_rows(chunks, "csv", "auto"))))
    results.append(('parse, `encoding = "auto"` (body in memory)', count, seconds))
    typed = [r for r in rows if isinstance(r, Row)]
    records, seconds = _timed(lambda: [to_record(r) for r in typed])
    results.append(("typing (`to_record`)", len(records), seconds))
    _, seconds = _timed(lambda: [to_record_reference(r) for r in typed])
    results.append(("typing, reference path", len(typed), seconds))
    calls = [r for r in records if isinstance(r, CallRecord)]
    encoder = SingleObjectEncoder()
    values, seconds = _timed(lambda: [encoder.encode(r) for r in calls])
    results.append(("Avro encoding (`SingleObjectEncoder.encode`)", len(values), seconds))

    def reference(record: CallRecord) -> bytes:
        return encode_reference(encoder.schema, record, encoder.header)

    _, seconds = _timed(lambda: [reference(r) for r in calls])
    results.append(("Avro encoding, reference path", len(calls), seconds))

    topic = f"stages-{uuid.uuid4().hex[:8]}"
    _create_topic(bootstrap, topic)
    publisher = Publisher(producer_config(bootstrap))
    headers_base = [("source", b"feed"), ("feed", FEED.encode())]
    messages = [
        (
            r.account_code.encode(),
            v,
            timestamp_ms(r),
            [("cdr_id", str(r.id).encode()), *headers_base],
        )
        for r, v in zip(calls, values, strict=True)
    ]

    def produce() -> int:
        for key, value, ts, headers in messages:
            publisher.produce(topic, key, value, timestamp_ms=ts, headers=headers)
        publisher.flush(120)
        return len(messages)

    count, seconds = _timed(produce)
    results.append(("produce + flush (to the broker, acks=all)", count, seconds))

    def chain(parse: Callable[[Iterable[bytes], str], Iterator[Any]], typing: Callable[[Any], Any],
              encode: Callable[[Any], bytes]) -> int:  # fmt: skip
        count = 0
        for row in parse(chunks, "csv"):
            record = typing(row)
            publisher.produce(
                topic, record.account_code.encode(), encode(record),
                timestamp_ms=timestamp_ms(record),
                headers=[("cdr_id", str(record.id).encode()), *headers_base],
            )  # fmt: skip
            count += 1
        publisher.flush(120)
        return count

    count, seconds = _timed(lambda: chain(parse_rows, to_record, encoder.encode))
    results.append(("whole chain in one loop (parse, type, encode, produce)", count, seconds))
    count, seconds = _timed(lambda: chain(parse_rows, to_record_reference, reference))
    results.append(("whole chain, reference paths", count, seconds))
    publisher.close()
    return results


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


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def run() -> str:
    backlog = max(SIZES)
    with tempfile.TemporaryDirectory(prefix="cdr-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with (
            broker(tmp / "kafka") as bootstrap,
            simulator(backlog, ["--prerender", "csv"], ready_timeout_s=600) as url,
        ):
            # A child's ru_maxrss is at least this process's peak at its start (see below).
            parent_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            streamer: dict[tuple[str, int], list[StreamerRun]] = {}
            for n in SIZES:
                for mode in MODES:
                    streamer[mode, n] = [
                        run_streamer(tmp, bootstrap, url, mode, backlog, n) for _ in range(RUNS)
                    ]
                    print(f"  e2e {mode} {n}: {streamer[mode, n]}", file=sys.stderr, flush=True)
            sample_topic = _settings(sorted(tmp.glob("streamer-*.toml"), key=os.path.getmtime)[0])
            record_bytes = round(_mean_message_bytes(bootstrap, sample_topic.kafka.topic))
            ceiling = {
                n: [run_ceiling(bootstrap, n, record_bytes) for _ in range(RUNS)] for n in SIZES
            }
            print(f"  ceiling: {ceiling}", file=sys.stderr, flush=True)
            stages = _stages_in_own_process(url, bootstrap, backlog)
    return _report(streamer, ceiling, record_bytes, stages, parent_kib)


def _report(
    streamer: dict[tuple[str, int], list[StreamerRun]],
    ceiling: dict[int, list[CeilingRun]],
    record_bytes: int,
    stages: list[tuple[str, int, float]],
    parent_kib: int,
) -> str:
    lines = [
        "## End to end: simulator -> `cdr-streamer run --once` -> Kafka (acks=all)",
        "",
        f"Machine: {_versions()}.",
        "",
        f"Medians of {RUNS} runs each. **CDR/s** counts from the start of the streamer process "
        "(imports, topic checks, producer start) to its cursor committed at the last ID; "
        "**poll CDR/s** is the poll alone as the streamer logs it (first request to last "
        "commit). **Kafka ceiling** is Kafka's own ProducerPerformance sending as many "
        f"records of {record_bytes} bytes (the streamer's mean value + key + headers, "
        "measured on its topic) to the same broker, acks=all, idempotent, lz4, linger 20 ms; "
        "its own records/sec. CPU and peak RSS are the streamer process's (librdkafka's "
        "threads included; the broker and simulator run in processes of their own; this "
        f"benchmark's own process, whose peak a child's `ru_maxrss` starts from, was at "
        f"{parent_kib / 1024:.1f} MiB).",
        "",
        "| mode | CDRs | CDR/s | poll CDR/s | Kafka ceiling rec/s | CDR/s / ceiling "
        "| CPU s per 1M CDRs | peak RSS MiB | runs, CDR/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rate: dict[tuple[str, int], float] = {}
    rss: dict[tuple[str, int], float] = {}
    for n in SIZES:
        top = _median(c.per_s for c in ceiling[n])
        for mode in MODES:
            runs = streamer[mode, n]
            rate[mode, n] = _median(r.rows / r.seconds for r in runs)
            poll = _median(r.rows / r.poll_seconds for r in runs)
            cpu = _median(r.cpu_s / r.rows * 1e6 for r in runs)
            rss[mode, n] = _median(r.peak_rss_kib / 1024 for r in runs)
            each = ", ".join(f"{r.rows / r.seconds:,.0f}" for r in runs)
            lines.append(
                f"| {mode.replace('_', '-')} | {n:,} | {rate[mode, n]:,.0f} | {poll:,.0f} | "
                f"{top:,.0f} | {rate[mode, n] / top:.2f} | {cpu:.1f} | {rss[mode, n]:.1f} | "
                f"{each} |"
            )
    big = max(SIZES)
    small = min(SIZES)
    alo, eos = rate["at_least_once", big], rate["exactly_once", big]
    growth = max(rss[m, big] / rss[m, small] for m in MODES)
    peak = max(rss.values())

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines += [
        "",
        "Targets (2 cores, broker on the same machine):",
        "",
        f"- at-least-once >= {TARGET_CDR_PER_S:,} CDR/s: {alo:,.0f} at {big:,} CDRs "
        f"({verdict(alo >= TARGET_CDR_PER_S)})",
        f"- exactly-once >= {TARGET_EOS_SHARE:.0%} of at-least-once: {eos / alo:.0%} "
        f"({verdict(eos >= TARGET_EOS_SHARE * alo)})",
        f"- peak RSS <= {TARGET_RSS_MIB} MiB: {peak:.1f} MiB ({verdict(peak <= TARGET_RSS_MIB)}); "
        f"1M / 100k at most {TARGET_RSS_GROWTH:.2f}: {growth:.2f} "
        f"({verdict(growth <= TARGET_RSS_GROWTH)})",
        "",
        "### Each stage alone, in one process",
        "",
        f"The last {STAGE_ROWS:,} CDRs of the same feed, one stage at a time, each over the "
        "previous stage's output held in memory (the collector is kept off those lists). "
        "The reference paths are the straightforward ones the fast paths are tested "
        "against byte for byte (`records.to_record_reference`, `avro.encode_reference`: "
        "`to_avro_dict` + fastavro with the schema's logical types).",
        "",
        "| stage | CDRs | CDR/s | µs per CDR |",
        "|---|---:|---:|---:|",
    ]
    for name, count, seconds in stages:
        lines.append(
            f"| {name} | {count:,} | {count / seconds:,.0f} | {seconds / count * 1e6:.2f} |"
        )
    lines.append("")
    lines.append(
        "On this machine the streamer, librdkafka's threads, the broker and the simulator "
        "share two cores, so the end-to-end figures sit below the slowest stage alone."
    )
    return "\n".join(lines) + "\n"


def _stages_in_own_process(url: str, bootstrap: str, backlog: int) -> list[tuple[str, int, float]]:
    """`run_stages` in a fresh process: its memory must not inflate this one.

    Linux carries a process's peak RSS across exec into the child it starts, so a
    parent grown by these stages would lift every later child's `ru_maxrss`.
    """
    done = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--stages", url, bootstrap, str(backlog)],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the stage measurements failed:\n{done.stderr[-3000:]}")
    rows = json.loads(done.stdout.splitlines()[-1])
    return [(str(name), int(count), float(seconds)) for name, count, seconds in rows]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--stages"]:
        url, bootstrap, backlog = argv[1:4]
        print(json.dumps(run_stages(url, bootstrap, int(backlog))))
        return 0
    print(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
