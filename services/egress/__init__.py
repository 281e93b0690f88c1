"""The webhook egress: one pull consumer per webhook target, signed POSTs, retries,
a circuit breaker shared by every instance, dead letters (``service.py`` wires it)."""

from services.egress.service import WebhookEgress

__all__ = ["WebhookEgress"]
