"""IdRanges: the per-response set of handled IDs, compared against a plain set."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamer.cursor import IdRanges


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=300))
def test_behaves_like_a_set(ids: list[int]) -> None:
    ranges, reference = IdRanges(), set()
    for n in ids:
        assert ranges.add(n) == (n not in reference)
        reference.add(n)


def test_contiguous_ids_stay_one_range() -> None:
    ranges = IdRanges()
    for n in range(1, 100_001):
        ranges.add(n)
    assert len(ranges) == 1


def test_gaps_filled_out_of_order_merge() -> None:
    ranges = IdRanges()
    for n in (1, 3, 5, 2, 4):
        ranges.add(n)
    assert len(ranges) == 1


@given(
    st.lists(st.integers(min_value=1, max_value=200), max_size=100),
    st.lists(st.integers(min_value=1, max_value=200), max_size=100),
    st.integers(min_value=0, max_value=200),
)
def test_compacted_ranges_behave_the_same(before: list[int], after: list[int], cut: int) -> None:
    plain, packed = IdRanges(), IdRanges()
    for n in before:
        plain.add(n)
        packed.add(n)
    packed.compact()  # arrays of 64-bit integers from here on
    assert packed == plain
    for n in after:
        assert packed.add(n) == plain.add(n)
    packed.add_range(cut, cut + 3)
    plain.add_range(cut, cut + 3)
    packed.discard_through(cut)
    plain.discard_through(cut)
    assert list(packed) == list(plain)
    assert all((n in packed) == (n in plain) for n in range(202))
