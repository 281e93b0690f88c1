"""Acknowledged means on disk: the broker's sync mode and the database's commit durability.

nats-server's JetStream file store fsyncs every two minutes by default, so an acknowledged
publish can be lost to a power failure or kernel crash (Jepsen, NATS 2.12.1; issue #14).
mesh runs its embedded broker (and ships nats.conf) with ``sync_interval: always``;
``MESH_BROKER_SYNC=lazy`` opts out for speed.

Which mode the broker runs in is read, in order of trust:

1. from the server itself: ``$SYS.REQ.SERVER.PING.VARZ`` (``jetstream.config.sync_always``),
   answered only to a user of the system account;
2. for the embedded broker, from the file it records the config it was given in
   (``$MESH_HOME/nats/mesh-broker.json``);
3. otherwise "unknown": an external server's config cannot be seen without system access.
"""

from __future__ import annotations

import contextlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from mesh._nats.types import nats_errors

BROKER_INFO_FILE = "mesh-broker.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
VARZ_SUBJECT = "$SYS.REQ.SERVER.PING.VARZ"
LAZY_WARNING = (
    "warning: MESH_BROKER_SYNC=lazy: the broker acknowledges events before they are on disk;"
    " a power failure or kernel crash can lose up to two minutes of acknowledged events"
)


class SyncMode(StrEnum):
    """How the JetStream file store reaches the disk."""

    ALWAYS = "always"  # fsync before every acknowledgement
    LAZY = "lazy"  # nats-server's default: fsync every two minutes


def nats_config(mode: SyncMode) -> str:
    """The nats-server config lines that give ``mode`` (empty: the server's default)."""
    if mode is SyncMode.ALWAYS:
        return "jetstream {\n  sync_interval: always\n}\n"
    return ""


def write_broker_info(store_dir: Path, mode: SyncMode, port: int) -> None:
    (store_dir / BROKER_INFO_FILE).write_text(json.dumps({"sync": str(mode), "port": port}))


def read_broker_info(store_dir: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((store_dir / BROKER_INFO_FILE).read_text())
        if isinstance(info, dict):
            return info
    return None


def mode_from_varz(varz: dict[str, Any]) -> SyncMode | None:
    """``always``/``lazy`` from one server's /varz document (None if it has no JetStream)."""
    config = (varz.get("jetstream") or {}).get("config")
    if not isinstance(config, dict):
        return None
    return SyncMode.ALWAYS if config.get("sync_always") else SyncMode.LAZY


async def broker_sync(port: Any, store_dir: Path) -> dict[str, Any]:
    """``{"mode": "always"|"lazy"|"mixed"|"unknown", "source": ..., "servers": {...}}``.

    ``store_dir``: where this mesh's embedded broker would keep its store
    (``Settings.nats_store_dir``); its record counts only if ``nc`` is connected to that
    broker's port on loopback. ``port``: a ``JetStreamPort``.
    """
    servers: dict[str, str] = {}
    with contextlib.suppress(nats_errors.Error, OSError, TimeoutError, ValueError):
        for msg in await port.gather(VARZ_SUBJECT, flush_timeout=1, next_timeout=0.3):
            doc = json.loads(msg.data)
            data = doc.get("data") or {}
            mode = mode_from_varz(data)
            if mode is not None:
                servers[str(data.get("server_name") or data.get("server_id"))] = str(mode)
    if servers:
        modes = set(servers.values())
        return {
            "mode": modes.pop() if len(modes) == 1 else "mixed",
            "source": "server (/varz)",
            "servers": servers,
        }
    url = port.server_url
    if url is not None and url.hostname in LOOPBACK:
        info = read_broker_info(store_dir)
        if info and info.get("port") == url.port:
            return {"mode": str(info.get("sync")), "source": "embedded broker config"}
    return {
        "mode": "unknown",
        "source": "external server without system-account access: check its"
        " jetstream { sync_interval } setting",
    }
