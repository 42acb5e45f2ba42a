"""The FTP source's pieces that need no server: its settings, listing lines, error mapping.

The server itself is tested in tests/integration/test_ftp.py against a real ProFTPD.
"""

from __future__ import annotations

import ftplib
import gzip
import logging
import ssl
import zipfile
from pathlib import Path
from typing import Any

import pytest

from streamer.app import _file_server
from streamer.config import Secret, parse_settings
from streamer.errors import (
    AuthError,
    ConfigError,
    SftpUnavailableError,
    StreamerError,
    TlsCertificateError,
)
from streamer.simulator import SimulatorConfig, write_files
from streamer.sources.ftp import FtpServer, _mtime, parse_mlsd_line
from streamer.sources.sftp import SftpServer

ENV = {"FTP_PW": "s3cret-ftp-pw"}


def ftp_table(**extra: Any) -> dict[str, Any]:
    return {
        "name": "files", "protocol": "ftps", "host": "ftp.example.net", "user": "cdr",
        "password_env": "FTP_PW", **extra,
    }  # fmt: skip


def parse(*tables: dict[str, Any]) -> Any:
    return parse_settings(
        {"kafka": {"bootstrap_servers": "h:1"}, "sftp": list(tables)}, env=ENV
    ).sftp


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "port"),
    [
        ({"protocol": "sftp", "trust_unknown_host_key": True}, 22),
        ({"protocol": "ftp"}, 21),
        ({}, 21),
        ({"ftps_mode": "implicit"}, 990),
        ({"ftps_mode": "implicit", "port": 2990}, 2990),
    ],
)
def test_each_protocol_has_its_port(extra: dict[str, Any], port: int) -> None:
    [source] = parse(ftp_table(**extra))
    assert source.port == port


def test_ftps_settings_with_defaults_and_a_hidden_password(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    [source] = parse(ftp_table(ca_file=str(ca)))
    assert (source.protocol, source.ftps_mode, source.tls_verify, source.passive) == (
        "ftps", "explicit", True, True,
    )  # fmt: skip
    assert source.ca_file == str(ca)
    assert source.password == Secret("s3cret-ftp-pw")
    assert source.max_decompressed_bytes == 4 << 30
    assert "s3cret-ftp-pw" not in repr(source)


def test_every_ftp_problem_reported_at_once(tmp_path: Path) -> None:
    sources = [
        ftp_table(name="a", protocol="ftp", key_file="/k", known_hosts="/kh", ca_file="/ca",
                  ftps_mode="implicit", password_env=None),
        ftp_table(name="b", ca_file=str(tmp_path / "missing.pem"), ftps_mode="sometimes",
                  trust_unknown_host_key=True, max_decompressed_bytes=0),
        ftp_table(name="c", protocol="scp"),
        {"name": "d", "host": "h", "user": "u", "trust_unknown_host_key": True,
         "password_env": "FTP_PW", "passive": False, "tls_verify": False},
    ]  # fmt: skip
    for table in sources:
        if table.get("password_env") is None:
            table.pop("password_env", None)
    with pytest.raises(ConfigError) as info:
        parse(*sources)
    message = str(info.value)
    for expected in (
        'sftp[a].key_file: only for protocol = "sftp"',
        'sftp[a].known_hosts: only for protocol = "sftp"',
        "sftp[a]: no password: set password_env",
        'sftp[a].ca_file: only for protocol = "ftps"',
        'sftp[a].ftps_mode: only for protocol = "ftps"',
        "sftp[b].ca_file: " + str(tmp_path / "missing.pem") + " is not a readable file",
        "sftp[b].ftps_mode: must be 'explicit' (AUTH TLS) or 'implicit'",
        'sftp[b].trust_unknown_host_key: only for protocol = "sftp"',
        "sftp[b].max_decompressed_bytes: must be more than 0",
        "sftp[c].protocol: must be sftp, ftp or ftps, not 'scp'",
        'sftp[d].passive: only for protocol = "ftp" or "ftps"',
        'sftp[d].tls_verify: only for protocol = "ftp" or "ftps"',
    ):
        assert expected in message, expected


def test_the_server_follows_the_protocol(caplog: pytest.LogCaptureFixture) -> None:
    sftp, ftp, ftps, local = parse(
        ftp_table(name="s", protocol="sftp", trust_unknown_host_key=True),
        ftp_table(name="f", protocol="ftp"),
        ftp_table(name="t", ftps_mode="implicit", tls_verify=False),
        ftp_table(name="l", protocol="ftp", host="127.0.0.1"),
    )
    with caplog.at_level(logging.WARNING, logger="streamer"):
        servers = [_file_server(s) for s in (sftp, ftp, ftps, local)]
    assert isinstance(servers[0], SftpServer)
    assert [type(s) for s in servers[1:]] == [FtpServer] * 3
    assert [(s.tls, s.port, s.verify) for s in servers[1:] if isinstance(s, FtpServer)] == [
        ("none", 21, True), ("implicit", 990, False), ("none", 21, True),
    ]  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # none for plain FTP on loopback
    assert "ftp f: plain FTP sends the password and the CDRs unencrypted" in warnings[0]
    assert "ftps t: tls_verify = false" in warnings[1]
    assert all("s3cret-ftp-pw" not in w for w in warnings)
    assert "s3cret" not in repr(servers[1])


# --- listing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "facts"),
    [
        ("type=file;size=1200;modify=20240301120000; cdr_1.csv", "cdr_1.csv",
         {"type": "file", "size": "1200", "modify": "20240301120000"}),
        ("Type=file;Size=5;Modify=20240301120000.123; a name with spaces.csv",
         "a name with spaces.csv", {"type": "file", "size": "5", "modify": "20240301120000.123"}),
        ("type=dir;modify=20240301120000; done", "done",
         {"type": "dir", "modify": "20240301120000"}),
        (" bare.csv", "bare.csv", {}),
        ("type=file;size=1; semi;colon.csv", "semi;colon.csv", {"type": "file", "size": "1"}),
    ],
)  # fmt: skip
def test_mlsd_lines(line: str, name: str, facts: dict[str, str]) -> None:
    assert parse_mlsd_line(line) == (name, facts)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20240301000000", 1709251200),
        ("20240301000000.123", 1709251200),
        ("  20240301000001\r", 1709251201),
        ("", 0),
        ("yesterday", 0),
    ],
)
def test_mlsd_and_mdtm_times_are_utc(text: str, seconds: int) -> None:
    assert _mtime(text) == seconds


