"""A real OpenSSH server for the SFTP tests: /usr/sbin/sshd on a free loopback port.

It runs from a temporary sshd_config: a fresh ed25519 host key, `Subsystem sftp
internal-sftp` (forced, so the test user gets SFTP and nothing else), `UsePAM no`
(password logins check /etc/shadow directly), `StrictModes no` (the keys live in a
temporary directory), `AllowUsers` the test user only, and a PidFile of its own.

The test user, `cdr-sftp-test`, is a system user without a home, created with
`useradd` when missing (this needs root, as CI is) and given a random password with
`chpasswd`, the same one for every session of one boot (kept in a root-only file under
/run): test sessions running at the same time on one machine share it, instead of each
resetting it under the others' feet. Its key is a fresh ed25519 key with a passphrase.
The user stays on the machine afterwards (creating it again is all a next session would do).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
USER = "cdr-sftp-test"
KEY_PASSPHRASE = "correct horse battery staple"
START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class SshServer:
    """A running sshd and everything a client needs to reach it."""

    host: str
    port: int
    user: str
    password: str
    key_file: Path  # the user's private key, encrypted with KEY_PASSPHRASE
    known_hosts: Path  # holds the server's real host key
    other_known_hosts: Path  # holds another key under the server's name (a mismatch)
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    base: Path  # the temporary directory of it all
    log: Path

    def new_directory(self) -> Path:
        """A fresh directory the test user owns, for one test's files."""
        path = Path(tempfile.mkdtemp(prefix="data-", dir=self.base))
        path.chmod(0o755)
        info = pwd.getpwnam(self.user)
        os.chown(path, info.pw_uid, info.pw_gid)
        return path


def _keygen(path: Path, passphrase: str = "") -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "cdr-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


PASSWORD_FILE = Path("/run/cdr-sftp-test.password")


def _ensure_user() -> str:
    """The test user exists and has a password; returns it (the same for every session)."""
    with open(PASSWORD_FILE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one session at a time sets it up
        try:
            pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                check=True,
                capture_output=True,
            )
            PASSWORD_FILE.unlink(missing_ok=True)  # a new user has no password yet
        if PASSWORD_FILE.exists():
            password = PASSWORD_FILE.read_text().strip()
        else:
            password = secrets.token_urlsafe(16)
            fd = os.open(PASSWORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        # Set each time, to the same value: harmless to a session already using it, and
        # it mends a password something else changed.
        subprocess.run(
            ["chpasswd"], input=f"{USER}:{password}\n", text=True, check=True, capture_output=True
        )
        return password


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sshd_version() -> tuple[int, int]:
    out = subprocess.run([str(SSHD), "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _answers_banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def start(base: Path) -> tuple[SshServer, subprocess.Popen[bytes]]:
    """Start sshd; returns once its port answers with an SSH banner."""
    password = _ensure_user()
    base.chmod(0o755)  # the user must reach authorized_keys; sshd reads it as the user
    host_key = base / "host_ed25519"
    host_pub = _keygen(host_key)
    other_pub = _keygen(base / "other_ed25519")
    key_file = base / "client_ed25519"
    (base / "authorized_keys").write_text(_keygen(key_file, KEY_PASSPHRASE) + "\n")
    (base / "authorized_keys").chmod(0o644)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    host, port = "127.0.0.1", _free_port()
    known_hosts = base / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {host_pub}\n")
    other_known_hosts = base / "other_known_hosts"
    other_known_hosts.write_text(f"[{host}]:{port} {other_pub}\n")
    lines = [
        f"Port {port}",
        f"ListenAddress {host}",
        f"HostKey {host_key}",
        f"PidFile {base / 'sshd.pid'}",
        f"AuthorizedKeysFile {base / 'authorized_keys'}",
        "PasswordAuthentication yes",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin no",
        f"AllowUsers {USER}",
        "UsePAM no",
        "StrictModes no",
        "Subsystem sftp internal-sftp",
        "ForceCommand internal-sftp",
        "MaxStartups 100",
        "LogLevel VERBOSE",
    ]
    if _sshd_version() >= (9, 8):
        lines.append("PerSourcePenalties no")  # the wrong-password tests must not lock us out
    config = base / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    log = base / "sshd.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers_banner(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"sshd did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)  # the polling period of the check above
    server = SshServer(
        host=host,
        port=port,
        user=USER,
        password=password,
        key_file=key_file,
        known_hosts=known_hosts,
        other_known_hosts=other_known_hosts,
        host_key_pub=host_pub,
        base=base,
        log=log,
    )
    return server, proc


def stop(proc: subprocess.Popen[bytes], base: Path) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(base, ignore_errors=True)
