"""Every secret the process knows, and the one place that removes them from text.

Secrets are registered where the configuration is read: `config.Secret` registers
itself, and config.py registers the secret-looking librdkafka settings (`sasl.password`,
`ssl.key.password`, ...). `redact(text)` then replaces each of them with `***` in every
form it could take in a log line or an error message:

- raw, URL- or form-encoded (upper or lower case hex, `+` for a space, encoded again
  by a proxy: `%2526`), JSON-, Python-repr- or bytes-repr-escaped, as HTML character
  references, as UTF-8 read as Latin-1, and any mix of these within one occurrence;
- cut short: a prefix of 4 characters or more right before the mark of a cut
  (`...`, or the end of the text), and a suffix of 4 or more right after a leading
  `...`. `excerpt()` marks its cuts that way, so a password that an 80-character
  excerpt of an echoed request cuts in half is still found.

`redact` also hides the value after `password=` (and `passwd`, `pwd`, `passphrase`,
`secret`, `token`) in URLs and form bodies, registered or not.

`install()` applies it to every log record as it is created (a LogRecord factory: every
logger, third-party ones and their children included, and every handler and formatter,
also those added later such as a JSON formatter) and to uncaught exceptions
(`sys.excepthook`, `threading.excepthook`). `StreamerError` applies it to its own
message, so an error's text is clean wherever it goes.
"""

from __future__ import annotations

import base64
import html.entities
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from types import TracebackType
from typing import Any

MASK = "***"
CUT = "..."  # what excerpt() puts where it cut the text
EXCERPT_CHARS = 80
MIN_PART_CHARS = 4  # a cut prefix or suffix this long counts as the secret
# Beyond this many characters a cut part is not looked for (an excerpt shows 80).
_MAX_PART_CHARS = 128

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None  # whole secrets, and prefixes before a cut
_tail_pattern: re.Pattern[str] | None = None  # suffixes after a cut at the start
_installed = False  # the exception hooks
_installed_factory = False  # the LogRecord factory

_KEYED = re.compile(r"(?i)((?:password|passwd|pwd|passphrase|secret|token)(?:=|%3D))[^&\s'\"<>]+")
# A piece of an escape that a cut split: "%2" of "%26", "\u00" of "\u00e9", "&am" of "&amp;".
_BYTE_ESCAPE = r"(?:%(?:25)*[0-9A-Fa-f]{2}|\\+x[0-9A-Fa-f]{2}|[\x80-\xbf])"
_FRAGMENT_BEFORE_CUT = (
    r"(?:(?:%(?:25)*[0-9A-Fa-f]{2}){0,3}(?:%(?:25)*[0-9A-Fa-f]?)?"
    r"|(?:\\+x[0-9A-Fa-f]{2}){0,3}(?:\\+x?[0-9A-Fa-f]?)?"
    r"|(?:\\+u[dD][89abAB][0-9A-Fa-f]{2})?(?:\\+(?:u[0-9A-Fa-f]{0,3}|U[0-9A-Fa-f]{0,7})?)?"
    r"|&#?[xX]?[0-9A-Za-z]{0,8}"
    r"|[\xc2-\xf4](?:[\x80-\xbf]|\\+x[89abAB][0-9A-Fa-f]){0,2}"
    r"|\ufffd{1,3})"
)
# The rest of an escape, or of a character's UTF-8 bytes, that a cut at the start split.
_FRAGMENT_AFTER_CUT = (
    r"(?:(?:\\*[uxU]?[0-9A-Fa-f]{1,7}|#?[xX]?[0-9A-Za-z]{0,8};)?"
    r"(?:\\+u[dD][c-fC-F][0-9A-Fa-f]{2})?" + _BYTE_ESCAPE + "{0,3})"
)
_CUT_AHEAD = r"(?=b?['\"]?(?:\.\.\.|\u2026|\Z))"
_CUT_BEHIND = (
    "(?:"
    + "|".join(
        f"(?<={re.escape(mark + quote)})"
        for mark in (CUT, "\u2026")
        for quote in ("", "'", '"', "b'", 'b"')
    )
    + ")"
)


def register(secret: str) -> None:
    """Add a secret (empty strings are ignored); from now on `redact` removes it."""
    if not secret:
        return
    global _pattern, _tail_pattern
    with _lock:
        if secret in _secrets:
            return
        _secrets.add(secret)
        _pattern, _tail_pattern = _compile(_secrets)
    _install_record_factory()


def registered() -> frozenset[str]:
    """The secrets registered so far (for tests, which put the set back after each one)."""
    with _lock:
        return frozenset(_secrets)


def restore(secrets: Iterable[str]) -> None:
    """Make `secrets` the whole registry again (tests: forget those a test registered)."""
    global _pattern, _tail_pattern
    with _lock:
        _secrets.clear()
        _secrets.update(secrets)
        _pattern, _tail_pattern = _compile(_secrets) if _secrets else (None, None)


def register_basic_auth(user: str, password: str) -> None:
    """The password, and the `Authorization: Basic` token made of it and `user`."""
    register(password)
    if password:
        register(base64.b64encode(f"{user}:{password}".encode()).decode("ascii"))


def redact(text: str) -> str:
    """`text` without any registered secret, in any of its forms, nor a `password=` value."""
    pattern, tail_pattern = _pattern, _tail_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if tail_pattern is not None and (CUT in text or "\u2026" in text):
        text = tail_pattern.sub(MASK, text)
    return _KEYED.sub(r"\1" + MASK, text)


