"""Portal sessions as the API sees them: the bearer check and the routes a session may call.

Kept apart from ``portal.py`` (the pages and the link route) so that ``auth.py`` can use
it without importing the route table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path

from aiohttp import web

from mesh import portal
from mesh.apikeys import ApiKey, Scope
from mesh.config import Settings
from mesh.errors import KeyFileError
from mesh.revocations import RevocationStore
from services.api.problems import FORBIDDEN, UNAUTHORIZED, UNAVAILABLE, ApiProblem

SESSION_ID_PREFIX = "portal-"
# What a portal session may call: the page's own needs, nothing else (no API keys,
# no bridge tokens, no GraphQL, no purge).
SESSION_ROUTES = frozenset(
    {
        ("GET", "/v1/targets"),
        ("POST", "/v1/targets"),
        ("GET", "/v1/targets/{name}"),
        ("PATCH", "/v1/targets/{name}"),
        ("DELETE", "/v1/targets/{name}"),
        ("POST", "/v1/targets/{name}/pause"),
        ("POST", "/v1/targets/{name}/resume"),
        ("POST", "/v1/targets/{name}/rotate-secret"),
        ("POST", "/v1/targets/{name}/replay"),
        ("GET", "/v1/propagations"),
        ("POST", "/v1/propagations"),
        ("POST", "/v1/events"),
        ("GET", "/v1/events/{id}"),
        ("GET", "/v1/deliveries"),
        ("GET", "/v1/dead-letters"),
        ("POST", "/v1/dead-letters/{ident}/retry"),
    }
)


@cache
def _key(path: Path) -> bytes:
    return portal.load_key_file(path)


def signing_key(settings: Settings) -> bytes:
    """The portal key (created on first use); a key file problem is a 503."""
    try:
        return _key(portal.key_path(settings))
    except KeyFileError as exc:
        raise ApiProblem(UNAVAILABLE, f"the portal's key is unusable: {exc}") from None


Revocations = Callable[[], Awaitable[RevocationStore]]


class SessionVerifier:
    """Turns a portal session credential into the key the API checks scopes with; a
    session of a revoked link is refused (read from the revocation bucket each call)."""

    def __init__(self, settings: Settings, revocations: Revocations) -> None:
        self.settings = settings
        self.revocations = revocations

    async def __call__(self, text: str) -> ApiKey:
        try:
            claims = portal.verify(signing_key(self.settings), text, portal.SESSION_AUDIENCE)
        except portal.PortalError as exc:
            raise ApiProblem(
                UNAUTHORIZED, str(exc).replace("link", "session"), headers=_CHALLENGE
            ) from None
        if await portal.revoked(await self.revocations(), claims):
            raise ApiProblem(UNAUTHORIZED, "this portal session's link was revoked")
        return ApiKey(
            id=f"{SESSION_ID_PREFIX}{claims.jti[:12]}",
            name=f"portal session of tenant {claims.tenant}",
            scope=Scope.ADMIN,
            hash="",
            created_at=claims.issued_at,
            expires_at=claims.expires_at,
            created_by=f"portal:{claims.tenant}",
            tenant=claims.tenant,
        )


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mesh"'}


def check_session_route(key: ApiKey, request: web.Request) -> None:
    """A portal session may call only the portal's routes (403 elsewhere)."""
    if not key.id.startswith(SESSION_ID_PREFIX):
        return
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else request.path
    if (request.method, template) not in SESSION_ROUTES:
        raise ApiProblem(FORBIDDEN, "a portal session cannot call this")
