"""Rejected rows -> dead-letter events: the raw text, why it was rejected, and where it came from.

The value is JSON, not Avro, on purpose: a dead letter is read by people fixing a
problem, and it must be able to carry any text the provider sent. Its fields (the
README's "Dead letters" documents them for consumers):

    version        DEAD_LETTER_VERSION, the record's own version
    reason         a records.REASONS code; detail: the problem in words
    raw            the row as text (best effort: bytes not text in the feed's encoding show
                   as U+FFFD); raw_truncated: true when cut at MAX_RAW_BYTES
    raw_base64     the row's original bytes, for a replay byte for byte
    id             the row's CDR ID if it could be read, else null
    feed, source   the feed's (or file source's) configured name; "feed" or the protocol
    fromid         the cursor the feed request started from (0 for files)
    rejected_at    when it was rejected, ISO 8601 UTC with milliseconds
    file           file sources only: the file's name
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from streamer.records import Rejection

DEAD_LETTER_VERSION = 1
MAX_RAW_BYTES = 200_000  # of `raw` (UTF-8) and of the original bytes, each
# Under the broker's default message.max.bytes (1 MB), with room for the key and
# headers: a dead letter Kafka refused would be retried for ever.
MAX_VALUE_BYTES = 900_000


def encode_dead_letter(
    rejection: Rejection,
    *,
    feed: str,
    source: str,
    fromid: int,
    file: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """One dead-letter value (UTF-8 JSON); `file` (the SFTP file's name) only when given."""
    when = now or datetime.now(UTC)
    extra: dict[str, object] = {} if file is None else {"file": file}
    raw = rejection.raw
    original = rejection.original_bytes()
    # The parser keeps only the start of a row of any length (raw_chars says how long).
    cut = rejection.raw_chars is not None
    encoded = raw.encode("utf-8", "replace")
    if len(encoded) > MAX_RAW_BYTES:
        # The start of the text is what a person needs to look at.
        raw = encoded[:MAX_RAW_BYTES].decode("utf-8", "ignore")
        cut = True
    if len(original) > MAX_RAW_BYTES:
        original = original[:MAX_RAW_BYTES]
        cut = True
    if cut:
        extra["raw_truncated"] = True
        extra["raw_chars"] = rejection.raw_chars or len(rejection.raw)
    while True:
        value = json.dumps(
            {
                "version": DEAD_LETTER_VERSION,
                "reason": rejection.reason,
                "detail": rejection.detail,
                "raw": raw,
                "raw_base64": base64.b64encode(original).decode("ascii"),
                "id": rejection.cdr_id,
                "feed": feed,
                "source": source,
                "fromid": fromid,
                "rejected_at": when.isoformat(timespec="milliseconds"),
                **extra,
            },
            ensure_ascii=False,
        ).encode("utf-8")
        if len(value) <= MAX_VALUE_BYTES:
            return value
        # Only text JSON escapes six-fold (control characters) gets here: halve both.
        raw, original = raw[: len(raw) // 2], original[: len(original) // 2]
        extra["raw_truncated"] = True
        extra["raw_chars"] = rejection.raw_chars or len(rejection.raw)
