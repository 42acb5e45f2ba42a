"""The Publisher against librdkafka's in-process mock cluster: no broker, real client code."""

from __future__ import annotations

from typing import Any

import pytest

from streamer.errors import DeliveryError
from streamer.publisher import POLL_EVERY, Publisher, RejectedMessage, producer_config


def mock_config() -> dict[str, str]:
    config = producer_config("", {"test.mock.num.brokers": "1", "linger.ms": "5"})
    del config["bootstrap.servers"]  # the mock cluster is the bootstrap
    return config


def test_flush_confirms_every_message() -> None:
    publisher = Publisher(mock_config())
    try:
        for i in range(200):
            publisher.produce("events", b"k", f"v{i}".encode(), headers=[("cdr_id", b"1")])
        publisher.flush(30)
        assert publisher.failed == 0  # only failures report (delivery.report.only.error)
        assert publisher.in_flight == 0
    finally:
        publisher.close()


class _PollCounter:
    """The librdkafka producer, counting the polls made on it."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.polls = 0

    def poll(self, timeout: float) -> int:
        self.polls += 1
        return int(self._producer.poll(timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def __len__(self) -> int:
        return len(self._producer)


@pytest.mark.parametrize("transactional", [False, True])
def test_delivery_reports_are_served_every_poll_every_messages_and_all_before_flush_returns(
    transactional: bool,
) -> None:
    tid = "mock-poll" if transactional else None
    publisher = Publisher(mock_config(), transactional_id=tid, init_timeout_s=30)
    counter = _PollCounter(publisher._producer)
    publisher._producer = counter  # type: ignore[assignment]
    try:
        n = 2 * POLL_EVERY + 3
        for i in range(n):
            publisher.produce("events", b"k", f"v{i}".encode())
        assert counter.polls == 2  # not one per message
        publisher.flush(30)
        assert publisher.failed == 0  # flush returned: none failed, none left in flight
        assert publisher.in_flight == 0
    finally:
        publisher._producer = counter._producer
        publisher.close()


def test_a_transaction_commits_on_flush_and_aborts_cleanly() -> None:
    publisher = Publisher(mock_config(), transactional_id="mock-feed", init_timeout_s=30)
    try:
        publisher.produce("events", b"k", b"one")
        assert publisher.in_transaction
        publisher.flush(30)  # commits
        assert not publisher.in_transaction
        assert publisher.failed == 0
        assert publisher.in_flight == 0
        publisher.produce("events", b"k", b"two")
        publisher.abort(30)
        assert not publisher.in_transaction
        assert publisher.usable
    finally:
        publisher.close()


def test_a_probe_in_a_transaction_delivers_nothing_visible_and_reports_no_refusal() -> None:
    publisher = Publisher(mock_config(), transactional_id="mock-probe", init_timeout_s=30)
    try:
        message = RejectedMessage("events", b"k", b"v", [("cdr_id", b"9")], 0, "")
        assert publisher.probe([message], 30) == []
        assert not publisher.in_transaction  # the probe's transaction was aborted
    finally:
        publisher.close()


def test_an_unreachable_cluster_is_a_delivery_error_not_a_hang() -> None:
    config = producer_config("127.0.0.1:1", {"message.timeout.ms": "500"})
    publisher = Publisher(config)
    try:
        publisher.produce("events", b"k", b"v")
        with pytest.raises(DeliveryError):
            publisher.flush(5)
    finally:
        publisher.close(0)


def _threads() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_close_frees_the_client_at_once_even_with_messages_it_cannot_send() -> None:
    before = _threads()
    publisher = Publisher(mock_config())
    publisher.produce("events", b"k", b"v")
    publisher.flush(30)
    assert _threads() > before  # librdkafka's own threads
    stuck = Publisher(producer_config("127.0.0.1:1", {"message.timeout.ms": "60000"}))
    stuck.produce("events", b"k", b"never delivered")
    publisher.close()
    stuck.close(0.1)  # its message would keep close() waiting without limit
    assert _threads() == before
    stuck.poll()  # a scrape may still poll a closed producer: nothing happens
