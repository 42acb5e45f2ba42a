"""The Kafka side: topic provisioning, the producer, delivery reports, flush, transactions.

Delivery reports arrive through `poll()`/`flush()`. The callbacks only count and
latch the first error (callbacks never raise); `flush()` and `commit()` raise it,
so the caller never commits a cursor over an unconfirmed event.

librdkafka's error classes decide what happens next (see its INTRODUCTION.md):
a *fatal* error (e.g. the idempotent producer lost its sequence) makes this
producer instance useless, so `DeliveryError(needs_new_producer=True)`; a
*fenced* transactional producer means another instance took over the feed, so
`FencedError`, which stops the feed; anything else is retriable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

# These two are not re-exported by confluent_kafka.admin's typed interface.
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.cimpl import NewTopic

from streamer.errors import DeliveryError, FencedError, MessagesRejectedError, TopicError

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("librdkafka")

# Our settings win over user overrides for these, because the guarantees rest on them.
REQUIRED_PRODUCER_CONFIG: dict[str, str] = {
    "enable.idempotence": "true",  # implies acks=all and ordered, de-duplicated retries
    "acks": "all",
    # The Java client's default partitioner: a Java consumer or Kafka Streams app
    # keyed by AccountCode finds each account on the same partition we chose.
    "partitioner": "murmur2_random",
}
DEFAULT_PRODUCER_CONFIG: dict[str, str] = {
    "compression.type": "lz4",
    "linger.ms": "20",
    "batch.num.messages": "10000",
    "queue.buffering.max.kbytes": "65536",  # bounds memory: produce() waits when full
    # A transaction (a checkpoint's batch, or a whole response without ids_ascending) must
    # commit within this, or the broker aborts it and fences us. 15 min is the broker's
    # default transaction.max.timeout.ms.
    "transaction.timeout.ms": "900000",
    "statistics.interval.ms": "15000",  # librdkafka's statistics -> stats_cb -> metrics
}
# produce() serves delivery reports (producer.poll) every this many messages, not after
# each: a poll costs about as much as the produce. Nothing waits on a report between
# flushes (flush() serves them all and checks every one), and a full queue is served
# at once (BufferError), so the cursor's guarantee does not depend on this number.
POLL_EVERY = 500
# Delivery reports of messages an abort purged: expected, not a failure of the next batch.
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
# Errors about a message itself, not about Kafka: the broker would refuse it every
# time. Such a message goes to the dead-letter topic (sink.py) and the rest goes on.
MESSAGE_ERRORS = frozenset(
    {
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.POLICY_VIOLATION,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
    }
)
# What the idempotent producer reports for the messages that were in flight behind a
# refused one on the same partition (their sequence numbers skipped): refused too, by
# consequence, never written. Taken with the refused ones, when there are refused ones.
SEQUENCE_ERRORS = frozenset({KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER})
# Refused messages kept for isolation per flush; past this, the batch fails as a whole.
MAX_REJECTED_KEPT = 100_000
_FENCED_CODES = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    """A message Kafka refused for what it is, with all it takes to produce it again."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, str | bytes | None]]
    timestamp_ms: int
    reason: str  # the broker's word for it

    @property
    def cdr_id(self) -> int | None:
        """The event's `cdr_id` header; None for a dead letter or a cursor record."""
        for name, value in self.headers:
            if name == "cdr_id" and value is not None:
                return int(value)
        return None


@dataclass(frozen=True, slots=True)
class TimestampLimits:
    """How far from now the event topic accepts a message timestamp.

    Kafka checks `message.timestamp.before.max.ms` and `message.timestamp.after.max.ms`
    (Kafka 4 defaults: unlimited and 1 h) against its own clock unless the topic uses
    LogAppendTime. A valid CDR outside them (provider clock skew, local time written as
    UTC, a CDR dated before 1970, which Kafka Streams refuses) is still published, with
    the produce time as its message timestamp and a `timestamp_replaced` header.
    """

    before_max_ms: int | None = None  # None: no limit
    after_max_ms: int | None = 3_600_000
    log_append_time: bool = False


