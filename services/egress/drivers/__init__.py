"""Delivery drivers: one per target kind the egress delivers (see ``base.Driver``)."""

from __future__ import annotations

from collections.abc import Callable

from mesh.registry import Target, TargetKind
from mesh.signing import Signer
from services.egress.drivers.base import Driver, MissingExtra
from services.egress.http.sender import HttpSender

__all__ = ["Driver", "MissingExtra", "make_driver"]


def make_driver(target: Target, url: str, http: HttpSender, signer: Callable[[], Signer]) -> Driver:
    """The driver of ``target``'s kind; ``url`` is its full (unsealed) URL."""
    kind = target.kind
    if kind == TargetKind.WEBHOOK:
        from services.egress.drivers.webhook import WebhookDriver

        return WebhookDriver(target, http, signer)
    if kind == TargetKind.AMQP:
        from services.egress.drivers.amqp import AmqpDriver

        return AmqpDriver(target, url)
    if kind == TargetKind.MQTT:
        from services.egress.drivers.mqtt import MqttDriver

        return MqttDriver(target, url)
    if kind == TargetKind.REDIS:
        from services.egress.drivers.redis_streams import RedisDriver

        return RedisDriver(target, url)
    if kind == TargetKind.SQS:
        from services.egress.drivers.aws import SqsDriver

        return SqsDriver(target, url)
    if kind == TargetKind.S3:
        from services.egress.drivers.aws import S3Driver

        return S3Driver(target, url)
    if kind == TargetKind.KAFKA:
        from services.egress.drivers.kafka import KafkaDriver

        return KafkaDriver(target, url)
    raise ValueError(f"no driver delivers {kind} targets")
