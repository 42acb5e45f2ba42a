"""Rows and dead letters never grow past what the broker accepts (message.max.bytes, 1 MB)."""

from __future__ import annotations

import base64
import json

from streamer.deadletter import MAX_RAW_BYTES, MAX_VALUE_BYTES, encode_dead_letter
from streamer.records import FIELDS, MAX_ROW_CHARS, Rejection, Row, to_record


def test_a_row_far_longer_than_any_cdr_is_rejected_with_its_id() -> None:
    values = dict.fromkeys(FIELDS, "x")
    values["ID"] = "77"
    values["TextDesc2"] = "é" * (MAX_ROW_CHARS + 1)
    row = Row(values, ",".join(values.values()))
    rejection = to_record(row)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "row_too_long"
    assert rejection.cdr_id == 77  # still moves the cursor once its dead letter is confirmed


def test_dead_letter_of_a_huge_row_fits_under_the_broker_limit() -> None:
    raw = "€" * 1_000_000  # 3 MB of UTF-8
    value = encode_dead_letter(
        Rejection("row_too_long", "d", raw), feed="f", source="feed", fromid=0
    )
    assert len(value) < 1_000_000
    letter = json.loads(value)
    assert letter["raw_truncated"] is True
    assert raw.startswith(letter["raw"])
    assert len(letter["raw"].encode()) <= MAX_RAW_BYTES


def test_ordinary_dead_letter_is_whole() -> None:
    letter = json.loads(
        encode_dead_letter(Rejection("bad_id", "d", "a,b"), feed="f", source="feed", fromid=0)
    )
    assert letter["raw"] == "a,b"
    assert base64.b64decode(letter["raw_base64"]) == b"a,b"
    assert "raw_truncated" not in letter
    assert "raw_chars" not in letter


def test_dead_letter_keeps_the_original_bytes_for_a_replay() -> None:
    original = "1,Café".encode("cp1252") + b"\x81"
    rejection = Rejection("bad_encoding", "d", "1,Café\ufffd", 1, original)
    letter = json.loads(encode_dead_letter(rejection, feed="f", source="feed", fromid=0))
    assert base64.b64decode(letter["raw_base64"]) == original
    assert letter["raw"] == "1,Café\ufffd"
    # Without bytes of its own, a rejection's original bytes are its text in UTF-8.
    plain = json.loads(
        encode_dead_letter(Rejection("bad_id", "d", "a,ü"), feed="f", source="feed", fromid=0)
    )
    assert base64.b64decode(plain["raw_base64"]) == "a,ü".encode()


def test_a_row_the_parser_cut_says_so_and_how_long_it_was() -> None:
    rejection = Rejection("row_too_long", "d", "1," + "x" * 100, 1, None, 5_000_000)
    letter = json.loads(encode_dead_letter(rejection, feed="f", source="feed", fromid=0))
    assert letter["raw_truncated"] is True
    assert letter["raw_chars"] == 5_000_000
    assert letter["raw"] == rejection.raw


def test_dead_letter_of_control_characters_fits_under_the_broker_limit() -> None:
    # JSON writes each as \u00XX: six bytes for one.
    raw = "\x01" * MAX_RAW_BYTES
    value = encode_dead_letter(
        Rejection("wrong_field_count", "d", raw, None, raw.encode()),
        feed="f",
        source="feed",
        fromid=0,
    )
    assert len(value) <= MAX_VALUE_BYTES
    letter = json.loads(value)
    assert letter["raw_truncated"] is True
    assert letter["raw_chars"] == MAX_RAW_BYTES
    assert raw.startswith(letter["raw"])
    assert raw.encode().startswith(base64.b64decode(letter["raw_base64"]))
