"""docker-compose.yml is valid and runs the Kafka version pinned in scripts/kafka-version."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


def docker_compose_config(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `docker-compose config ARGS`; validating and normalising need no Docker engine."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is not installed; run scripts/bootstrap", pytrace=False)
    return subprocess.run(
        [tool, "--file", str(COMPOSE_FILE), "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def compose_config() -> str:
    """The file as docker-compose normalises it."""
    result = docker_compose_config()
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_compose_file_is_valid() -> None:
    result = docker_compose_config("-q")
    assert result.returncode == 0, result.stderr


def test_kafka_image_is_the_pinned_version(compose_config: str) -> None:
    pinned = (REPO_ROOT / "scripts" / "kafka-version").read_text().strip()
    kafka_images = re.findall(r"^\s+image: (apache/kafka:\S+)$", compose_config, re.MULTILINE)
    assert kafka_images == [f"apache/kafka:{pinned}"]


def test_streamer_reads_its_password_from_the_compose_secret(compose_config: str) -> None:
    config = tomllib.loads((REPO_ROOT / "deploy" / "config.toml").read_text())
    (feed,) = config["feeds"]
    secret = Path(feed["password_file"])
    assert secret.parent == Path("/run/secrets")
    assert re.search(rf"^  {re.escape(secret.name)}:\n    file: ", compose_config, re.MULTILINE)


def test_the_container_serves_metrics_beyond_its_own_loopback() -> None:
    # The plain CLI listens on 127.0.0.1 by default; the image and compose say 0.0.0.0.
    config = tomllib.loads((REPO_ROOT / "deploy" / "config.toml").read_text())
    assert config["metrics"]["host"] == "0.0.0.0"
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^ENV CDR_METRICS_HOST=0\.0\.0\.0$", dockerfile, re.MULTILINE)
