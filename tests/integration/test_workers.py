"""Worker processes (`[processing] workers`) against the real broker: a worker killed
mid-poll, for the feed and for a file source."""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import StreamerProcess, read_cursor, read_cursor_topic, read_events, wait_until

from streamer.simulator import BillingFeedSimulator

CDRS = 200_000
CHECKPOINT_EVERY = 5_000
MORE = 20_000


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name, in parentheses, may hold spaces: the fields after it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _workers(pid: int) -> list[int]:
    """The streamer's worker processes: the forkserver's children (its grandchildren)."""
    return [w for child in _children(pid) for w in _children(child)]


@pytest.mark.parametrize(("delivery", "fmt"), [("at_least_once", "csv"), ("exactly_once", "json")])
def test_a_worker_killed_mid_poll_fails_the_poll_and_loses_nothing(
    delivery: str,
    fmt: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_name: str,
    simulator: Callable[..., BillingFeedSimulator],
    streamer_config: Callable[..., Path],
) -> None:
    sim = simulator(backlog=CDRS, seed=5, malformed_rate=0.001)
    cursor_file = tmp_path / "cursor.json"
    feed = {
        "name": "main", "url": sim.url, "login": "81234567", "poll_interval_s": 1,
        "cursor_file": str(cursor_file), "backoff_base_s": 0.2, "backoff_max_s": 1,
        "ids_ascending": True, "format": fmt,
    }  # fmt: skip
    cursor_topic = f"{topic_name}-cursors"
    config = streamer_config(
        [feed], checkpoint_every=CHECKPOINT_EVERY, delivery=delivery, cursor_topic=cursor_topic,
        processing={"workers": 2},
    )  # fmt: skip

    def committed() -> int | None:
        if delivery == "exactly_once":
            return read_cursor_topic(kafka_bootstrap, cursor_topic, "main")
        return read_cursor(cursor_file)

    proc = StreamerProcess(config, tmp_path / "run.log")
    try:
        proc.wait_for(lambda: len(_workers(proc.proc.pid)) == 2, "two worker processes")
        victim = _workers(proc.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        failure = re.compile(r"a worker process died.*cursor stays at (\d+)")
        proc.wait_for(lambda: failure.search(proc.log()) is not None, "the poll to fail")
        match = failure.search(proc.log())
        assert match is not None
        stayed = int(match.group(1))
        assert stayed < CDRS  # it failed mid-poll, not after
        # The next poll, through a new pool of workers, finishes the feed.
        proc.wait_for(lambda: committed() == CDRS, "the cursor to reach the end")
        sim.add(MORE)
        proc.wait_for(lambda: committed() == CDRS + MORE, "the new CDRs")
        assert len(_workers(proc.proc.pid)) == 2
        assert victim not in _workers(proc.proc.pid)
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]

    log = proc.log()
    assert f"cursor {stayed} -> {CDRS}" in log, log[-3000:]
    events = read_events(kafka_bootstrap, topic_name)
    ids = Counter(e.value["ID"] for e in events)
    malformed = {i for i in range(1, CDRS + MORE + 1) if sim.is_malformed(i)}
    assert malformed
    missing = set(range(1, CDRS + MORE + 1)) - set(ids) - malformed
    assert not missing, f"{len(missing)} CDRs lost, e.g. {sorted(missing)[:5]}"
    # At least once: only the rows after the cursor that stayed can come twice.
    duplicated = {i for i, n in ids.items() if n > 1}
    if delivery == "exactly_once":
        assert not duplicated
    else:
        assert all(i > stayed for i in duplicated)
    dead = [json.loads(m.value()) for m in _read_dlq(kafka_bootstrap, topic_name)]
    # Every malformed row is a dead letter (by its ID, or one without a readable ID).
    unaccounted = malformed - set(ids) - {d["id"] for d in dead}
    assert len(unaccounted) <= sum(1 for d in dead if d["id"] is None)
    assert dead


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_streamer_leaves_no_worker_behind(
    tmp_path: Path,
    simulator: Callable[..., BillingFeedSimulator],
    streamer_config: Callable[..., Path],
) -> None:
    """kill -9 of the streamer: its workers and their forkserver exit by themselves."""
    sim = simulator(backlog=CDRS, seed=6)
    feed = {"name": "main", "url": sim.url, "login": "81234567", "poll_interval_s": 1,
            "cursor_file": str(tmp_path / "cursor.json")}  # fmt: skip
    config = streamer_config([feed], processing={"workers": 2})
    proc = StreamerProcess(config, tmp_path / "run.log")
    try:
        proc.wait_for(lambda: len(_workers(proc.proc.pid)) == 2, "two worker processes")
        helpers = _children(proc.proc.pid) + _workers(proc.proc.pid)  # + the forkserver
        assert "starting 2 worker processes" in proc.log()
    finally:
        proc.kill()
    wait_until(
        lambda: not any(_alive(pid) for pid in helpers),
        f"the workers and their forkserver ({helpers}) to exit",
        timeout_s=30,
    )


def _read_dlq(bootstrap: str, topic: str) -> list[object]:
    from helpers import read_topic

    return list(read_topic(bootstrap, f"{topic}-dlq"))
