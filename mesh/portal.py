"""Portal links and sessions: short-lived signed credentials for one tenant's portal.

``mesh portal link --tenant T [--ttl 1h]`` (or ``POST /v1/portal/links``) signs a
*link* token (an HS256 JWT, audience ``mesh-portal-link``) and prints a URL to the
API service's ``/portal/?link=TOKEN``. The page verifies it and hands the browser a
*session* token (audience ``mesh-portal-session``, prefixed ``mps_``) that expires
with the link or after ``SESSION_TTL``, whichever is first; the page calls ``/v1``
with it as its bearer credential. The key (``<key dir>/portal.key``, 0600, created
on first use like the bridge key) never leaves the machine; a tampered token fails
its signature and an expired one its ``exp``, each a ``PortalError`` naming why.

A link can be revoked before it expires (``mesh portal revoke LINK``, or
``POST /v1/portal/links/{jti}/revoke``): its id (the JWT's ``jti``) goes into the bridge
tokens' revocation bucket (``mesh.revocations``, ``jti.<id>``, kept until the link
would have expired), and both the page and every session call look it up there, so
the link and the sessions it opened stop working at once, in every API process.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import jwt

from mesh.config import Settings
from mesh.errors import MeshError
from mesh.subjects import validate_name

if TYPE_CHECKING:
    from mesh.revocations import RevocationStore

ALGORITHM = "HS256"
ISSUER = "mesh"
LINK_AUDIENCE = "mesh-portal-link"
SESSION_AUDIENCE = "mesh-portal-session"
SESSION_PREFIX = "mps_"
KEY_FILE_NAME = "portal.key"
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=7)
SESSION_TTL = timedelta(minutes=30)
LEEWAY_S = 5.0


class PortalError(MeshError):
    """A portal link or session that is refused; ``expired`` tells the two cases apart."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True)
class PortalClaims:
    tenant: str
    issued_at: datetime
    expires_at: datetime
    jti: str


def key_path(settings: Settings) -> Path:
    return settings.key_path.parent / KEY_FILE_NAME


def load_key_file(path: Path) -> bytes:
    """The portal's signing key, created when missing (the bridge key's file rules)."""
    from mesh.tokens import load_key

    return load_key(path, create=True)


def _sign(key: bytes, audience: str, tenant: str, issued: float, expires: float, jti: str) -> str:
    claims = {
        "iss": ISSUER,
        "aud": audience,
        "sub": tenant,
        "iat": issued,
        "exp": expires,
        "jti": jti,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def issue_link(
    key: bytes, tenant: str, *, ttl: timedelta = DEFAULT_TTL, now: datetime | None = None
) -> tuple[str, PortalClaims]:
    """A link token for ``tenant``'s portal and its claims."""
    validate_name(tenant, "tenant name")
    if ttl.total_seconds() <= 0:
        raise PortalError("a portal link's time to live must be positive")
    if ttl > MAX_TTL:
        raise PortalError(f"a portal link lives at most {MAX_TTL.days} days")
    issued = round((now or datetime.now(UTC)).timestamp(), 3)
    expires = round(issued + ttl.total_seconds(), 3)
    jti = uuid.uuid4().hex
    token = _sign(key, LINK_AUDIENCE, tenant, issued, expires, jti)
    return token, _claims(tenant, issued, expires, jti)


def issue_session(key: bytes, link: PortalClaims, *, now: datetime | None = None) -> str:
    """A session credential for the page a verified link opened (``mps_`` + a JWT)."""
    issued = round((now or datetime.now(UTC)).timestamp(), 3)
    expires = min(link.expires_at.timestamp(), issued + SESSION_TTL.total_seconds())
    return SESSION_PREFIX + _sign(
        key, SESSION_AUDIENCE, link.tenant, issued, round(expires, 3), link.jti
    )


def _claims(tenant: str, issued: float, expires: float, jti: str) -> PortalClaims:
    return PortalClaims(
        tenant=tenant,
        issued_at=datetime.fromtimestamp(issued, UTC),
        expires_at=datetime.fromtimestamp(expires, UTC),
        jti=jti,
    )


def verify(key: bytes, token: str, audience: str) -> PortalClaims:
    """The claims of a link (``LINK_AUDIENCE``) or session (``SESSION_AUDIENCE``) token."""
    if audience == SESSION_AUDIENCE:
        if not token.startswith(SESSION_PREFIX):
            raise PortalError("not a portal session")
        token = token[len(SESSION_PREFIX) :]
    if not token:
        raise PortalError("missing portal link")
    try:
        doc = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=ISSUER,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise PortalError("this portal link has expired", expired=True) from None
    except jwt.InvalidTokenError:
        # Bad signature, wrong audience, malformed: the reason is not told to the holder.
        raise PortalError("this portal link is not valid") from None
    try:
        tenant = validate_name(str(doc["sub"]), "tenant name")
        claims = _claims(tenant, float(doc["iat"]), float(doc["exp"]), str(doc["jti"]))
    except (KeyError, TypeError, ValueError, OverflowError, MeshError):
        raise PortalError("this portal link is not valid") from None
    if claims.expires_at - claims.issued_at > MAX_TTL + timedelta(seconds=LEEWAY_S):
        raise PortalError("this portal link is not valid")
    return claims


def link_url(base: str, token: str) -> str:
    return f"{base.rstrip('/')}/portal/?link={token}"


_LINK_ID = re.compile(r"[0-9a-f]{32}")


def link_id(text: str) -> tuple[str, datetime | None]:
    """The id of a portal link given as its id, its token or its URL, and (not for a bare
    id) when it expires. The signature is not checked: revoking needs no proof."""
    text = text.strip()
    if _LINK_ID.fullmatch(text):
        return text, None
    token = parse_qs(urlsplit(text).query).get("link", [text])[0] if "link=" in text else text
    try:
        doc = jwt.decode(token, options={"verify_signature": False})
        jti, exp = str(doc["jti"]), float(doc["exp"])
        if not _LINK_ID.fullmatch(jti):
            raise ValueError(jti)
        return jti, datetime.fromtimestamp(exp, UTC)
    except (jwt.InvalidTokenError, KeyError, TypeError, ValueError, OverflowError):
        raise PortalError("not a portal link, its URL or its 32-digit id") from None


async def revoke_link(
    store: RevocationStore, text: str, *, reason: str = "", by: str = ""
) -> tuple[str, bool]:
    """Revoke a portal link (its id, token or URL); returns its id and whether it is new."""
    jti, expires = link_id(text)
    until = expires if expires is not None else datetime.now(UTC) + MAX_TTL
    _, new = await store.revoke_token(jti, reason=reason, by=by, expires_at=until)
    return jti, new


async def revoked(store: RevocationStore, claims: PortalClaims) -> bool:
    """Whether the link of these claims (or of the session it opened) is revoked."""
    return await store.get(f"jti.{claims.jti}") is not None
