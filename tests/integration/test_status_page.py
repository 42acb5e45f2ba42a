"""The status page in a real headless Chromium (Debian's `chromium`), against a running streamer.

Three feeds: one healthy, one whose password is refused (stopped), one whose provider
cannot be reached (failing). The page must load, show every feed, and mark the stopped
one so that it shows: its state in words and in red.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from helpers import FEED_PASSWORD, StreamerProcess, write_config

from streamer.simulator import BillingFeedSimulator, SimulatorConfig

CHROMIUM = shutil.which("chromium")
STOPPED_RED = (0xC6, 0x28, 0x28)  # the badge of a stopped feed (status.py)
STOPPED_ROW = (0xFF, 0xEB, 0xEE)  # the background of its row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is missing: scripts/bootstrap installs it"
    return subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,900", *args,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit, non-interlaced RGB(A) PNG (Chromium's)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8
    assert color in (2, 6)
    assert interlace == 0
    channels = 4 if color == 6 else 3
    raw, stride = zlib.decompress(idat), width * channels
    pixels: list[tuple[int, int, int]] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + best) & 0xFF
        pixels += [tuple(line[x : x + 3]) for x in range(0, stride, channels)]  # type: ignore[misc]
        previous = line
    return width, height, pixels


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/bootstrap)")
def test_status_page_in_headless_chromium(
    tmp_path: Path, kafka_bootstrap: str, topic_name: str
) -> None:
    metrics_port, closed_port = free_port(), free_port()
    with BillingFeedSimulator(SimulatorConfig(password=FEED_PASSWORD, backlog=200)) as sim:
        common = {"url": sim.url, "login": "81234567", "poll_interval_s": 1}
        feeds = [
            {**common, "name": "healthy", "cursor_file": str(tmp_path / "healthy.json")},
            {**common, "name": "refused", "cursor_file": str(tmp_path / "refused.json"),
             "password_env": "WRONG_PASSWORD"},
            {**common, "name": "unreachable", "cursor_file": str(tmp_path / "unreachable.json"),
             "url": f"http://127.0.0.1:{closed_port}/billingfeed.php", "backoff_max_s": 2},
        ]  # fmt: skip
        config = write_config(
            tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=feeds
        )
        config.write_text(
            config.read_text().replace("port = 0", f'port = {metrics_port}\nhost = "127.0.0.1"')
        )
        env = {**os.environ, "WRONG_PASSWORD": FEED_PASSWORD + "-wrong"}
        streamer = StreamerProcess(config, tmp_path / "streamer.log", env=env)
        base = f"http://127.0.0.1:{metrics_port}"
        try:

            def states() -> dict[str, str]:
                status, body = http_get(f"{base}/status")
                if status != 200:
                    return {}
                return {s["name"]: s["state"] for s in json.loads(body)["sources"]}

            wanted = {"healthy": "running", "refused": "stopped", "unreachable": "failing"}
            streamer.wait_for(lambda: states() == wanted, f"states {wanted}", timeout_s=90)
            _status, body = http_get(f"{base}/status")
            document = json.loads(body)
            ready_status, ready = http_get(f"{base}/readyz")
            dom = chromium(tmp_path, "--dump-dom", f"{base}/")
            shot = tmp_path / "status.png"
            screenshot = chromium(tmp_path, f"--screenshot={shot}", f"{base}/")
        finally:
            streamer.stop()

    by_name = {s["name"]: s for s in document["sources"]}
    assert by_name["healthy"]["cursor"] == 200
    assert by_name["healthy"]["last_hour"]["events"] == 200
    assert by_name["healthy"]["last_poll"]["ok"] is True
    assert "check the login and password" in by_name["refused"]["last_error"]
    assert by_name["unreachable"]["failures_in_a_row"] >= 1
    assert "cannot reach /billingfeed.php" in by_name["unreachable"]["last_error"]
    # /readyz: not ready while a feed is stopped, and it says which and why.
    assert ready_status == 503
    assert "feed refused stopped:" in ready
    assert "check the login and password" in ready

    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>cdr-streamer status</title>" in html
    for name, state in wanted.items():
        assert f'data-name="{name}" data-state="{state}"' in html, name
    assert 'class="source state-stopped"' in html
    assert ">STOPPED<" in html
    assert ">FAILING<" in html
    assert ">RUNNING<" in html
    assert "Not ready:" in html
    for text in (html, body, ready):
        assert FEED_PASSWORD not in text
        assert "Tr1cky" not in text

    assert screenshot.returncode == 0, screenshot.stderr[-2000:]
    _, _, pixels = png_pixels(shot.read_bytes())
    red = sum(1 for p in pixels if p == STOPPED_RED)
    pink = sum(1 for p in pixels if p == STOPPED_ROW)
    assert red > 200, f"{red} pixels of the stopped badge's red"  # the badge is drawn
    assert pink > 5000, f"{pink} pixels of the stopped row's background"  # so is the row
