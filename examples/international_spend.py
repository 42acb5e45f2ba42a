"""A fraud rule to start from: international spend per account over a sliding hour.

Reads cdr-streamer's events, adds up each account's international charges (Charge,
incl. GST) over a sliding window of *event time* (the call's UTCDateTime), and writes
an alert event to an alerts topic when an account's spend in some window first passes
the threshold. What a fraud team needs to get right, and where this file does it:

- **Exactly once.** The input is read `read_committed` (the streamer may write in
  transactions); the alerts and the input offsets are committed in one Kafka
  transaction (`send_offsets_to_transaction`), so an event is counted once and an
  alert written once, whatever crashes. Read the alerts topic `read_committed` too.
- **Duplicates.** The streamer is at-least-once by default and `cdr-streamer backfill`
  republishes a day on purpose: events are deduplicated by `cdr_id` (the CDR's ID). The
  memory of IDs is bounded: it holds the calls still inside the window, and anything
  older is too late to count anyway.
- **Late and backfilled events.** Windows follow event time, not arrival: a call billed
  an hour late still lands in its own hour. Each partition's watermark is the newest
  event time seen minus the allowed lateness; an event older than that is counted as
  too late and dropped (its windows are closed). A backfill of old days is therefore
  ignored, and a replay of the whole topic gives the same alerts as the live run.
- **State after a restart or a rebalance** is rebuilt from the input: each committed
  offset carries its partition's newest event time, and on assignment the partition is
  read again from `window + lateness` before it, without alerting, up to the committed
  offset. (Each account's events are in one partition: the key is the AccountCode.)

One alert per episode: an account alerts when its highest spend in any window first
exceeds the threshold, and again only once the calls of that window have aged out of
the state (`window + lateness` of event time later) and a new window passes it.

    python examples/international_spend.py --bootstrap-servers 127.0.0.1:9092 \\
        --topic cdr-events --alerts-topic cdr-fraud-alerts --threshold-nzd 100
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from cdr_decoder import CdrDecoder
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

log = logging.getLogger("international_spend")

REPO = Path(__file__).resolve().parent.parent
RULE = "international_spend"
SWEEP_EVERY_MS = 60_000  # event time between two sweeps of every account's old calls


# --- the rule: no Kafka here ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """What the rule needs of one event."""

    cdr_id: int
    account: str
    at_ms: int  # UTCDateTime, epoch milliseconds
    charge: Decimal  # Charge incl. GST, NZD


@dataclass(frozen=True, slots=True)
class Alert:
    account: str
    spend: Decimal
    threshold: Decimal
    window_s: int
    first_ms: int  # the window's first and last call (event time)
    last_ms: int
    cdr_ids: tuple[int, ...]
    trigger_cdr_id: int  # the call whose arrival made the spend pass the threshold

    @property
    def alert_id(self) -> str:
        """The same alert gets the same id, on a replay too: consumers can drop repeats."""
        return f"{RULE}/{self.account}/{self.trigger_cdr_id}"

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "alert_id": self.alert_id,
                "rule": RULE,
                "account": self.account,
                "spend_nzd": str(self.spend),
                "threshold_nzd": str(self.threshold),
                "window_s": self.window_s,
                "first_call_at": _iso(self.first_ms),
                "last_call_at": _iso(self.last_ms),
                "cdr_ids": list(self.cdr_ids),
                "detected_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        ).encode()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@dataclass
class _Account:
    """One account's international calls inside the horizon, ordered by event time."""

    times: list[int] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    ids: set[int] = field(default_factory=set)

    def insert(self, call: Call) -> None:
        i = bisect.bisect_right(self.times, call.at_ms)
        self.times.insert(i, call.at_ms)
        self.calls.insert(i, call)
        self.ids.add(call.cdr_id)

    def forget_before(self, ms: int) -> None:
        i = bisect.bisect_left(self.times, ms)
        for call in self.calls[:i]:
            self.ids.discard(call.cdr_id)
        del self.times[:i], self.calls[:i]

    def peak(self, window_ms: int) -> tuple[Decimal, int, int]:
        """The highest spend of any window (t - window, t]: (spend, first index, end index)."""
        best, best_first, best_end = Decimal(0), 0, 0
        total, first = Decimal(0), 0
        for end, call in enumerate(self.calls):
            total += call.charge
            while self.times[first] <= call.at_ms - window_ms:
                total -= self.calls[first].charge
                first += 1
            if total > best:
                best, best_first, best_end = total, first, end + 1
        return best, best_first, best_end


@dataclass
class Counts:
    counted: int = 0
    duplicates: int = 0
    too_late: int = 0
    alerts: int = 0

    def add(self, other: Counts) -> None:
        self.counted += other.counted
        self.duplicates += other.duplicates
        self.too_late += other.too_late
        self.alerts += other.alerts


