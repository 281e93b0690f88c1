"""Targets and propagations, through the same registry calls as the CLI.

The API's models are derived from the registry's (``mesh.registry.Target`` and
``Propagation``) with ``create_model``: a field added there (a propagation
``filter``, say) appears here and in the document without a second definition.
Secrets are never answered, except a generated or rotated one, once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field, create_model
from pydantic import ValidationError as PydValidationError

from mesh.apikeys import Scope
from mesh.destinations import missing_extra
from mesh.netguard import validate_url
from mesh.registry import (
    DESTINATION_KINDS,
    SECRET_PREFIX,
    Propagation,
    Registry,
    Target,
    TargetKind,
    TargetStatus,
    validate_expressions,
)
from mesh.subjects import validate_name
from services.api import routing, tenancy
from services.api.problems import INVALID, ApiProblem
from services.api.quotas import tenant_for_new_target
from services.api.routing import NAME_PATTERN, Call, Param, Reply, Route, RouteTable, field_errors

_SECRETS = {"secret_enc", "old_secret_enc", "url_enc"}
_BOOKKEEPING = {"old_secret_expires", "status", "status_reason", "created_at", "updated_at"}
# What a client may set on a target after creating it.
UPDATABLE = (
    "url",
    "timeout_s",
    "rate",
    "retry",
    "circuit_threshold",
    "circuit_open_s",
    "max_in_flight",
    "ordered",
    "format",
    "transform",  # JMESPath over the data (mesh/transform.py), checked before it is stored
)


def _fields(model: type[BaseModel], skip: set[str], *, optional: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        if optional:
            # The constraints (gt, le, ...) stay on the value; None means "unchanged".
            inner = Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation
            out[name] = (Optional[inner], Field(default=None, description=f.description))  # noqa: UP045
        else:
            out[name] = (f.annotation, f)
    return out


_ONE: Any = Literal["unidirectional", "bidirectional"]
_MULTI: Any = Literal["multicast"]
_ALL: Any = Literal["broadcast"]
_WEBHOOK: Any = Literal["webhook"]
_CONSUMER: Any = Literal["nats", "stream"]
_DESTINATION: Any = Literal["amqp", "mqtt", "redis", "sqs", "s3", "kafka"]


TargetOut = create_model(
    "TargetOut",
    __doc__="A target as the registry holds it, without its secrets.",
    **_fields(Target, _SECRETS),
    has_secret=(bool, ...),
    rotating=(bool, Field(description="An old secret still signs (during a rotation)")),
)
# http(s)://host[:port][/path]: what mesh.netguard.validate_url takes (ports 1-65535).
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
URL_PATTERN = r"^https?://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:" + _PORT + r")?(/[!-~]*)?$"
_Url = Annotated[str, Field(pattern=URL_PATTERN, max_length=2000, description="http(s) URL")]
_create_fields = _fields(Target, _SECRETS | _BOOKKEEPING | {"name", "kind", "url"})
WebhookTargetIn = create_model(
    "WebhookTargetIn",
    __doc__="A new webhook target; its signing secret is generated when not given.",
    name=(str, Field(pattern=NAME_PATTERN)),
    kind=(_WEBHOOK, ...),
    url=(_Url, ...),
    **_create_fields,
    secret=(
        str | None,
        Field(
            default=None,
            pattern="^" + SECRET_PREFIX + r"[A-Za-z0-9+/=]{8,200}$",
            description="whsec_ + base64 (generated if omitted)",
        ),
    ),
)
ConsumerTargetIn = create_model(
    "ConsumerTargetIn",
    __doc__="A new nats target (a program consumes it) or stream target (the WebSocket bridge).",
    name=(str, Field(pattern=NAME_PATTERN)),
    kind=(_CONSUMER, ...),
    **_create_fields,
)
DestinationTargetIn = create_model(
    "DestinationTargetIn",
    __doc__="A new target beyond HTTP (docs/ARCHITECTURE.md, 'Destinations beyond HTTP'): its"
    " URL may hold credentials; it is stored sealed and shown with the password as ***.",
    name=(str, Field(pattern=NAME_PATTERN)),
    kind=(_DESTINATION, ...),
    url=(
        str,
        Field(
            min_length=1,
            max_length=2000,
            description="amqp://, mqtt://, redis://, the SQS queue URL, s3://BUCKET[/PREFIX]"
            " or kafka[s]://[USER:PASS@]HOST:PORT",
        ),
    ),
    **_create_fields,
)
TargetIn: Any = Annotated[
    WebhookTargetIn | ConsumerTargetIn | DestinationTargetIn,  # type: ignore[valid-type]
    Field(discriminator="kind"),
]
TargetCreated = create_model(
    "TargetCreated",
    __base__=TargetOut,
    secret=(str | None, Field(default=None, description="The generated secret, shown once")),
)
TargetPatch = create_model(
    "TargetPatch",
    __doc__="Fields to change; those left out keep their value (rate: null removes the limit;"
    " transform: null removes it).",
    **{
        **{k: v for k, v in _fields(Target, set(), optional=True).items() if k in UPDATABLE},
        "url": (_Url | None, None),
    },
)


TargetList: Any = list[TargetOut]  # type: ignore[valid-type]


class RotateIn(BaseModel):
    grace_s: float = Field(
        default=86400.0, ge=0, le=30 * 86400, description="How long the old secret keeps signing"
    )


class RotatedSecret(BaseModel):
    secret: str = Field(description="The new signing secret, shown once")
    old_secret_expires: str | None


_PROP_SKIP = {"id", "created_at", "mode", "targets"}
TYPES_PATTERN = r"^(([A-Za-z0-9_-]{1,64}|\*)\.)*([A-Za-z0-9_-]{1,64}|\*|>)$"
_Name = Annotated[str, Field(pattern=NAME_PATTERN)]
_prop_fields = {
    **_fields(Propagation, _PROP_SKIP),
    "source": (_Name, ...),
    "types": (
        str | None,
        Field(default=None, max_length=255, pattern=TYPES_PATTERN, description="e.g. order.*"),
    ),
}
OneToOneIn = create_model(
    "OneToOneIn",
    __doc__="Unidirectional (source -> target) or bidirectional (source <-> target).",
    mode=(_ONE, ...),
    targets=(list[_Name], Field(min_length=1, max_length=1)),
    **_prop_fields,
)
MulticastIn = create_model(
    "MulticastIn",
    __doc__="Multicast: source -> each listed target.",
    mode=(_MULTI, ...),
    targets=(list[_Name], Field(min_length=1, max_length=1000)),
    **_prop_fields,
)
BroadcastIn = create_model(
    "BroadcastIn",
    __doc__="Broadcast: source -> every target, including those added later.",
    mode=(_ALL, ...),
    targets=(list[_Name], Field(default_factory=list, max_length=0)),
    **_prop_fields,
)
PropagationIn: Any = Annotated[
    OneToOneIn | MulticastIn | BroadcastIn,  # type: ignore[valid-type]
    Field(discriminator="mode"),
]


class Removed(BaseModel):
    removed: str
    propagations_removed: list[str] = Field(default_factory=list)


NAME_PARAM = Param("name", "path", "The target (or ~tenant.name)", pattern=routing.REF_PATTERN)
ID_PARAM = Param("id", "path", "The propagation's id", pattern=r"^[A-Za-z0-9_-]{1,64}$")


def valid_target(doc: dict[str, Any]) -> Target:
    try:
        return Target.model_validate(doc)
    except PydValidationError as exc:  # e.g. a constraint only the whole target can check
        raise ApiProblem(
            INVALID, "the target is not valid", errors=field_errors(exc, "body")
        ) from None


def _out(t: Target, **extra: Any) -> dict[str, Any]:
    return {**t.public(), **extra}


async def _reconcile(call: Call, target: Target) -> None:
    await call.api.client.provisioner.reconcile_target(target)


# Targets ----------------------------------------------------------------------------


async def list_targets(call: Call) -> list[dict[str, Any]]:
    targets = await call.api.client.registry.list_targets()
    return [_out(t) for t in targets if tenancy.visible(t.tenant, call.tenant)]


async def get_target(call: Call) -> dict[str, Any]:
    return _out(await tenancy.target(call))


async def create_target(call: Call) -> Reply:
    body = call.body
    doc = body.model_dump(exclude={"secret"}, exclude_unset=True)
    doc["kind"] = body.kind  # a Literal with a default is not "set"
    doc["tenant"] = await tenant_for_new_target(call, doc.get("tenant"))  # quota checked
    target = valid_target(doc)
    missing = missing_extra(target.kind)
    if missing is not None:
        raise ApiProblem(INVALID, missing)
    client = call.api.client
    given = getattr(body, "secret", None)
    created = await client.add_target(target, given)
    secrets = client.registry.secrets_for(created) if given is None else []
    out = _out(created, secret=secrets[0] if secrets else None)
    await call.api.audit.record(
        call.actor, "target.create", f"target:{created.name}", None, created.public()
    )
    return Reply(out, status=201)


async def update_target(call: Call) -> dict[str, Any]:
    registry: Registry = call.api.client.registry
    before = await tenancy.target(call)
    changes = call.body.model_dump(exclude_unset=True)
    if "retry" in changes and changes["retry"] is not None:
        changes["retry"] = {**before.retry.model_dump(), **changes["retry"]}
    for key, value in list(changes.items()):
        if value is None and key not in ("rate", "transform"):
            del changes[key]  # null means "leave as is", except: rate (no limit), transform
    if "transform" in changes:
        changes["transform"] = changes["transform"] or None  # "" or null: no transform
    merged = valid_target({**before.model_dump(), **changes})
    if merged.kind == TargetKind.WEBHOOK and "url" in changes:
        validate_url(merged.url or "")
    if merged.kind in DESTINATION_KINDS and "url" in changes:
        # Its URL holds credentials, sealed at creation: never stored from a patch.
        raise ApiProblem(INVALID, "a destination's URL cannot change: remove and add the target")
    validate_expressions(None, merged.transform)
    after = await registry.put_target(merged)
    await _reconcile(call, after)
    await call.api.audit.record(
        call.actor, "target.update", f"target:{after.name}", before.public(), after.public()
    )
    return _out(after)


async def _set_status(call: Call, status: TargetStatus, reason: str | None) -> dict[str, Any]:
    registry = call.api.client.registry
    before = await tenancy.target(call)
    after = await registry.set_status(before.ref, status, reason)
    action = "target.pause" if status == TargetStatus.DISABLED else "target.resume"
    await call.api.audit.record(
        call.actor, action, f"target:{after.name}", before.public(), after.public()
    )
    return _out(after)


async def pause_target(call: Call) -> dict[str, Any]:
    return await _set_status(call, TargetStatus.DISABLED, "paused through the API")


async def resume_target(call: Call) -> dict[str, Any]:
    return await _set_status(call, TargetStatus.ACTIVE, None)


async def delete_target(call: Call) -> Removed:
    name = call.params["name"]
    client = call.api.client
    before = await tenancy.target(call)
    props = await client.remove_target(before.ref)
    await call.api.audit.record(
        call.actor, "target.delete", f"target:{name}", before.public(), {"propagations": props}
    )
    return Removed(removed=name, propagations_removed=props)


async def rotate_secret(call: Call) -> RotatedSecret:
    name = call.params["name"]
    registry = call.api.client.registry
    ref = (await tenancy.target(call)).ref
    secret = await registry.rotate_secret(ref, timedelta(seconds=call.body.grace_s))
    after = await registry.get_target(ref)
    expires = after.old_secret_expires.isoformat() if after.old_secret_expires else None
    await call.api.audit.record(
        call.actor, "target.rotate_secret", f"target:{name}", None, {"old_secret_expires": expires}
    )
    return RotatedSecret(secret=secret, old_secret_expires=expires)


# Propagations ---------------------------------------------------------------------


async def list_propagations(call: Call) -> list[Propagation]:
    props = await call.api.client.registry.list_propagations()
    return [p for p in props if tenancy.visible(p.tenant, call.tenant)]


async def create_propagation(call: Call) -> Reply:
    body = call.body
    validate_name(body.source, "source name")
    # Fields the registry's model has beyond these (filter, transform) go through as they are.
    extra = body.model_dump(exclude={"mode", "source", "targets", "types"}, exclude_unset=True)
    extra["tenant"] = await tenancy.tenant_for_create(call, extra.pop("tenant", None))
    client = call.api.client
    prop = await client.add_propagation(body.mode, body.source, body.targets, body.types, **extra)
    await call.api.audit.record(
        call.actor,
        "propagation.create",
        f"propagation:{prop.id}",
        None,
        prop.model_dump(mode="json"),
    )
    return Reply(prop, status=201)


async def delete_propagation(call: Call) -> Removed:
    found = await call.api.client.registry.get_propagation(call.params["id"])
    tenancy.check(call, found.tenant, f"unknown propagation {found.id!r}")
    prop = await call.api.client.remove_propagation(found.id)
    await call.api.audit.record(
        call.actor, "propagation.delete", f"propagation:{prop.id}", prop.model_dump(mode="json")
    )
    return Removed(removed=prop.id)


def register(table: RouteTable) -> None:
    t, p = ("targets",), ("propagations",)
    table.extend(
        [
            Route(
                "GET",
                "/v1/targets",
                list_targets,
                "List targets",
                t,
                Scope.READ,
                "listTargets",
                response=TargetList,
            ),
            Route(
                "POST",
                "/v1/targets",
                create_target,
                "Create a target",
                t,
                Scope.ADMIN,
                "createTarget",
                body=TargetIn,
                response=TargetCreated,
                status=201,
                problems=(409,),
            ),
            Route(
                "GET",
                "/v1/targets/{name}",
                get_target,
                "Read a target",
                t,
                Scope.READ,
                "getTarget",
                response=TargetOut,
                problems=(404,),
                params=(NAME_PARAM,),
            ),
            Route(
                "PATCH",
                "/v1/targets/{name}",
                update_target,
                "Change a target's settings",
                t,
                Scope.ADMIN,
                "updateTarget",
                body=TargetPatch,
                response=TargetOut,
                problems=(404,),
                params=(NAME_PARAM,),
            ),
            Route(
                "DELETE",
                "/v1/targets/{name}",
                delete_target,
                "Delete a target (and its part in propagations)",
                t,
                Scope.ADMIN,
                "deleteTarget",
                response=Removed,
                problems=(404,),
                params=(NAME_PARAM,),
            ),
            Route(
                "POST",
                "/v1/targets/{name}/pause",
                pause_target,
                "Pause deliveries (events queue up, nothing is lost)",
                t,
                Scope.ADMIN,
                "pauseTarget",
                response=TargetOut,
                problems=(404,),
                params=(NAME_PARAM,),
            ),
            Route(
                "POST",
                "/v1/targets/{name}/resume",
                resume_target,
                "Resume deliveries",
                t,
                Scope.ADMIN,
                "resumeTarget",
                response=TargetOut,
                problems=(404,),
                params=(NAME_PARAM,),
            ),
            Route(
                "POST",
                "/v1/targets/{name}/rotate-secret",
                rotate_secret,
                "New signing secret (shown once); the old one signs during the grace",
                t,
                Scope.ADMIN,
                "rotateTargetSecret",
                body=RotateIn,
                response=RotatedSecret,
                problems=(404,),
                params=(NAME_PARAM,),
            ),
            Route(
                "GET",
                "/v1/propagations",
                list_propagations,
                "List propagations",
                p,
                Scope.READ,
                "listPropagations",
                response=list[Propagation],
            ),
            Route(
                "POST",
                "/v1/propagations",
                create_propagation,
                "Create a propagation",
                p,
                Scope.ADMIN,
                "createPropagation",
                body=PropagationIn,
                response=Propagation,
                status=201,
                problems=(404, 409),
            ),
            Route(
                "DELETE",
                "/v1/propagations/{id}",
                delete_propagation,
                "Delete a propagation",
                p,
                Scope.ADMIN,
                "deletePropagation",
                response=Removed,
                problems=(404,),
                params=(ID_PARAM,),
            ),
        ],
        tenant_aware=True,
    )
