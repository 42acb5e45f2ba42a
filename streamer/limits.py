"""Bounds on what a source may send: decoded bytes per response or file, and compression.

A feed response or an SFTP file is parsed as it streams, so its size alone costs no
memory; but a compressed body can expand a thousandfold in one step (a 1,830-byte
`Content-Encoding: gzip, gzip` body is 1 GiB of zeros), and a body without end holds a
poll for as long as it flows. So:

- `decode_content` undoes a response's Content-Encoding layers (`gzip`, `deflate`,
  stacked ones such as `gzip, gzip`) itself, from the raw bytes, never producing more
  than `CHUNK_BYTES` at a time from any layer (zlib's `max_length`), and fails once
  the body expands more than `max_expansion_ratio` times its compressed size (past a
  first `RATIO_GRACE_BYTES`, which a tiny body may well exceed) or passes `max_bytes`;
- `capped` fails a stream of bytes (an SFTP file, an unencoded body) past `max_bytes`.

Either failure is a `BadResponseError` (reason `too_large` or `too_compressed`): the
poll fails, the cursor stays where it was, and the source tries again later.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from streamer.errors import BadResponseError

CHUNK_BYTES = 64 * 1024  # the most any decoding step produces at once
RATIO_GRACE_BYTES = 1 << 20  # decoded bytes below which the expansion ratio is not judged
MAX_ENCODINGS = 3  # Content-Encoding layers accepted ("gzip, gzip" is two)
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB: millions of rows in one response
# Billing rows compress 5-15x with gzip (the simulator's CSV about 6.5x, its JSON 13x).
DEFAULT_MAX_EXPANSION_RATIO = 100.0
ACCEPT_ENCODING = "gzip, deflate"  # what decode_content can undo

_GZIP_WBITS = zlib.MAX_WBITS | 16
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """How much one response (or file) may hold once decoded, and how far it may expand."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_expansion_ratio: float = DEFAULT_MAX_EXPANSION_RATIO

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {self.max_bytes}")
        if not self.max_expansion_ratio >= 1:
            raise ValueError(
                f"max_expansion_ratio must be at least 1, not {self.max_expansion_ratio}"
            )


def too_large(where: str, max_bytes: int, setting: str) -> BadResponseError:
    return BadResponseError(
        f"{where} holds more than {max_bytes} bytes ({setting}): not a feed response, "
        f"or raise {setting}",
        reason="too_large",
    )


def capped(
    chunks: Iterable[bytes], max_bytes: int, *, where: str, setting: str = "max_body_bytes"
) -> Iterator[bytes]:
    """`chunks` as they come, failing (BadResponseError `too_large`) past `max_bytes` in all."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise too_large(where, max_bytes, setting)
        yield chunk


def encodings_of(content_encoding: str, *, where: str) -> list[str]:
    """The Content-Encoding layers in the order they were applied; identity dropped.

    BadResponseError (`bad_encoding`) for one we cannot undo, or too many of them.
    """
    named = [name.strip().lower() for name in content_encoding.split(",")]
    layers = [name for name in named if name and name != "identity"]
    unknown = [name for name in layers if name not in ("gzip", "x-gzip", "deflate")]
    if unknown:
        raise BadResponseError(
            f"{where} sent a body with Content-Encoding {', '.join(unknown)}, which the "
            f"streamer does not ask for (it sends Accept-Encoding: {ACCEPT_ENCODING})",
            reason="bad_encoding",
        )
    if len(layers) > MAX_ENCODINGS:
        raise BadResponseError(
            f"{where} sent a body with {len(layers)} Content-Encoding layers "
            f"(at most {MAX_ENCODINGS} are undone)",
            reason="bad_encoding",
        )
    return layers


def decode_content(
    raw: Iterable[bytes],
    content_encoding: str,
    limits: BodyLimits,
    *,
    where: str,
) -> Iterator[bytes]:
    """The decoded body, in pieces of at most CHUNK_BYTES, within `limits`.

    `raw` is the body as it came off the wire. Raises BadResponseError: `too_large`,
    `too_compressed`, `bad_encoding` (a corrupt or unknown encoding) or `truncated`
    (a compressed stream that ends before its end).
    """
    layers = encodings_of(content_encoding, where=where)
    counted = _Counted(raw)
    stream: Iterable[bytes] = counted
    for layer in reversed(layers):  # the last one applied is undone first
        stream = _inflate(stream, gzip=layer != "deflate", where=where)
    decoded = 0
    for chunk in stream:
        decoded += len(chunk)
        if decoded > limits.max_bytes:
            raise too_large(where, limits.max_bytes, "max_body_bytes")
        if (
            layers
            and decoded > RATIO_GRACE_BYTES
            and decoded > limits.max_expansion_ratio * counted.n
        ):
            raise BadResponseError(
                f"{where} sent a body that expands more than {limits.max_expansion_ratio:g} "
                f"times ({counted.n} bytes of {', '.join(layers)} gave {decoded} bytes so far): "
                "a decompression bomb, or raise max_expansion_ratio",
                reason="too_compressed",
            )
        yield chunk


class _Counted:
    """An iterable of chunks that counts the bytes it has handed out."""

    __slots__ = ("_chunks", "n")

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.n = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.n += len(chunk)
            yield chunk


def _inflate(chunks: Iterable[bytes], *, gzip: bool, where: str) -> Iterator[bytes]:
    """Undo one gzip (several members allowed) or deflate (zlib or raw) layer, boundedly."""
    # deflate: RFC 9110 means the zlib format, but some servers send raw deflate; the
    # first call sees the 2-byte zlib header whole, so it alone can tell them apart.
    decoder = zlib.decompressobj(_GZIP_WBITS if gzip else _ZLIB_WBITS)
    started = False
    ended = False
    try:
        for data in _at_least(chunks, 2):
            while data:
                if ended:
                    if not gzip or not data.lstrip(b"\0"):
                        data = b""  # padding after the end, as some servers send
                        continue
                    decoder = zlib.decompressobj(_GZIP_WBITS)  # the next gzip member
                    ended = False
                try:
                    out = decoder.decompress(data, CHUNK_BYTES)
                except zlib.error:
                    if gzip or started:
                        raise  # raw deflate is tried on the first bytes only
                    decoder = zlib.decompressobj(_RAW_DEFLATE_WBITS)
                    out = decoder.decompress(data, CHUNK_BYTES)
                started = True
                data = decoder.unconsumed_tail
                if out:
                    yield out
                # Output may wait inside zlib when it filled CHUNK_BYTES: drain it.
                while len(out) == CHUNK_BYTES and not decoder.eof:
                    out = decoder.decompress(data, CHUNK_BYTES)
                    data = decoder.unconsumed_tail
                    if out:
                        yield out
                if decoder.eof:
                    ended = True
                    data = decoder.unused_data + data
    except zlib.error as exc:
        raise BadResponseError(
            f"{where} sent a body that cannot be decoded: {exc}", reason="bad_encoding"
        ) from exc
    if started and not ended:
        raise BadResponseError(
            f"{where} sent a compressed body that ends before its end: truncated",
            reason="truncated",
        )


def _at_least(chunks: Iterable[bytes], n: int) -> Iterator[bytes]:
    """`chunks`, the first one joined with the next ones until it has `n` bytes (or all)."""
    it = iter(chunks)
    first = b""
    for chunk in it:
        first += chunk
        if len(first) >= n:
            break
    if first:
        yield first
    yield from it
