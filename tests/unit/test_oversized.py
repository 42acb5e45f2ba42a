"""Rows and dead letters never grow past what the broker accepts (message.max.bytes, 1 MB)."""

from __future__ import annotations

import json

from streamer.deadletter import MAX_RAW_BYTES, encode_dead_letter
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
    assert "raw_truncated" not in letter
