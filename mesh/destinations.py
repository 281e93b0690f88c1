"""Destinations beyond HTTP: the target kinds the egress delivers, their options, their
URLs (credentials sealed) and the templates that name topics, keys and groups.

This module is the registry's and the CLI's view; the drivers that talk to each system
live in the egress (``services/egress/drivers/``). A kind's library is an optional extra
(``pip install 'mesh[amqp]'``); ``missing_extra`` names the one a kind lacks.
"""

from __future__ import annotations

import importlib.util
import re
import string
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import BaseModel, Field

from mesh.errors import ValidationError

# kind -> (module to import, extra to install)
EXTRAS: dict[str, tuple[str, str]] = {
    "amqp": ("aio_pika", "amqp"),
    "mqtt": ("aiomqtt", "mqtt"),
    "redis": ("redis", "redis"),
    "sqs": ("aiobotocore", "sqs"),
    "s3": ("aiobotocore", "s3"),
    "kafka": ("aiokafka", "kafka"),
}
# kind -> URL schemes it accepts
SCHEMES: dict[str, tuple[str, ...]] = {
    "amqp": ("amqp", "amqps"),
    "mqtt": ("mqtt", "mqtts"),
    "redis": ("redis", "rediss", "unix"),
    "sqs": ("http", "https"),
    "s3": ("s3",),
    "kafka": ("kafka", "kafkas"),
}
# Option defaults of one kind where the shared default does not fit it (a Kafka topic
# takes no '/'; a Kafka key is the partitioning key, not an object key).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "kafka": {"topic": "{source}", "key": "{source}"},
}
# SASL mechanisms a kafka URL may name (?mechanism=...); PLAIN when it names none.
KAFKA_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# The fields a template may name: {id}, {source}, {type}, {subject}, and {type_path}
# (the type with dots as slashes, for MQTT topics and S3 keys).
TEMPLATE_FIELDS = frozenset({"id", "source", "type", "subject", "type_path"})
REDACTED = "***"


class DestinationOptions(BaseModel):
    """Per-kind options of a non-HTTP target; each kind reads its own."""

    exchange: str | None = None  # amqp: the exchange ("" = the default exchange)
    routing_key: str = "{type}"  # amqp: routing-key template
    topic: str = "{source}/{type_path}"  # mqtt (kafka: '{source}'): topic template
    qos: int = Field(default=1, ge=0, le=2)  # mqtt
    stream: str = "mesh:{source}"  # redis: stream-key template
    maxlen: int | None = Field(default=None, ge=1)  # redis: XADD MAXLEN ~ n
    group_id: str = "{source}"  # sqs FIFO queues: MessageGroupId template
    # s3: object-key template; kafka: partitioning-key template ('{source}'; '' = no key)
    key: str = "{source}/{type_path}/{id}.json"
    endpoint_url: str | None = None  # sqs / s3: an S3- or SQS-compatible endpoint
    region: str | None = None  # sqs / s3


def with_kind_defaults(kind: str, options: DestinationOptions) -> DestinationOptions:
    """``options`` with ``kind``'s own defaults for the fields nobody set."""
    unset = {
        k: v for k, v in KIND_DEFAULTS.get(kind, {}).items() if k not in options.model_fields_set
    }
    return options.model_copy(update=unset) if unset else options


def check_kafka_topic(topic: str) -> str:
    """A rendered topic name Kafka accepts (``[A-Za-z0-9._-]``, 1..249), else an error."""
    if not _KAFKA_TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ValidationError(f"not a Kafka topic name: {topic!r} (A-Z a-z 0-9 . _ -)")
    return topic


def missing_extra(kind: str) -> str | None:
    """One line saying what to install when ``kind``'s library is absent, else None."""
    found = EXTRAS.get(kind)
    if found is None:
        return None
    module, extra = found
    if importlib.util.find_spec(module) is not None:
        return None
    return f"the {kind} driver needs {module}: pip install 'mesh[{extra}]'"


