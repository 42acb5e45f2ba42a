"""Hypothesis strategies for rows: text that looks like each field, near misses included."""

from __future__ import annotations

from datetime import UTC, date, timedelta, timezone

from hypothesis import strategies as st

from streamer.records import FIELDS, Row

# Text that looks like each field, near misses included: what a fast path must not take
# for something else.
_digits = st.text("0123456789", min_size=0, max_size=20)
_noise = st.text(" 0123456789-:/.+TZUCGMa\u0660\u00b2", max_size=22)
_dates = st.one_of(
    st.dates().map(date.isoformat),
    st.dates().map(lambda d: d.strftime("%d/%m/%Y")),
    st.dates().map(lambda d: d.strftime("%Y%m%d")),
    _noise,
)
_times = st.one_of(
    st.times().map(lambda t: t.isoformat(timespec="seconds")),
    st.times().map(lambda t: t.isoformat()),
    st.times().map(lambda t: t.strftime("%H:%M")),
    st.sampled_from(["24:00:00", "12:34+05", "12:34:5Z", "1:02:03", " 12:34:56", "12:34:56 "]),
    _noise,
)
_datetimes = st.one_of(
    st.datetimes().map(lambda d: d.isoformat(sep=" ", timespec="seconds")),
    st.datetimes().map(lambda d: d.isoformat(timespec="seconds") + "Z"),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=13))])).map(
        lambda d: d.isoformat(sep=" ")
    ),
    st.sampled_from(
        ["2024-03-05 12+05:00", "2024-03-05 12:34:5Z", "2024-W10-2 12:34:56", "2024-03-05 24:00:00"]
    ),
    _noise,
)
_amounts = st.one_of(
    st.decimals(min_value=-(10**12), max_value=10**12, places=6).map(str),
    st.decimals(allow_nan=True, places=8).map(str),
    st.sampled_from(["", "0", "-0", "$1,234.50", "1e3", "0.0000001", " 12 "]),
    _noise,
)
_offsets = st.one_of(
    st.sampled_from(["13", "12", "12.75", "+12:45", "-1", "13.00", "14", "15", "12.7", "+1245"]),
    _noise,
)
_counts = st.one_of(_digits, st.sampled_from(["", "12.0", " 7", "-1", "1234567890"]), _noise)
_text = st.text(max_size=12)


@st.composite
def rows(draw: st.DrawFn) -> Row:
    values = {name: draw(_text) for name in FIELDS}
    values.update(
        ID=draw(st.one_of(st.integers(1, 10**18).map(str), _counts)),
        AccountCode=draw(st.one_of(st.text("0123456789", min_size=1, max_size=8), _text)),
        BillDate=draw(_dates),
        Date=draw(_dates),
        Time=draw(_times),
        UTCDateTime=draw(_datetimes),
        UTCOffset=draw(_offsets),
        Seconds=draw(_counts),
        NetworkSeconds=draw(_counts),
        ConnectSeconds=draw(_counts),
        Charge=draw(_amounts),
        ChargeExcl=draw(_amounts),
        FreeUnitsUsed=draw(_amounts),
    )
    if draw(st.booleans()):
        del values[draw(st.sampled_from(FIELDS))]
    return Row(values, "raw")
