"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from helpers import FEED_PASSWORD, write_config

from streamer.simulator import BillingFeedSimulator, SimulatorConfig


@pytest.fixture
def streamer_config(tmp_path: Path, kafka_bootstrap: str, topic_name: str) -> Callable[..., Path]:
    def make(feeds: list[dict[str, Any]], **kafka: Any) -> Path:
        return write_config(
            tmp_path / f"config-{uuid4().hex[:6]}.toml",
            bootstrap=kafka_bootstrap,
            topic=topic_name,
            feeds=feeds,
            **kafka,
        )

    return make


@pytest.fixture
def simulator() -> Iterator[Callable[..., BillingFeedSimulator]]:
    """Start billing-feed simulators (over HTTP on loopback); all stop after the test."""
    started: list[BillingFeedSimulator] = []

    def start(**config: Any) -> BillingFeedSimulator:
        sim = BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, **config))
        sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()