class SpendRule:
    """International spend per account over a sliding event-time window, for one partition."""

    def __init__(self, threshold: Decimal, window_s: int, lateness_s: int) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self.window_ms = window_s * 1000
        self.lateness_ms = lateness_s * 1000
        self.newest_ms = 0  # the newest event time seen: the watermark is this - lateness
        self.counts = Counts()
        self._accounts: dict[str, _Account] = {}
        self._swept_ms = 0

    @property
    def watermark_ms(self) -> int:
        return self.newest_ms - self.lateness_ms

    def add(self, call: Call) -> Alert | None:
        """Count one international call; the alert if it makes its account's spend pass."""
        if call.at_ms < self.watermark_ms:
            self.counts.too_late += 1  # its windows are closed: alerting now would be a lie
            return None
        account = self._accounts.setdefault(call.account, _Account())
        if call.cdr_id in account.ids:
            self.counts.duplicates += 1
            return None
        if call.at_ms > self.newest_ms:
            self.newest_ms = call.at_ms
        # A call older than the horizon shares no window with a call still on time.
        account.forget_before(self.watermark_ms - self.window_ms)
        if self.newest_ms - self._swept_ms >= SWEEP_EVERY_MS:
            self._forget_old()
        before, _, _ = account.peak(self.window_ms)
        account.insert(call)
        self.counts.counted += 1
        after, first, end = account.peak(self.window_ms)
        if not after > self.threshold >= before:
            return None
        self.counts.alerts += 1
        calls = account.calls[first:end]
        return Alert(
            account=call.account,
            spend=after,
            threshold=self.threshold,
            window_s=self.window_s,
            first_ms=calls[0].at_ms,
            last_ms=calls[-1].at_ms,
            cdr_ids=tuple(c.cdr_id for c in calls),
            trigger_cdr_id=call.cdr_id,
        )

    def _forget_old(self) -> None:
        """Drop what every account holds beyond the horizon (memory; the rule's own
        account is trimmed on each call)."""
        self._swept_ms = self.newest_ms
        horizon = self.watermark_ms - self.window_ms
        for name in [n for n, a in self._accounts.items() if a.times and a.times[0] < horizon]:
            account = self._accounts[name]
            account.forget_before(horizon)
            if not account.calls:
                del self._accounts[name]


def international_call(event: dict[str, Any]) -> Call | None:
    """The event as a Call, if it is a charged international one."""
    if event["CallType"] != "International" or event["Charge"] <= 0:
        return None
    at = event["UTCDateTime"]  # fastavro gives timestamp-millis as an aware datetime
    return Call(event["ID"], event["AccountCode"], round(at.timestamp() * 1000), event["Charge"])


# --- Kafka: read_committed in, one transaction per batch out ------------------------------------


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str
    topic: str
    alerts_topic: str
    group: str
    instance_id: str  # this instance's, stable across its restarts
    threshold: Decimal
    window_s: int
    lateness_s: int
    released: Path
    reader_schema: Path
    batch: int = 500


