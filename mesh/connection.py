"""The two slow steps of ``MeshClient.connect``, with the one clear line each failure
becomes: reaching NATS, then opening the registry while JetStream may still be
electing its leader."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from mesh._nats.types import NATS, js_errors, nats_errors
from mesh.config import Settings
from mesh.crypto import KeyRing
from mesh.errors import BrokerError, BrokerUnavailable
from mesh.registry import Registry

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

log = structlog.get_logger("mesh.client")  # the client's logger, as before the split


async def connect_nats(
    nc: NATS,
    settings: Settings,
    name: str,
    *,
    reconnect_forever: bool,
    on_disconnect: Callable[[], Awaitable[None]],
    on_reconnect: Callable[[], Awaitable[None]],
) -> None:
    """The first connect, within one budget (a TLS failure can leave nats.py waiting);
    raises ``BrokerUnavailable`` with what nats.py reported on the way."""
    last_error: list[str] = []

    async def on_error(exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        last_error.append(text.removeprefix("nats: ").strip("'"))
        log.debug("nats error", error=text)

    opts = settings.connect_options()
    try:
        await asyncio.wait_for(
            nc.connect(
                name=name,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                max_reconnect_attempts=-1 if reconnect_forever else 3,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats.py says int; float works
                allow_reconnect=True,
                **opts,
            ),
            timeout=settings.connect_timeout * 3 + 2,
        )
    except (nats_errors.Error, OSError, TimeoutError) as exc:
        raise unreachable(exc, settings.servers, last_error) from None


def unreachable(exc: BaseException, servers: list[str], last_error: list[str]) -> BrokerUnavailable:
    """Why the first connect failed, from the exception and the errors nats.py reported."""
    if not isinstance(exc, nats_errors.NoServersError | OSError | TimeoutError):
        return BrokerUnavailable(f"cannot connect to NATS: {str(exc) or type(exc).__name__}")
    where = ", ".join(servers)
    auth = [e for e in last_error if "authorization" in e.lower()]
    if auth:
        return BrokerUnavailable(
            f"cannot connect to NATS at {where}: {auth[0]} (check MESH_NATS_USER,"
            " MESH_NATS_PASSWORD, MESH_NATS_TOKEN or MESH_NATS_CREDS)"
        )
    if any("certificate" in e.lower() for e in last_error):
        return BrokerUnavailable(
            f"cannot connect to NATS at {where}: TLS certificate not trusted"
            " (check MESH_NATS_TLS_CA)"
        )
    return BrokerUnavailable(
        f"cannot connect to NATS at {where}"
        f" ({last_error[-1] if last_error else type(exc).__name__}): is the broker running"
        " (`mesh up`) and MESH_NATS_URL right?"
    )


async def open_registry(
    port: JetStreamPort,
    keyring: Callable[[], KeyRing | None],
    bucket: str,
    *,
    replicas: int,
    wait_s: float,
    close: Callable[[], Awaitable[None]],
) -> Registry:
    """Open the registry, waiting up to ``wait_s`` for a JetStream that is still electing
    its leader; on failure ``close`` the connection, then raise one clear error."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await Registry.open(port, keyring(), bucket, replicas=replicas)
        except nats_errors.NoRespondersError:
            await close()
            raise BrokerUnavailable(
                "the NATS server has no JetStream (start it with -js)"
            ) from None
        except (js_errors.APIError, nats_errors.TimeoutError) as exc:
            if time.monotonic() < deadline and (
                isinstance(exc, nats_errors.TimeoutError | js_errors.ServiceUnavailableError)
            ):
                log.info("waiting for JetStream", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            await close()
            raise BrokerError(f"cannot open the registry: {exc}") from None
