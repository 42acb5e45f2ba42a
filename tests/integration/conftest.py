"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from helpers import write_config


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
