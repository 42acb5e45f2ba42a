"""Topic provisioning at start, against the real broker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
from helpers import FEED_PASSWORD, run_streamer

from streamer.simulator import BillingFeedSimulator, SimulatorConfig


def topic_configs(admin: AdminClient, topic: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result()
    return {name: entry.value for name, entry in entries.items()}


def feed_for(sim: BillingFeedSimulator, tmp_path: Path) -> dict[str, object]:
    return {
        "name": "main", "url": sim.url, "login": "81234567",
        "cursor_file": str(tmp_path / "cursor.json"),
    }  # fmt: skip


def test_missing_topics_are_created_with_our_settings(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=10)) as sim:
        config = streamer_config([feed_for(sim, tmp_path)], delivery="exactly_once")
        done = run_streamer("run", "--config", str(config), "--once")
    assert done.returncode == 0, done.stderr
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topics = admin.list_topics(timeout=30).topics
    assert len(topics[topic_name].partitions) == 3
    events = topic_configs(admin, topic_name)
    assert events["cleanup.policy"] == "delete"
    assert events["retention.ms"] == "-1"  # event-time timestamps must not age out on arrival
    assert topic_configs(admin, f"{topic_name}-dlq")["retention.ms"] == "-1"
    assert topic_configs(admin, "cdr-streamer-cursors")["cleanup.policy"] == "compact"


def test_compacted_event_topic_is_refused_with_a_reason(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics(
        [
            NewTopic(
                topic_name,
                num_partitions=1,
                replication_factor=1,
                config={"cleanup.policy": "compact"},
            )
        ]
    )[topic_name].result()
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=10)) as sim:
        refused = run_streamer(
            "run", "--config", str(streamer_config([feed_for(sim, tmp_path)])), "--once"
        )
        assert sim.request_count == 0  # refused before fetching anything
    assert refused.returncode == 1
    assert f"topic {topic_name} has cleanup.policy=compact" in refused.stderr
    assert "only the last event per AccountCode" in refused.stderr


def test_existing_topic_with_time_retention_gets_a_warning(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str, streamer_config: Callable[..., Path]
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics(
        [
            NewTopic(
                topic_name,
                num_partitions=1,
                replication_factor=1,
                config={"retention.ms": "604800000"},
            )
        ]
    )[topic_name].result()
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=10)) as sim:
        done = run_streamer(
            "run", "--config", str(streamer_config([feed_for(sim, tmp_path)])), "--once"
        )
    assert done.returncode == 0, done.stderr
    assert f"topic {topic_name} has retention.ms=604800000" in done.stderr
