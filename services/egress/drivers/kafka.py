"""The Kafka driver over aiokafka: a topic template, a key template (one key keeps its
order: the key picks the partition with Kafka's own murmur2 partitioner), ``acks=all``
(a send returns once every in-sync replica has the record). A batch becomes one record
batch per partition (aiokafka's batch API: one future per partition, not per record),
handed to the producer together and awaited together.

Format: CloudEvents Kafka protocol binding, binary mode: the attributes as ``ce_<name>``
headers (UTF-8), ``content-type`` the data's type, the record value the data, the record
key the rendered key template (none when the template is empty).

Topics: mesh never creates one. Before its first record to a topic on a connection the
driver asks the broker for that topic's metadata with auto-creation off; a topic the
broker does not have (or refuses to name) is a permanent failure, like a missing AMQP
exchange. The producer is not idempotent: Tansu, the Kafka-compatible broker the tests
run, answers InitProducerId with an error, and a producer mode never run against a real
broker is not offered. Delivery is at least once; consumers dedupe on ``ce_id``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from mesh.destinations import (
    DestinationOptions,
    check_kafka_topic,
    render,
    with_kind_defaults,
)
from mesh.envelope import Event
from mesh.errors import MeshError
from mesh.registry import Target
from services.egress.drivers.base import ERROR_CHARS, Driver, describe, need
from services.egress.drivers.formats import attributes, data_body, fields_of
from services.egress.http.sender import AttemptResult

DEFAULT_PORT = 9092
# The producer's largest request (aiokafka's default, set explicitly): a record over it is
# refused before it is sent, as ``producer.send`` does.
MAX_REQUEST_SIZE = 1024 * 1024
# aiokafka errors no retry can fix: the record or the topic is wrong, or access refused.
# (A refused SASL login is not among them: see ``LoginRefused``.)
PERMANENT_ERRORS = frozenset(
    {
        "ClusterAuthorizationFailedError",
        "InvalidRequiredAcksError",
        "InvalidTopicError",
        "KafkaConfigurationError",
        "MessageSizeTooLargeError",
        "PolicyViolationError",
        "RecordListTooLargeError",
        "RecordTooLargeError",
        "TopicAuthorizationFailedError",
        "UnsupportedForMessageFormatError",
    }
)
# aiokafka errors of a SASL handshake the broker refused (a wrong password, an unknown
# user, a mechanism it does not enable).
LOGIN_ERRORS = frozenset(
    {
        "AuthenticationFailedError",
        "AuthenticationMethodNotSupported",
        "IllegalSaslStateError",
        "SaslAuthenticationFailed",
        "UnsupportedSaslMechanismError",
    }
)


class UnknownTopic(MeshError):
    """The broker has no such topic (mesh never creates Kafka topics)."""


class LoginRefused(MeshError):
    """The broker refused the target's SASL login. A retry, not a dead letter: the
    credentials are the target's, not the event's (the breaker pauses the target until
    they work again, as for AMQP's refused login)."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def headers_of(event: Event, content_type: str) -> list[tuple[str, bytes]]:
    """The record headers of one event (CloudEvents Kafka binding, binary mode)."""
    headers = [(f"ce_{k}", v.encode()) for k, v in attributes(event).items()]
    headers.append(("content-type", content_type.encode()))
    return headers


class KafkaDriver(Driver):
    kind = "kafka"

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target)
        self.url = url
        self.options = with_kind_defaults(self.kind, target.options or DestinationOptions())
        self._producer: Any = None
        self._topics: set[str] = set()  # topics the broker has, as it said on this connection
        self._topic_lock = asyncio.Lock()

    def update(self, target: Target) -> bool:
        changed = super().update(target)
        self.options = with_kind_defaults(self.kind, target.options or DestinationOptions())
        return changed

    def producer_config(self) -> dict[str, Any]:
        """AIOKafkaProducer's arguments for this target's URL (no TLS context yet)."""
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        tls = parts.scheme == "kafkas"
        config: dict[str, Any] = {
            "bootstrap_servers": f"{host}:{parts.port or DEFAULT_PORT}",
            "client_id": f"mesh-{self.target.name}",
            "acks": "all",
            # Records not sent within the target's timeout fail (and are retried by the
            # egress) instead of waiting in the producer's buffer for 40 s.
            "request_timeout_ms": max(1000, int(self.target.timeout_s * 1000)),
            "security_protocol": "SSL" if tls else "PLAINTEXT",
            # One produce request per partition can carry a whole batch of the egress
            # (aiokafka keeps one request in flight per partition; 16 KiB by default).
            "max_batch_size": 256 * 1024,
            "max_request_size": MAX_REQUEST_SIZE,
        }
        if parts.username is not None:
            mechanism = parse_qs(parts.query).get("mechanism", ["PLAIN"])[0].upper()
            config.update(
                security_protocol="SASL_SSL" if tls else "SASL_PLAINTEXT",
                sasl_mechanism=mechanism,
                sasl_plain_username=unquote(parts.username),
                sasl_plain_password=unquote(parts.password or ""),
            )
        return config

    async def _open(self) -> None:
        aiokafka = need("aiokafka", self.kind)
        config = self.producer_config()
        if config["security_protocol"] in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            config["ssl_context"] = create_ssl_context()
        producer = aiokafka.AIOKafkaProducer(**config)
        try:
            await producer.start()
        except BaseException as exc:
            await producer.stop()
            if isinstance(exc, Exception) and "sasl_mechanism" in config:
                refused = await self._refused_login(config)
                if refused is not None:
                    raise refused from None
            raise
        self._producer = producer
        self._topics = set()

    async def _refused_login(self, config: dict[str, Any]) -> LoginRefused | None:
        """Why the producer could not start, if the broker refused the SASL login.

        aiokafka's bootstrap logs a refused login and raises "Unable to bootstrap" (so
        the refusal reads as an unreachable broker), and a SCRAM answer that is an error
        (RFC 5802 ``e=...``, as Tansu sends) escapes it as a ``KeyError``. One handshake
        of our own, after the failure only, tells the refusal apart; the password never
        shows in what it says."""
        from aiokafka.conn import create_conn
        from aiokafka.errors import KafkaError

        host, _, port = config["bootstrap_servers"].rpartition(":")
        login = f"SASL {config['sasl_mechanism']} login as {config['sasl_plain_username']!r}"
        try:
            conn = await create_conn(
                host.strip("[]"),
                int(port),
                client_id=config["client_id"],
                request_timeout_ms=config["request_timeout_ms"],
                ssl_context=config.get("ssl_context"),
                security_protocol=config["security_protocol"],
                sasl_mechanism=config["sasl_mechanism"],
                sasl_plain_username=config["sasl_plain_username"],
                sasl_plain_password=config["sasl_plain_password"],
            )
        except KeyError:  # aiokafka reads only a SCRAM answer's signature ('v='), not 'e='
            return LoginRefused(f"{login} refused: the broker's SCRAM answer was an error")
        except ValueError as exc:  # a SCRAM answer that does not prove the broker knows us
            return LoginRefused(f"{login} failed: {exc}")
        except KafkaError as exc:
            if type(exc).__name__ in LOGIN_ERRORS:
                return LoginRefused(f"{login} refused: {describe(exc)}")
            return None
        except (OSError, TimeoutError):
            return None
        conn.close()
        return None

    async def _shut(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        from aiokafka.errors import KafkaConnectionError

        # Records still in the buffer fail now (the egress retries them) rather than hold
        # the close until they expire; stop() then only closes the connections.
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None:
            accumulator.fail_all(KafkaConnectionError("the mesh closed the producer"))
        await producer.stop()

    # Sending --------------------------------------------------------------------

    async def _send(self, event: Event) -> None:
        future = await self._enqueue(event)
        # Shielded: a timeout abandons the wait, not the record (it may still arrive).
        await asyncio.shield(future)

    async def _enqueue(self, event: Event) -> asyncio.Future[Any]:
        """Put one record into the producer's buffer; the future completes on its ack."""
        topic, key, body, headers = await self._record(event)
        future: asyncio.Future[Any] = await self._producer.send(
            topic, body, key=key, headers=headers
        )
        # A record whose wait was abandoned (a timeout) still fails or lands later: its
        # outcome is retrieved here, so asyncio does not log it as never retrieved.
        future.add_done_callback(_retrieve)
        return future

    async def _check_topic(self, topic: str) -> None:
        """Ask the broker once per connection whether it has ``topic`` (never creating it)."""
        if topic in self._topics:
            return
        from aiokafka.errors import KafkaConnectionError, NoError, for_code
        from aiokafka.protocol.metadata import MetadataRequest

        async with self._topic_lock:
            if topic in self._topics:
                return
            client = self._producer.client
            node = client.get_random_node()
            if node is None:
                raise KafkaConnectionError("no broker known")
            answer = await client.send(
                node, MetadataRequest([topic], allow_auto_topic_creation=False)
            )
            for error_code, name, *_ in answer.topics:
                if name != topic:
                    continue
                error = for_code(error_code)
                if error is NoError:
                    self._topics.add(topic)
                    return
                if error.__name__ == "UnknownTopicOrPartitionError":
                    raise UnknownTopic(f"the broker has no topic {topic!r} (create it first)")
                raise error()
            raise UnknownTopic(f"the broker did not name topic {topic!r}")

    async def send_batch(
        self, events: Sequence[Event], traces: Sequence[dict[str, str] | None] | None = None
    ) -> list[AttemptResult]:
        """One record batch per partition through aiokafka's batch API, then await them
        all: one result per event, in order; every event of a batch shares its outcome.

        A record the event cannot make (a template it cannot fill, a missing topic, too
        large) fails alone; a connection-level failure fails the records not yet handed
        to the producer, and the batches already handed over are still awaited."""
        if len(events) == 1:
            return [await self.send(events[0])]
        started = time.monotonic()
        results: list[AttemptResult | None] = [None] * len(events)
        sent: list[tuple[list[int], asyncio.Future[Any]]] = []
        generation = self.generation
        broken: Exception | None = None
        deadline = started + self.target.timeout_s
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await self.connect()
                generation = self.generation
                batches, broken = await self._batches(events, results, started)
                for topic, partition, batch, members in batches:
                    future = await self._producer.send_batch(batch, topic, partition=partition)
                    future.add_done_callback(_retrieve)
                    sent.append((members, future))
        except TimeoutError:
            broken = TimeoutError(f"timeout after {self.target.timeout_s:g}s")
        except Exception as exc:
            broken = exc
        if sent:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.wait([future for _, future in sent], timeout=remaining)
        latency = time.monotonic() - started
        for members, future in sent:
            if not future.done():
                outcome = AttemptResult(
                    error=f"timeout after {self.target.timeout_s:g}s", latency_s=latency
                )
                broken = broken or TimeoutError("a record was not acknowledged in time")
            elif (error := future.exception()) is not None:
                assert isinstance(error, Exception)
                outcome = self._result(error, started)
                broken = broken or (error if self.drops_connection(error) else None)
            else:
                outcome = AttemptResult(delivered=True, latency_s=latency)
            for i in members:
                results[i] = outcome
        if broken is not None:
            failed = self._result(broken, started)
            results = [r or failed for r in results]
            if isinstance(broken, TimeoutError) or self.drops_connection(broken):
                await self.close(generation)
        return [r or AttemptResult(error="not sent") for r in results]

    async def _batches(
        self, events: Sequence[Event], results: list[AttemptResult | None], started: float
    ) -> tuple[list[tuple[str, int, Any, list[int]]], Exception | None]:
        """The events' records in batches of aiokafka's builder, one or more per partition
        (in the events' order within each), and the failure that stopped making them.

        The partition is what ``producer.send`` would choose: Kafka's default partitioner
        (murmur2 of the key over the topic's partitions, a random available one for no
        key), asked once per key and batch; records without a key share one partition
        per batch. A record the event cannot make is answered in ``results``."""
        from aiokafka.errors import MessageSizeTooLargeError
        from aiokafka.record.default_records import DefaultRecordBatchBuilder

        producer = self._producer
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes
        open_: dict[tuple[str, int], tuple[Any, list[int]]] = {}
        full: list[tuple[str, int, Any, list[int]]] = []
        partition_of: dict[tuple[str, bytes | None], int] = {}
        for i, event in enumerate(events):
            try:
                topic, key, body, headers = await self._record(event)
                if estimate(key, body, headers) > MAX_REQUEST_SIZE:
                    raise MessageSizeTooLargeError(
                        f"the record is over max_request_size ({MAX_REQUEST_SIZE} bytes)"
                    )
                partition = partition_of.get((topic, key))
                if partition is None:
                    partition = await self._partition(topic, key)
                    partition_of[(topic, key)] = partition
            except Exception as exc:
                if not self._record_fault(exc):
                    return self._in_order(full, open_), exc
                results[i] = self._result(exc, started)
                continue
            batch, members = open_.get((topic, partition)) or (None, [])
            if (
                batch is None
                or batch.append(timestamp=None, key=key, value=body, headers=headers) is None
            ):
                if batch is not None:  # full: it goes as it is, a new one takes the record
                    full.append((topic, partition, batch, members))
                batch, members = producer.create_batch(), []
                batch.append(timestamp=None, key=key, value=body, headers=headers)
                open_[(topic, partition)] = (batch, members)
            members.append(i)
        return self._in_order(full, open_), None

    @staticmethod
    def _in_order(
        full: list[tuple[str, int, Any, list[int]]],
        open_: dict[tuple[str, int], tuple[Any, list[int]]],
    ) -> list[tuple[str, int, Any, list[int]]]:
        """The full batches first (each before the later one of its partition), then the
        open ones; none is closed, so the producer may still add to the last of each."""
        return [*full, *((t, p, b, m) for (t, p), (b, m) in open_.items() if m)]

    async def _record(
        self, event: Event
    ) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
        """The topic, key, value and headers of one event's record (the topic checked)."""
        fields = fields_of(event)
        topic = check_kafka_topic(render(self.options.topic, fields))
        key = render(self.options.key, fields).encode() if self.options.key else None
        body, ctype = data_body(event)
        await self._check_topic(topic)
        return topic, key, body, headers_of(event, ctype)

    async def _partition(self, topic: str, key: bytes | None) -> int:
        """The partition aiokafka's ``producer.send`` would pick for ``key``."""
        from aiokafka.partitioner import DefaultPartitioner

        every = list(await self._producer.partitions_for(topic))
        available = list(self._producer.client.cluster.available_partitions_for_topic(topic))
        return int(DefaultPartitioner()(key, every, available))

    def _result(self, exc: Exception, started: float) -> AttemptResult:
        return AttemptResult(
            error=describe(exc)[:ERROR_CHARS],
            permanent=self.is_permanent(exc),
            latency_s=time.monotonic() - started,
        )

    def _record_fault(self, exc: Exception) -> bool:
        """Whether the failure is this record's alone (the next one may still go)."""
        return self.is_permanent(exc)

    # Outcomes -------------------------------------------------------------------

    def is_permanent(self, exc: Exception) -> bool:
        if isinstance(exc, LoginRefused):
            return False
        if type(exc).__name__ in PERMANENT_ERRORS:
            return True
        return super().is_permanent(exc)  # UnknownTopic, a template the event cannot fill

    def drops_connection(self, exc: Exception) -> bool:
        from aiokafka.errors import BrokerResponseError, UnknownTopicOrPartitionError

        if isinstance(exc, UnknownTopicOrPartitionError):
            # The producer's own metadata wait gave up: the topic may have gone, or the
            # broker may be out of reach; a new connection asks anew.
            return True
        # The broker answered (or the record was refused before it left): the producer is
        # sound. Anything else (a cut connection, an expired batch) makes a new one.
        return not isinstance(exc, BrokerResponseError | MeshError) and not self.is_permanent(exc)
