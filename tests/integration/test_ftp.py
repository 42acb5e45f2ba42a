"""FTP and FTPS sources against a real ProFTPD (tests/integration/ftpd.py) and Kafka.

No mocks: three ProFTPD servers per module (explicit FTPS that also speaks plain FTP,
with MLSD; implicit FTPS; an old-style plain server without MLSD or TLS), a test CA
made with openssl, the real broker, the simulator over HTTP, and `cdr-streamer run`
as a real process where crashes are involved. The crash and pairing tests are those
of the SFTP source (tests/integration/file_sources.py) over FTP.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ftpd
import pytest
from file_sources import (
    CHECKPOINT_EVERY,
    CURSOR_FILE,
    SOURCE,
    assert_resumed_without_loss,
    file_cursor,
    files_config,
    kill_twice_mid_file,
)
from helpers import (
    REPO_ROOT,
    StreamerProcess,
    read_dead_letters,
    read_events,
    run_streamer,
    write_config,
)

from streamer.config import Secret
from streamer.errors import AuthError, ConfigError, TlsCertificateError
from streamer.simulator import BillingFeedSimulator, write_files
from streamer.simulator.files import Compress
from streamer.sources.ftp import FtpServer, FtpSession, Tls


@pytest.fixture(scope="module")
def ftp_base() -> Iterator[tuple[Path, ftpd.Credentials]]:
    if os.geteuid() != 0:
        pytest.skip("ProFTPD binds as root and switches to the FTP user: the tests need root")
    for needed in (ftpd.PROFTPD, ftpd.MOD_TLS):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: run scripts/bootstrap (proftpd-core, -mod-crypto)")
    base = Path(tempfile.mkdtemp(prefix="cdr-ftpd-"))
    try:
        yield base, ftpd.make_credentials(base)
    finally:
        ftpd.remove(base)


def _serve(
    ftp_base: tuple[Path, ftpd.Credentials], name: str, tls: ftpd.Tls, *, mlsd: bool = True
) -> Iterator[ftpd.Ftpd]:
    server, proc = ftpd.start(*ftp_base, name=name, tls=tls, mlsd=mlsd)
    try:
        yield server
    finally:
        ftpd.stop(proc)


@pytest.fixture(scope="module")
def ftps(ftp_base: tuple[Path, ftpd.Credentials]) -> Iterator[ftpd.Ftpd]:
    """Explicit FTPS (AUTH TLS), plain FTP on the same port too, MLSD."""
    yield from _serve(ftp_base, "explicit", "explicit")


@pytest.fixture(scope="module")
def implicit_ftps(ftp_base: tuple[Path, ftpd.Credentials]) -> Iterator[ftpd.Ftpd]:
    yield from _serve(ftp_base, "implicit", "implicit")


@pytest.fixture(scope="module")
def old_ftp(ftp_base: tuple[Path, ftpd.Credentials]) -> Iterator[ftpd.Ftpd]:
    """Plain FTP only, without MLSD in FEAT: the collector lists with NLST, SIZE, MDTM."""
    yield from _serve(ftp_base, "old", "none", mlsd=False)


def server_for(server: ftpd.Ftpd, tls: Tls | None = None, **settings: Any) -> FtpServer:
    settings.setdefault("ca_file", server.ca_file)
    settings.setdefault("password", Secret(server.password))
    return FtpServer(
        server.host, server.port, server.user, tls=tls or server.tls, connect_timeout_s=10,
        **settings,
    )  # fmt: skip


def put_files(directory: Path) -> dict[str, bytes]:
    """Two matching files, one not matching, a directory that matches, a hidden temp file."""
    files = {"cdr_20240301_0000.csv": b"a" * 1000, "cdr_20240301_0100.json": os.urandom(70_000)}
    for name, body in {**files, "notes.txt": b"x", ".cdr_20240301_0200.csv.tmp": b"y"}.items():
        (directory / name).write_bytes(body)
    (directory / "cdr_dir").mkdir()
    os.utime(directory / "cdr_20240301_0000.csv", (1709251200, 1709251200))  # 2024-03-01
    return files


def read_all(session: FtpSession, path: Path) -> bytes:
    return b"".join(session.read(str(path), lambda n: None))


# --- logging in and listing ------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "explicit"])
def test_mlsd_lists_matching_files_with_sizes_and_mtimes(ftps: ftpd.Ftpd, tls: Tls) -> None:
    directory = ftps.new_directory()
    files = put_files(directory)
    with server_for(ftps, tls).connect() as session:
        listed = session.list(str(directory), "cdr_*")
        assert [(f.name, f.size) for f in listed] == [(n, len(b)) for n, b in files.items()]
        assert [f.mtime for f in listed] == [
            int((directory / f.name).stat().st_mtime) for f in listed
        ]
        assert listed[0].mtime == 1709251200
        for name, body in files.items():
            assert read_all(session, directory / name) == body


def test_without_mlsd_nlst_size_and_mdtm_list_the_same(
    old_ftp: ftpd.Ftpd, caplog: pytest.LogCaptureFixture
) -> None:
    directory = old_ftp.new_directory()
    files = put_files(directory)
    with (
        caplog.at_level(logging.INFO, logger="streamer.sources.ftp"),
        server_for(old_ftp).connect() as session,
    ):
        listed = session.list(str(directory), "cdr_*")
        assert session.list(str(old_ftp.new_directory()), "cdr_*") == []  # empty: a 450
    assert [(f.name, f.size) for f in listed] == [(n, len(b)) for n, b in files.items()]
    assert [f.mtime for f in listed] == [int((directory / f.name).stat().st_mtime) for f in listed]
    assert any("does not offer MLSD" in r.getMessage() for r in caplog.records)


def test_implicit_ftps_reads_a_file(implicit_ftps: ftpd.Ftpd) -> None:
    directory = implicit_ftps.new_directory()
    files = put_files(directory)
    with server_for(implicit_ftps).connect() as session:
        [first, _] = session.list(str(directory), "cdr_*")
        assert read_all(session, directory / first.name) == files[first.name]


@pytest.mark.parametrize("listing", ["MLSD", "NLST"])
def test_missing_directory_is_a_config_error(
    listing: str, ftps: ftpd.Ftpd, old_ftp: ftpd.Ftpd
) -> None:
    server = ftps if listing == "MLSD" else old_ftp
    with (
        server_for(server).connect() as session,
        pytest.raises(ConfigError, match="cannot list directory '/no/such/dir'"),
    ):
        session.list("/no/such/dir", "*")


def test_wrong_password_is_fatal_with_a_clear_message(ftps: ftpd.Ftpd) -> None:
    server = server_for(ftps, password=Secret("not-the-password"))
    with pytest.raises(AuthError, match="check the FTP user and password") as info:
        server.connect()
    assert "not-the-password" not in str(info.value)
    assert ftps.user in str(info.value)


def test_a_certificate_from_another_ca_is_refused(ftps: ftpd.Ftpd) -> None:
    for ca_file in (ftps.other_ca_file, None):  # None: the system's CAs
        with pytest.raises(TlsCertificateError, match="TLS certificate is not trusted"):
            server_for(ftps, ca_file=ca_file).connect()
    with server_for(ftps, ca_file=None, verify=False).connect() as session:
        assert session.list(str(ftps.new_directory()), "*") == []


def test_a_server_without_tls_is_never_used_in_the_clear(old_ftp: ftpd.Ftpd) -> None:
    with pytest.raises(ConfigError, match="does not offer explicit FTPS"):
        server_for(old_ftp, "explicit").connect()


@pytest.mark.parametrize("tls", ["none", "explicit"])
def test_a_read_left_half_way_does_not_upset_the_session(ftps: ftpd.Ftpd, tls: Tls) -> None:
    directory = ftps.new_directory()
    body = os.urandom(8 << 20)
    (directory / "cdr_big.csv").write_bytes(body)
    (directory / "cdr_small.csv").write_bytes(b"small")
    with server_for(ftps, tls).connect() as session:
        # As when the parser stops at a fault: the reader is left open, the next commands go.
        reader = session.read(str(directory / "cdr_big.csv"), lambda n: None)
        assert next(reader)
        session.move(str(directory / "cdr_big.csv"), str(directory / "quarantine"))
        assert [f.name for f in session.list(str(directory), "cdr_*")] == ["cdr_small.csv"]
        assert read_all(session, directory / "cdr_small.csv") == b"small"
        reader.close()
        assert read_all(session, directory / "quarantine" / "cdr_big.csv") == body


def test_move_makes_its_directory_and_replaces_a_file_there(ftps: ftpd.Ftpd) -> None:
    directory = ftps.new_directory()
    (directory / "cdr_1.csv").write_bytes(b"new")
    with server_for(ftps).connect() as session:
        session.move(str(directory / "cdr_1.csv"), str(directory / "done"))
        (directory / "cdr_1.csv").write_bytes(b"newer")
        session.move(str(directory / "cdr_1.csv"), str(directory / "done"))
        assert (directory / "done" / "cdr_1.csv").read_bytes() == b"newer"
        session.remove(str(directory / "done" / "cdr_1.csv"))
        with pytest.raises(FileNotFoundError):
            session.remove(str(directory / "done" / "cdr_1.csv"))
    assert not (directory / "done" / "cdr_1.csv").exists()


# --- the streamer ----------------------------------------------------------------------------


@pytest.fixture
def password_file(ftps: ftpd.Ftpd, tmp_path: Path) -> Path:
    path = tmp_path / "ftp-password"
    path.write_text(ftps.password)
    path.chmod(0o600)
    return path


def source(
    server: ftpd.Ftpd, directory: Path, tmp_path: Path, password_file: Path, **extra: Any
) -> dict[str, Any]:
    """An [[sftp]] table for `server`: FTPS (as it offers it) unless protocol says ftp."""
    table: dict[str, Any] = {
        "name": SOURCE, "protocol": "ftp" if server.tls == "none" else "ftps",
        "host": server.host, "port": server.port, "user": server.user,
        "password_file": str(password_file), "directory": str(directory),
        "pattern": "cdr_*", "settle_s": 0, "poll_interval_s": 0.2,
        "cursor_file": str(tmp_path / CURSOR_FILE), "backoff_base_s": 0.2, "backoff_max_s": 2,
    }  # fmt: skip
    table.update(extra)
    if table["protocol"] == "ftps":
        table["ca_file"] = str(server.ca_file)
        if server.tls == "implicit":
            table["ftps_mode"] = "implicit"
    return table


def test_wrong_password_stops_the_source_with_exit_code_3(
    ftps: ftpd.Ftpd, tmp_path: Path, kafka_bootstrap: str, topic_name: str
) -> None:
    bad = tmp_path / "bad-password"
    bad.write_text("Wr0ng-ftp-password")
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ftps, ftps.new_directory(), tmp_path, bad)],
    )  # fmt: skip
    done = run_streamer("--log-level", "DEBUG", "run", "--config", str(config), "--once")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "check the FTP user and password" in done.stderr
    assert "Wr0ng-ftp-password" not in done.stderr + done.stdout


def test_file_still_being_written_is_not_read_early(
    old_ftp: ftpd.Ftpd,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    # The old server: settling sees the sizes NLST + SIZE report, and MDTM's mtimes.
    [whole] = write_files(files_config(5), tmp_path / "r", cadence="daily", fmt="csv", upto_id=300)
    body = whole.read_bytes()
    directory = old_ftp.new_directory()
    path = directory / whole.name
    first, second = len(body) // 3 + 7, 2 * len(body) // 3 + 11  # cut in the middle of rows
    path.write_bytes(body[:first])
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(old_ftp, directory, tmp_path, password_file, settle_s=5, poll_interval_s=0.1,
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
    assert "plain FTP sends the password and the CDRs unencrypted" not in streamer.log()  # loopback
    ids = Counter(e.value["ID"] for e in read_events(kafka_bootstrap, topic_name))
    assert ids == Counter(range(1, 301))
    assert read_dead_letters(kafka_bootstrap, topic_name) == []


def test_bad_and_corrupt_files_are_quarantined_while_the_others_go_on(
    ftps: ftpd.Ftpd,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    directory = ftps.new_directory()
    good = write_files(
        files_config(6), directory, cadence="hourly", fmt="json", upto_id=360, compress="zip"
    )
    (directory / "cdr_20240301_0030.csv").write_text("this is not\na CDR file\n")
    gz = write_files(files_config(6), tmp_path / "gz", cadence="daily", fmt="csv", upto_id=50,
                     compress="gz")[0].read_bytes()  # fmt: skip
    (directory / "cdr_20240301_0045.csv.gz").write_bytes(gz[: len(gz) // 2])  # cut short
    (directory / "cdr_20240301_0050.csv.gz").write_bytes(b"\x1f\x8b" + os.urandom(400))
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ftps, directory, tmp_path, password_file, after="move:done",
                     quarantine_dir="quarantine")],
    )  # fmt: skip
    done = run_streamer("run", "--config", str(config), "--once")
    assert done.returncode == 0, done.stderr[-3000:]

    events = read_events(kafka_bootstrap, topic_name)
    # The rows of the half file before its cut are published (as rows before any fault).
    assert Counter(e.value["ID"] for e in events if e.headers["file"].endswith(b".zip")) == (
        Counter(range(1, 361))
    )
    assert {e.headers["source"] for e in events} == {b"ftps"}
    dead = read_dead_letters(kafka_bootstrap, topic_name)
    bad = ["cdr_20240301_0030.csv", "cdr_20240301_0045.csv.gz", "cdr_20240301_0050.csv.gz"]
    assert sorted((d["reason"], d["file"], d["source"]) for d in dead) == [
        ("bad_file", name, "ftps") for name in bad
    ]
    details = " ".join(d["detail"] for d in dead)
    assert "cut short" in details
    assert "corrupt compressed data" in details
    assert sorted(p.name for p in (directory / "quarantine").iterdir()) == bad
    assert sorted(p.name for p in (directory / "done").iterdir()) == [p.name for p in good]
    cursor = file_cursor(tmp_path, kafka_bootstrap, None)
    assert cursor["files"]["cdr_20240301_0050.csv.gz"] == "quarantined"
    assert cursor["files"][good[0].name] == "done"


def test_gzipped_files_from_simulate_files(
    ftps: ftpd.Ftpd,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    directory = ftps.new_directory()
    written = subprocess.run(
        [sys.executable, "-m", "streamer", "simulate-files", str(directory), "--cadence",
         "hourly", "--files-format", "pipe", "--upto-id", "2000", "--seed", "4", "--compress",
         "gz"],
        capture_output=True, text=True, timeout=120, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    names = sorted(p.name for p in directory.iterdir())
    assert f"wrote {len(names)} hourly files of CDRs 1..2000" in written.stdout
    assert names[0] == "cdr_20240301_0000.pipe.gz"
    assert len(names) > 1
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ftps, directory, tmp_path, password_file, after="delete")],
    )  # fmt: skip
    done = run_streamer("--log-level", "DEBUG", "run", "--config", str(config), "--once")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ftps.password not in done.stderr + done.stdout
    events = read_events(kafka_bootstrap, topic_name)
    assert Counter(e.value["ID"] for e in events) == Counter(range(1, 2001))
    assert {e.headers["file"].decode() for e in events} == set(names)
    assert read_dead_letters(kafka_bootstrap, topic_name) == []
    assert list(directory.iterdir()) == []


# Enough rows that the second kill (at 10 000 in the topic, then up to 0.4 s later) still
# lands mid-file: 20 000 at 1 row per 4 s were sometimes done by then (CI, in-process).
FTP_CRASH_ROWS = 50_000


@pytest.mark.parametrize(
    ("delivery", "protocol", "compress", "workers"),
    [("at_least_once", "ftp", "none", 0), ("exactly_once", "ftps", "gz", 0)],
)
def test_kill_9_mid_file_resumes_without_loss(
    delivery: str,
    protocol: str,
    compress: Compress,
    workers: int,
    ftps: ftpd.Ftpd,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
) -> None:
    directory = ftps.new_directory()
    # One daily file of 50 000 rows in ID order (a call every 1.5 s, no jitter), as the
    # SFTP test's: the collector is the same, this one tests the FTP session.
    [big] = write_files(
        files_config(7, mean_gap_s=1.5, jitter_s=0), directory, cadence="daily", fmt="csv",
        upto_id=FTP_CRASH_ROWS, compress=compress,
    )  # fmt: skip
    cursor_topic = f"{topic_name}-cursors" if delivery == "exactly_once" else None
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[],
        sftp=[source(ftps, directory, tmp_path, password_file, protocol=protocol)],
        delivery=delivery, cursor_topic=f"{topic_name}-cursors",
        checkpoint_every=CHECKPOINT_EVERY, processing={"workers": workers},
    )  # fmt: skip
    where = (tmp_path, kafka_bootstrap, topic_name, cursor_topic, big.name)
    rows_at_kill = kill_twice_mid_file(config, *where, thresholds=(4_000, 10_000))
    started = "starting 2 worker processes" in (tmp_path / "run-0.log").read_text()
    assert started == (workers == 2)
    assert_resumed_without_loss(
        config, *where, rows_at_kill, exactly_once=delivery == "exactly_once",
        rows=FTP_CRASH_ROWS,
    )  # fmt: skip


def test_feed_and_implicit_ftps_over_overlapping_ids_once_each(
    implicit_ftps: ftpd.Ftpd,
    tmp_path: Path,
    password_file: Path,
    kafka_bootstrap: str,
    topic_name: str,
    simulator: Callable[..., BillingFeedSimulator],
) -> None:
    seed = 11
    sim = simulator(backlog=1500, seed=seed)
    directory = implicit_ftps.new_directory()
    # The files hold CDRs 1..3000 (hourly, so some cross the feed's 1500 both ways).
    write_files(
        files_config(seed), directory, cadence="hourly", fmt="txt", upto_id=3000, compress="gz"
    )
    feed = {
        "name": "main", "url": sim.url, "login": "81234567", "poll_interval_s": 1,
        "cursor_file": str(tmp_path / "cursor.json"),
    }  # fmt: skip
    config = write_config(
        tmp_path / "config.toml", bootstrap=kafka_bootstrap, topic=topic_name, feeds=[feed],
        sftp=[source(implicit_ftps, directory, tmp_path, password_file, pairs_with_feed="main")],
        delivery="exactly_once", cursor_topic=f"{topic_name}-cursors", checkpoint_every=400,
    )  # fmt: skip
    # First the feed has 1..1500 (the FTPS source skips those), the files go beyond.
    first = run_streamer("run", "--config", str(config), "--once", timeout_s=180)
    assert first.returncode == 0, first.stderr[-3000:]
    # Then the feed catches up past the files: it skips what the FTPS source published.
    sim.add(2000)
    second = run_streamer("run", "--config", str(config), "--once", timeout_s=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cursor 1500 -> 3500" in second.stderr

    events = read_events(kafka_bootstrap, topic_name)
    ids = Counter(e.value["ID"] for e in events)
    assert set(ids) == set(range(1, 3501)), "a CDR was lost"
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:10]
    by_source = Counter(e.headers["source"] for e in events)
    assert by_source[b"feed"] >= 2000, by_source
    assert by_source[b"ftps"] > 0, by_source
    sample = {e.value["ID"]: e for e in events if e.value["ID"] in (1, 1600, 3200)}
    assert sample[1600].headers["source"] == b"ftps"
    assert sample[3200].headers["source"] == b"feed"
    assert all(e.value["AccountCode"] == sim.row(i)["AccountCode"] for i, e in sample.items())
