"""Helpers for tests of the HTTP API: a started ``Api`` on a free port, keys, requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import aiohttp

from mesh.apikeys import ApiKeyStore, Scope
from mesh.client import MeshClient
from mesh.config import Settings
from services.api import Api


@asynccontextmanager
async def api_running(settings: Settings, **updates: Any) -> AsyncIterator[Api]:
    api = Api(settings.model_copy(update={"api_port": 0, **updates}))
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


async def make_key(
    client: MeshClient,
    scope: Scope | str,
    *,
    name: str = "test",
    ttl: timedelta | None = None,
    rate: float | None = None,
) -> tuple[str, str]:
    """(key id, key text) of a new API key."""
    store = await ApiKeyStore.open(client.port, client.names.apikeys)
    record, key = await store.create(name, Scope(scope), ttl=ttl, rate=rate)
    return record.id, key


class Http:
    """A small client: JSON in, (status, headers, parsed body) out."""

    def __init__(self, base: str, key: str | None = None) -> None:
        self.base = base
        self.key = key
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> Http:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        data: bytes | str | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        h = dict(headers or {})
        token = key if key is not None else self.key
        if token:
            h.setdefault("Authorization", f"Bearer {token}")
        kwargs: dict[str, Any] = {"headers": h}
        if json_body is not None:
            kwargs["json"] = json_body
        elif data is not None:
            kwargs["data"] = data
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            text = await resp.text()
            ctype = resp.headers.get("Content-Type", "")
            body: Any = text
            if "json" in ctype and text:
                import json

                body = json.loads(text)
            return resp.status, dict(resp.headers), body
