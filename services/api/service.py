"""The API process: an aiohttp server on ``MESH_API_HOST``:``MESH_API_PORT`` (9402).

Stateless: keys, idempotency answers and the registry live in the broker, so any
number of instances may serve behind a load balancer. ``start`` opens the
buckets, builds the route table and listens (TLS when ``MESH_API_TLS_CERT`` and
``MESH_API_TLS_KEY`` are set); ``drain`` stops taking connections and lets
requests in flight finish; ``close`` releases the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, ClassVar

from aiohttp import web

from mesh.apikeys import ApiKeyStore
from mesh.config import Settings
from mesh.errors import ConfigError
from mesh.history import PayloadReader
from mesh.revocations import RevocationStore
from mesh.storage import Store, open_store
from services.api import graphql, portal, portal_session
from services.api.audit import Auditor
from services.api.auth import Auth
from services.api.idempotency import IdempotencyStore
from services.api.openapi import build_document, dumps
from services.api.problems import problem_middleware
from services.api.routes import route_table
from services.base import Service

# A batch of 1,000 events of a few KiB each fits; one event is capped by the broker's
# max_payload (PayloadTooLarge -> 413) long before this.
MAX_BODY = 16 * 1024 * 1024


class Api(Service):
    """The HTTP API service (``mesh serve api``)."""

    name: ClassVar[str] = "api"

    def __init__(
        self, settings: Settings, *, instance: str | None = None, host: str | None = None
    ) -> None:
        super().__init__(settings, instance=instance)
        self.host = host or settings.api_host
        self.port = settings.api_port
        self.table = route_table()
        self.document = build_document(self.table)
        self.document_text = dumps(self.document)
        self._runner: web.AppRunner | None = None
        self._auth: Auth | None = None
        self._idem: IdempotencyStore | None = None
        self._audit: Auditor | None = None
        self._store: Store | None = None
        self._revocations: RevocationStore | None = None
        self._store_lock = asyncio.Lock()
        self.reader = PayloadReader(settings)
        self.requests = 0

    # What handlers use ---------------------------------------------------------------

    @property
    def auth(self) -> Auth:
        assert self._auth is not None, "the API is not started"
        return self._auth

    @property
    def idempotency(self) -> IdempotencyStore:
        assert self._idem is not None, "the API is not started"
        return self._idem

    @property
    def audit(self) -> Auditor:
        assert self._audit is not None, "the API is not started"
        return self._audit

    async def revocations(self) -> RevocationStore:
        """The revocation bucket (portal links and bridge tokens), opened on first use."""
        if self._revocations is None:
            c = self.client
            self._revocations = await RevocationStore.open(
                c.port, c.names.revoked, self.settings.stream_replicas
            )
        return self._revocations

    async def store(self) -> Store:
        """The sink's database, opened (and its schema created if missing) on first use,
        for the read endpoints; the API writes no rows. A failure is a ``StorageError``
        (503)."""
        async with self._store_lock:
            if self._store is None:
                store = await open_store(self.settings.db_url)
                try:
                    # The sink's own migrations, idempotent and safe beside a migrating
                    # sink: before the sink has ever run, reads find empty tables, not
                    # missing ones (a 503).
                    await store.migrate()
                except BaseException:
                    await store.close()
                    raise
                self._store = store
            return self._store

    @property
    def scheme(self) -> str:
        return "https" if self.settings.api_tls_cert else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    # Lifecycle ------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        cert, key = self.settings.api_tls_cert, self.settings.api_tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ConfigError("set both MESH_API_TLS_CERT and MESH_API_TLS_KEY, or neither")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the API's TLS certificate or key: {exc}") from None
        return ctx

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY)
        self.table.install(app, self)
        graphql.install(app, self)
        portal.install(app, self.settings, self.revocations)
        return app

    async def on_start(self) -> None:
        ctx = self._ssl_context()
        names = self.client.names
        replicas = self.settings.stream_replicas
        keys = await ApiKeyStore.open(self.client.port, names.apikeys, replicas)
        session = portal_session.SessionVerifier(self.settings, self.revocations)
        self._auth = Auth(keys, self.settings.api_rate, session=session)
        self._idem = await IdempotencyStore.open(self.client.port, names.idempotency, replicas)
        self._audit = Auditor(self.client)
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ctx)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port} for the API"
                f" ({exc.strerror or exc}): set MESH_API_PORT to a free port"
            ) from None
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        self.log.info("api listening", host=self.host, port=self.port, tls=ctx is not None)

    async def on_drain(self, timeout: float) -> None:
        # aiohttp's cleanup stops listening, then waits (shutdown_timeout) for requests.
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def on_close(self) -> None:
        await self.on_drain(0)
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()

    def stats(self) -> dict[str, Any]:
        return {"api_port": self.port}
