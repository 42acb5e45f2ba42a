"""cdr-streamer: turn a telecom Billing Feed into a stream of Avro events on Kafka."""

from __future__ import annotations

__version__ = "0.1.0"
