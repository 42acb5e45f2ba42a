"""streamer.redact: a registered secret leaves every log record and error text, in every form."""

from __future__ import annotations

import html
import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest

from streamer import redact
from streamer.config import Secret, parse_settings
from streamer.errors import BadResponseError, StreamerError
from streamer.redact import excerpt

# & = % + quotes, a backslash, non-ASCII (2, 3 and 4 UTF-8 bytes) and a space.
PASSWORD = "Qx9&p+w=%41\"'\\é€😀 zü Vj4"


def _pct_lower(text: str) -> str:
    return re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), text)


# Each form as a list of units, one per character of the password: a cut between two
# units shows that many characters of it; a cut inside one shows a piece of an escape.
UNIT_FORMS: dict[str, Callable[[str], str]] = {
    "raw": lambda c: c,
    "url": lambda c: quote(c, safe=""),
    "url, lower-case hex": lambda c: _pct_lower(quote(c, safe="")),
    "form": quote_plus,
    "url, twice": lambda c: quote(quote(c, safe=""), safe=""),
    "json": lambda c: json.dumps(c)[1:-1],
    "json, no ascii": lambda c: json.dumps(c, ensure_ascii=False)[1:-1],
    "html": html.escape,
    "html, numeric": lambda c: f"&#{ord(c)};" if not c.isalnum() else c,
    "repr": lambda c: repr(c)[1:-1] if c != "'" else "\\'",
    "bytes repr": lambda c: repr(c.encode())[2:-1] if c != "'" else "\\'",
    "utf-8 read as latin-1": lambda c: c.encode().decode("latin-1"),
}


def units(form: str) -> list[str]:
    return [UNIT_FORMS[form](c) for c in PASSWORD]


@pytest.fixture(autouse=True)
def _registered() -> None:
    redact.register(PASSWORD)


@pytest.mark.parametrize("form", UNIT_FORMS)
def test_every_form_of_a_whole_password_is_hidden(form: str) -> None:
    shown = "".join(units(form))
    assert redact.redact(f"Error: login 81234567 with {shown} refused") == (
        "Error: login 81234567 with *** refused"
    )
    assert redact.redact(f"x{shown}y") == "x***y"


def test_forms_mixed_within_one_occurrence_are_hidden() -> None:
    # httpx leaves some characters as they are and encodes others; servers vary.
    mixed = "".join(
        UNIT_FORMS[("raw", "url", "json", "html")[i % 4]](c) for i, c in enumerate(PASSWORD)
    )
    assert redact.redact(f"[{mixed}]") == "[***]"


LEAD = "Error for login 81234567 with "  # no "password=": that rule would hide any value


@pytest.mark.parametrize("form", UNIT_FORMS)
def test_a_prefix_cut_by_an_excerpt_is_hidden_wherever_the_cut_falls(form: str) -> None:
    pieces = units(form)
    encoded = "".join(pieces)
    body = LEAD + encoded + " and more"
    for cut in range(1, len(encoded)):
        text = "not a feed: " + excerpt(body, 0, len(LEAD) + cut)
        shown = redact.redact(text)
        whole = sum(1 for i in range(len(pieces)) if len("".join(pieces[: i + 1])) <= cut)
        if whole >= redact.MIN_PART_CHARS:
            # (the quote that closes the excerpt may go too, when the next character is one)
            assert re.fullmatch(
                r"not a feed: (['\"])Error for login 81234567 with \*\*\*\1?\.\.\.", shown
            ), (
                cut,
                shown,
            )
        else:  # three characters and a piece of an escape are no secret: the text stays
            # (unless the piece reads as a 4th character: "&" of "&amp;" is a raw "&")
            assert shown == text or shown.endswith("***'..."), (cut, shown)


@pytest.mark.parametrize("form", UNIT_FORMS)
def test_a_suffix_after_a_leading_cut_is_hidden(form: str) -> None:
    pieces = units(form)
    encoded = "".join(pieces)
    body = LEAD + encoded + " and more"
    for shown_chars in range(1, len(encoded)):
        start = len(LEAD) + len(encoded) - shown_chars
        text = "the body ends with " + excerpt(body, start, len(body))
        shown = redact.redact(text)
        whole = sum(1 for i in range(len(pieces)) if len("".join(pieces[i:])) <= shown_chars)
        if whole >= redact.MIN_PART_CHARS:
            assert re.fullmatch(r"the body ends with \.\.\.(['\"])?\*\*\* and more['\"]", shown), (
                shown_chars,
                shown,
            )
        else:
            assert shown == text


