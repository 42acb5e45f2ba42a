"""Reconciliation against the real broker: CDRs that became visible after the cursor passed them.

The simulator's late-ID fault hides chosen IDs until 45 higher IDs exist, so the live
poll's cursor passes them before they appear. The data run across the end of NZ
daylight time (2024-04-07 03:00 NZDT -> 02:00 NZST), whose local hour 02 occurs twice,
with late IDs in both occurrences. The first check of that hour stalls in the middle
of its answer, after some late CDRs were committed, and the streamer is killed there
with SIGKILL; the next instance checks the hour again. In the end every CDR is on the
topic: once each for a read_committed consumer in exactly-once mode, and at least once
in at-least-once mode, repeated only within the documented bound.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date
from functools import partial
from pathlib import Path

import pytest
from helpers import FEED_PASSWORD, Event, StreamerProcess, read_events

from streamer.simulator import BillingFeedSimulator, SimulatorConfig

GAP_S = 120  # 30 CDRs an hour; CDR n at 2024-03-01 00:00 UTC + n * 2 min
DST_END_ID = 26_340  # 2024-04-06 14:00 UTC: 03:00 NZDT becomes 02:00 NZST
FIRST_ID = DST_END_ID - 150  # initial_cursor: 5 hours before the change
END_ID = DST_END_ID + 190  # 20:20 UTC: the last late hour's last check is due by then
# Late IDs: in local hour 02 of 2024-04-07 before the change (NZDT) and after it (NZST);
# at 00:00 NZDT, 03:59 NZST, and 03:36 on the Chatham Islands (an account there, +12:45).
LATE_IN_HOUR_2 = {26312, 26313, 26318, 26325, 26333, 26345, 26352, 26353, 26367}
LATE = {*LATE_IN_HOUR_2, 26250, 26366, 26400}
LATE_BY_IDS = 45  # a late ID appears once 45 higher IDs exist (an hour and a half later)
CHECKPOINT_EVERY = 2
STEP = 15  # CDRs added at a time: half an hour of calls
REPEATED_HOUR = (date(2024, 4, 7), 2)
MODES = [
    pytest.param({}, id="at-least-once"),
    pytest.param({"delivery": "exactly_once", "cursor_store": "kafka"}, id="exactly-once"),
]


@pytest.fixture
def simulator() -> Iterator[BillingFeedSimulator]:
    sim = BillingFeedSimulator(
        SimulatorConfig(
            password=FEED_PASSWORD, backlog=FIRST_ID + 60, mean_gap_s=GAP_S, batch_rows=10,
            late_ids=",".join(str(i) for i in sorted(LATE)), late_by_ids=LATE_BY_IDS,
        )
    )  # fmt: skip
    with sim:
        yield sim


def _visible_high(sim: BillingFeedSimulator) -> int:
    """The highest ID the feed serves now (the highest existing one may be late, hidden)."""
    high = sim.high_id
    while not sim.store.visible(high):
        high -= 1
    return high


def _live_fromid(sim: BillingFeedSimulator) -> int:
    """The highest `fromid` of a live request (no date): the cursor the streamer committed."""
    live = [int(r.params["fromid"]) for r in sim.requests if "date" not in r.params]
    return max(live, default=0)


def _caught_up_or_stalled(sim: BillingFeedSimulator, target: int, killed: bool) -> bool:
    return _live_fromid(sim) >= target or bool(sim.stalls_started and not killed)


def _window_requests(sim: BillingFeedSimulator) -> Counter[tuple[str, str]]:
    return Counter(
        (r.params["date"], r.params.get("hour", "")) for r in sim.requests if "date" in r.params
    )


def _found_late(events: list[Event]) -> set[int]:
    return {e.value["ID"] for e in events if e.headers.get("found_late") == b"true"}


@pytest.mark.parametrize("mode", MODES)
def test_late_cdrs_are_found_across_a_kill_9_in_a_check_and_the_dst_change(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    simulator: BillingFeedSimulator,
    streamer_config: Callable[..., Path],
    mode: dict[str, str],
) -> None:
    sim, topic = simulator, topic_name
    # The first check of the repeated hour sends its first 10 rows, then nothing for 60 s.
    sim.inject_window("stall", *REPEATED_HOUR, seconds=60)
    config = streamer_config(
        [
            {
                "name": "main", "url": sim.url, "login": "81234567",
                "cursor_file": str(tmp_path / "cursor.json"), "initial_cursor": FIRST_ID,
                "poll_interval_s": 0.2, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
                # Hours age with the simulated calls' time (2024), not the wall clock.
                "reconcile_clock": "feed", "reconcile_horizon_h": 3, "reconcile_checks": 2,
            }
        ],
        cursor_topic=f"{topic_name}-cursors", checkpoint_every=CHECKPOINT_EVERY,
        # Its own transactional id: the shared broker may run other "main" feeds meanwhile.
        transactional_id_prefix=f"cdr-streamer-{topic_name}", **mode,
    )  # fmt: skip
    first = StreamerProcess(config, tmp_path / "first.log")
    current = first
    killed = False
    try:
        while True:
            target = _visible_high(sim)
            current.wait_for(
                partial(_caught_up_or_stalled, sim, target, killed),
                f"the live poll to reach {target}",
            )
            if sim.stalls_started and not killed:
                # Mid-check: wait until its first late CDRs are committed, then SIGKILL.
                current.wait_for(
                    lambda: {26312, 26313} <= _found_late(read_events(kafka_bootstrap, topic)),
                    "the stalled check's first late CDRs on the topic",
                )
                first.kill()
                killed = True
                assert "reconciled 2024-04-07 hour 02 (check 1 of 2)" not in first.log()
                current = StreamerProcess(config, tmp_path / "second.log")
                continue
            if sim.high_id >= END_ID:
                break
            sim.add(STEP)
        expected = set(range(FIRST_ID + 1, sim.high_id + 1))
        current.wait_for(
            lambda: expected <= {e.value["ID"] for e in read_events(kafka_bootstrap, topic)},
            "every CDR, the late ones included, on the topic",
            timeout_s=90,
        )
    finally:
        if current.proc.poll() is None:
            assert current.stop() == 0, current.log()[-3000:]
    assert killed, "the stalled check was never reached"

    events = read_events(kafka_bootstrap, topic_name)
    ids = Counter(e.value["ID"] for e in events)
    assert set(ids) == expected
    assert _found_late(events) == LATE  # published by reconciliation, none by the live poll
    late_events = [e for e in events if e.value["ID"] in LATE]
    for event in late_events:  # the same event and key as the live poll's would have been
        assert event.key == sim.row(event.value["ID"])["AccountCode"]
        assert (
            event.value["UTCDateTime"].strftime("%Y-%m-%d %H:%M:%S")
            == (sim.row(event.value["ID"])["UTCDateTime"])
        )
    duplicated = {i for i, n in ids.items() if n > 1}
    if mode:
        assert not duplicated
    else:
        # Only late CDRs of the killed check, produced after its last checkpoint.
        assert duplicated <= LATE_IN_HOUR_2
        assert len(duplicated) <= CHECKPOINT_EVERY

    # The repeated hour is one window: asked once per check (twice), plus the killed try
    # (still stalled, so not in the simulator's log of answered requests yet).
    windows = _window_requests(sim)
    assert windows[("2024-04-07", "2")] == 2
    assert sim.stalls_started == 1
    assert max(n for w, n in windows.items() if w != ("2024-04-07", "2")) <= 2
    # Each late CDR's own local hour was asked for, in both time zones' offsets.
    for cdr_id in LATE:
        row = sim.row(cdr_id)
        assert (row["Date"], str(int(row["Time"][:2]))) in windows, cdr_id
    rows = [sim.row(i) for i in LATE_IN_HOUR_2]
    assert {(r["Date"], r["Time"][:2]) for r in rows} == {("2024-04-07", "02")}
    assert {r["UTCOffset"] for r in rows} == {"13", "12"}  # NZDT and NZST: the same hour
    assert sim.row(26366)["UTCOffset"] == "12.75"  # Chatham Islands, in its own local hour

    if not mode:  # the record of published IDs rides in the cursor file
        record = json.loads((tmp_path / "cursor.json").read_text())["published"]
        assert record["floor"] == FIRST_ID
        assert record["hours"]
        assert len(record["hours"]) <= 2 * 3 + 2  # pruned: twice the horizon, and the newest
