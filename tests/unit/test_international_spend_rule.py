"""examples/international_spend.py's rule, without Kafka: windows, duplicates, lateness."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from international_spend import Call, SpendRule, international_call

MIN = 60_000  # ms
HOUR = 60 * MIN
T0 = 1_709_251_200_000  # 2024-03-01T00:00:00Z


def call(cdr_id: int, minute: float, charge: str, account: str = "A") -> Call:
    return Call(cdr_id, account, T0 + round(minute * MIN), Decimal(charge))


def rule(threshold: str = "100") -> SpendRule:
    return SpendRule(Decimal(threshold), window_s=3600, lateness_s=2 * 3600)


def test_spend_in_one_window_passes_the_threshold_once() -> None:
    r = rule()
    assert r.add(call(1, 0, "40")) is None
    assert r.add(call(2, 20, "40")) is None
    alert = r.add(call(3, 50, "30"))
    assert alert is not None
    assert (alert.account, alert.spend, alert.cdr_ids) == ("A", Decimal(110), (1, 2, 3))
    assert alert.alert_id == "international_spend/A/3"
    assert (alert.first_ms, alert.last_ms) == (T0, T0 + 50 * MIN)
    # Still the same episode: no second alert while that spend is in the state.
    assert r.add(call(4, 55, "80")) is None
    assert r.counts.alerts == 1
    document = json.loads(alert.to_json())
    assert document["spend_nzd"] == "110"
    assert document["cdr_ids"] == [1, 2, 3]
    assert document["first_call_at"] == "2024-03-01T00:00:00.000+00:00"


def test_calls_more_than_a_window_apart_do_not_add_up() -> None:
    r = rule()
    assert r.add(call(1, 0, "60")) is None
    assert r.add(call(2, 60, "60")) is None  # exactly an hour later: (t - 1 h, t] excludes 1
    alert = r.add(call(3, 100, "50"))
    assert alert is not None
    assert alert.cdr_ids == (2, 3)


def test_accounts_are_apart() -> None:
    r = rule()
    assert r.add(call(1, 0, "60", "A")) is None
    assert r.add(call(2, 1, "60", "B")) is None
    assert r.add(call(3, 2, "30", "A")) is None
    assert r.add(call(4, 3, "50", "B")) is not None


def test_a_duplicate_cdr_id_counts_once() -> None:
    r = rule()
    r.add(call(1, 0, "60"))
    assert r.add(call(1, 0, "60")) is None  # the same CDR again (at-least-once, backfill)
    assert r.counts.duplicates == 1
    assert r.add(call(2, 10, "30")) is None  # 90: the duplicate did not count
    assert r.add(call(3, 20, "20")) is not None


def test_a_late_call_lands_in_its_own_window() -> None:
    r = rule()
    r.add(call(1, 0, "60"))
    r.add(call(2, 90, "10"))  # event time moves on by 90 minutes
    # Billed late: this call happened at minute 30, inside the lateness allowed.
    alert = r.add(call(3, 30, "50"))
    assert alert is not None
    assert alert.cdr_ids == (1, 3)
    assert r.counts.too_late == 0


def test_a_call_older_than_the_watermark_is_too_late() -> None:
    r = rule()
    r.add(call(1, 0, "60"))
    r.add(call(2, 200, "1"))  # the watermark is now minute 80
    assert r.add(call(3, 10, "50")) is None  # would have made 110 with call 1
    assert r.counts.too_late == 1
    assert r.watermark_ms == T0 + 80 * MIN


def test_a_new_episode_alerts_again_once_the_old_one_aged_out() -> None:
    r = rule()
    r.add(call(1, 0, "120"))  # alert
    assert r.counts.alerts == 1
    assert r.add(call(2, 100, "120")) is None  # call 1 is still held: same episode
    r.add(call(3, 400, "1"))  # 6 h 40 later: calls 1 and 2 aged out (window + lateness)
    assert r.add(call(4, 401, "150")) is not None
    assert r.counts.alerts == 2


@pytest.mark.parametrize("restart_at", [20, 57, 111, 160])
def test_state_rebuilt_from_window_plus_lateness_gives_the_same_alerts(restart_at: int) -> None:
    """What SpendAlerter does on assignment: replay from `window + lateness` before the
    newest event time committed, without alerting, then go on: the same alerts follow."""
    # Bursts of calls 250 minutes apart, every 7th call billed 20 minutes late, two
    # accounts: some bursts pass the threshold, some do not.
    calls = [
        call(
            i, i // 10 * 250 + i % 10 * 3 - (20 if i % 7 == 0 else 0), str(i * 13 % 40), "AB"[i % 2]
        )
        for i in range(1, 200)
    ]
    live = rule()
    alerts = [(i, live.add(c)) for i, c in enumerate(calls)]
    expected = [a.alert_id for i, a in alerts if a is not None and i >= restart_at]
    assert expected  # the data passes the threshold after the restart

    before = rule()
    for c in calls[:restart_at]:
        before.add(c)
    since = before.newest_ms - (3600 + 2 * 3600) * 1000  # the committed offset's metadata
    # offsets_for_times: the first offset whose timestamp is at or after `since`.
    start = next(i for i, c in enumerate(calls) if c.at_ms >= since)
    rebuilt = rule()
    for c in calls[start:restart_at]:
        rebuilt.add(c)  # replayed: alerts not emitted again
    after = [a.alert_id for c in calls[restart_at:] if (a := rebuilt.add(c)) is not None]
    assert after == expected
    assert len([a for _, a in alerts if a is not None]) < len(calls) // 10  # not every burst


def event(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "ID": 7, "AccountCode": "A", "CallType": "International", "Charge": Decimal("2.5"),
        "UTCDateTime": datetime(2024, 3, 1, 0, 1, tzinfo=UTC),
    }  # fmt: skip
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "counted"),
    [
        ({}, True),
        ({"CallType": "Mobile"}, False),
        ({"Charge": Decimal(0)}, False),  # unanswered: nothing spent
        ({"Charge": Decimal("-3")}, False),  # a credit
    ],
)
def test_only_charged_international_calls_count(changes: dict[str, object], counted: bool) -> None:
    found = international_call(event(**changes))
    assert (found is not None) == counted
    if found is not None:
        assert found == Call(7, "A", T0 + MIN, Decimal("2.5"))
