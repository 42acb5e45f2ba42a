"""Realistic CDRs for encoding tests, edge values included, typed the way the feed's rows are."""

from __future__ import annotations

from streamer.records import FIELDS, CallRecord, Row, to_record

# One line per record, in the provider's field order (FIELDS).
_ROWS: tuple[tuple[str, ...], ...] = (
    # An ordinary mobile call in NZDT.
    ("5001", "81234567", "outbound", "Mobile", "2024-04-01", "2024-03-05", "13:45:12",
     "2024-03-05 00:45:12", "13", "6493001234", "6421555123", "6493001234", "120", "97", "4",
     "0.330625", "0.2875", "0", "Mobile", "Call to Mobile - Spark", "0016", "Ok", "Business",
     "Default", "Default", "Default"),
    # Chatham Islands: UTC+12:45 in standard time, the one quarter-hour offset.
    ("5002", "81234568", "outbound", "National", "2024-07-01", "2024-06-12", "08:05:00",
     "2024-06-11 19:20:00", "12.75", "6433050123", "6444990001", "6433050123", "60", "41", "2",
     "0.115", "0.1", "0", "Wellington", "National call - Wellington", "0016", "Ok", "Chatham",
     "Islands", "Default", "Default"),
    # The largest charge decimal(18,6) holds, and a bundle's free units.
    ("5003", "81234569", "outbound", "International", "2024-04-01", "2024-03-30", "23:59:59",
     "2024-03-30 10:59:59", "13", "6495550000", "441632960001", "6495550000", "14400", "14399",
     "9", "999999999999.999999", "869565217391.304347", "240.5", "United Kingdom",
     "United Kingdom - Sheffield", "0016", "Ok", "Global", "Default", "Default", "Default"),
    # Non-ASCII text (macrons, an em dash, symbols outside the BMP) and a busy outcome.
    ("5004", "8123ā567", "inbound", "0800", "2024-05-01", "2024-04-20", "00:00:00",
     "2024-04-19 12:00:00", "12", "6421000111", "0800123456", "0800123456", "0", "0", "17",
     "0", "0", "0", "Whangārei — Ōtautahi 📞", "Freephone call from mobile ☎", "0017", "Busy",
     "Freephone", "Te Ika-a-Māui", "Ngā Kāinga", "Māori TV"),
    # A service fee: no numbers called, no release cause, a monthly charge.
    ("5005", "81234567", "outbound", "Service", "2024-05-01", "2024-05-01", "00:00:00",
     "2024-04-30 12:00:00", "12", "", "", "6493001234", "0", "0", "0", "80.4885", "69.99",
     "0", "Broadband", "Broadband for 6493001234, May 2024", "", "Ok", "Business", "Default",
     "Default", "Default"),
    # A credit: a negative charge.
    ("5006", "81234567", "outbound", "Service", "2024-05-01", "2024-05-01", "00:00:00",
     "2024-04-30 12:00:00", "12", "", "", "6493001234", "0", "0", "0", "-28.75", "-25",
     "0", "Credit - Number rental", "Number rental for 6493001234, May 2024", "", "Ok",
     "Business", "Default", "Default", "Default"),
)  # fmt: skip


def sample_records() -> list[CallRecord]:
    """The rows above as typed records (each one must type cleanly)."""
    records = []
    for values in _ROWS:
        record = to_record(Row(dict(zip(FIELDS, values, strict=True)), ",".join(values)))
        assert isinstance(record, CallRecord), record
        records.append(record)
    return records
