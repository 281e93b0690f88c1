"""The raw JetStream API request, for what nats.py has no method for: the one place
nats.py's private ``_api_request`` is used (``tests/test_seam.py`` checks)."""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext


async def api_request(
    js: JetStreamContext, api: str, payload: bytes = b"", *, timeout: float = 5.0
) -> dict[str, Any]:
    """A raw JetStream API request (``api``: after the ``$JS.API.`` prefix, e.g.
    ``STREAM.PURGE.<stream>``) for what nats.py has no method for. Raises nats.py's
    JetStream errors, as its own methods do."""
    resp: dict[str, Any] = await js._api_request(f"{js._prefix}.{api}", payload, timeout=timeout)
    return resp
