"""Compressed CDR files (streamer/sources/compression.py): streamed, checked, capped."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.errors import BadResponseError
from streamer.formats import parse_rows
from streamer.records import Rejection
from streamer.simulator import SimulatorConfig, write_files
from streamer.sources.compression import PIECE_BYTES, compression_of, decompressed
from streamer.sources.files import format_of


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets, as a file server's reads would come."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def inflate(chunks: list[bytes], name: str, **kw: int) -> bytes:
    return b"".join(decompressed(chunks, name, **kw))


class _Unseekable(io.RawIOBase):
    """A sink zipfile cannot seek back in: it then writes data descriptors, as streams do."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def zipped(
    members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED, *, stream: bool = False
) -> bytes:
    sink: io.BytesIO | _Unseekable = _Unseekable() if stream else io.BytesIO()
    with zipfile.ZipFile(sink, "w", method) as archive:  # type: ignore[arg-type]
        for name, body in members.items():
            if stream:
                with archive.open(name, "w") as f:
                    f.write(body)
            else:
                archive.writestr(name, body)
    return bytes(sink.data) if isinstance(sink, _Unseekable) else sink.getvalue()


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stem", "kind", "fmt"),
    [
        ("cdr_20240301_0000.csv.gz", "cdr_20240301_0000.csv", "gz", "csv"),
        ("cdr_20240301_0000.TXT.GZ", "cdr_20240301_0000.TXT", "gz", "txt"),
        ("cdr_20240301_0000.json.zip", "cdr_20240301_0000.json", "zip", "json"),
        ("cdr_20240301_0000.psv.gzip", "cdr_20240301_0000.psv", "gz", "pipe"),
        ("cdr_20240301_0000.csv", "cdr_20240301_0000.csv", None, "csv"),
        ("cdr_20240301_0000.gz", "cdr_20240301_0000", "gz", None),
    ],
)
def test_the_format_is_read_through_the_compression_suffix(
    name: str, stem: str, kind: str | None, fmt: str | None
) -> None:
    assert compression_of(name) == (stem, kind)
    assert format_of(name, "auto") == fmt
    assert format_of(name, "pipe") == "pipe"


def test_a_plain_file_passes_untouched() -> None:
    chunks = [b"ID,AccountCode\n", b"1,8"]
    assert list(decompressed(chunks, "cdr_1.csv")) == chunks


# --- gzip ------------------------------------------------------------------------------------


@given(st.binary(max_size=5000), st.lists(st.integers(min_value=0), max_size=8))
def test_gzip_round_trips_however_the_bytes_arrive(data: bytes, cuts: list[int]) -> None:
    assert inflate(pieces(gzip.compress(data), cuts), "f.csv.gz") == data


def test_gzip_members_one_after_another_and_zero_padding() -> None:
    data = gzip.compress(b"1,a\n") + gzip.compress(b"2,b\n") + b"\x00" * 7
    assert inflate(pieces(data, [3, 20, 30]), "f.csv.gz") == b"1,a\n2,b\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the file is empty"),
        (gzip.compress(b"x" * 5000)[:-4], "cut short"),
        (gzip.compress(os.urandom(5000))[:100], "cut short"),
        (b"ID,AccountCode\n1,8\n", "corrupt compressed data"),
        (b"\x1f\x8b\x08\x00" + b"\xff" * 60, "corrupt compressed data"),
        (gzip.compress(b"1,a\n")[:-8] + b"\x00\x00\x00\x00\x04\x00\x00\x00", "corrupt"),
        (gzip.compress(b"1,a\n") + b"junk", "corrupt compressed data"),
    ],
    ids=["empty", "no-trailer", "cut", "not-gzip", "bad-deflate", "bad-crc", "trailing-junk"],
)
def test_a_bad_gzip_file_is_a_bad_archive(data: bytes, message: str) -> None:
    with pytest.raises(BadResponseError, match=message) as info:
        inflate([data], "cdr_1.csv.gz")
    assert info.value.reason == "bad_archive"
    assert "cdr_1.csv.gz" in str(info.value)


def inflates_or_is_a_bad_archive(data: bytes, name: str) -> str:
    """'ok', or the reason of the BadResponseError; any other exception fails the test."""
    try:
        inflate([data], name)
    except BadResponseError as exc:
        return exc.reason
    return "ok"


@given(st.binary(max_size=300))
def test_any_bytes_as_gzip_inflate_or_raise_a_bad_archive(data: bytes) -> None:
    assert inflates_or_is_a_bad_archive(data, "f.gz") in ("ok", "bad_archive")


