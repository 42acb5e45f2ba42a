"""Rejected rows -> dead-letter events: the raw text, why it was rejected, and where it came from.

The value is JSON, not Avro, on purpose: a dead letter is read by people fixing a
problem, and it must be able to carry any text the provider sent.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from streamer.records import Rejection

DEAD_LETTER_VERSION = 1


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
    extra = {} if file is None else {"file": file}
    return json.dumps(
        {
            "version": DEAD_LETTER_VERSION,
            "reason": rejection.reason,
            "detail": rejection.detail,
            "raw": rejection.raw,
            "id": rejection.cdr_id,
            "feed": feed,
            "source": source,
            "fromid": fromid,
            "rejected_at": when.isoformat(timespec="milliseconds"),
            **extra,
        },
        ensure_ascii=False,
    ).encode("utf-8")
