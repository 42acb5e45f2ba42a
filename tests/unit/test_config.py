"""Settings: every problem reported at once, passwords from env or file only, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.config import Secret, load_settings, parse_settings
from streamer.errors import ConfigError

FEED = {"name": "main", "url": "http://127.0.0.1:8080/billingfeed.php", "login": "81234567"}


def settings_of(feed: dict[str, object], **kafka: object) -> dict[str, object]:
    return {"kafka": {"bootstrap_servers": "127.0.0.1:9092", **kafka}, "feeds": [feed]}


def test_password_from_env_var_named_in_config() -> None:
    s = parse_settings(settings_of({**FEED, "password_env": "MY_PW"}), env={"MY_PW": "Monkey123"})
    assert s.feeds[0].password.reveal() == "Monkey123"
    assert "Monkey123" not in repr(s)
    assert "Monkey123" not in str(s.feeds[0])


def test_password_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("Monkey123\n")
    s = parse_settings(settings_of({**FEED, "password_file": str(secret)}), env={})
    assert s.feeds[0].password == Secret("Monkey123")


def test_default_password_env() -> None:
    s = parse_settings(settings_of(FEED), env={"CDR_FEED_PASSWORD": "pw"})
    assert s.feeds[0].password.reveal() == "pw"


def test_every_problem_reported_at_once() -> None:
    bad = {
        "name": "main",
        "url": "ftp://x/billingfeed.php",
        "login": "",
        "format": "xml",
        "callsonly": True,
        "servicesonly": True,
        "poll_intervall_s": 5,
    }
    with pytest.raises(ConfigError) as info:
        parse_settings({"kafka": {}, "feeds": [bad], "extra": {}}, env={})
    message = str(info.value)
    for expected in (
        "unknown section",
        "poll_intervall_s: unknown setting",
        "must be an http(s) URL",
        "login is required",
        "format: must be one of",
        "callsonly and servicesonly exclude each other",
        "no password",
        "bootstrap_servers: not set",
    ):
        assert expected in message


@pytest.mark.parametrize(
    ("url", "allow", "ok"),
    [
        ("http://127.0.0.1:8080/billingfeed.php", False, True),
        ("http://localhost/billingfeed.php", False, True),
        ("https://portal.example.net/billingfeed.php", False, False),
        ("https://portal.example.net/billingfeed.php", True, True),
    ],
)
def test_fast_polling_needs_explicit_setting_off_loopback(url: str, allow: bool, ok: bool) -> None:
    feed = {**FEED, "url": url, "poll_interval_s": 60, "allow_fast_polling": allow}
    if ok:
        assert parse_settings(settings_of(feed), env={"CDR_FEED_PASSWORD": "x"}).feeds[0]
    else:
        with pytest.raises(ConfigError, match="allow_fast_polling"):
            parse_settings(settings_of(feed), env={"CDR_FEED_PASSWORD": "x"})


def test_query_string_in_url_refused() -> None:
    feed = {**FEED, "url": "http://127.0.0.1/billingfeed.php?password=Monkey123"}
    with pytest.raises(ConfigError, match="query string") as info:
        parse_settings(settings_of(feed), env={"CDR_FEED_PASSWORD": "x"})
    assert "Monkey123" not in str(info.value)


def test_two_feeds_with_one_name_refused() -> None:
    data = {"kafka": {"bootstrap_servers": "h:1"}, "feeds": [FEED, FEED]}
    with pytest.raises(ConfigError, match="share this name"):
        parse_settings(data, env={"CDR_FEED_PASSWORD": "x"})


def test_bootstrap_servers_from_environment_overrides_file() -> None:
    s = parse_settings(
        settings_of(FEED), env={"CDR_FEED_PASSWORD": "x", "KAFKA_BOOTSTRAP_SERVERS": "e:1"}
    )
    assert s.kafka.bootstrap_servers == "e:1"


def test_load_settings_reports_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})


def test_credentials_in_the_url_refused_without_repeating_them() -> None:
    feed = {**FEED, "url": "https://81234567:Monkey123@portal.example.net/billingfeed.php"}
    with pytest.raises(ConfigError, match="must not contain credentials") as info:
        parse_settings(settings_of(feed), env={"CDR_FEED_PASSWORD": "x"})
    assert "Monkey123" not in str(info.value)


def test_non_finite_numbers_refused() -> None:
    with pytest.raises(ConfigError, match="finite"):
        parse_settings(
            settings_of({**FEED, "poll_interval_s": float("nan")}), env={"CDR_FEED_PASSWORD": "x"}
        )


def test_retention_minus_one_is_allowed_explicitly() -> None:
    s = parse_settings(settings_of(FEED, retention_ms=-1), env={"CDR_FEED_PASSWORD": "x"})
    assert s.kafka.retention_ms == -1


def test_producer_secrets_stay_out_of_repr() -> None:
    s = parse_settings(
        settings_of(FEED, producer={"sasl.password": "kafka-secret"}),
        env={"CDR_FEED_PASSWORD": "x"},
    )
    assert "kafka-secret" not in repr(s)


ENV = {"CDR_FEED_PASSWORD": "x"}


def test_body_limits_have_sane_defaults_and_are_checked() -> None:
    feed = parse_settings(settings_of(FEED), env=ENV).feeds[0]
    assert feed.max_body_bytes == 4 << 30
    assert feed.max_expansion_ratio == 100
    bad = {**FEED, "max_body_bytes": 0, "max_expansion_ratio": 0.5}
    with pytest.raises(ConfigError) as info:
        parse_settings(settings_of(bad), env=ENV)
    assert "feeds[main].max_body_bytes: must be at least 1, not 0" in str(info.value)
    assert "feeds[main].max_expansion_ratio: must be at least 1, not 0.5" in str(info.value)


def test_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    assert parse_settings(settings_of(FEED), env=ENV).metrics.host == "127.0.0.1"
    docker = parse_settings(settings_of(FEED), env={**ENV, "CDR_METRICS_HOST": "0.0.0.0"})
    assert docker.metrics.host == "0.0.0.0"
    # The file decides over the environment.
    data = {**settings_of(FEED), "metrics": {"host": "::1"}}
    assert parse_settings(data, env={**ENV, "CDR_METRICS_HOST": "0.0.0.0"}).metrics.host == "::1"


def test_metrics_credentials_come_from_a_file_or_the_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("Bearer-T0ken\n")
    data = {
        **settings_of(FEED),
        "metrics": {
            "basic_auth_user": "prometheus",
            "basic_auth_password_env": "METRICS_PW",
            "bearer_token_file": str(token),
            "auth_probes": True,
        },
    }
    m = parse_settings(data, env={**ENV, "METRICS_PW": "Scr4pe!"}).metrics
    assert m.basic_auth_password == Secret("Scr4pe!")
    assert m.bearer_token == Secret("Bearer-T0ken")
    assert m.auth_probes
    assert "Scr4pe!" not in repr(m)
    assert "Bearer-T0ken" not in repr(m)


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({"basic_auth_user": "p"}, "metrics.basic_auth_user: has no password"),
        ({"basic_auth_password_env": "PW"}, "metrics.basic_auth_password: has no user"),
        ({"basic_auth_password": "inline"}, "metrics.basic_auth_password: not in the file"),
        ({"bearer_token": "inline"}, "metrics.bearer_token: not in the file"),
        ({"bearer_token_env": "NOT_SET"}, "environment variable NOT_SET is not set"),
        ({"auth_probes": True}, "metrics.auth_probes: needs basic_auth_user or bearer_token"),
        ({"tls_cert_file": "/nonexistent.pem"}, "TLS needs both tls_cert_file and tls_key_file"),
        (
            {"tls_cert_file": "/nonexistent.pem", "tls_key_file": "/nonexistent.key"},
            "metrics.tls_key_file: /nonexistent.key is not a readable file",
        ),
        ({"port": 70000}, "metrics.port: must be 0..65535"),
    ],
)
def test_metrics_settings_problems(metrics: dict[str, object], problem: str) -> None:
    data = {**settings_of(FEED), "metrics": metrics}
    with pytest.raises(ConfigError) as info:
        parse_settings(data, env={**ENV, "PW": "pw"})
    assert problem in str(info.value)


def test_sftp_files_have_the_same_cap() -> None:
    source = {"name": "files", "host": "h", "user": "u", "password": "p"}
    data = {**settings_of(FEED), "sftp": [{**source, "trust_unknown_host_key": True}]}
    assert parse_settings(data, env=ENV).sftp[0].max_file_bytes == 4 << 30
    data = {**settings_of(FEED), "sftp": [{**source, "max_file_bytes": 0}]}
    with pytest.raises(ConfigError, match=r"sftp\[files\].max_file_bytes: must be at least 1"):
        parse_settings(data, env=ENV)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "utf-8"),
        ("cp1252", "cp1252"),
        ("Windows-1252", "cp1252"),
        ("ISO-8859-1", "latin-1"),
        ("latin-1", "latin-1"),
        ("auto", "auto"),
        ("UTF8", "utf-8"),
    ],
)
def test_feed_and_sftp_encoding(tmp_path: Path, given: str | None, expected: str) -> None:
    extra = {} if given is None else {"encoding": given}
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    data = settings_of({**FEED, **extra})
    data["sftp"] = [
        {"name": "files", "host": "h", "user": "u", "password": "p",
         "known_hosts": str(known_hosts), **extra}
    ]  # fmt: skip
    s = parse_settings(data, env={"CDR_FEED_PASSWORD": "pw"})
    assert s.feeds[0].encoding == expected
    assert s.sftp[0].encoding == expected


def test_unknown_encoding_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(settings_of({**FEED, "encoding": "ebcdic"}), env={"CDR_FEED_PASSWORD": "p"})
    assert "feeds[main].encoding: must be one of utf-8, cp1252" in str(info.value)


def test_reconciliation_is_on_by_default_and_its_settings_are_checked() -> None:
    feed = parse_settings(settings_of(FEED), env={"CDR_FEED_PASSWORD": "pw"}).feeds[0]
    assert (feed.reconcile, feed.reconcile_horizon_h, feed.reconcile_checks) == (True, 24.0, 3)
    assert (feed.reconcile_min_interval_s, feed.reconcile_clock) == (0.0, "wall")
    bad = {
        **FEED, "reconcile_horizon_h": 0.5, "reconcile_checks": 0, "reconcile_clock": "utc",
        "reconcile": "yes",
    }  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        parse_settings(settings_of(bad), env={"CDR_FEED_PASSWORD": "pw"})
    message = str(caught.value)
    for problem in (
        "reconcile_horizon_h: must be 1 to 84 hours", "reconcile_checks: must be 1 to 24",
        "reconcile_clock: must be 'wall' or 'feed'", "reconcile: must be true or false",
    ):  # fmt: skip
        assert problem in message


def test_processing_workers_auto_a_number_or_a_clear_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = settings_of({**FEED, "password": "pw"})
    assert parse_settings(base, env={}).processing.workers == "auto"  # the default
    auto = {**base, "processing": {"workers": "auto"}}
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert parse_settings(auto, env={}).processing.worker_count == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0}, raising=False)
    assert parse_settings(auto, env={}).processing.worker_count == 0  # one core: in-process
    for value, count in ((0, 0), (3, 3), ("auto", 0)):
        data = {**base, "processing": {"workers": value}}
        assert parse_settings(data, env={}).processing.worker_count == count
    env = {"CDR_STREAMER_PROCESSING_WORKERS": "4"}
    assert parse_settings(base, env=env).processing.worker_count == 4
    for bad in (-1, 65, 1.5, True, "many"):
        with pytest.raises(ConfigError, match=r'processing\.workers: must be "auto" or a whole'):
            parse_settings({**base, "processing": {"workers": bad}}, env={})
    with pytest.raises(ConfigError, match=r"processing\.threads: unknown setting"):
        parse_settings({**base, "processing": {"threads": 2}}, env={})
    with pytest.raises(ConfigError, match=r"feeds\[0\]\.workers: moved to \[processing\]"):
        parse_settings(settings_of({**FEED, "password": "pw", "workers": 2}), env={})
