"""examples/international_spend.py on the real broker, fed by the streamer from the simulator.

The example runs as its users run it (`python examples/international_spend.py`), is
killed with SIGKILL halfway, restarted, and then sees a backfill of the whole day
republished. Its alerts (read read_committed) must be exactly the accounts whose
international spend in some hour passes the threshold, each alert once, computed here
by brute force from the simulator's rows; one account's window straddles the kill, so
only the state rebuilt from the input can find it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from helpers import FEED_PASSWORD, REPO_ROOT, read_topic, run_streamer, wait_until

from streamer.simulator import BillingFeedSimulator, SimulatorConfig

# The events carry their calls' times (2024): time retention would delete them at once.
KEEP = {"retention.ms": "-1"}
EXAMPLE = REPO_ROOT / "examples" / "international_spend.py"
TOTAL = 3000  # CDRs, 10 s apart: about 8 hours of calls on 2024-03-01
WINDOW_S = 3600
PARTITIONS = 3  # what helpers.write_config gives the streamer's topic
SIM = {"password": FEED_PASSWORD, "accounts": 8, "mean_gap_s": 10.0, "seed": 31}

Spend = list[tuple[int, int, Decimal]]  # (cdr_id, UTC epoch ms, charge) of one account


def international_calls(rows: dict[int, dict[str, str]]) -> dict[str, Spend]:
    calls: dict[str, Spend] = {}
    for cdr_id, row in rows.items():
        charge = Decimal(row["Charge"])
        if row["CallType"] == "International" and charge > 0:
            at = datetime.fromisoformat(row["UTCDateTime"].replace(" ", "T") + "+00:00")
            ms = round(at.timestamp() * 1000)
            calls.setdefault(row["AccountCode"], []).append((cdr_id, ms, charge))
    return calls


def window_sum(calls: Spend, end_ms: int) -> Decimal:
    """Spend of the window (end - 1 h, end]."""
    return sum((c for _, t, c in calls if end_ms - WINDOW_S * 1000 < t <= end_ms), Decimal(0))


def peak(calls: Spend) -> Decimal:
    return max((window_sum(calls, t) for _, t, _ in calls), default=Decimal(0))


def first_crossing(calls: Spend, threshold: Decimal) -> tuple[int, int, Decimal]:
    """The call (in arrival order) whose arrival first makes some window pass `threshold`."""
    return next(c for i, c in enumerate(calls) if peak(calls[: i + 1]) > threshold)


def trigger_index(calls: Spend, cdr_id: int) -> int:
    return next(i for i, c in enumerate(calls) if c[0] == cdr_id)


class Example:
    """`python examples/international_spend.py` in the background."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log_path = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLE), *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=dict(os.environ),
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        def done() -> bool:
            assert self.proc.poll() is None, f"the example exited:\n{self.log()[-3000:]}"
            return condition()

        wait_until(done, what, timeout_s=120)


@pytest.fixture
def offsets(kafka_bootstrap: str) -> Iterator[Callable[[str, str], bool]]:
    """caught_up(topic, group): the group's committed offsets are at the end of the topic."""
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "offset-reader"})

    def caught_up(topic: str, group: str) -> bool:
        probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
        try:
            parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            committed = probe.committed(parts, timeout=10)
        finally:
            probe.close()
        ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
        return [tp.offset for tp in committed] == ends

    yield caught_up
    consumer.close()


def test_international_spend_alerts_once_through_a_crash_and_a_backfill(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    streamer_config: Callable[..., Path],
    offsets: Callable[[str, str], bool],
) -> None:
    source = BillingFeedSimulator(SimulatorConfig(**SIM))  # rows depend on the seed and ID only
    rows = {i: source.row(i) for i in range(1, TOTAL + 1)}
    calls = international_calls(rows)
    peaks = {account: peak(spend) for account, spend in calls.items()}
    # A threshold some accounts pass and others do not.
    threshold = sorted(peaks.values())[len(peaks) // 2]
    expected_accounts = {a for a, p in peaks.items() if p > threshold}
    assert 0 < len(expected_accounts) < len(peaks)
    # Kill the example just before the call that first takes an account over the
    # threshold, in a window with earlier calls: after the restart only the rebuilt
    # state still holds those.
    straddle = next(
        (account, trigger)
        for account in sorted(expected_accounts)
        for trigger, t, charge in [first_crossing(calls[account], threshold)]
        if window_sum(calls[account][: trigger_index(calls[account], trigger)], t) > 0
    )
    split = straddle[1] - 1

    alerts_topic = f"{topic_name}-alerts"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(alerts_topic, 1, 1, config=KEEP)]).values():
        future.result(30)
    group = f"fraud-{uuid4().hex[:8]}"
    example_args = (
        "--bootstrap-servers", kafka_bootstrap, "--topic", topic_name,
        "--alerts-topic", alerts_topic, "--group", group, "--threshold-nzd", str(threshold),
        "--window-s", str(WINDOW_S), "--lateness-s", "7200",
    )  # fmt: skip
    with BillingFeedSimulator(SimulatorConfig(**SIM, backlog=split)) as sim:
        config = streamer_config(
            [{"name": "main", "url": sim.url, "login": "81234567",
              "cursor_file": str(tmp_path / "cursor.json")}]
        )  # fmt: skip
        assert run_streamer("run", "--config", str(config), "--once").returncode == 0

        first = Example(tmp_path / "example-1.log", *example_args)
        first.wait_for(lambda: offsets(topic_name, group), "the example to catch up")
        first.proc.kill()  # SIGKILL: no clean shutdown, no last commit
        first.proc.wait(30)

        sim.add(TOTAL - split)
        assert run_streamer("run", "--config", str(config), "--once").returncode == 0
        second = Example(tmp_path / "example-2.log", *example_args)
        second.wait_for(lambda: offsets(topic_name, group), "the example to catch up again")
        assert "state rebuilt from offset" in second.log()

        # The whole day again, as `cdr-streamer backfill` republishes it: duplicates.
        day = rows[TOTAL]["Date"]
        assert rows[1]["Date"] == day
        backfill = run_streamer("backfill", "--config", str(config), "--date", day)
        assert backfill.returncode == 0, backfill.stderr
        second.wait_for(lambda: offsets(topic_name, group), "the example to read the backfill")
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0, second.log()[-3000:]

    stopped = json.loads(second.log().rsplit("stopped: ", 1)[1].splitlines()[0])
    # Every backfilled international call was a duplicate or too late to count again.
    assert stopped["duplicates"] + stopped["too_late"] >= sum(len(c) for c in calls.values())

    alerts = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, alerts_topic)]
    ids = [a["alert_id"] for a in alerts]
    assert len(ids) == len(set(ids)), "an alert was written twice"
    assert {a["account"] for a in alerts} == expected_accounts
    for alert in alerts:
        spend = {cdr_id: charge for cdr_id, _, charge in calls[alert["account"]]}
        assert set(alert["cdr_ids"]) <= set(spend), alert
        assert Decimal(alert["spend_nzd"]) == sum(spend[i] for i in alert["cdr_ids"]) > threshold
    account, trigger = straddle
    assert f"international_spend/{account}/{trigger}" in ids
