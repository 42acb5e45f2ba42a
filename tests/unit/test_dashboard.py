"""The Grafana dashboard and its provisioning fit together (its queries run in integration)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA = REPO_ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cdr-streamer.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_fixed_uid_and_a_feed_variable_from_label_values(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "cdr-streamer"
    (feed,) = [v for v in dashboard["templating"]["list"] if v["name"] == "feed"]
    assert re.fullmatch(r"label_values\(cdr_streamer_\w+, feed\)", feed["definition"])
    assert feed["includeAll"]
    assert feed["allValue"] == ".*"


def test_every_panel_queries_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioned = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    (uid,) = re.findall(r"^\s+uid: (\S+)$", provisioned, re.MULTILINE)
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_panels_follow_the_feed_variable(dashboard: dict[str, Any]) -> None:
    per_build = {"Version"}  # the one panel about the process, not a feed
    for panel in panels(dashboard):
        if panel["title"] in per_build or panel["title"].startswith("Cluster: "):
            continue  # about the process or the cluster's replicas, not a feed
        for target in panel["targets"]:
            assert 'feed=~"$feed"' in target["expr"], (panel["title"], target["expr"])


def test_ids_are_unique_and_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_the_provider_loads_the_directory_compose_mounts() -> None:
    provider = (GRAFANA / "provisioning" / "dashboards" / "cdr-streamer.yml").read_text()
    (path,) = re.findall(r"^\s+path: (\S+)$", provider, re.MULTILINE)
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    assert f"./grafana/dashboards:{path}:ro" in compose
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in compose


def test_calls_and_spend_row_and_a_calls_only_error_ratio(dashboard: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in panels(dashboard)}
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert "Calls and spend" in rows
    for title in (
        "ASR and NER",
        "ACD (average call duration)",
        "Spend by call type (NZD incl. GST per hour)",
        "Spend by direction (NZD incl. GST per hour)",
        "International spend (NZD incl. GST per hour)",
    ):
        assert title in by_title
    # SMS and service fees are not calls: the error Status ratio counts call attempts only.
    ratio = by_title["Error Status ratio (share of calls not Ok)"]
    for target in ratio["targets"]:
        assert "cdr_streamer_call_attempts_total" in target["expr"]
        assert "events_published" not in target["expr"]
