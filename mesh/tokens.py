"""Bridge credentials: JWTs (HS256) scoped to one target.

``mesh token issue --target T`` signs a token with a key kept beside the
encryption key (``<key dir>/bridge.key``, created 0600; a file readable by
group or others is refused, as the key ring is). Claims::

    sub      the target the token opens (feed or tail)
    pub      sources the holder may publish as (default: the target itself)
    iat exp  issued / expires (seconds since the epoch, to the millisecond, so that
             ``mesh token revoke --target T --all`` tells tokens issued just before
             it from those issued just after)
    jti      a unique id (32 hex digits): logs name it, ``mesh token revoke JTI`` takes it
    iss aud  "mesh" / "mesh-bridge": a token minted for something else is refused

A token lives at most ``MAX_TTL`` (the bridge refuses a longer-lived one), so a
revocation kept that long (``mesh/revocations.py``) outlives every token it covers.

The bridge checks a token before upgrading a connection; every refusal is a
``TokenError`` whose message is the reason sent back with the HTTP 401.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from mesh.config import Settings
from mesh.errors import KeyFileError, MeshError
from mesh.subjects import validate_name

ALGORITHM = "HS256"
ISSUER = "mesh"
AUDIENCE = "mesh-bridge"
KEY_FILE_NAME = "bridge.key"
KEY_BYTES = 32
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=366)
# Clocks of the issuing machine and the bridge may differ a little.
LEEWAY_S = 5.0
_JTI = re.compile(r"[0-9a-f]{32}")


class TokenError(MeshError):
    """A credential the bridge refuses; the message is the reason."""


@dataclass(frozen=True)
class TokenClaims:
    target: str
    publish_as: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    jti: str
    tenant: str = "default"  # the target's tenant: its publishes are that tenant's sources

    def may_publish_as(self, source: str) -> bool:
        return source in self.publish_as


def validate_jti(jti: str) -> str:
    """A token id as ``issue`` makes them (32 lowercase hex digits), or ``TokenError``."""
    if not _JTI.fullmatch(jti):
        raise TokenError(
            f"invalid token id {jti[:40]!r}: a token id is 32 hex digits"
            " (printed by `mesh token issue`)"
        )
    return jti


# The signing key ------------------------------------------------------------


def key_path(settings: Settings) -> Path:
    return settings.key_path.parent / KEY_FILE_NAME


def _check_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"bridge key {path} is accessible by group or others (mode {mode:o});"
            f" run `chmod 600 {path}`"
        )


def load_key(path: Path, create: bool = True) -> bytes:
    """The signing key, created (0600, in a 0700 directory) when missing and allowed."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise KeyFileError(f"bridge key {path} does not exist (run `mesh token issue`)")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        try:
            # O_EXCL: the bridge and the CLI may race to create it; one wins, both read it.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(KEY_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    _check_mode(path)
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"bridge key {path} is corrupt: {type(exc).__name__}") from None
    if len(key) < KEY_BYTES:
        # Racing a creator that has not written yet looks the same; either way, no weak key.
        raise KeyFileError(f"bridge key {path} is corrupt: shorter than {KEY_BYTES} bytes")
    return key


# Issue and verify -------------------------------------------------------------


def issue(
    key: bytes,
    target: str,
    *,
    ttl: timedelta = DEFAULT_TTL,
    publish_as: Sequence[str] | None = None,
    now: datetime | None = None,
    tenant: str = "default",
) -> str:
    """A signed token for ``target``; ``publish_as`` defaults to the target's own name."""
    validate_name(target, "target name")
    if ttl.total_seconds() <= 0:
        raise TokenError("a token's time to live must be positive")
    if ttl > MAX_TTL:
        raise TokenError(f"a token's time to live is at most {MAX_TTL.days} days")
    sources = list(dict.fromkeys(publish_as)) if publish_as else [target]
    for s in sources:
        validate_name(s, "source name")
    now = now or datetime.now(UTC)
    issued = round(now.timestamp(), 3)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": target,
        "pub": sources,
        "iat": issued,
        "exp": round(issued + ttl.total_seconds(), 3),
        "jti": uuid.uuid4().hex,
    }
    if tenant != "default":  # tokens of the default tenant stay as they were
        claims["ten"] = validate_name(tenant, "tenant")
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(key: bytes, token: str, target: str, *, now: datetime | None = None) -> TokenClaims:
    """The token's claims if it opens ``target``; else ``TokenError`` with the reason."""
    if not token:
        raise TokenError("missing credentials")
    options: dict[str, object] = {"require": ["exp", "iat", "sub", "jti", "iss", "aud"]}
    if now is not None:
        # Verify as of a given time (tests): pyjwt compares with the wall clock.
        options["verify_exp"] = False
    try:
        doc = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=LEEWAY_S,
            options=options,  # type: ignore[arg-type]
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.InvalidSignatureError:
        raise TokenError("invalid token: signature does not verify") from None
    except jwt.DecodeError:
        raise TokenError("invalid token: not a well-formed JWT") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError(f"invalid token: only {ALGORITHM} is accepted") from None
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"invalid token: {exc}") from None
    try:
        issued = datetime.fromtimestamp(float(doc["iat"]), UTC)
        expires = datetime.fromtimestamp(float(doc["exp"]), UTC)
        sub = str(doc["sub"])
        pub = doc.get("pub", [sub])
        if not isinstance(pub, list) or not all(isinstance(p, str) for p in pub):
            raise TypeError("pub")
        tenant = doc.get("ten", "default")
        if not isinstance(tenant, str):
            raise TypeError("ten")
    except (KeyError, TypeError, ValueError, OverflowError):
        raise TokenError("invalid token: malformed claims") from None
    if now is not None and now.timestamp() > expires.timestamp() + LEEWAY_S:
        raise TokenError("token expired")
    if sub != target:
        raise TokenError(f"token is not valid for target {target!r}")
    if (expires - issued).total_seconds() > MAX_TTL.total_seconds() + LEEWAY_S:
        # A revocation is kept MAX_TTL: a longer-lived token would outlive it.
        raise TokenError(f"invalid token: lives longer than {MAX_TTL.days} days")
    return TokenClaims(
        target=sub,
        publish_as=tuple(pub),
        issued_at=issued,
        expires_at=expires,
        jti=str(doc["jti"]),
        tenant=tenant,
    )
