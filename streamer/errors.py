"""The whole exception tree, sorted by what the caller must do.

    StreamerError                     root: anything this package raises on purpose
    +-- FatalError                    stop, exit non-zero, the message says what to fix
    |   +-- ConfigError               bad or missing setting
    |   +-- AuthError                 the feed (or SFTP server) refused the credentials
    |   +-- FeedRequestError          a 4xx other than 429: the request itself is wrong
    |   +-- TopicError                a topic is missing and cannot be made, or unsuitable
    |   +-- FencedError               another instance took over our transactional id
    |   +-- RegistryError             the schema registry refused our credentials or schema
    |   +-- HostKeyError              the SFTP server's host key is unknown or does not match
    |       +-- TlsCertificateError   the FTPS server's certificate is not trusted
    |   +-- ClusterError              the replica cannot take part in its cluster's consumer group
    +-- RetriableError                back off, leave the cursor where it is, try again
        +-- FeedUnavailableError      connection trouble, timeout, 5xx, 429
        +-- BadResponseError          a body that is not a feed response (HTML, truncated...)
        +-- DeliveryError             Kafka did not confirm an event
        |   +-- MessagesRejectedError Kafka refused some messages for what they are
        +-- EventsRejectedError       some events of a transaction were refused: replay it
        +-- RegistryUnavailableError  the schema registry is unreachable, 5xx or 429
        +-- SftpUnavailableError      the SFTP (or FTP) server is unreachable, times out or drops us
        +-- KafkaUnavailableError     the Kafka cluster does not answer (at start)
        +-- StoppedError              asked to stop mid-poll (a handover): its batch not committed

A single bad *row* is not an exception: it becomes a `records.Rejection`, goes to
the dead-letter topic and is counted (the "skippable" class of errors).

Every message is redacted when the error is made (`streamer.redact`): an excerpt of a
body that echoes the request never carries a password, wherever the error is shown.
"""

from __future__ import annotations

from typing import Any

from streamer.redact import redact


class StreamerError(Exception):
    """Root of every error cdr-streamer raises on purpose; its text never holds a secret."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class FatalError(StreamerError):
    """Retrying cannot help: stop and tell the operator what to fix."""


class ConfigError(FatalError):
    """A setting is missing or invalid."""


class AuthError(FatalError):
    """The provider refused the login or password."""


class FeedRequestError(FatalError):
    """The provider rejected the request itself (a 4xx other than 429)."""


class TopicError(FatalError):
    """A Kafka topic is missing and cannot be created, or exists but is unsuitable."""


class FencedError(FatalError):
    """Another instance with the same transactional id has fenced this one."""


class RegistryError(FatalError):
    """The schema registry refused the credentials, or the schema (incompatible, unregistered)."""


class HostKeyError(FatalError):
    """The SFTP server's host key is not in known_hosts, or differs from the one there."""


class TlsCertificateError(HostKeyError):
    """The FTPS server's TLS certificate does not verify against the CAs or its host name."""


class ClusterError(FatalError):
    """The replica cannot join or stay in its cluster's consumer group (e.g. not authorised)."""


class RetriableError(StreamerError):
    """A passing fault: back off and try again from the committed cursor."""


class FeedUnavailableError(RetriableError):
    """The feed could not be reached, timed out, or answered 5xx / 429."""

    def __init__(
        self, message: str, *, outcome: str = "connection_error", retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.outcome = (
            outcome  # bounded metric label: connection_error, timeout, http_5xx, http_429
        )
        self.retry_after_s = retry_after_s


class BadResponseError(RetriableError):
    """The body is not a feed response: an HTML page, a login error text, a truncated body."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DeliveryError(RetriableError):
    """Kafka did not confirm delivery of an event (or a dead letter).

    `needs_new_producer` is set after a fatal librdkafka error: that producer
    instance can never send again, so the next attempt must build a new one.
    """

    def __init__(self, message: str, *, needs_new_producer: bool = False) -> None:
        super().__init__(message)
        self.needs_new_producer = needs_new_producer


class MessagesRejectedError(DeliveryError):
    """Kafka refused messages for something about them (timestamp, size, record, policy).

    Nothing about Kafka itself failed: `rejected` holds each refused message, so the
    sink can find the culprits and dead-letter them while the rest goes on.
    """

    def __init__(self, message: str, *, rejected: list[Any]) -> None:
        super().__init__(message)
        self.rejected = rejected


class EventsRejectedError(RetriableError):
    """Exactly-once: Kafka refused some events, so their transaction was aborted.

    The culprits are known by CDR ID; the replay of the poll dead-letters them.
    """


class RegistryUnavailableError(RetriableError):
    """The schema registry could not be reached, or answered 5xx / 429."""


class SftpUnavailableError(RetriableError):
    """The SFTP or FTP server could not be reached, timed out, or closed the connection."""

    def __init__(self, message: str, *, kind: str = "connection_error") -> None:
        super().__init__(message)
        self.kind = kind  # bounded metric label: connection_error, timeout


class KafkaUnavailableError(RetriableError):
    """The Kafka cluster does not answer a metadata request (e.g. at start)."""


class StoppedError(RetriableError):
    """A unit was asked to stop mid-poll (its work moves to another replica, or a shutdown).

    The open batch is abandoned like any failed one: its transaction aborted, its
    cursor not committed; the next owner resumes from the last checkpoint. Not a failure.
    """
