"""Session-wide fixtures: the Kafka broker the integration tests share, and fresh topic names."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import pytest
from hypothesis import settings

from streamer import redact

# No per-example time limit: these machines are shared and noisy, and speed is measured
# in bench/, never asserted by a test (hypothesis' default deadline is 200 ms).
settings.register_profile("cdr-streamer", deadline=None)
settings.load_profile("cdr-streamer")

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = REPO_ROOT / "scripts" / "kafka-local"
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"

# The first start may also fetch the jars with Maven; the script has its own deadlines.
KAFKA_START_TIMEOUT_S = 600
KAFKA_STOP_TIMEOUT_S = 120


@dataclass(frozen=True, slots=True)
class KafkaBroker:
    """The broker under test: its bootstrap address and, if this session started it, its dir."""

    bootstrap: str
    local_dir: Path | None


# Loggers the CLI's logs.setup() quiets for the whole process (cli.main runs in-process
# in some tests): each test starts with the levels the session began with.
_QUIETED = ("httpx", "httpcore", "paramiko")


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in ("", *_QUIETED)}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """Each test's secrets are redacted during that test only: one test's password
    (say "x") must not hide text in the messages another test checks."""
    before = redact.registered()
    yield
    redact.restore(before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as `integration`."""
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """Use KAFKA_BOOTSTRAP_SERVERS when set, else run scripts/kafka-local once per session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield KafkaBroker(bootstrap=external, local_dir=None)
        return

    broker_dir = tmp_path_factory.mktemp("kafka")
    try:
        started = subprocess.run(
            [str(KAFKA_LOCAL), "start", "--dir", str(broker_dir)],
            capture_output=True,
            text=True,
            timeout=KAFKA_START_TIMEOUT_S,
            check=False,
        )
        if started.returncode != 0:
            pytest.fail(
                f"scripts/kafka-local start failed (exit {started.returncode}):\n"
                f"{started.stdout}{started.stderr}",
                pytrace=False,
            )
        bootstrap = (broker_dir / "bootstrap").read_text().strip()
        yield KafkaBroker(bootstrap=bootstrap, local_dir=broker_dir)
    finally:
        # Always, also after a failed or timed-out start: leave no broker behind.
        subprocess.run(
            [str(KAFKA_LOCAL), "stop", "--dir", str(broker_dir)],
            capture_output=True,
            timeout=KAFKA_STOP_TIMEOUT_S,
            check=False,
        )


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """The bootstrap address (host:port) of the session's Kafka broker."""
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def kafka_local_dir(kafka_broker: KafkaBroker) -> Path | None:
    """The scripts/kafka-local dir of the session's broker; None for an external broker."""
    return kafka_broker.local_dir


@pytest.fixture
def topic_name() -> str:
    """A topic name no other test uses; create the topic yourself."""
    return f"cdr-{uuid4().hex[:8]}"
