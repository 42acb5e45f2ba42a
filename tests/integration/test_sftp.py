"""The SFTP collector against a real OpenSSH server (tests/integration/sshd.py) and Kafka.

No mocks: sshd with internal-sftp, the real broker, the simulator over HTTP, and
`cdr-streamer run` as a real process where crashes are involved.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sshd
from file_sources import (
    CHECKPOINT_EVERY,
    CRASH_ROWS,
    CURSOR_FILE,
    SOURCE,
    assert_resumed_without_loss,
    file_cursor,
    files_config,
    kill_twice_mid_file,
)
from helpers import (
    StreamerProcess,
    read_dead_letters,
    read_events,
    run_streamer,
    write_config,
)

from streamer.config import Secret
from streamer.errors import AuthError, ConfigError, HostKeyError
from streamer.records import FIELDS
from streamer.simulator import BillingFeedSimulator, write_files
from streamer.sources.sftp import SftpServer


@pytest.fixture(scope="module")
def ssh() -> Iterator[sshd.SshServer]:
    if os.geteuid() != 0:
        pytest.skip("the SFTP tests create a system user and run sshd: they need root")
    if not sshd.SSHD.exists():
        pytest.fail(f"{sshd.SSHD} is missing: run scripts/bootstrap (openssh-server)")
    base = Path(tempfile.mkdtemp(prefix="cdr-sshd-"))
    server, proc = sshd.start(base)
    try:
        yield server
    finally:
        sshd.stop(proc, base)


def fingerprint_of(public_key: str) -> str:
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def server_for(ssh: sshd.SshServer, **settings: Any) -> SftpServer:
    settings.setdefault("known_hosts", ssh.known_hosts)
    return SftpServer(ssh.host, ssh.port, ssh.user, connect_timeout_s=10, **settings)


# --- logging in ------------------------------------------------------------------------------


def test_password_login_lists_matching_files(ssh: sshd.SshServer) -> None:
    directory = ssh.new_directory()
    for name in ("cdr_20240301_0000.csv", "cdr_20240301_0100.json", "notes.txt"):
        (directory / name).write_text("x")
    (directory / ".cdr_20240301_0200.csv.tmp").write_text("being written")
    (directory / "cdr_dir").mkdir()
    server = server_for(ssh, password=Secret(ssh.password))
    with server.connect() as session:
        files = session.list(str(directory), "cdr_*")
    assert [f.name for f in files] == ["cdr_20240301_0000.csv", "cdr_20240301_0100.json"]
    assert all(f.size == 1 and f.mtime > 0 for f in files)


def test_key_login_with_passphrase(ssh: sshd.SshServer) -> None:
    directory = ssh.new_directory()
    (directory / "cdr_1.csv").write_bytes(b"abc")
    server = server_for(ssh, key_file=ssh.key_file, key_passphrase=Secret(sshd.KEY_PASSPHRASE))
    with server.connect() as session:
        [remote] = session.list(str(directory), "cdr_*")
        assert b"".join(session.read(str(directory / remote.name), lambda n: None)) == b"abc"


def test_encrypted_key_without_passphrase_is_a_config_error(ssh: sshd.SshServer) -> None:
    with pytest.raises(ConfigError, match="is encrypted: set key_passphrase"):
        server_for(ssh, key_file=ssh.key_file).connect()


def test_wrong_password_is_fatal_with_a_clear_message(ssh: sshd.SshServer) -> None:
    server = server_for(ssh, password=Secret("not-the-password"))
    with pytest.raises(AuthError, match="check the SFTP user, password or key") as info:
        server.connect()
    assert "not-the-password" not in str(info.value)
    assert ssh.user in str(info.value)


def test_changed_host_key_is_refused(ssh: sshd.SshServer) -> None:
    server = server_for(ssh, known_hosts=ssh.other_known_hosts, password=Secret(ssh.password))
    with pytest.raises(HostKeyError, match="the key changed, or someone is in between") as info:
        server.connect()
    assert fingerprint_of(ssh.host_key_pub) in str(info.value)


def test_unknown_host_refused_unless_trusted_then_recorded(
    ssh: sshd.SshServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    refusing = server_for(ssh, known_hosts=known_hosts, password=Secret(ssh.password))
    with pytest.raises(HostKeyError, match="is not in known_hosts") as info:
        refusing.connect()
    assert fingerprint_of(ssh.host_key_pub) in str(info.value)
    with pytest.raises(HostKeyError, match="does not exist"):
        server_for(ssh, known_hosts=tmp_path / "missing", password=Secret(ssh.password)).connect()

    trusting = server_for(
        ssh,
        known_hosts=tmp_path / "new" / "known_hosts",
        password=Secret(ssh.password),
        trust_unknown_host_key=True,
    )
    with caplog.at_level(logging.WARNING, logger="streamer.sources.sftp"), trusting.connect():
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(fingerprint_of(ssh.host_key_pub) in w for w in warnings), warnings
    recorded = (tmp_path / "new" / "known_hosts").read_text()
    assert recorded == f"[{ssh.host}]:{ssh.port} {ssh.host_key_pub}\n"
    # Recorded: the next contact needs no trust any more.
    with server_for(
        ssh, known_hosts=tmp_path / "new" / "known_hosts", password=Secret(ssh.password)
    ).connect():
        pass


# --- the streamer ----------------------------------------------------------------------------


@pytest.fixture
def password_file(ssh: sshd.SshServer, tmp_path: Path) -> Path:
    path = tmp_path / "sftp-password"
    path.write_text(ssh.password)
    path.chmod(0o600)
    return path


def source(
    ssh: sshd.SshServer, directory: Path, tmp_path: Path, password_file: Path, **extra: Any
) -> dict[str, Any]:
    return {
        "name": SOURCE, "host": ssh.host, "port": ssh.port, "user": ssh.user,
        "password_file": str(password_file), "known_hosts": str(ssh.known_hosts),
        "directory": str(directory), "pattern": "cdr_*", "settle_s": 0,
        "poll_interval_s": 0.2, "cursor_file": str(tmp_path / CURSOR_FILE),
        "backoff_base_s": 0.2, "backoff_max_s": 2, **extra,
    }  # fmt: skip


def test_wrong_password_stops_the_source_with_exit_code_3(
    ssh: sshd.SshServer, tmp_path: Path, kafka_bootstrap: str, topic_name: str
) -> None:
    bad = tmp_path / "bad-password"
    bad.write_text("Wr0ng-password")
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ssh, ssh.new_directory(), tmp_path, bad)],
    )  # fmt: skip
    done = run_streamer("run", "--config", str(config), "--once", timeout_s=120)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "check the SFTP user, password or key" in done.stderr
    assert "Wr0ng-password" not in done.stderr + done.stdout


def test_file_still_being_written_is_not_read_early(
    ssh: sshd.SshServer,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    rendered = tmp_path / "rendered"
    [whole] = write_files(files_config(5), rendered, cadence="daily", fmt="csv", upto_id=300)
    body = whole.read_bytes()
    directory = ssh.new_directory()
    path = directory / whole.name
    # Cut in the middle of rows: read now, the file would be a truncated feed file.
    first, second = len(body) // 3 + 7, 2 * len(body) // 3 + 11
    path.write_bytes(body[:first])
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ssh, directory, tmp_path, password_file, settle_s=5, poll_interval_s=0.1,
                     after="delete")],
    )  # fmt: skip
    streamer = StreamerProcess(config, tmp_path / "streamer.log")
    try:
        streamer.wait_for(lambda: f"new file {whole.name}" in streamer.log(), "the first listing")
        with path.open("ab") as f:
            f.write(body[first:second])
        streamer.wait_for(
            lambda: f"{whole.name} is still being written" in streamer.log(), "a listing of growth"
        )
        with path.open("ab") as f:
            f.write(body[second:])
        streamer.wait_for(lambda: not path.exists(), "the whole file to be read, then deleted")
    finally:
        assert streamer.stop() == 0, streamer.log()[-3000:]
    ids = Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name))
    assert ids == Counter(range(1, 301))
    assert read_dead_letters(kafka_bootstrap, topic_name) == []


def test_malformed_file_is_quarantined_while_the_others_go_on(
    ssh: sshd.SshServer,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    directory = ssh.new_directory()
    good = write_files(files_config(6), directory, cadence="hourly", fmt="json", upto_id=360)
    (directory / "cdr_20240301_0030.csv").write_text("this is not\na CDR file\n")
    (directory / "cdr_20240301_0130.json").write_text('[{"ID": "1", "AccountCode": "8')
    # Over max_file_bytes (each good file is far smaller): set aside like a malformed one.
    cap = 100_000
    assert max(p.stat().st_size for p in good) < cap
    (directory / "cdr_20240301_0230.csv").write_text(",".join(FIELDS) + "\n" * (2 * cap))
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ssh, directory, tmp_path, password_file, after="move:done",
                     quarantine_dir="quarantine", max_file_bytes=cap)],
    )  # fmt: skip
    done = run_streamer("run", "--config", str(config), "--once", timeout_s=120)
    assert done.returncode == 0, done.stderr[-3000:]

    events = read_events(kafka_bootstrap, topic_name)
    assert Counter(e.value["ID"] for e in events) == Counter(range(1, 361))
    assert {e.headers["source"] for e in events} == {b"sftp"}
    assert {e.headers["file"].decode() for e in events} == {p.name for p in good}
    dead = read_dead_letters(kafka_bootstrap, topic_name)
    assert sorted((d["reason"], d["file"], d["source"]) for d in dead) == [
        ("bad_file", "cdr_20240301_0030.csv", "sftp"),
        ("bad_file", "cdr_20240301_0130.json", "sftp"),
        ("bad_file", "cdr_20240301_0230.csv", "sftp"),
    ]
    (too_big,) = [d for d in dead if d["file"] == "cdr_20240301_0230.csv"]
    assert f"holds more than {cap} bytes (max_file_bytes)" in too_big["detail"]
    assert sorted(p.name for p in (directory / "quarantine").iterdir()) == [
        "cdr_20240301_0030.csv", "cdr_20240301_0130.json", "cdr_20240301_0230.csv",
    ]  # fmt: skip
    assert sorted(p.name for p in (directory / "done").iterdir()) == [p.name for p in good]
    assert not list(directory.glob("cdr_*"))
    cursor = file_cursor(tmp_path, kafka_bootstrap, None)
    assert cursor["files"]["cdr_20240301_0030.csv"] == "quarantined"
    assert cursor["files"][good[0].name] == "done"
    assert "quarantining cdr_20240301_0030.csv" in done.stderr


# Parsed in-process, and in 2 worker processes (streamer/workers.py) under exactly-once.
@pytest.mark.parametrize(("delivery", "workers"), [("at_least_once", 0), ("exactly_once", 2)])
def test_kill_9_mid_file_resumes_without_loss(
    delivery: str,
    workers: int,
    ssh: sshd.SshServer,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    directory = ssh.new_directory()
    # One daily file of 50 000 rows in ID order (a call every 1.5 s, no jitter).
    [big] = write_files(
        files_config(7, mean_gap_s=1.5, jitter_s=0), directory, cadence="daily", fmt="csv",
        upto_id=CRASH_ROWS,
    )  # fmt: skip
    cursor_topic = f"{topic_name}-cursors" if delivery == "exactly_once" else None
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ssh, directory, tmp_path, password_file)], delivery=delivery,
        cursor_topic=f"{topic_name}-cursors", checkpoint_every=CHECKPOINT_EVERY,
        processing={"workers": workers},
    )  # fmt: skip
    where = (tmp_path, kafka_bootstrap, topic_name, cursor_topic, big.name)
    rows_at_kill = kill_twice_mid_file(config, *where)
    started = "starting 2 worker processes" in (tmp_path / "run-0.log").read_text()
    assert started == (workers == 2)
    assert_resumed_without_loss(
        config, *where, rows_at_kill, exactly_once=delivery == "exactly_once"
    )


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_feed_and_sftp_over_overlapping_ids(
    delivery: str,
    ssh: sshd.SshServer,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
    simulator: Callable[..., BillingFeedSimulator],
) -> None:
    seed = 11
    sim = simulator(backlog=1500, seed=seed)
    directory = ssh.new_directory()
    # The files hold CDRs 1..3000 (hourly, so some cross the feed's 1500 both ways).
    write_files(files_config(seed), directory, cadence="hourly", fmt="txt", upto_id=3000)
    feed = {
        "name": "main", "url": sim.url, "login": "81234567", "poll_interval_s": 1,
        "cursor_file": str(tmp_path / "cursor.json"),
    }  # fmt: skip
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[feed],
        sftp=[source(ssh, directory, tmp_path, password_file, pairs_with_feed="main")],
        delivery=delivery, cursor_topic=f"{topic_name}-cursors", checkpoint_every=400,
    )  # fmt: skip
    # First the feed has 1..1500 (the SFTP source skips those), the files go beyond.
    first = run_streamer("run", "--config", str(config), "--once", timeout_s=180)
    assert first.returncode == 0, first.stderr[-3000:]
    # Then the feed catches up past the files: it skips what the SFTP source published.
    sim.add(2000)
    second = run_streamer("run", "--config", str(config), "--once", timeout_s=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "published by its file source; cursor 1500 -> 3500" in second.stderr

    events = read_events(kafka_bootstrap, topic_name)
    ids = Counter(e.value["ID"] for e in events)
    assert set(ids) == set(range(1, 3501)), "a CDR was lost"
    by_source = Counter(e.headers["source"] for e in events)
    assert by_source[b"feed"] >= 2000, by_source
    assert by_source[b"sftp"] > 0, by_source
    if delivery == "exactly_once":
        assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:10]
    # Each source's events carry exactly the simulator's data.
    sample = {e.value["ID"]: e for e in events if e.value["ID"] in (1, 1600, 3200)}
    assert sample[1600].headers["source"] == b"sftp"
    assert sample[3200].headers["source"] == b"feed"
    assert all(e.value["AccountCode"] == sim.row(i)["AccountCode"] for i, e in sample.items())