def excerpt(
    text: str, start: int = 0, limit: int = EXCERPT_CHARS, *, cut_before: bool | None = None
) -> str:
    """Up to `limit` characters of `text` from `start`, quoted, with `...` where it was cut.

    `cut_before`: whether to mark a cut before it (when `text` is itself part of more);
    by default, when `start` is past the beginning. The marks let `redact` find a secret
    the cut left only part of.
    """
    shown = text[start : start + limit]
    before = CUT if (start > 0 if cut_before is None else cut_before) else ""
    after = CUT if len(text) > start + limit else ""
    return f"{before}{shown!r}{after}"


def install() -> None:
    """Redact every log record and every uncaught exception's traceback of this process."""
    global _installed
    _install_record_factory()
    with _lock:
        if _installed:
            return
        _installed = True
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


# --- the patterns ---------------------------------------------------------------------------


def _hex(value: int, digits: int) -> str:
    """`value` in hex, each letter matching either case."""
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{value:0{digits}x}")


def _char(c: str) -> str:
    """Every way one character of a secret can be written in text we log."""
    cp = ord(c)
    data = c.encode("utf-8", "surrogatepass")
    forms = {
        re.escape(c),
        "".join(f"%(?:25)*{_hex(b, 2)}" for b in data),  # URL, form, encoded again
        f"&#0*{cp};",
        f"&#[xX]0*{_hex(cp, 1)};",
    }
    if c == " ":
        forms.add(r"\+")
    if c == "+":
        forms.add(" ")  # a form body read as a query by the echoing server
    if c in "\\'\"/":
        forms.add(r"\\+" + re.escape(c))  # JSON and repr escapes, nested reprs add more
    if c == "\\":
        forms.add(r"\\+")
    escapes = {"\n": "n", "\r": "r", "\t": "t", "\b": "b", "\f": "f"}
    if c in escapes:
        forms.add(r"\\+" + escapes[c])
    if cp < 0x100:
        forms.add(r"\\+x" + _hex(cp, 2))
    if cp < 0x10000:
        forms.add(r"\\+u" + _hex(cp, 4))
    else:
        hi, lo = 0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)
        forms.add(r"\\+u" + _hex(hi, 4) + r"\\+u" + _hex(lo, 4))
        forms.add(r"\\+U" + _hex(cp, 8))
    if not c.isascii():
        forms.add("".join(r"\\+x" + _hex(b, 2) for b in data))  # bytes repr
        misread = data.decode("latin-1")  # UTF-8 read as Latin-1, as is and repr-escaped
        forms.add(re.escape(misread))
        forms.add(
            "".join(re.escape(m) if m.isprintable() else r"\\+x" + _hex(ord(m), 2) for m in misread)
        )
        forms.add("\ufffd{1,%d}" % len(data))  # noqa: UP031 - a regex, not a message
        if cp < 0x100:
            forms.add(f"%(?:25)*{_hex(cp, 2)}")  # percent-encoded as Latin-1
    name = html.entities.codepoint2name.get(cp)
    if name is not None:
        forms.add(f"&{name};")
    if c == "'":
        forms.add("&apos;")
    return "(?:" + "|".join(sorted(forms, key=len, reverse=True)) + ")"


def _prefix(chars: list[str]) -> str:
    """A run of at least MIN_PART_CHARS of `chars` from their start (greedy, longest first)."""
    inner = ""
    for c in reversed(chars[MIN_PART_CHARS:]):
        inner = f"(?:{c}{inner})?"
    return "".join(chars[:MIN_PART_CHARS]) + inner


def _suffix(chars: list[str]) -> str:
    """A run of at least MIN_PART_CHARS of `chars` up to their end."""
    inner = ""
    for c in chars[:-MIN_PART_CHARS]:
        inner = f"(?:{inner}{c})?"
    return inner + "".join(chars[-MIN_PART_CHARS:])


def _compile(secrets: Iterable[str]) -> tuple[re.Pattern[str], re.Pattern[str] | None]:
    """(whole secrets and prefixes before a cut, suffixes after a leading cut)."""
    branches: list[str] = []
    tails: list[str] = []
    for secret in sorted(secrets, key=len, reverse=True):
        chars = [_char(c) for c in secret]
        if len(chars) < MIN_PART_CHARS:
            # So short it would hide pieces of words and numbers all over a log line:
            # hidden where it stands alone.
            before = r"(?<![0-9A-Za-z])" if secret[0].isalnum() else ""
            after = r"(?![0-9A-Za-z])" if secret[-1].isalnum() else ""
            branches.append(before + "".join(chars) + after)
            continue
        branches.append("".join(chars))
        if len(chars) > MIN_PART_CHARS:
            part = min(len(chars) - 1, _MAX_PART_CHARS)
            branches.append(f"{_prefix(chars[:part])}{_FRAGMENT_BEFORE_CUT}?{_CUT_AHEAD}")
            tails.append(f"{_FRAGMENT_AFTER_CUT}?{_suffix(chars[-part:])}")
    tail = re.compile(f"{_CUT_BEHIND}(?:{'|'.join(tails)})") if tails else None
    return re.compile("|".join(branches)), tail


# --- where it is applied --------------------------------------------------------------------


def redact_record(record: logging.LogRecord) -> None:
    """Replace a record's message, traceback and stack by their redacted text."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging would report it; keep what there is
        message = f"{record.msg!r} {record.args!r}"
    record.msg = redact(message)
    record.args = ()
    if record.exc_info:
        # Formatted now, and the exception object dropped: a formatter that formats
        # exc_info itself would otherwise print the traceback unredacted.
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = redact(text)
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _install_record_factory() -> None:
    global _installed_factory
    with _lock:
        if _installed_factory:
            return
        _installed_factory = True
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            redact_record(record)
            return record

        logging.setLogRecordFactory(factory)


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))
