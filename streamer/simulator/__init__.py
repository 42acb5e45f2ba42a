"""The fake billing feed: a deterministic, streaming stand-in for the provider's billingfeed.php.

Layers, each usable on its own (one module each):

    config   SimulatorConfig: every output variant and fault, validated up front
    data     CdrGenerator: (seed, cdr_id) -> one CDR row; nothing stored: a 10M backlog is free
    store    FeedStore: which IDs exist (backlog + growth over time) and the query over them
    render   rows -> response bytes for each format and variant (or prerendered for benchmarks)
    http     BillingFeedSimulator: the HTTP endpoint: parameters, auth, faults, request log
    files    write_files: the provider's file delivery (SFTP, FTP)
    cli      the `simulate` and `simulate-files` commands

The provider documents the parameters and the 26 fields but not the text layout, the
error responses or the framing, so every such choice here is a `SimulatorConfig` variant
that tests and demos can switch, and faults are injectable one request at a time.
"""

from streamer.simulator.config import (
    AUCKLAND,
    AUTH_FAILURE_TEXT,
    CHATHAM,
    DELIMITERS,
    DIAERESIS,
    FAULTS,
    FORMATS,
    MALFORMATIONS,
    NO_RECORDS_TEXT,
    PATH,
    SERVICE_CALL_TYPE,
    SimulatorConfig,
)
from streamer.simulator.data import CdrGenerator
from streamer.simulator.files import CADENCES, file_name, write_files
from streamer.simulator.http import BillingFeedSimulator, RequestRecord, serve
from streamer.simulator.store import FeedQuery, FeedStore

__all__ = [
    "AUCKLAND",
    "AUTH_FAILURE_TEXT",
    "CADENCES",
    "CHATHAM",
    "DELIMITERS",
    "DIAERESIS",
    "FAULTS",
    "FORMATS",
    "MALFORMATIONS",
    "NO_RECORDS_TEXT",
    "PATH",
    "SERVICE_CALL_TYPE",
    "BillingFeedSimulator",
    "CdrGenerator",
    "FeedQuery",
    "FeedStore",
    "RequestRecord",
    "SimulatorConfig",
    "file_name",
    "serve",
    "write_files",
]