def producer_config(
    bootstrap_servers: str, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The producer's librdkafka configuration."""
    config = {"bootstrap.servers": bootstrap_servers, "client.id": "cdr-streamer"}
    config.update(DEFAULT_PRODUCER_CONFIG)
    config.update(overrides or {})
    config.update(REQUIRED_PRODUCER_CONFIG)
    return config


class Publisher:
    """Produces events and dead letters, and tells whether all of them were confirmed.

    With a `transactional_id` every batch is a Kafka transaction: `begin()`, produce,
    `commit()`; a read_committed consumer sees all of it or none of it.
    """

    def __init__(
        self,
        config: Mapping[str, str],
        *,
        transactional_id: str | None = None,
        stats_cb: Callable[[str], None] | None = None,
        init_timeout_s: float = 60.0,
    ) -> None:
        settings: dict[str, Any] = dict(config)
        settings["error_cb"] = self._on_error
        # Delivery reports of failed messages only: a success needs no callback, since
        # flush() (or the transaction's commit) waits until nothing is left in flight
        # and a message that failed has reported by then. A Python callback per message
        # was about 1 µs of the feed thread's time per CDR.
        settings["on_delivery"] = self._on_delivery
        settings["delivery.report.only.error"] = True
        if stats_cb is not None:
            settings["stats_cb"] = stats_cb
        if transactional_id:
            settings["transactional.id"] = transactional_id
        self.transactional_id = transactional_id
        self.failed = 0
        self._first_error: KafkaError | None = None
        self._rejected: list[RejectedMessage] = []
        self._other_failures = 0  # failures that are not about the message itself
        self._refused_seen = False  # a MESSAGE_ERRORS failure since the last flush
        self._fatal: KafkaError | None = None
        self._aborted_badly = False
        self.in_transaction = False
        self._unserved = 0  # messages produced since delivery reports were last served
        # librdkafka's own log lines go through logging, not straight to stderr.
        self._producer = Producer(settings, logger=_librdkafka_log)
        if transactional_id:
            # Fences any older instance with this id and aborts its open transaction.
            self._call("initialise transactions", self._producer.init_transactions, init_timeout_s)

    def _on_error(self, err: KafkaError) -> None:
        # Client-level errors: most are transient (a broker down) and librdkafka retries
        # them itself, logging each attempt through the "librdkafka" logger already.
        if err.fatal():
            if self._fatal is None:
                self._fatal = err
            log.error("Kafka producer failed for good: %s", err.str())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("Kafka: all brokers are down; events wait in the producer's queue")
        else:
            log.debug("Kafka: %s", err.str())

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:  # not reported (delivery.report.only.error), kept as a guard
            return
        if err.code() in _PURGED:
            return
        self.failed += 1
        if self._first_error is None:
            self._first_error = err
        code = err.code()
        if code in MESSAGE_ERRORS:
            self._refused_seen = True
        if (code in MESSAGE_ERRORS or code in SEQUENCE_ERRORS) and len(
            self._rejected
        ) < MAX_REJECTED_KEPT:
            ts_type, ts = msg.timestamp()
            raw_headers: Any = msg.headers() or []  # list of (name, bytes) pairs at run time
            headers: list[tuple[str, str | bytes | None]] = [(str(k), v) for k, v in raw_headers]
            self._rejected.append(
                RejectedMessage(
                    msg.topic() or "",
                    msg.key(),
                    msg.value() or b"",
                    headers,
                    ts if ts_type else 0,
                    err.str(),
                )
            )
        else:
            self._other_failures += 1

    def _take_rejected(self) -> list[RejectedMessage] | None:
        """The refused messages since the last flush, if every failure was about a message."""
        rejected, other, refused = self._rejected, self._other_failures, self._refused_seen
        self._rejected, self._other_failures, self._refused_seen = [], 0, False
        return rejected if rejected and refused and not other else None

    def _refused_in_transaction(self) -> list[RejectedMessage] | None:
        """A transaction that failed mid-batch because Kafka refused messages: which ones.

        produce() then fails with librdkafka's "erroneous state" before any flush; the
        refused messages' reports are served here, and the transaction is aborted.
        """
        if not self.in_transaction:
            return None
        deadline = time.monotonic() + 1.0
        while not self._rejected and time.monotonic() < deadline:
            self.poll(0.05)  # serves the delivery reports of the failed request
        rejected = self._take_rejected()
        if rejected is not None:
            self.abort()
        return rejected

    def _rejected_error(self, action: str, rejected: list[RejectedMessage]) -> Exception:
        reasons = sorted({r.reason for r in rejected})
        return MessagesRejectedError(
            f"Kafka refused {len(rejected)} messages while trying to {action} "
            f"({'; '.join(reasons)[:300]})",
            rejected=rejected,
        )

    def _error(self, action: str, err: KafkaError) -> Exception:
        """Our error for a librdkafka error."""
        if err.code() == KafkaError._FATAL and self._fatal is None:
            # The generic "fatal" code: the error callback says why (fenced or not).
            # Serve it now, or a fenced instance would rebuild its producer and fence back.
            try:
                self._producer.poll(0)
            except KafkaException as exc:  # the fatal error itself, raised by poll
                if exc.args[0].fatal():
                    self._fatal = exc.args[0]
        if err.code() == KafkaError._FATAL and self._fatal is not None:
            err = self._fatal
        if err.code() in _FENCED_CODES and self.transactional_id:
            return FencedError(
                f"Kafka fenced transactional id {self.transactional_id!r}: another cdr-streamer "
                "took over this feed (only one instance may run per feed), or a transaction "
                "outlived transaction.timeout.ms; this one stops"
            )
        fatal = err.fatal() or not self.usable
        return DeliveryError(f"Kafka could not {action}: {err.str()}", needs_new_producer=fatal)

    def _call(self, action: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except KafkaException as exc:
            raise self._error(action, exc.args[0]) from exc

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._error("continue", self._fatal)
        if self._aborted_badly:
            raise DeliveryError(
                "the Kafka producer could not abort its transaction", needs_new_producer=True
            )

    @property
    def usable(self) -> bool:
        """False once this producer must be replaced (a fatal error or a failed abort)."""
        return self._fatal is None and not self._aborted_badly

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        timestamp_ms: int = 0,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        """Queue one message; waits (serving delivery reports) while librdkafka's queue is full."""
        if self.transactional_id and not self.in_transaction:
            self._check_fatal()
            self._call("begin a transaction", self._producer.begin_transaction)
            self.in_transaction = True
        while True:
            try:
                self._producer.produce(topic, value, key, timestamp=timestamp_ms, headers=headers)
                break
            except BufferError:
                self._serve(0.1)
                self._check_fatal()
            except KafkaException as exc:
                refused = self._refused_in_transaction()
                if refused is not None:
                    raise self._rejected_error(f"produce to {topic}", refused) from exc
                raise self._error(f"produce to {topic}", exc.args[0]) from exc
        self._unserved += 1
        if self._unserved >= POLL_EVERY:
            self._unserved = 0
            self._serve(0)

    def _serve(self, timeout_s: float) -> None:
        """producer.poll(), whose errors (librdkafka may raise a fatal one here) become ours."""
        try:
            self._producer.poll(timeout_s)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal() and self._fatal is None:
                self._fatal = err
            raise self._error("serve delivery reports", err) from exc

    def flush(self, timeout_s: float) -> None:
        """Wait for every queued message's delivery report; raise if any failed or is missing.

        In a transaction, commit it: Kafka then confirms the whole batch at once.
        """
        if self.in_transaction:
            self._commit(timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        remaining = len(self._producer)
        while remaining and time.monotonic() < deadline:
            try:
                remaining = self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
            except KafkaException as exc:
                raise self._error("confirm delivery", exc.args[0]) from exc
        self._check_fatal()
        error, self._first_error = self._first_error, None
        rejected = self._take_rejected()
        if error is not None:
            if rejected is not None and not remaining:
                raise self._rejected_error("confirm delivery", rejected)
            raise self._error("confirm delivery", error)
        if remaining:
            raise DeliveryError(
                f"{remaining} events still unconfirmed after {timeout_s:g} s: "
                "is the broker reachable?"
            )

    def _commit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._producer.commit_transaction(max(1.0, deadline - time.monotonic()))
                break
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                # librdkafka: a retriable commit error (e.g. its flush timed out) leaves the
                # transaction committing; calling commit again is the documented way on.
                if err.retriable() and not err.txn_requires_abort():
                    if time.monotonic() < deadline:
                        continue
                    # Out of time in the middle of a commit: only a new producer can
                    # tell (by fencing this one) how it ended; the cursor is read back.
                    self.in_transaction = False
                    raise DeliveryError(
                        f"Kafka did not finish committing the transaction in {timeout_s:g} s",
                        needs_new_producer=True,
                    ) from exc
                rejected = self._take_rejected()
                if err.txn_requires_abort():
                    self.abort(timeout_s)
                else:
                    self.in_transaction = False
                if rejected is not None and self.usable:
                    raise self._rejected_error("commit the transaction", rejected) from exc
                raise self._error("commit the transaction", err) from exc
        self.in_transaction = False
        error, self._first_error = self._first_error, None
        if error is not None:  # cannot happen after a successful commit; kept as a guard
            raise self._error("confirm delivery", error)

    def probe(self, messages: list[RejectedMessage], timeout_s: float) -> list[RejectedMessage]:
        """Produce `messages` again; the ones Kafka refuses again (about themselves).

        With a transactional id, inside a transaction that is then aborted: nothing
        becomes visible to read_committed consumers. Without, the accepted ones are
        delivered for good. A failure that is not about the messages raises.
        """
        if self.transactional_id:
            self._call("begin a transaction", self._producer.begin_transaction)
            self.in_transaction = True
        for m in messages:
            while True:
                try:
                    self._producer.produce(
                        m.topic, m.value, m.key, timestamp=m.timestamp_ms, headers=m.headers
                    )
                    break
                except BufferError:
                    self._serve(0.1)
        try:
            remaining = self._producer.flush(timeout_s)
        except KafkaException as exc:
            raise self._error("confirm delivery", exc.args[0]) from exc
        rejected, other = self._rejected, self._other_failures
        self._rejected, self._other_failures, self._first_error = [], 0, None
        self._refused_seen = False
        self.abort(timeout_s)
        if other or remaining:
            raise DeliveryError(
                f"Kafka failed ({other} errors, {remaining} unconfirmed) while finding the "
                "messages it refuses; trying again"
            )
        # Kafka's reports carry neither headers nor timestamp: hand back the messages given.
        given = {m.value: m for m in messages}
        return [
            replace(given[r.value], reason=r.reason) if r.value in given else r for r in rejected
        ]

    def abort(self, timeout_s: float = 30.0) -> None:
        """Abort the open transaction (if any); its messages stay invisible to read_committed."""
        if not self.in_transaction:
            return
        self.in_transaction = False
        try:
            self._producer.abort_transaction(timeout_s)
        except KafkaException as exc:
            # A fenced or fatal producer cannot abort (its transaction times out on the
            # broker); any other failure leaves librdkafka in a state we cannot continue
            # from. Either way this producer is done: the next poll builds a new one.
            log.warning("could not abort the transaction: %s", exc.args[0].str())
            self._aborted_badly = True
        # Cleared after the abort: it hands back the purged messages' delivery reports.
        self._first_error = None
        self._rejected, self._other_failures, self._refused_seen = [], 0, False

    @property
    def in_flight(self) -> int:
        """Messages queued or sent but not yet confirmed."""
        return len(self._producer)

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve pending callbacks (delivery reports, statistics); safe from another thread.

        Never raises: a fatal error found here is latched and raised by the feed's own
        next produce or flush, in the feed's thread.
        """
        try:
            self._producer.poll(timeout_s)
        except KafkaException as exc:
            if exc.args[0].fatal() and self._fatal is None:
                self._fatal = exc.args[0]
        except RuntimeError:  # closed already: nothing left to serve
            return

    def close(self, timeout_s: float = 10.0) -> None:
        """Give queued messages a last chance; whatever is unconfirmed is not committed anyway.

        Then the client is freed: its threads and broker connections end now, not when
        the garbage collector gets to it (callbacks tie it to this object in a cycle).
        """
        try:
            self._finish(timeout_s)
        finally:
            self._free()

    def _finish(self, timeout_s: float) -> None:
        if self.in_transaction:
            self.abort(timeout_s)
            return
        if self._fatal is not None:
            return  # a fatal (e.g. fenced) producer can deliver nothing more
        try:
            self._producer.flush(timeout_s)
        except (KafkaException, SystemError) as exc:
            # Closing must not turn one error into two. A producer that turned fatal
            # since the last check raises from inside librdkafka's callback path, which
            # Python reports as SystemError.
            log.warning("Kafka producer closed with an error: %s", exc)

    def _free(self) -> None:
        try:
            # close() waits for every queued message without limit: drop them first.
            self._producer.purge()
            self._producer.poll(0)  # the purged messages' reports
            self._producer.close()
        except (KafkaException, RuntimeError, SystemError) as exc:
            log.debug("freeing the Kafka producer: %s", exc)


def provision_topic(
    admin: AdminClient,
    name: str,
    *,
    partitions: int,
    replication_factor: int,
    min_insync_replicas: int,
    compacted: bool = False,
    retention_ms: int = -1,
    timeout_s: float = 30.0,
) -> None:
    """Create the topic if missing; refuse one that exists with the wrong cleanup policy.

    Event topics must not be compacted (only the last event per AccountCode would
    survive); the cursor topic must be (only the last cursor per feed matters).
    """
    metadata = admin.list_topics(timeout=timeout_s)
    if name not in metadata.topics or metadata.topics[name].error is not None:
        config = {"min.insync.replicas": str(min_insync_replicas)}
        if compacted:
            config["cleanup.policy"] = "compact"
        else:
            config["retention.ms"] = str(retention_ms)
        topic = NewTopic(
            name, num_partitions=partitions, replication_factor=replication_factor, config=config
        )
        future = admin.create_topics([topic], request_timeout=timeout_s)[name]
        try:
            future.result()
            log.info(
                "created topic %s (%d partitions, replication %d%s)",
                name, partitions, replication_factor, ", compacted" if compacted else "",
            )  # fmt: skip
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {name}: {exc.args[0].str()}") from exc
        _wait_until_listed(admin, name, timeout_s)
        return
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    configs = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result()
    policy = configs["cleanup.policy"].value if "cleanup.policy" in configs else "delete"
    is_compacted = "compact" in (policy or "")
    if is_compacted and not compacted:
        raise TopicError(
            f"topic {name} has cleanup.policy={policy}: compaction would keep only the last "
            "event per AccountCode. Use another topic, or set cleanup.policy=delete"
        )
    if not compacted:
        _warn_about_time(name, configs)
    if compacted and not is_compacted:
        raise TopicError(
            f"cursor topic {name} has cleanup.policy={policy}: it must be compacted "
            "(cleanup.policy=compact), or it grows forever"
        )


def _wait_until_listed(admin: AdminClient, name: str, timeout_s: float) -> None:
    """Wait until the broker's metadata shows a topic just created.

    CreateTopics answers once the controller has the topic; the broker a client asks
    next may not list it yet, and a reader opened at once (the cursor store's) would
    find "no such topic". Seen in the benchmark: a cursor topic created 20 ms before.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        topic = admin.list_topics(name, timeout=timeout_s).topics.get(name)
        if topic is not None and topic.error is None and topic.partitions:
            return
        if time.monotonic() >= deadline:
            raise TopicError(
                f"topic {name} was created but the broker does not list it after "
                f"{timeout_s:.0f} s: check the broker's logs"
            )
        time.sleep(0.05)


def _warn_about_time(name: str, configs: Mapping[str, Any]) -> None:
    """An existing event topic whose time settings fight event-time timestamps."""
    retention = configs["retention.ms"].value if "retention.ms" in configs else "-1"
    if retention not in (None, "-1"):
        log.warning(
            "topic %s has retention.ms=%s: events carry the call's time as their timestamp, "
            "so CDRs older than that (a first sync, a backfill) are deleted soon after they "
            "are published; consider retention.ms=-1 or a longer retention",
            name, retention,
        )  # fmt: skip
    kind = configs["message.timestamp.type"].value if "message.timestamp.type" in configs else ""
    if kind == "LogAppendTime":
        log.warning(
            "topic %s has message.timestamp.type=LogAppendTime: the broker replaces each "
            "event's timestamp (the call's UTCDateTime) with the time it was appended",
            name,
        )


def timestamp_limits(admin: AdminClient, topic: str, timeout_s: float = 30.0) -> TimestampLimits:
    """The event topic's `message.timestamp.*` settings, as the sink checks them."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        configs = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result()
    except KafkaException as exc:
        raise TopicError(f"cannot read the settings of topic {topic}: {exc.args[0].str()}") from exc

    def limit(name: str, default: int | None) -> int | None:
        entry = configs.get(name)
        if entry is None or entry.value is None:
            return default
        value = int(entry.value)
        return None if value >= 2**62 else value  # Long.MAX_VALUE: no limit

    kind = configs["message.timestamp.type"].value if "message.timestamp.type" in configs else ""
    return TimestampLimits(
        before_max_ms=limit("message.timestamp.before.max.ms", None),
        after_max_ms=limit("message.timestamp.after.max.ms", 3_600_000),
        log_append_time=kind == "LogAppendTime",
    )