class SpendAlerter:
    """The consumer: decode, apply the rule per partition, write alerts exactly once."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.decoder = CdrDecoder(settings.released, settings.reader_schema)
        self.rules: dict[int, SpendRule] = {}
        self.totals = Counts()  # of partitions no longer assigned
        self.replay_until: dict[int, int] = {}  # partition -> first offset not yet committed
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": settings.group,
                "isolation.level": "read_committed",  # never an aborted or open transaction
                "enable.auto.commit": False,  # offsets are committed in our transactions
                "auto.offset.reset": "earliest",
                # Static membership: a restarted instance gets its partitions back at
                # once, instead of after the old member's session timed out.
                "group.instance.id": settings.instance_id,
            }
        )
        self.producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "transactional.id": settings.instance_id,
            }
        )

    def run(self, stop: Callable[[], bool]) -> None:
        # Fences an older instance with the same transactional id and aborts its open
        # transaction, so what it had not committed is read again here.
        self.producer.init_transactions(60)
        self.consumer.subscribe([self.s.topic], on_assign=self._assigned, on_revoke=self._revoked)
        try:
            while not stop():
                messages = [m for m in self.consumer.consume(self.s.batch, 1.0) if _ok(m)]
                if messages:
                    self._process(messages)
        finally:
            self.consumer.close()
            self.producer.flush(30)

    def _process(self, messages: list[Message]) -> None:
        # Step 1: open a transaction for this batch's alerts and offsets.
        self.producer.begin_transaction()
        try:
            # Step 2: the rule, partition by partition; replayed events only rebuild state.
            for msg in messages:
                for alert in self._apply(msg):
                    self.producer.produce(
                        self.s.alerts_topic,
                        alert.to_json(),
                        alert.account.encode(),
                        timestamp=alert.last_ms,
                        headers=[("rule", RULE.encode())],
                    )
            # Step 3: the next offsets, each with its partition's newest event time, join
            # the transaction; committing it makes alerts and offsets visible together.
            self.producer.send_offsets_to_transaction(
                self._positions(), self.consumer.consumer_group_metadata(), 60
            )
            self.producer.commit_transaction(60)
        except KafkaException:
            # Nothing of this batch is visible. Stop: a restart resumes at the committed
            # offsets with the state rebuilt (a supervisor, systemd or Kubernetes, restarts).
            self.producer.abort_transaction(60)
            raise

    def _apply(self, msg: Message) -> Iterator[Alert]:
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None
        assert offset is not None
        rule = self.rules[partition]
        event = self.decoder.decode(msg.value() or b"")
        call = international_call(event)
        if call is None:
            return
        alert = rule.add(call)
        if alert is not None and offset >= self.replay_until.get(partition, 0):
            log.warning(
                "alert %s: account %s spent NZD %s in %d s",
                alert.alert_id,
                alert.account,
                alert.spend,
                self.s.window_s,
            )
            yield alert

    def _positions(self) -> list[TopicPartition]:
        positions = self.consumer.position(self.consumer.assignment())
        return [
            TopicPartition(
                tp.topic, tp.partition, tp.offset, metadata=str(self.rules[tp.partition].newest_ms)
            )
            for tp in positions
            if tp.offset >= 0 and tp.partition in self.rules
        ]

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Rebuild each new partition's state: start `window + lateness` before its offset."""
        horizon_ms = (self.s.window_s + self.s.lateness_s) * 1000
        starts = []
        for tp in consumer.committed(partitions, timeout=60):
            self.rules[tp.partition] = SpendRule(
                self.s.threshold, self.s.window_s, self.s.lateness_s
            )
            self.replay_until[tp.partition] = max(tp.offset, 0)
            if tp.offset < 0 or not tp.metadata:
                starts.append(TopicPartition(tp.topic, tp.partition, tp.offset))
                continue
            since = TopicPartition(tp.topic, tp.partition, int(tp.metadata) - horizon_ms)
            (found,) = consumer.offsets_for_times([since], timeout=60)
            start = found.offset if 0 <= found.offset < tp.offset else tp.offset
            starts.append(TopicPartition(tp.topic, tp.partition, start))
            log.info(
                "partition %d: state rebuilt from offset %d, resuming at %d",
                tp.partition,
                start,
                tp.offset,
            )
        consumer.assign(starts)

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every batch is committed before the next consume(), so nothing is in flight here.
        for tp in partitions:
            rule = self.rules.pop(tp.partition, None)
            self.replay_until.pop(tp.partition, None)
            if rule is not None:
                self.totals.add(rule.counts)

    def counts(self) -> Counts:
        """What the rule did, since this process started (state rebuilding included)."""
        total = Counts()
        total.add(self.totals)
        for rule in self.rules.values():
            total.add(rule.counts)
        return total


def _ok(msg: Message) -> bool:
    error = msg.error()
    if error is None:
        return True
    if error.fatal():
        raise KafkaException(error)
    log.warning("consumer: %s", error.str())
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", default="cdr-events")
    parser.add_argument("--alerts-topic", default="cdr-fraud-alerts")
    parser.add_argument("--group", default="fraud-international-spend")
    parser.add_argument(
        "--instance-id",
        help="unique per running instance and stable across its restarts: its transactional "
        "id and static group membership (default: GROUP-1)",
    )
    parser.add_argument("--threshold-nzd", type=Decimal, default=Decimal(100))
    parser.add_argument("--window-s", type=int, default=3600, help="sliding window (event time)")
    parser.add_argument("--lateness-s", type=int, default=7200, help="allowed lateness")
    parser.add_argument("--released", type=Path, default=REPO / "schemas" / "released")
    parser.add_argument(
        "--reader-schema",
        type=Path,
        default=REPO / "schemas" / "released" / "cdr-v1.avsc",
        help="the schema version this code reads (fields it uses: ID, AccountCode, ...)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings(
        bootstrap_servers=args.bootstrap_servers,
        topic=args.topic,
        alerts_topic=args.alerts_topic,
        group=args.group,
        instance_id=args.instance_id or f"{args.group}-1",
        threshold=args.threshold_nzd,
        window_s=args.window_s,
        lateness_s=args.lateness_s,
        released=args.released,
        reader_schema=args.reader_schema,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    alerter = SpendAlerter(settings)
    try:
        alerter.run(stop.is_set)
    except KafkaException as exc:
        log.error("stopped: %s", exc)
        return 1
    log.info("stopped: %s", json.dumps(asdict(alerter.counts())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
