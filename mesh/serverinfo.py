"""What the mesh needs of the NATS server it connects to, and whether its services run.

``check_server`` reads the server's INFO line (already received on connect: no round
trip) and refuses a server too old for the mesh, or one without JetStream, *before*
anything is created on it. ``services_running`` asks each mesh service's NATS micro
``PING`` subject at once; a server with no subscriber answers "no responders" right
away, so it costs one round trip whether or not services run.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import TYPE_CHECKING, Any

from mesh._nats.types import nats_errors

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

from mesh.errors import BrokerError

# 2.10: a consumer with several filter subjects (every deliver-<target>).
# 2.11: per-message TTL (MESH_REVOKED entries) and consumer pause (an open circuit).
MIN_SERVER_VERSION = (2, 11, 0)
NEEDED_FOR = "per-message TTL for token revocation, consumer pause for open circuits"

# The long-running services (`mesh serve NAME`); each registers as micro `<prefix>-NAME`.
SERVICE_NAMES = ("webhook-egress", "bridge", "health", "sink")
PING_TIMEOUT_S = 0.5


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``2.11.3`` / ``v2.10.0-beta.1`` -> (2, 11, 3); None when unreadable."""
    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def refusal(info: dict[str, Any], where: str) -> str | None:
    """Why the server described by ``info`` cannot carry the mesh, or None."""
    version = str(info.get("version") or "")
    parsed = parse_version(version)
    need = ".".join(str(n) for n in MIN_SERVER_VERSION[:2])
    if parsed is not None and parsed < MIN_SERVER_VERSION:
        return (
            f"nats-server {version} at {where} is too old: the mesh needs {need} or newer"
            f" ({NEEDED_FOR})"
        )
    if info.get("jetstream") is False:
        return (
            f"nats-server {version or '?'} at {where} has no JetStream: start it with -js"
            " (or `mesh up` for the embedded one)"
        )
    return None


def check_server(port: JetStreamPort) -> None:
    """Raise ``BrokerError`` with one line when the connected server cannot carry the mesh."""
    problem = refusal(port.server_info, port.where)
    if problem:
        raise BrokerError(problem)


def micro_name(prefix: str, service: str) -> str:
    """The micro service name a service registers (``services/base.py``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{prefix}-{service}")


async def services_running(
    port: JetStreamPort, prefix: str, timeout: float = PING_TIMEOUT_S
) -> bool:
    """True when any mesh service answers its micro PING (or something listens and is slow)."""

    async def ping(service: str) -> bool:
        try:
            await port.request(f"$SRV.PING.{micro_name(prefix, service)}", b"", timeout=timeout)
        except nats_errors.NoRespondersError:
            return False
        except nats_errors.TimeoutError:
            return True  # a subscriber exists but is slow: do not cry wolf
        return True

    answers = await asyncio.gather(*(ping(s) for s in SERVICE_NAMES), return_exceptions=True)
    return any(a is True for a in answers)


async def warn_without_services(port: JetStreamPort, prefix: str, warn: Any) -> None:
    """Call ``warn(line)`` when no mesh service answers; quiet on any failure to ask."""
    with contextlib.suppress(Exception):
        if not await services_running(port, prefix):
            warn(f"no mesh services are running on {port.where}: start them with `mesh up`")


__all__ = [
    "MIN_SERVER_VERSION",
    "check_server",
    "parse_version",
    "refusal",
    "services_running",
    "warn_without_services",
]