def test_text_without_a_cut_mark_keeps_a_prefix_that_is_just_text() -> None:
    # Only a cut can make a prefix: "Qx9&p" in the middle of a line is left alone.
    assert redact.redact("Qx9&p is a word here") == "Qx9&p is a word here"


def test_password_values_in_urls_and_forms_are_hidden_even_unregistered() -> None:
    line = "GET /feed?login=1&password=hunter2xyz&fromid=2 passwd%3Dabc token=t0k secret=s3"
    assert redact.redact(line) == (
        "GET /feed?login=1&password=***&fromid=2 passwd%3D*** token=*** secret=***"
    )


def test_a_short_secret_is_hidden_only_where_it_stands_alone() -> None:
    redact.register("x7")
    assert redact.redact("password x7 given; 0x7f stays") == "password *** given; 0x7f stays"


def test_basic_auth_registers_the_header_token_too() -> None:
    redact.register_basic_auth("user", "pa:ss")
    assert redact.redact("Authorization: Basic dXNlcjpwYTpzcw==") == "Authorization: Basic ***"


def test_streamer_errors_redact_their_own_message() -> None:
    error = BadResponseError(f"echo: {PASSWORD}", reason="not_feed")
    assert str(error) == "echo: ***"
    assert PASSWORD not in repr(error)
    assert str(StreamerError("a", PASSWORD)) == "('a', '***')"


def test_a_secret_made_in_the_configuration_is_registered() -> None:
    settings = parse_settings(
        {
            "kafka": {
                "bootstrap_servers": "k:9092",
                "producer": {
                    "sasl.password": "Kafka-S3cret!",
                    "ssl.key.password": "Key-Pa55",
                    "client.id": "plain-client-id",
                },
            },
            "feeds": [
                {"name": "a", "url": "http://127.0.0.1/b", "login": "l", "password": "Feed-Pw-1"}
            ],
        },
        env={"CDR_SCHEMA_REGISTRY_PASSWORD": "Registry-Pw-2"},
    )
    assert settings.feeds[0].password == Secret("Feed-Pw-1")
    line = "Kafka-S3cret! Key-Pa55 Feed-Pw-1 Registry-Pw-2 plain-client-id"
    assert redact.redact(line) == "*** *** *** *** plain-client-id"


@pytest.fixture
def installed(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    redact.install()
    caplog.set_level(logging.DEBUG)
    # The CLI quiets paramiko in-process (cli.main): a level left by an earlier test.
    for name in ("httpcore.http11", "paramiko.transport", "some.library.deep.child"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_records_of_any_logger_are_redacted_third_party_children_included(
    installed: pytest.LogCaptureFixture,
) -> None:
    encoded = quote(PASSWORD, safe="")
    headers = [(b"Location", f"/login?next=/billingfeed.php%3Fpassword%3D{encoded}".encode())]
    logging.getLogger("httpcore.http11").debug("receive_response_headers.complete %r", headers)
    logging.getLogger("paramiko.transport").info("auth with %s", PASSWORD)
    logging.getLogger("some.library.deep.child").warning("%(pw)s", {"pw": PASSWORD})
    logging.getLogger().error(json.dumps({"password": PASSWORD}))
    assert len(installed.records) == 4
    for record in installed.records:
        assert "***" in record.getMessage()
    assert PASSWORD not in installed.text
    assert encoded not in installed.text
    assert quote(encoded, safe="") not in installed.text


def test_a_logged_traceback_is_redacted(installed: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError(f"echoed {PASSWORD!r}")
    except ValueError:
        logging.getLogger("x").exception("failed")
    (record,) = installed.records
    assert record.exc_info is None  # formatted already, so no formatter can print it raw
    assert record.exc_text is not None
    assert "ValueError: echoed '***'" in record.exc_text
    formatted = logging.Formatter("%(message)s").format(record)
    assert "ValueError" in formatted
    assert PASSWORD not in formatted


def test_uncaught_exceptions_in_threads_and_main_are_redacted() -> None:
    script = textwrap.dedent(
        f"""
        import threading
        from streamer import redact
        redact.register({PASSWORD!r})
        redact.install()
        def fail():
            raise RuntimeError("thread saw " + {PASSWORD!r})
        t = threading.Thread(target=fail)
        t.start(); t.join()
        raise RuntimeError("main saw " + {PASSWORD!r})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "RuntimeError: thread saw ***" in done.stderr
    assert "RuntimeError: main saw ***" in done.stderr
    assert PASSWORD not in done.stderr
