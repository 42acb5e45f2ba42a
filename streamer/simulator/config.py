"""The simulator's settings: a frozen SimulatorConfig with every variant and fault; constants."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal, get_args

from streamer.errors import ConfigError

logger = logging.getLogger("streamer.simulator")  # one name for the whole simulator

PATH = "/billingfeed.php"
AUCKLAND = "Pacific/Auckland"
CHATHAM = "Pacific/Chatham"
DEFAULT_START = datetime(2024, 3, 1, tzinfo=UTC)  # crosses the NZ DST end on 2024-04-07
SERVICE_CALL_TYPE = "Service"  # CallType of service fees (number rental, broadband, fixed charges)
AUTH_FAILURE_TEXT = "Invalid login or password"
NO_RECORDS_TEXT = "No records found"  # the body of empty_style "text"
# How text the encodings cp1252 and Latin-1 cannot hold is written in them (see `encoding`).
DIAERESIS = str.maketrans("ĀāĒēĪīŌōŪū", "ÄäËëÏïÖöÜü")

FORMATS: tuple[str, ...] = ("csv", "txt", "pipe", "json")
DELIMITERS: Mapping[str, str] = {"csv": ",", "txt": "\t", "pipe": "|"}
NUMERIC_FIELDS = frozenset(
    {"ID", "Seconds", "NetworkSeconds", "ConnectSeconds", "Charge", "ChargeExcl",
     "FreeUnitsUsed", "UTCOffset"}
)  # fmt: skip
FAULTS: tuple[str, ...] = (
    "500", "503", "429", "truncate", "truncate_chunked", "html", "auth_text200", "auth_html200",
    "latency", "cut_last_line", "stall",
)  # fmt: skip
MALFORMATIONS: tuple[str, ...] = (
    "bad_date", "bad_time", "bad_id", "wrong_field_count", "empty_account", "bad_decimal",
)  # fmt: skip

# Valid CDRs that are odd in a way Kafka or its consumers care about (`odd_rows`):
# a call time 2 h ahead of now (provider clock skew), one before 1970, a 3,000-character
# description of 30,000 random letters (an event over a small max.message.bytes).
# And one broken way that no retry can mend: "no_id", the row written without its ID.
ODDITIES: tuple[str, ...] = ("future_utc", "before_1970", "long_text", "no_id")

DateStyle = Literal["iso", "nz"]
DateTimeStyle = Literal["space", "iso_t", "iso_z", "offset", "nz"]
# No rows: an empty body, the header row alone, HTTP 204, the text NO_RECORDS_TEXT, or
# (json; the others: empty) `null`, what PHP's json_encode makes of no result.
EmptyStyle = Literal["empty", "header", "no_content", "text", "null"]
AuthFailureStyle = Literal["text200", "html200", "401", "403"]
# The bytes of delimited bodies and files (json is ASCII: \u escapes, as PHP writes it).
BodyEncoding = Literal["utf-8", "cp1252", "latin-1"]
Transfer = Literal["auto", "chunked", "length", "close"]
# "none", or the format whose responses are rendered once, at start, and then served from memory.
Prerender = Literal["none", "csv", "txt", "pipe", "json"]

MONEY = Decimal("0.0001")
GST = Decimal("1.15")
ZERO = Decimal(0)
# Local offsets in New Zealand lie within [+12:00, +13:45]: a UTC window this much wider
# than a local day or hour holds every CDR of that day or hour, whatever the zone or DST.
MAX_OFFSET = timedelta(hours=14)
MIN_OFFSET = timedelta(hours=12)


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Everything the simulator does, with defaults that behave like a quiet, healthy provider."""

    password: str = field(repr=False)
    login: str = "81234567"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    # Data
    seed: int = 1
    backlog: int = 1000  # CDRs that exist at start: IDs 1..backlog
    rate_per_s: float = 0.0  # new CDRs per second of wall-clock time after construction
    start: datetime = DEFAULT_START  # UTC time of CDR 0; CDR n is at start + n * mean_gap_s
    mean_gap_s: float = 30.0
    jitter_s: int = 20  # each CDR's time is off its slot by up to this many seconds either way
    accounts: int = 50
    malformed_rate: float = 0.0  # share of IDs whose row is always written broken
    # An exchange fault: every call from this ID on ends Busy or Unallocated (0: never).
    # For demos and tests of the error-Status metrics and alert; lower IDs are unchanged.
    status_fault_from_id: int = 0
    # "ID:kind,ID:kind": those IDs' CDRs are odd in one of ODDITIES' ways (valid, but odd).
    odd_rows: str = ""
    # Output variants
    max_rows: int | None = None  # provider page cap; None: every matching row
    header: bool = True  # delimited formats only
    date_style: DateStyle = "iso"  # BillDate and Date: YYYY-MM-DD or DD/MM/YYYY
    datetime_style: DateTimeStyle = "space"  # UTCDateTime
    json_numbers: bool = False  # numeric fields as JSON numbers (the decimal text, never a float)
    json_pretty: bool = False
    line_ending: str = "\n"
    bom: bool = False
    quote_all: bool = False
    empty_style: EmptyStyle = "empty"  # no rows (json "[]" unless "no_content", "text", "null")
    unsorted: bool = False  # rows of a response shuffled within each batch
    auth_failure_style: AuthFailureStyle = "text200"
    transfer: Transfer = "auto"  # auto: Content-Length for one batch, chunked beyond
    batch_rows: int = 1000  # rows rendered and written to the socket at a time
    # Characters macron vowels lack in cp1252 and Latin-1 are written with a diaeresis
    # instead (ā -> ä), so such a body holds non-ASCII text in its encoding.
    encoding: BodyEncoding = "utf-8"
    # Rows the provider writes broken on every request, whatever the format, by ID: a JSON
    # element without the comma after its first member, or a delimited row whose TextDesc2
    # opens a quote that never closes.
    broken_row_ids: tuple[int, ...] = ()
    long_row_ids: tuple[int, ...] = ()  # rows whose TextDesc1 is long_row_chars long
    long_row_chars: int = 2 << 20
    # Benchmarks: render the backlog once, at start, in this format, and serve plain requests
    # (no date or call/service filter, no shuffling, no body fault) from memory.
    prerender: Prerender = "none"
    # Faults, drawn per request from a seeded dice (inject() queues deterministic ones)
    latency_s: float = 0.0
    error_rate: float = 0.0  # 500 and 503 alternately
    rate_limit_rate: float = 0.0  # 429 with Retry-After
    retry_after_s: int = 1
    truncate_rate: float = 0.0  # Content-Length short body and chunked without end, alternately
    html_error_rate: float = 0.0  # an HTML error page, status 200 and 500 alternately
    # A PHP time limit: every answer of more than this many rows is cut short inside the
    # batch that passes it, the same way every time (0: never). Smaller answers (a date
    # or hour window, a later cursor) get through.
    cut_after_rows: int = 0
    # Late IDs, the failure of every incrementing-ID source: these rows have their IDs (and
    # call times) but become visible only once `late_by_ids` higher IDs exist, so a cursor
    # has already passed them when they appear (concurrent inserts committed out of order,
    # late-rated calls). `late_ids`: "ID,ID-ID,..."; `late_rate`: a share of all IDs, by seed.
    late_ids: str = ""
    late_rate: float = 0.0
    late_by_ids: int = 100

    def __post_init__(self) -> None:
        problems: list[str] = []

        def check(ok: bool, problem: str) -> None:
            if not ok:
                problems.append(problem)

        check(bool(self.password), "password must not be empty")
        check(bool(self.login), "login must not be empty")
        check(0 <= self.port <= 65535, f"port {self.port} is not 0..65535")
        check(self.backlog >= 0, "backlog must be >= 0")
        check(self.rate_per_s >= 0, "rate_per_s must be >= 0")
        check(self.start.tzinfo is not None, "start must be timezone-aware")
        check(self.mean_gap_s > 0, "mean_gap_s must be > 0")
        check(self.jitter_s >= 0, "jitter_s must be >= 0")
        check(self.accounts >= 2, "accounts must be >= 2")
        check(self.status_fault_from_id >= 0, "status_fault_from_id must be >= 0")
        check(self.max_rows is None or self.max_rows >= 1, "max_rows must be None or >= 1")
        check(self.batch_rows >= 1, "batch_rows must be >= 1")
        check(self.cut_after_rows >= 0, "cut_after_rows must be >= 0")
        check(self.late_by_ids >= 1, "late_by_ids must be >= 1")
        check(self.line_ending in ("\n", "\r\n"), "line_ending must be '\\n' or '\\r\\n'")
        for name, allowed in (
            ("date_style", DateStyle),
            ("datetime_style", DateTimeStyle),
            ("empty_style", EmptyStyle),
            ("auth_failure_style", AuthFailureStyle),
            ("transfer", Transfer),
            ("encoding", BodyEncoding),
            ("prerender", Prerender),
        ):
            choices = get_args(allowed)
            check(getattr(self, name) in choices, f"{name} must be one of {', '.join(choices)}")
        for name in ("broken_row_ids", "long_row_ids"):
            ids = getattr(self, name)
            ok = isinstance(ids, tuple) and all(type(i) is int and i >= 1 for i in ids)
            check(ok, f"{name} must be a tuple of IDs >= 1")
        check(self.long_row_chars >= 1, "long_row_chars must be >= 1")
        check(not (self.bom and self.encoding != "utf-8"), "bom needs encoding utf-8")
        check(self.latency_s >= 0, "latency_s must be >= 0")
        check(self.retry_after_s >= 0, "retry_after_s must be >= 0")
        for name in ("malformed_rate", "error_rate", "rate_limit_rate", "truncate_rate",
                     "html_error_rate", "late_rate"):  # fmt: skip
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be within 0..1")
        try:
            self.odd_row_map()
        except ValueError as exc:
            problems.append(str(exc))
        try:
            self.late_id_ranges()
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("invalid simulator config: " + "; ".join(problems))

    def odd_row_map(self) -> dict[int, str]:
        """`odd_rows` as {ID: kind}; ValueError if it is not "ID:kind,..." with known kinds."""
        out: dict[int, str] = {}
        for part in filter(None, (p.strip() for p in self.odd_rows.split(","))):
            text, _, kind = part.partition(":")
            if not text.isdigit() or kind not in ODDITIES:
                raise ValueError(
                    f"odd_rows entry {part!r} is not ID:kind with kind one of {', '.join(ODDITIES)}"
                )
            out[int(text)] = kind
        return out

    def late_id_ranges(self) -> tuple[tuple[int, int], ...]:
        """`late_ids` as (first, last) pairs; ValueError if it is not "ID,ID-ID,..."."""
        out = []
        for part in filter(None, (p.strip() for p in self.late_ids.split(","))):
            first, _, last = part.partition("-")
            last = last or first
            if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
                raise ValueError(f"late_ids entry {part!r} is not ID or FIRST-LAST")
            out.append((int(first), int(last)))
        return tuple(out)

    @property
    def has_late_ids(self) -> bool:
        return bool(self.late_ids.strip()) or self.late_rate > 0