def check_template(template: str, what: str) -> None:
    """Refuse a template naming an unknown field (at ``target add``, not at delivery)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValidationError(f"{what} template {template!r}: {exc}") from None
    for name in names:
        if name not in TEMPLATE_FIELDS:
            allowed = ", ".join("{" + f + "}" for f in sorted(TEMPLATE_FIELDS))
            raise ValidationError(
                f"{what} template {template!r}: unknown field {name!r} ({allowed})"
            )


def render(template: str, fields: dict[str, Any]) -> str:
    """The template filled in; a field the event lacks (no subject) is an error."""
    try:
        return template.format_map(fields)
    except (KeyError, ValueError, IndexError) as exc:
        raise ValidationError(f"template {template!r}: cannot fill {exc}") from None


def template_fields(event_id: str, source: str, type_: str, subject: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": event_id,
        "source": source,
        "type": type_,
        "type_path": type_.replace(".", "/"),
    }
    if subject:
        fields["subject"] = subject
    return fields


def validate_destination(kind: str, url: str, options: DestinationOptions) -> None:
    """Refuse what could never be delivered: wrong scheme, no host, a bad template."""
    parts = _split(url, kind)
    options = with_kind_defaults(kind, options)
    if parts.scheme not in SCHEMES[kind]:
        raise ValidationError(
            f"a {kind} URL starts with {' or '.join(s + '://' for s in SCHEMES[kind])}"
        )
    if (kind != "redis" or parts.scheme != "unix") and not parts.hostname:
        raise ValidationError(f"the {kind} URL names no host")
    if kind == "amqp":
        if options.exchange is None:
            raise ValidationError('an amqp target needs --exchange ("" for the default exchange)')
        check_template(options.routing_key, "routing key")
    elif kind == "mqtt":
        check_template(options.topic, "topic")
    elif kind == "redis":
        check_template(options.stream, "stream")
    elif kind == "sqs":
        check_template(options.group_id, "group id")
        if len([p for p in parts.path.split("/") if p]) < 2:
            raise ValidationError("an sqs URL is the queue URL: https://HOST/ACCOUNT/QUEUE")
    elif kind == "s3":
        check_template(options.key, "key")
    elif kind == "kafka":
        check_template(options.topic, "topic")
        check_template(options.key, "key")
        literal = "".join(text for text, *_ in string.Formatter().parse(options.topic))
        if re.search(r"[^A-Za-z0-9._-]", literal):
            raise ValidationError(
                f"topic template {options.topic!r}: a Kafka topic takes A-Z a-z 0-9 . _ -"
            )
        _check_kafka_query(parts.query)


def _check_kafka_query(query: str) -> None:
    from urllib.parse import parse_qs

    try:
        params = parse_qs(query, strict_parsing=bool(query))
    except ValueError:
        raise ValidationError(f"kafka URL query {query!r}: use ?mechanism=NAME") from None
    unknown = set(params) - {"mechanism"}
    if unknown:
        raise ValidationError(f"kafka URL: unknown parameter {sorted(unknown)[0]!r} (mechanism)")
    for mechanism in params.get("mechanism", []):
        if mechanism.upper() not in KAFKA_MECHANISMS:
            known = ", ".join(KAFKA_MECHANISMS)
            raise ValidationError(f"kafka URL: SASL mechanism {mechanism!r} is not one of {known}")


def _split(url: str, kind: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError as exc:
        raise ValidationError(f"invalid {kind} URL: {exc}") from None
    return parts


def redact(url: str) -> str:
    """The URL with its password (or secret key) replaced, for listings and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:{REDACTED}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _DestinationTarget(Protocol):
    @property
    def kind(self) -> str: ...

    url: str | None
    url_enc: str | None
    options: DestinationOptions | None


def seal_destination(target: _DestinationTarget, seal: Callable[[str], str]) -> None:
    """Check a new destination target; keep its whole URL sealed, show it redacted."""
    if not target.url:
        raise ValidationError(f"a {target.kind} target needs --{target.kind} URL")
    target.options = with_kind_defaults(target.kind, target.options or DestinationOptions())
    validate_destination(target.kind, target.url, target.options)
    target.url_enc = seal(target.url)
    target.url = redact(target.url)
