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