# --- errors ----------------------------------------------------------------------------------


def _cert_error() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "unable to get local issuer certificate"
    return exc


@pytest.mark.parametrize(
    ("exc", "expected", "kind", "words"),
    [
        (TimeoutError("timed out"), SftpUnavailableError, "timeout", "timed out trying to list"),
        (TimeoutError("timed out"), SftpUnavailableError, "timeout", "timed out"),
        (ConnectionRefusedError(111, "refused"), SftpUnavailableError, "connection_error",
         "cannot list"),
        (EOFError(), SftpUnavailableError, "connection_error", "EOFError"),
        (ftplib.error_temp("421 Too many connections"), SftpUnavailableError,  # noqa: S321
         "connection_error", "421 Too many connections"),
        (ftplib.error_reply("250 unexpected"), SftpUnavailableError,  # noqa: S321
         "connection_error", "250"),
        (ssl.SSLError(1, "[SSL] wrong version number"), SftpUnavailableError,
         "connection_error", "TLS failed trying to list"),
        (_cert_error(), TlsCertificateError, None, "unable to get local issuer certificate"),
        (AuthError("refused"), AuthError, None, "refused"),
    ],
)  # fmt: skip
def test_failure_mapping(
    exc: BaseException, expected: type[StreamerError], kind: str | None, words: str
) -> None:
    server = FtpServer("ftp.example.net", 21, "cdr", Secret("pw"), tls="explicit")
    mapped = server._error("list /out", exc)
    assert type(mapped) is expected
    assert words in str(mapped)
    if kind is not None:
        assert isinstance(mapped, SftpUnavailableError)
        assert mapped.kind == kind
    assert "FTPS server ftp.example.net:21" in str(mapped) or expected is AuthError


def test_a_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    server = FtpServer("127.0.0.1", 1, "cdr", Secret("pw"), ca_file=bad)
    with pytest.raises(ConfigError, match="cannot load ca_file"):
        server.connect()


# --- the simulator's compressed files --------------------------------------------------------


def test_simulated_files_compressed(tmp_path: Path) -> None:
    config = SimulatorConfig(password="-", seed=2)
    [plain] = write_files(config, tmp_path / "p", cadence="daily", fmt="csv", upto_id=100)
    [gz] = write_files(config, tmp_path / "g", cadence="daily", fmt="csv", upto_id=100,
                       compress="gz")  # fmt: skip
    [zp] = write_files(config, tmp_path / "z", cadence="daily", fmt="csv", upto_id=100,
                       compress="zip")  # fmt: skip
    assert (gz.name, zp.name) == (f"{plain.name}.gz", f"{plain.name}.zip")
    assert gzip.decompress(gz.read_bytes()) == plain.read_bytes()
    with zipfile.ZipFile(zp) as archive:
        assert archive.namelist() == [plain.name]
        assert archive.read(plain.name) == plain.read_bytes()
    # The same seed, the same bytes (no timestamps inside).
    [again] = write_files(config, tmp_path / "g2", cadence="daily", fmt="csv", upto_id=100,
                          compress="gz")  # fmt: skip
    assert again.read_bytes() == gz.read_bytes()
    with pytest.raises(ConfigError, match="compress must be one of none, gz, zip"):
        write_files(config, tmp_path, cadence="daily", fmt="csv", compress="bz2")  # type: ignore[arg-type]
