"""The streaming bridge: authenticated WebSocket feeds with resume and no loss.

``GET /v1/stream?target=T`` with ``Authorization: Bearer <token>`` (or
``&token=`` for browsers, which cannot set headers on a WebSocket). A refused
credential is an HTTP 401 with ``{"error": reason}`` before any upgrade.

Modes:

- ``feed`` (default): the target's durable ``deliver-T`` consumer, at least
  once. Every frame carries the stream sequence; the client answers
  ``{"ack": seq}`` (or a list of seqs). What it has not acked when it goes away
  is nak'ed back and comes again, to this or the next connection. At most
  ``max_in_flight`` unacked frames per connection.
- ``tail``: an ordered read of the target's filter subjects from
  ``since_seq=N`` (the first frame has seq >= N: resume with last seq + 1) or
  ``since_time=ISO`` (the first event stored at or after it), or from now.
  Nothing to ack; ``seq`` is the stream sequence. Live tails of one target share
  one ordered consumer; a tail from a point has its own.

Frames out: ``{"seq", "id", "source", "type", "time", "data"}`` (feed adds
``attempt``; an event with a trace context adds ``traceparent``/``tracestate``);
``{"published": {...}}`` and ``{"error": ...}`` answer the client. Frames in:
``{"ack": seq}``, ``{"nak": seq}``, ``{"publish": {"type", "data", "source"?, "id"?,
"ref"?, "traceparent"?, "tracestate"?}}`` (a valid W3C context continues the client's
trace).

Revocation: a token revoked with ``mesh token revoke`` (an entry in the
``<PREFIX>_REVOKED`` bucket, written by any process) is refused with a 401 and
the reason; the bridge watches the bucket and closes the live sessions of a
revoked token with 1008 (policy violation) and the reason, naking their unacked
frames first, as any close does.

Backpressure: frames go through a bounded queue to one writer. A client whose
queue stays full, whose socket stops taking data, or (feed) whose oldest frame
stays unacked too long is closed with 1013 (try again later); its unacked
frames are nak'ed first, so it loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiohttp import web

from mesh._nats.types import js_errors, nats_errors
from mesh.config import Settings
from mesh.errors import ConfigError, MeshError, NotFound, PortInUse
from mesh.ownership import find_target
from mesh.registry import EGRESS_KINDS
from mesh.revocations import Revocation, RevocationStore, RevocationView
from mesh.subjects import validate_name
from mesh.tokens import TokenClaims, TokenError, key_path, load_key, verify
from services.base import Service
from services.bridge.frames import CLOSE_GOING_AWAY, CLOSE_REVOKED
from services.bridge.session import (
    FEED,
    TAIL,
    BridgeOptions,
    BridgeShared,
    Session,
    Spec,
)
from services.bridge.tail import FrameCache, TailReader

PATH = "/v1/stream"


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _parse_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _Refused(400, f"since_time {text[:40]!r} is not an ISO 8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class Bridge(Service):
    name: ClassVar[str] = "bridge"

    def __init__(
        self,
        settings: Settings,
        *,
        instance: str | None = None,
        options: BridgeOptions | None = None,
    ) -> None:
        super().__init__(settings, instance=instance)
        self.options = options or BridgeOptions()
        self.port = settings.bridge_port
        self.scheme = "ws"
        self._key = b""
        self._runner: web.AppRunner | None = None
        self._conns: set[Session] = set()
        self._hubs: dict[tuple[str, tuple[str, ...]], TailReader] = {}
        self._hub_lock = asyncio.Lock()
        self.frames = FrameCache()
        self._accepting = False
        self.revocations: RevocationStore | None = None
        self.revoked = RevocationView()  # what the watch has seen, for sessions already in
        self.counts = {
            "connections": 0,
            "frames_in": 0,
            "frames_out": 0,
            "slow_closes": 0,
            "revoked_closes": 0,
        }
        self.shared = BridgeShared(
            client=self.client,
            deliveries=self.deliveries,
            options=self.options,
            log=self.log,
            instance=self.instance,
            counts=self.counts,
            conns=self._conns,
            close_if_revoked=self.close_if_revoked,
            join_tail=self.join_tail,
            leave_tail=self.leave_tail,
        )

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{PATH}"

    # Lifecycle ----------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        cert, key = self.settings.bridge_tls_cert, self.settings.bridge_tls_key
        if cert is None and key is None:
            return None
        if cert is None:
            raise ConfigError("MESH_BRIDGE_TLS_KEY is set without MESH_BRIDGE_TLS_CERT")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the bridge TLS certificate {cert}: {exc}") from None
        return ctx

    async def on_start(self) -> None:
        self._key = load_key(key_path(self.settings))
        ctx = self._ssl_context()
        self.revocations = await RevocationStore.open(
            self.client.port, self.client.names.revoked, self.settings.stream_replicas
        )
        self.spawn(self._watch_revocations(), name="bridge-revocations")
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        host = self.options.host or self.settings.bridge_host
        site = web.TCPSite(runner, host, self.settings.bridge_port, ssl_context=ctx)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PortInUse(
                f"bridge cannot listen on port {self.settings.bridge_port}"
                f" ({exc.strerror or exc}): set MESH_BRIDGE_PORT"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.scheme = "wss" if ctx else "ws"
        self._accepting = True
        self.log.info("bridge listening", port=self.port, tls=ctx is not None)

    async def on_drain(self, timeout: float) -> None:
        self._accepting = False
        await self._close_all(CLOSE_GOING_AWAY, "bridge shutting down", timeout)

    async def on_close(self) -> None:
        self._accepting = False
        await self._close_all(CLOSE_GOING_AWAY, "bridge shutting down", 5.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close_all(self, code: int, reason: str, timeout: float) -> None:
        closers = [c.close_soon(code, reason) for c in list(self._conns)]
        if closers:
            await asyncio.wait(closers, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._conns), "shared_tails": len(self._hubs), **self.counts}

    # Revocations ------------------------------------------------------------------

    async def _watch_revocations(self) -> None:
        """Follow the revocation bucket; a new watcher after a reconnect (one can go quiet
        across a server restart, and its first read closes what was revoked meanwhile)."""
        while not self.stopping.is_set():
            seen_reconnects = self.client.reconnects
            watch = asyncio.create_task(self._follow_revocations(), name="bridge-revoked-watch")
            try:
                while (
                    not self.stopping.is_set()
                    and not watch.done()
                    and seen_reconnects == self.client.reconnects
                ):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), 1.0)
                ended = watch.done()
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watch
            if ended and not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)

    async def _follow_revocations(self) -> None:
        assert self.revocations is not None
        loading = True
        try:
            async for rev in self.revocations.watch():
                if rev is None:
                    if loading:
                        self.log.info("revocations in force", count=len(self.revoked))
                    loading = False
                    continue
                if self.revoked.apply(rev) and not loading:
                    # The token itself is never known here, let alone logged: its id is.
                    self.log.info(
                        "bridge token revocation received",
                        revocation=rev.key,
                        reason=rev.reason,
                        by=rev.by,
                    )
                for session in list(self._conns):
                    self.close_if_revoked(session, rev)
        except (MeshError, nats_errors.Error, OSError, TimeoutError) as exc:
            # Admission still reads the bucket itself; the loop above starts a new watch.
            self.log.warning("revocation watch failed", error=str(exc) or repr(exc))

    def close_if_revoked(self, session: Session, rev: Revocation | None = None) -> bool:
        """Close a session whose token ``rev`` (or any revocation seen) covers."""
        claims = session.spec.claims
        rev = rev if rev is not None else self.revoked.refusal(claims)
        if rev is None or not rev.covers(claims) or session.closer is not None:
            return False
        self.counts["revoked_closes"] += 1
        session.log.info("session closed: token revoked", jti=claims.jti, revocation=rev.key)
        session.close_soon(CLOSE_REVOKED, rev.describe())
        return True

    # Tails ------------------------------------------------------------------------

    async def join_tail(self, session: Session) -> TailReader:
        """The reader feeding a tail: the target's shared live one, or its own from a point."""
        spec = session.spec
        if spec.since_seq is None and spec.since_time is None:
            key = (spec.target, tuple(spec.filters))
            async with self._hub_lock:
                hub = self._hubs.get(key)
                if hub is None:
                    hub = self._reader(spec, shared=True)
                    await hub.open(await hub.start_for(None, None))
                    self._hubs[key] = hub
                hub.sessions.add(session)  # from here on it gets every event the hub reads
            return hub
        own = self._reader(spec, shared=False)
        start = await own.start_for(spec.since_seq, spec.since_time)
        session.next_seq = start
        own.sessions.add(session)
        await own.open(start)
        return own

    def _reader(self, spec: Spec, *, shared: bool) -> TailReader:
        return TailReader(
            spec.target,
            spec.filters,
            shared=shared,
            client=self.client,
            deliveries=self.deliveries,
            frames=self.frames,
            log=self.log,
            heartbeat_s=self.options.tail_heartbeat_s,
        )

    async def leave_tail(self, reader: TailReader, session: Session) -> None:
        if not reader.shared:
            reader.sessions.discard(session)
            await reader.close()
            return
        async with self._hub_lock:
            reader.sessions.discard(session)
            if not reader.sessions:
                if self._hubs.get(reader.key) is reader:
                    del self._hubs[reader.key]
                await reader.close()

    # Admission ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = await self._admit(request)
        except _Refused as r:
            headers = {}
            if r.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="mesh", error="invalid_token"'
            return web.json_response({"error": r.reason}, status=r.status, headers=headers)
        return await Session(self.shared, request, spec).run()

    async def _admit(self, request: web.Request) -> Spec:
        if not self._accepting:
            raise _Refused(503, "the bridge is shutting down")
        q = request.query
        target = q.get("target", "")
        if not target:
            raise _Refused(400, "missing ?target=")
        try:
            validate_name(target, "target name")
        except MeshError as exc:
            raise _Refused(400, str(exc)) from None
        claims = self._authenticate(request, target)
        await self._check_revoked(claims)
        mode = q.get("mode", FEED)
        if mode not in (FEED, TAIL):
            raise _Refused(400, f"unknown mode {mode[:20]!r}: use feed or tail")
        since_seq: int | None = None
        since_time: datetime | None = None
        if "since_seq" in q or "since_time" in q:
            if mode != TAIL:
                raise _Refused(400, "since_seq and since_time need mode=tail")
            if "since_seq" in q and "since_time" in q:
                raise _Refused(400, "give since_seq or since_time, not both")
        if "since_seq" in q:
            try:
                since_seq = int(q["since_seq"])
            except ValueError:
                since_seq = 0
            if since_seq < 1:
                raise _Refused(400, "since_seq must be a stream sequence >= 1")
        if "since_time" in q:
            since_time = _parse_time(q["since_time"])
        client = self.client
        try:
            # A token of another tenant: as if there were no target.
            t = await find_target(client.registry, target, claims.tenant)
            if mode == FEED and t.kind in EGRESS_KINDS:
                raise _Refused(
                    409, f"target {target!r} is a {t.kind} target: its feed belongs to the egress"
                )
            try:
                info = await client.port.consumer_info(client.names.events, t.consumer)
            except js_errors.NotFoundError:
                info = await client.provisioner.reconcile_target(t)
        except NotFound:
            raise _Refused(404, f"unknown target {target!r}") from None
        except (MeshError, nats_errors.Error, OSError, TimeoutError) as exc:
            self.log.warning("admission failed", target=target, error=str(exc) or repr(exc))
            raise _Refused(503, "the broker is not reachable; try again") from None
        if not web.WebSocketResponse().can_prepare(request):
            raise _Refused(426, "this endpoint speaks WebSocket only")
        cap = info.config.max_ack_pending or self.options.max_in_flight
        # Close a non-acking client well before the consumer would redeliver behind its back.
        ack_wait = info.config.ack_wait or self.options.ack_timeout_s * 2
        return Spec(
            target=t.ref,  # a tenant's target: ~tenant.name, as its consumer and records
            claims=claims,
            mode=mode,
            since_seq=since_seq,
            since_time=since_time,
            filters=list(info.config.filter_subjects or [info.config.filter_subject or ""]),
            max_in_flight=max(1, min(self.options.max_in_flight, cap)),
            ack_timeout_s=min(self.options.ack_timeout_s, ack_wait * 2 / 3),
        )

    async def _check_revoked(self, claims: TokenClaims) -> None:
        assert self.revocations is not None
        try:
            # The bucket itself, not the watched view: a revocation made a moment ago
            # elsewhere is honoured even if this bridge's watch has not seen it yet.
            rev = await self.revocations.refusal(claims)
        except (MeshError, nats_errors.Error, OSError, TimeoutError) as exc:
            self.log.warning("revocation check failed", error=str(exc) or repr(exc))
            raise _Refused(503, "the broker is not reachable; try again") from None
        if rev is not None:
            self.log.info("revoked token refused", target=claims.target, jti=claims.jti)
            raise _Refused(401, rev.describe())

    def _authenticate(self, request: web.Request, target: str) -> TokenClaims:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise _Refused(401, "unsupported Authorization: use 'Bearer <token>'")
            token = value.strip()
        else:
            token = request.query.get("token", "")
        if not token:
            raise _Refused(401, "missing credentials: send 'Authorization: Bearer <token>'")
        try:
            return verify(self._key, token, target)
        except TokenError as exc:
            raise _Refused(401, str(exc)) from None
