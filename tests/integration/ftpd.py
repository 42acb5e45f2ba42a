"""A real FTP server for the FTP and FTPS tests: Debian's ProFTPD on a free loopback port.

Why ProFTPD: it is in Debian (proftpd-core, and proftpd-mod-crypto for mod_tls), runs in
the foreground from a config file of our own (`proftpd -n -c FILE`), speaks MLSD (its
`FactsAdvertise off` gives a server without it, to test the NLST fallback), explicit
and implicit FTPS, and like vsftpd it requires TLS session reuse on data connections
by default, as many providers' servers do. vsftpd has no MLSD.

Each server runs from a temporary proftpd.conf: `SocketBindTight` on 127.0.0.1, its own
PidFile, ScoreboardFile and logs, no wtmp, no reverse DNS, no login delay (the
wrong-password tests must not slow the rest), and one virtual user from an
`AuthUserFile` (no system user is made; a fresh random password each session, hashed
with `openssl passwd -6`) mapped to nobody/nogroup, whose directories the tests chown.
The master process needs root to bind and switch users, as CI has.

The TLS material is made with openssl per session: a test CA and a server certificate
it signs for IP 127.0.0.1 and localhost, and an unrelated CA (a certificate from it is
"not trusted").
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PROFTPD = Path("/usr/sbin/proftpd")
MOD_TLS = Path("/usr/lib/proftpd/mod_tls.so")
USER = "cdr-ftp-test"
UID = GID = 65534  # nobody / nogroup
START_TIMEOUT_S = 15.0

Tls = Literal["none", "explicit", "implicit"]


@dataclass(frozen=True)
class Ftpd:
    """A running ProFTPD and everything a client needs to reach it."""

    host: str
    port: int
    user: str
    password: str
    tls: Tls  # what it offers: none, explicit (AUTH TLS, plain FTP too) or implicit
    mlsd: bool
    ca_file: Path  # the CA that signed its certificate
    other_ca_file: Path  # a CA that did not
    base: Path
    log: Path

    def new_directory(self) -> Path:
        """A fresh directory the FTP user owns, for one test's files."""
        path = Path(tempfile.mkdtemp(prefix="data-", dir=self.base))
        path.chmod(0o755)
        os.chown(path, UID, GID)
        return path


@dataclass(frozen=True)
class Credentials:
    """What every server of one session shares: the login and the TLS material."""

    password: str
    ca_file: Path
    other_ca_file: Path
    cert_file: Path
    key_file: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(base: Path, name: str) -> tuple[Path, Path]:
    key, cert = base / f"{name}.key", base / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=cdr-streamer {name}",
    )  # fmt: skip
    return cert, key


def make_credentials(base: Path) -> Credentials:
    """A test CA, a server certificate it signs, an unrelated CA, and the user's password."""
    base.chmod(0o755)  # the FTP user must reach the data directories below it
    ca_cert, ca_key = _make_ca(base, "test-ca")
    other_cert, _ = _make_ca(base, "other-ca")
    key, csr, cert = base / "server.key", base / "server.csr", base / "server.crt"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    extensions = base / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    key.chmod(0o600)
    # Characters that must survive the PASS command: a space, & and =.
    password = f"ftp pw&={secrets.token_urlsafe(12)}"
    return Credentials(password, ca_cert, other_cert, cert, key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _greets(host: str, port: int, tls: Tls, ca_file: Path) -> bool:
    """True once the server answers with its 220 greeting (over TLS if implicit)."""
    try:
        with socket.create_connection((host, port), timeout=1) as raw:
            raw.settimeout(1)
            if tls != "implicit":
                return raw.recv(64).startswith(b"220")
            context = ssl.create_default_context(cafile=str(ca_file))
            with context.wrap_socket(raw, server_hostname=host) as s:
                return s.recv(64).startswith(b"220")
    except OSError:
        return False


def start(
    base: Path, credentials: Credentials, *, name: str, tls: Tls, mlsd: bool = True
) -> tuple[Ftpd, subprocess.Popen[bytes]]:
    """Start one ProFTPD; returns once it greets."""
    host, port = "127.0.0.1", _free_port()
    password_hash = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=credentials.password, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    users = base / f"{name}.passwd"
    users.write_text(f"{USER}:{password_hash}:{UID}:{GID}::{base}:/usr/sbin/nologin\n")
    users.chmod(0o600)  # ProFTPD refuses a world-readable AuthUserFile
    groups = base / f"{name}.group"
    groups.write_text(f"nogroup:x:{GID}:\n")
    groups.chmod(0o600)
    log = base / f"{name}.log"
    lines = [
        f'ServerName "cdr-streamer test {name}"',
        "ServerType standalone",
        f"Port {port}",
        f"DefaultAddress {host}",
        "SocketBindTight on",
        "User nobody",
        "Group nogroup",
        f"PidFile {base / f'{name}.pid'}",
        f"ScoreboardFile {base / f'{name}.scoreboard'}",
        f"SystemLog {log}",
        "TransferLog none",
        "WtmpLog off",
        "UseReverseDNS off",
        "DelayEngine off",
        "AuthOrder mod_auth_file.c",
        f"AuthUserFile {users}",
        f"AuthGroupFile {groups}",
        "RequireValidShell off",
        "AllowOverwrite on",
        "MaxInstances 100",
        "TimeoutIdle 120",
        f"FactsAdvertise {'on' if mlsd else 'off'}",
    ]
    if tls != "none":
        lines += [
            f"ModulePath {MOD_TLS.parent}",
            "ModuleControlsACLs insmod,rmmod allow user root",
            "LoadModule mod_tls.c",
            "TLSEngine on",
            f"TLSLog {base / f'{name}.tls.log'}",
            "TLSProtocol TLSv1.2 TLSv1.3",
            f"TLSECCertificateFile {credentials.cert_file}",
            f"TLSECCertificateKeyFile {credentials.key_file}",
            "TLSRequired off",  # explicit: plain FTP on the same port too
            "TLSVerifyClient off",
            "TLSRenegotiate none",
        ]
        if tls == "implicit":
            lines.append("TLSOptions UseImplicitSSL")
        # No NoSessionReuseRequired: data connections must resume the control's session.
    config = base / f"{name}.conf"
    config.write_text("\n".join(lines) + "\n")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(PROFTPD), "--nodaemon", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _greets(host, port, tls, credentials.ca_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"proftpd did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)  # the polling period of the check above
    server = Ftpd(
        host=host,
        port=port,
        user=USER,
        password=credentials.password,
        tls=tls,
        mlsd=mlsd,
        ca_file=credentials.ca_file,
        other_ca_file=credentials.other_ca_file,
        base=base,
        log=log,
    )
    return server, proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def remove(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
