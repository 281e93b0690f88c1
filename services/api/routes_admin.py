"""Bridge tokens: issue, revoke (one, or every token of a target), list the revoked.

The same calls as ``mesh token``: ``mesh.tokens.issue`` with the bridge key beside
the encryption key (the API needs ``MESH_HOME``'s keys, as the CLI does), and
``mesh.revocations.RevocationStore``. A token is answered once, at issue; the audit
log names its id (jti), never the token.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, Field

from mesh.apikeys import Scope
from mesh.errors import NotFound
from mesh.ownership import find_target
from mesh.revocations import MAX_REASON, Revocation, RevocationStore
from mesh.subjects import split_source
from mesh.tokens import DEFAULT_TTL, MAX_TTL, issue, key_path, load_key, verify
from services.api.routing import NAME_PATTERN, REF_PATTERN, Call, Param, Reply, Route, RouteTable


class TokenIn(BaseModel):
    target: str = Field(
        pattern=REF_PATTERN,
        description="The target the token opens (a tenant's: ~tenant.name, or a name only one"
        " tenant holds)",
    )
    ttl_s: float = Field(
        default=DEFAULT_TTL.total_seconds(),
        ge=1,
        le=MAX_TTL.total_seconds(),
        description="Lifetime in seconds",
    )
    publish_as: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=list,
        max_length=100,
        description="Sources the holder may publish as (default: the target)",
    )


class TokenIssued(BaseModel):
    token: str = Field(description="The bridge token (JWT), shown once")
    jti: str
    target: str
    publish_as: list[str]
    issued_at: datetime
    expires_at: datetime


class RevokeIn(BaseModel):
    # One line of printable text (mesh.revocations.check_reason), stated so a schema can:
    # ASCII and the Latin letters.
    reason: str = Field(default="", max_length=MAX_REASON, pattern=r"^[ -~\u00c0-\u024f]*$")


class RevokeResult(BaseModel):
    revocation: Revocation
    new: bool


async def _store(call: Call) -> RevocationStore:
    client = call.api.client
    return await RevocationStore.open(
        client.port, client.names.revoked, client.settings.stream_replicas
    )


async def _tenant_and_name(call: Call, ref: str) -> tuple[str, str]:
    """(tenant, name) of the target ``ref`` names (``~T.name``, or a name one tenant
    holds); for none, as ``ref`` says: a token may name a target made later, and may
    outlive its target (the bridge finds the name in its tenant)."""
    try:
        found = await find_target(call.api.client.registry, ref, None)
    except NotFound:
        return split_source(ref)
    return found.tenant, found.name


async def issue_token(call: Call) -> Reply:
    body: TokenIn = call.body
    key = load_key(key_path(call.api.settings))
    tenant, target = await _tenant_and_name(call, body.target)
    token = issue(
        key,
        target,
        ttl=timedelta(seconds=body.ttl_s),
        publish_as=body.publish_as or None,
        tenant=tenant,
    )
    claims = verify(key, token, target)
    await call.api.audit.record(
        call.actor,
        "token.issue",
        f"token:{claims.jti}",
        None,
        {"target": claims.target, "expires_at": claims.expires_at.isoformat()},
    )
    out = TokenIssued(
        token=token,
        jti=claims.jti,
        target=claims.target,
        publish_as=list(claims.publish_as),
        issued_at=claims.issued_at,
        expires_at=claims.expires_at,
    )
    return Reply(out, status=201)


async def revoke_token(call: Call) -> RevokeResult:
    store = await _store(call)
    rev, new = await store.revoke_token(call.params["jti"], reason=call.body.reason, by=call.actor)
    if new:
        await call.api.audit.record(
            call.actor, "token.revoke", f"token:{rev.id}", None, rev.model_dump(mode="json")
        )
    return RevokeResult(revocation=rev, new=new)


async def revoke_target_tokens(call: Call) -> RevokeResult:
    store = await _store(call)
    tenant, name = await _tenant_and_name(call, call.params["name"])
    rev = await store.revoke_target(name, tenant=tenant, reason=call.body.reason, by=call.actor)
    await call.api.audit.record(
        call.actor,
        "token.revoke_target",
        f"target:{rev.target}",
        None,
        rev.model_dump(mode="json"),
    )
    return RevokeResult(revocation=rev, new=True)


async def list_revoked(call: Call) -> list[Revocation]:
    now = datetime.now(UTC)
    return [r for r in await (await _store(call)).list() if r.kept_until > now]


def register(table: RouteTable) -> None:
    tags = ("tokens",)
    jti = Param("jti", "path", "The token's id (32 hex digits)", pattern=r"^[0-9a-f]{32}$")
    name = Param("name", "path", "The target (a tenant's: ~tenant.name)", pattern=REF_PATTERN)
    table.extend(
        [
            Route(
                "POST",
                "/v1/tokens",
                issue_token,
                "Issue a bridge token (shown once)",
                tags,
                Scope.ADMIN,
                "issueToken",
                body=TokenIn,
                response=TokenIssued,
                status=201,
            ),
            Route(
                "POST",
                "/v1/tokens/{jti}/revoke",
                revoke_token,
                "Revoke one bridge token",
                tags,
                Scope.ADMIN,
                "revokeToken",
                body=RevokeIn,
                response=RevokeResult,
                params=(jti,),
            ),
            Route(
                "POST",
                "/v1/targets/{name}/revoke-tokens",
                revoke_target_tokens,
                "Revoke every bridge token of a target issued before now",
                tags,
                Scope.ADMIN,
                "revokeTargetTokens",
                body=RevokeIn,
                response=RevokeResult,
                params=(name,),
            ),
            Route(
                "GET",
                "/v1/tokens/revoked",
                list_revoked,
                "Revocations in force",
                tags,
                Scope.READ,
                "listRevokedTokens",
                response=list[Revocation],
            ),
        ]
    )
