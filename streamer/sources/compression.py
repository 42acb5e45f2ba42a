"""Compressed CDR files: `.gz` and single-member `.zip`, decompressed as a stream, size-capped.

A file source hands the bytes it reads through `decompressed()` before parsing, so a
daily file never sits in memory whole, compressed or not. Each output piece is at most
`PIECE_BYTES`: a small input that inflates hugely (a "zip bomb") costs time, never
memory, and the total is capped at `max_bytes` (the `max_decompressed_bytes` setting).

A file that is not a valid archive of its kind, ends early, fails its checksum,
inflates past the cap, or (zip) is encrypted or holds more than one file raises
`BadResponseError`: the collector quarantines it with a `bad_file` dead letter.
"""

from __future__ import annotations

import posixpath
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Literal

from streamer.errors import BadResponseError

Compression = Literal["gz", "zip"]
COMPRESSIONS: dict[str, Compression] = {".gz": "gz", ".gzip": "gz", ".zip": "zip"}
MAX_DECOMPRESSED_BYTES = 4 << 30  # far above a day of one account's CDRs, far below a full disk
PIECE_BYTES = 1 << 20  # the most one step of inflating may produce

_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_END = b"PK\x05\x06"
_ZIP_DESCRIPTOR = b"PK\x07\x08"
_ZIP_HEADER = struct.Struct("<4sHHHHHIIIHH")  # local file header, up to the name
_ZIP_ENCRYPTED = 0x0001
_ZIP_HAS_DESCRIPTOR = 0x0008
_ZIP_STORED, _ZIP_DEFLATED = 0, 8
_ZIP64_EXTRA = 0x0001


def compression_of(name: str) -> tuple[str, Compression | None]:
    """The name without its compression suffix, and the compression (None if plain).

    `cdr_20240301.csv.gz` -> (`cdr_20240301.csv`, "gz"), so the format is read off the
    extension beneath.
    """
    stem, ext = posixpath.splitext(name)
    kind = COMPRESSIONS.get(ext.lower())
    return (stem, kind) if kind is not None else (name, None)


def decompressed(
    chunks: Iterable[bytes], name: str, *, max_bytes: int = MAX_DECOMPRESSED_BYTES
) -> Iterator[bytes]:
    """The file's content: `chunks` as they are, or inflated if `name` says it is compressed."""
    _, kind = compression_of(name)
    if kind is None:
        return iter(chunks)
    if kind == "gz":
        return _capped(_gunzip(iter(chunks), name), name, max_bytes)
    return _capped(_unzip(_Bytes(iter(chunks)), name), name, max_bytes)


def _bad(name: str, what: str) -> BadResponseError:
    return BadResponseError(f"{name} is not a readable archive: {what}", reason="bad_archive")


def _capped(pieces: Iterator[bytes], name: str, max_bytes: int) -> Iterator[bytes]:
    """`pieces`, stopped with an error once they add up to more than `max_bytes`."""
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > max_bytes:
            raise BadResponseError(
                f"{name} inflates to more than max_decompressed_bytes = {max_bytes}: not read "
                "further (raise the setting if the file is genuine)",
                reason="too_large",
            )
        yield piece


def _inflate(decompressor: zlib._Decompress, data: bytes, name: str) -> Iterator[bytes]:
    """Feed `data` to `decompressor`, taking out at most PIECE_BYTES at a time."""
    while not decompressor.eof:
        try:
            out = decompressor.decompress(data, PIECE_BYTES)
        except zlib.error as exc:
            raise _bad(name, f"corrupt compressed data ({exc})") from None
        if out:
            yield out
        data = decompressor.unconsumed_tail
        if not data and len(out) < PIECE_BYTES:
            return  # input used up and nothing held back: the next chunk goes on


def _gunzip(chunks: Iterator[bytes], name: str) -> Iterator[bytes]:
    """gzip, members one after another (as `cat a.gz b.gz` makes), zero padding allowed."""
    decompressor = zlib.decompressobj(wbits=31)  # 16 + 15: gzip header and trailer checked
    empty = True
    for chunk in chunks:
        data = chunk
        while data:
            if decompressor.eof:
                data = data.lstrip(b"\x00")  # padding after a member
                if not data:
                    break
                decompressor = zlib.decompressobj(wbits=31)  # the next member
            empty = False
            yield from _inflate(decompressor, data, name)
            data = decompressor.unused_data if decompressor.eof else b""
    if empty:
        raise _bad(name, "the file is empty")
    if not decompressor.eof:
        raise _bad(name, "it ends before its compressed data does (cut short?)")


