"""Who is calling: ``Authorization: Bearer mk_...`` checked against the key bucket.

Wrong, expired and revoked keys are a 401 (``WWW-Authenticate: Bearer``); a key
whose scope is below the route's is a 403. A verified key is remembered for
``CACHE_S`` (by the hash of the presented text, never the text), so a
revocation takes effect on every instance within that time. Each key has a
token bucket (its own ``rate`` or ``MESH_API_RATE`` requests/s, a second's worth
of burst) in this instance; past it the answer is 429 with ``Retry-After``.
Nothing here logs or returns the presented key.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from mesh.apikeys import ApiKey, ApiKeyStore, Scope
from mesh.portal import SESSION_PREFIX
from mesh.resilience import RateLimiter
from services.api.portal_session import check_session_route
from services.api.problems import FORBIDDEN, RATE_LIMITED, UNAUTHORIZED, ApiProblem

CACHE_S = 2.0
CACHE_MAX = 10_000
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mesh"'}


class Auth:
    def __init__(
        self,
        store: ApiKeyStore,
        default_rate: float,
        cache_s: float = CACHE_S,
        session: Callable[[str], Awaitable[ApiKey]] | None = None,
    ) -> None:
        self.store = store
        # Portal sessions (``mps_...``, services/api/portal.py): signed, not stored.
        self.session = session
        self.default_rate = default_rate
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._pending: dict[str, asyncio.Future[tuple[ApiKey | None, str]]] = {}

    async def authenticate(self, request: web.Request) -> ApiKey:
        header = request.headers.get("Authorization", "")
        scheme, _, text = header.partition(" ")
        if not header:
            raise ApiProblem(
                UNAUTHORIZED, "missing Authorization: Bearer <API key>", headers=CHALLENGE
            )
        if scheme.lower() != "bearer" or not text.strip():
            raise ApiProblem(UNAUTHORIZED, "use Authorization: Bearer <API key>", headers=CHALLENGE)
        if self.session is not None and text.startswith(SESSION_PREFIX):
            return await self.session(text.strip())
        fingerprint = hashlib.sha256(text.strip().encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(fingerprint)
        if cached is not None and now - cached[0] < self.cache_s:
            key = cached[1]
            if key.state(datetime.now(UTC)) == "active":
                return key
        # One look-up per key at a time: a burst of requests with a key the cache does not
        # hold (yet, or any more) waits for the first one's answer.
        pending = self._pending.get(fingerprint)
        if pending is None:
            pending = asyncio.ensure_future(self.store.verify(text))
            self._pending[fingerprint] = pending
            pending.add_done_callback(lambda _: self._pending.pop(fingerprint, None))
        key_or_none, why = await asyncio.shield(pending)
        if key_or_none is None:
            self._cache.pop(fingerprint, None)
            raise ApiProblem(UNAUTHORIZED, why, headers=CHALLENGE)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[fingerprint] = (now, key_or_none)
        return key_or_none

    def _limit(self, key: ApiKey) -> None:
        rate = key.rate or self.default_rate
        limiter = self._limiters.get(key.id)
        if limiter is None:
            limiter = self._limiters[key.id] = RateLimiter(rate, burst=max(1.0, rate))
        elif limiter.rate != rate:
            limiter.set_rate(rate, burst=max(1.0, rate))
        wait = limiter.reserve()
        if wait > 0:
            limiter.tokens += 1.0  # refused: the token is not spent
            raise ApiProblem(
                RATE_LIMITED,
                f"over {rate:g} requests/s for this API key",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    async def check(self, request: web.Request, scope: Scope) -> ApiKey:
        key = await self.authenticate(request)
        if not key.scope.allows(scope):
            raise ApiProblem(FORBIDDEN, f"this needs the {scope} scope; the key has {key.scope}")
        check_session_route(key, request)
        self._limit(key)
        return key
