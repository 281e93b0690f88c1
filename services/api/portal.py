"""The endpoint-owner portal: ``/portal/`` pages and ``POST /v1/portal/links``.

An operator hands a tenant's user a signed link (``mesh portal link --tenant T`` or
``POST /v1/portal/links``). ``GET /portal/?link=TOKEN`` checks it (an expired link is
a 401 page, a tampered or malformed one a 403 page) and answers the page with a
session credential (``mesh.portal``) in a ``<meta>`` element; the page's script
(``portal_static/portal.js``, served from here, nothing from another origin) calls
``/v1`` with it as a bearer token. The API treats a session as an admin key limited
to the routes in ``portal_session.SESSION_ROUTES`` (what the page uses), so the portal has no back
end of its own. A session is a key of the link's tenant (``ApiKey.tenant``): it sees
that tenant's targets, propagations, deliveries and dead letters, nothing of another's.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, Field

from mesh import portal
from mesh.apikeys import Scope
from mesh.config import Settings
from services.api import tenancy
from services.api.portal_session import Revocations, signing_key
from services.api.problems import ApiProblem
from services.api.routing import NAME_PATTERN, Call, Param, Route, RouteTable

STATIC = Path(__file__).with_name("portal_static")
LINK_ID = r"^[0-9a-f]{32}$"
ASSETS = {
    "portal.js": "text/javascript",
    "portal.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
# Stricter than the dashboard's: no inline script or style at all.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # The link (a credential) is in the URL: never sent on as a Referer.
    "Referrer-Policy": "no-referrer",
}
# The link route (in the API's route table and document) ------------------------------


class LinkIn(BaseModel):
    tenant: str = Field(default="default", pattern=NAME_PATTERN, description="Whose portal")
    ttl_s: float = Field(
        default=portal.DEFAULT_TTL.total_seconds(),
        gt=0,
        le=portal.MAX_TTL.total_seconds(),
        description="How long the link opens the portal",
    )


class LinkOut(BaseModel):
    url: str = Field(description="The signed portal URL: hand it to the tenant's user")
    id: str = Field(description="The link's id: what revoking it takes")
    tenant: str
    expires_at: str


async def create_link(call: Call) -> LinkOut:
    body: LinkIn = call.body
    await (await tenancy.store(call)).get(body.tenant)  # 404 for an unknown tenant
    key = signing_key(call.api.settings)
    token, claims = portal.issue_link(key, body.tenant, ttl=timedelta(seconds=body.ttl_s))
    base = f"{call.request.scheme}://{call.request.host}"
    await call.api.audit.record(
        call.actor, "portal.link", f"tenant:{body.tenant}", None, {"jti": claims.jti}
    )
    return LinkOut(
        url=portal.link_url(base, token),
        id=claims.jti,
        tenant=claims.tenant,
        expires_at=claims.expires_at.isoformat(timespec="seconds"),
    )


class RevokeLinkIn(BaseModel):
    reason: str = Field(default="", max_length=200, pattern=r"^[ -~\u00c0-\u024f]*$")


class RevokeLinkOut(BaseModel):
    id: str = Field(description="The link's id")
    new: bool = Field(description="False: it was revoked already")


async def revoke_link(call: Call) -> RevokeLinkOut:
    store = await call.api.revocations()
    jti, new = await portal.revoke_link(
        store, call.params["jti"], reason=call.body.reason, by=call.actor
    )
    if new:
        await call.api.audit.record(call.actor, "portal.revoke", f"portal-link:{jti}", None, None)
    return RevokeLinkOut(id=jti, new=new)


def register(table: RouteTable) -> None:
    table.add(
        Route(
            "POST",
            "/v1/portal/links/{jti}/revoke",
            revoke_link,
            "Revoke a portal link and its sessions before they expire",
            ("portal",),
            Scope.ADMIN,
            "revokePortalLink",
            body=RevokeLinkIn,
            response=RevokeLinkOut,
            params=(Param("jti", "path", "The link's id (32 hex digits)", pattern=LINK_ID),),
        )
    )
    table.add(
        Route(
            "POST",
            "/v1/portal/links",
            create_link,
            "A signed link to one tenant's portal",
            ("portal",),
            Scope.ADMIN,
            "createPortalLink",
            body=LinkIn,
            response=LinkOut,
            status=201,
            problems=(404,),
        )
    )


# The pages ---------------------------------------------------------------------------------


def _page(title: str, body: str, status: int = 200, meta: str = "") -> web.Response:
    text = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>{meta}"
        '<link rel=icon href="/portal/favicon.svg">'
        '<link rel=stylesheet href="/portal/portal.css"></head>'
        f"<body>{body}</body></html>\n"
    )
    return web.Response(
        status=status, text=text, content_type="text/html", headers=dict(PAGE_HEADERS)
    )


def refused(status: int, reason: str) -> web.Response:
    body = (
        "<main class=refused><h1 id=refused>Portal link refused</h1><p id=reason>"
        f"{html.escape(reason)}.</p><p>Ask your operator for a new link.</p></main>"
    )
    return _page("Portal link refused", body, status)


def make_portal_page(
    settings: Settings, revocations: Revocations
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def page(request: web.Request) -> web.Response:
        token = request.query.get("link", "")
        if not token:
            return refused(401, "This page opens only from a portal link")
        try:
            key = signing_key(settings)
        except ApiProblem as exc:
            return refused(503, str(exc))
        try:
            claims = portal.verify(key, token, portal.LINK_AUDIENCE)
        except portal.PortalError as exc:
            return refused(401 if exc.expired else 403, str(exc).capitalize())
        if await portal.revoked(await revocations(), claims):
            return refused(403, "This portal link was revoked")
        session = portal.issue_session(key, claims)
        meta = (
            f'<meta name=mesh-session content="{html.escape(session)}">'
            f'<meta name=mesh-tenant content="{html.escape(claims.tenant)}">'
            f'<meta name=mesh-expires content="{claims.expires_at.isoformat()}">'
            '<script src="/portal/portal.js" defer></script>'
        )
        body = (STATIC / "portal.html").read_text(encoding="utf-8")
        return _page(f"Endpoints of {claims.tenant}", body, meta=meta)

    return page


async def _asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["asset"]
    ctype = ASSETS.get(name)
    if ctype is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=(STATIC / name).read_bytes(),
        content_type=ctype,
        charset="utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


def install(app: web.Application, settings: Settings, revocations: Revocations) -> None:
    app.router.add_get("/portal/", make_portal_page(settings, revocations))
    app.router.add_get("/portal/{asset}", _asset)