class _Bytes:
    """A byte stream over chunks: a few bytes at a time (zip headers) or a chunk at a time."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def exactly(self, n: int) -> bytes:
        """The next `n` bytes; fewer only where the stream ends (b"" at its end)."""
        while len(self._buffer) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def chunk(self) -> bytes:
        """Whatever comes next; b"" at the end."""
        if self._buffer:
            out, self._buffer = self._buffer, b""
            return out
        return next(self._chunks, b"")

    def push_back(self, data: bytes) -> None:
        self._buffer = data + self._buffer


def _unzip(stream: _Bytes, name: str) -> Iterator[bytes]:
    """The one file of a zip archive, read front to back by its local headers.

    Directory entries are passed over; a second file is an error (which one would be the
    feed?). Deflate or stored, with or without a data descriptor after the data (stored
    only without: its end is known from the header alone), zip64 sizes, CRC-32 checked.
    The central directory at the end repeats what the local headers said: not read.
    """
    found = ""
    while True:
        signature = stream.exactly(4)
        if signature in (_ZIP_CENTRAL, _ZIP_END):
            break  # every member has been read
        if not signature:
            raise _bad(name, "it ends before its central directory (cut short?)")
        if signature != _ZIP_LOCAL:
            raise _bad(name, "not a zip file" if not found else "garbage after its file")
        head = signature + stream.exactly(_ZIP_HEADER.size - 4)
        if len(head) < _ZIP_HEADER.size:
            raise _bad(name, "a zip header is cut short")
        _, _, flags, method, _, _, crc, size, _, name_len, extra_len = _ZIP_HEADER.unpack(head)
        member = stream.exactly(name_len).decode("utf-8", "replace")
        extra = stream.exactly(extra_len)
        fields = _extra_fields(extra)
        zip64 = _ZIP64_EXTRA in fields
        if zip64 and size == 0xFFFFFFFF and len(fields[_ZIP64_EXTRA]) >= 16:
            # The zip64 field holds the original size, then the compressed one.
            size = struct.unpack_from("<Q", fields[_ZIP64_EXTRA], 8)[0]
        if flags & _ZIP_ENCRYPTED:
            raise _bad(name, f"{member!r} in it is encrypted")
        is_dir = member.endswith("/")
        if found and not is_dir:
            raise _bad(name, f"it holds more than one file ({found!r}, {member!r}): unzip it")
        found = found or ("" if is_dir else member)
        checksum = 0
        for piece in _member_data(stream, name, member, flags, method, size):
            checksum = zlib.crc32(piece, checksum)
            if not is_dir:
                yield piece
        if flags & _ZIP_HAS_DESCRIPTOR:
            crc = _descriptor_crc(stream, name, zip64)
        if checksum != crc:
            raise _bad(name, f"{member!r} in it fails its CRC-32 check")
    if not found:
        raise _bad(name, "it holds no file")


def _member_data(
    stream: _Bytes, name: str, member: str, flags: int, method: int, size: int
) -> Iterator[bytes]:
    if method == _ZIP_DEFLATED:
        decompressor = zlib.decompressobj(wbits=-15)  # raw deflate
        while not decompressor.eof:
            data = stream.chunk()
            if not data:
                raise _bad(name, f"{member!r} in it is cut short")
            yield from _inflate(decompressor, data, name)
        stream.push_back(decompressor.unused_data)
    elif method == _ZIP_STORED and not flags & _ZIP_HAS_DESCRIPTOR:
        left = size
        while left:
            data = stream.exactly(min(left, PIECE_BYTES))
            if not data:
                raise _bad(name, f"{member!r} in it is cut short")
            left -= len(data)
            yield data
    else:
        raise _bad(name, f"{member!r} in it uses compression method {method}: only deflate")


def _extra_fields(extra: bytes) -> dict[int, bytes]:
    """A local header's extra field, by header id."""
    fields: dict[int, bytes] = {}
    at = 0
    while at + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, at)
        fields[field_id] = extra[at + 4 : at + 4 + length]
        at += 4 + length
    return fields


def _descriptor_crc(stream: _Bytes, name: str, zip64: bool) -> int:
    """The CRC-32 in the data descriptor after a member's data; its sizes are passed over."""
    head = stream.exactly(4)
    if head == _ZIP_DESCRIPTOR:  # the signature is optional
        head = stream.exactly(4)
    sizes = stream.exactly(16 if zip64 else 8)
    if len(head) < 4 or len(sizes) < (16 if zip64 else 8):
        raise _bad(name, "its data descriptor is cut short")
    crc: int = struct.unpack("<I", head)[0]
    return crc