def test_a_bomb_stops_at_the_cap_in_small_pieces() -> None:
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 100_000
    sizes: list[int] = []

    def read_all() -> None:
        for piece in decompressed([bomb], "bomb.csv.gz", max_bytes=16 << 20):
            sizes.append(len(piece))

    with pytest.raises(BadResponseError, match="max_decompressed_bytes = 16777216") as info:
        read_all()
    assert info.value.reason == "too_large"
    assert max(sizes) <= PIECE_BYTES  # memory stays bounded, whatever the ratio
    assert sum(sizes) <= 16 << 20
    # Just under the cap is read whole.
    assert len(inflate([gzip.compress(bytes(1000))], "f.gz", max_bytes=1000)) == 1000


def test_a_compressed_feed_file_parses_like_the_plain_one(tmp_path: Path) -> None:
    config = SimulatorConfig(password="-", seed=3)
    [plain] = write_files(config, tmp_path, cadence="daily", fmt="txt", upto_id=300)
    [packed] = write_files(config, tmp_path, cadence="daily", fmt="txt", upto_id=300, compress="gz")
    assert packed.name == f"{plain.name}.gz"
    inflated = decompressed(pieces(packed.read_bytes(), [10, 999, 5000]), packed.name)
    rows = [r for r in parse_rows(inflated, "txt") if not isinstance(r, Rejection)]
    assert rows == [
        r for r in parse_rows([plain.read_bytes()], "txt") if not isinstance(r, Rejection)
    ]
    assert len(rows) == 300


# --- zip -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "stream"),
    [(zipfile.ZIP_DEFLATED, False), (zipfile.ZIP_STORED, False), (zipfile.ZIP_DEFLATED, True)],
    ids=["deflated", "stored", "deflated-with-data-descriptor"],
)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_a_one_file_zip_round_trips(
    method: int, stream: bool, data: bytes, cuts: list[int]
) -> None:
    archive = zipped({"cdr_1.csv": data}, method, stream=stream)
    assert inflate(pieces(archive, cuts), "cdr_1.csv.zip") == data


def test_directory_entries_in_a_zip_are_passed_over() -> None:
    archive = zipped({"out/": b"", "out/cdr_1.csv": b"1,a\n"})
    assert inflate([archive], "cdr_1.csv.zip") == b"1,a\n"


def test_a_zip64_member_is_read() -> None:
    sink = io.BytesIO()
    with (
        zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("cdr_1.csv", "w", force_zip64=True) as f,
    ):
        f.write(b"1,a\n" * 1000)
    assert inflate([sink.getvalue()], "cdr_1.csv.zip") == b"1,a\n" * 1000


def _corrupt_crc(archive: bytes) -> bytes:
    data = bytearray(archive)
    data[14] ^= 0xFF  # the local header's CRC-32
    return bytes(data)


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (zipped({"a.csv": b"1", "b.csv": b"2"}), "more than one file"),
        (zipped({}), "holds no file"),
        (zipped({"out/": b""}), "holds no file"),
        (zipped({"a.csv": os.urandom(2000)})[:600], "cut short"),
        (zipped({"a.csv": b"1,a\n" * 100})[:20], "cut short"),
        (_corrupt_crc(zipped({"a.csv": b"1,a\n"})), "CRC-32"),
        (gzip.compress(b"1,a\n"), "not a zip file"),
        (zipped({"a.csv": b"x"}, zipfile.ZIP_BZIP2), "compression method 12"),
        (b"", "ends before its central directory"),
    ],
    ids=["two", "empty", "only-a-directory", "cut-data", "cut-header", "crc", "gzip", "bzip2",
         "nothing"],
)  # fmt: skip
def test_a_bad_zip_file_is_a_bad_archive(archive: bytes, message: str) -> None:
    with pytest.raises(BadResponseError, match=message) as info:
        inflate([archive], "cdr_1.csv.zip")
    assert info.value.reason == "bad_archive"


def test_an_encrypted_zip_is_a_bad_archive() -> None:
    data = bytearray(zipped({"a.csv": b"1,a\n"}))
    data[6] |= 0x01  # the encrypted flag: zipfile writes no encrypted archives itself
    with pytest.raises(BadResponseError, match="encrypted"):
        inflate([bytes(data)], "cdr_1.csv.zip")


@given(st.binary(max_size=300))
def test_any_bytes_as_zip_inflate_or_raise_a_bad_archive(data: bytes) -> None:
    assert inflates_or_is_a_bad_archive(b"PK\x03\x04" + data, "f.zip") in ("ok", "bad_archive")
