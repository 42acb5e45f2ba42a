"""streamer.limits: Content-Encoding undone within bounds; a bomb is an error, never memory."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable

import pytest

from streamer.errors import BadResponseError
from streamer.limits import CHUNK_BYTES, BodyLimits, capped, decode_content

DATA = os.urandom(40_000).hex().encode()  # 80 kB (over one CHUNK_BYTES) that compress 2x


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODED = [
    pytest.param("", DATA, id="identity"),
    pytest.param("identity", DATA, id="identity-named"),
    pytest.param("gzip", gzip.compress(DATA), id="gzip"),
    pytest.param("x-gzip", gzip.compress(DATA), id="x-gzip"),
    pytest.param("GZIP", gzip.compress(DATA), id="gzip-upper-case"),
    pytest.param("deflate", zlib.compress(DATA), id="deflate-zlib"),
    pytest.param("deflate", raw_deflate(DATA), id="deflate-raw"),
    pytest.param("gzip, gzip", gzip.compress(gzip.compress(DATA)), id="gzip-gzip"),
    pytest.param("deflate, gzip", gzip.compress(zlib.compress(DATA)), id="deflate-then-gzip"),
    pytest.param("gzip", gzip.compress(DATA[:999]) + gzip.compress(DATA[999:]), id="two-members"),
    pytest.param("gzip", gzip.compress(DATA) + b"\0" * 8, id="zero-padding"),
]


@pytest.mark.parametrize(("encoding", "body"), ENCODED)
@pytest.mark.parametrize("size", [1, 2, 1000, 1 << 20])
def test_every_encoding_is_undone_however_the_body_is_split(
    encoding: str, body: bytes, size: int
) -> None:
    out = list(decode_content(pieces(body, size), encoding, BodyLimits(), where="/f"))
    assert b"".join(out) == DATA
    assert max(len(chunk) for chunk in out) <= max(CHUNK_BYTES, size)


def consume(chunks: Iterable[bytes], sizes: list[int]) -> None:
    """Read every chunk (as a parser would), noting each one's size."""
    for chunk in chunks:
        sizes.append(len(chunk))


def zeros_gzip(n_mib: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b"\0" * (1 << 20)
    return b"".join([compressor.compress(block) for _ in range(n_mib)] + [compressor.flush()])


def test_a_gzip_gzip_bomb_fails_after_a_bounded_amount_of_output() -> None:
    bomb = gzip.compress(zeros_gzip(64))  # 64 MiB of zeros in a few hundred bytes
    assert len(bomb) < 1000
    sizes: list[int] = []
    with pytest.raises(BadResponseError, match="decompression bomb") as info:
        consume(decode_content(pieces(bomb, 512), "gzip, gzip", BodyLimits(), where="/f"), sizes)
    assert info.value.reason == "too_compressed"
    assert max(sizes) <= CHUNK_BYTES
    assert sum(sizes) < 2 << 20  # stopped just past the 1 MiB grace, not at 64 MiB


def test_a_big_decoded_body_fails_at_max_bytes() -> None:
    limits = BodyLimits(max_bytes=5 << 20, max_expansion_ratio=1e9)
    sizes: list[int] = []
    with pytest.raises(BadResponseError, match="max_body_bytes") as info:
        consume(decode_content(pieces(zeros_gzip(64), 4096), "gzip", limits, where="/f"), sizes)
    assert info.value.reason == "too_large"
    assert 4 << 20 < sum(sizes) <= 5 << 20


def test_an_identity_body_fails_at_max_bytes_and_is_not_judged_by_ratio() -> None:
    limits = BodyLimits(max_bytes=1000, max_expansion_ratio=1)
    assert b"".join(decode_content([b"x" * 1000], "", limits, where="/f")) == b"x" * 1000
    with pytest.raises(BadResponseError, match="more than 1000 bytes"):
        list(decode_content([b"x" * 600, b"x" * 600], "", limits, where="/f"))


def test_a_small_body_may_expand_beyond_the_ratio_within_the_grace() -> None:
    # An empty page with its header row, gzipped, easily expands 5x or more.
    body = gzip.compress(b"\n" * 500_000)
    assert b"".join(decode_content([body], "gzip", BodyLimits(), where="/f")) == b"\n" * 500_000


@pytest.mark.parametrize(
    ("encoding", "body", "reason"),
    [
        ("gzip", b"not gzip at all", "bad_encoding"),
        ("deflate", b"\xff\xfe not deflate", "bad_encoding"),
        ("br", b"whatever", "bad_encoding"),
        ("gzip, gzip, gzip, gzip", b"", "bad_encoding"),
        ("gzip", gzip.compress(DATA)[:-30], "truncated"),
        ("gzip", gzip.compress(DATA) + b"trailing junk", "bad_encoding"),
    ],
)
def test_what_cannot_be_undone_is_a_bad_response(encoding: str, body: bytes, reason: str) -> None:
    with pytest.raises(BadResponseError) as info:
        list(decode_content([body], encoding, BodyLimits(), where="/f"))
    assert info.value.reason == reason


def test_an_empty_compressed_body_is_an_empty_body() -> None:
    assert list(decode_content([], "gzip", BodyLimits(), where="/f")) == []


def test_capped_passes_chunks_through_and_fails_past_the_cap() -> None:
    def chunks() -> Iterable[bytes]:
        yield b"a" * 10
        yield b"b" * 10
        raise AssertionError("read past the cap")

    sizes: list[int] = []
    with pytest.raises(BadResponseError, match="max_file_bytes") as info:
        consume(capped(chunks(), 15, where="f.csv", setting="max_file_bytes"), sizes)
    assert sizes == [10]
    assert info.value.reason == "too_large"


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_expansion_ratio": 0.5}, {"max_expansion_ratio": float("nan")}],
)
def test_limits_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        BodyLimits(**kwargs)  # type: ignore[arg-type]
