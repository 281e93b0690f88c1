"""The declarative route table: one ``Route`` per operation, the single source of truth.

A route names its method, path, handler, request model, query model, response
model, success status, the problems it may answer with, the scope it needs, a
summary and tags. From the same table the service registers aiohttp handlers
(``RouteTable.install``) and ``openapi.build_document`` writes the OpenAPI 3.1
document, so what is validated and what is documented cannot drift apart.

Handlers take a ``Call`` (the parsed, validated request and the caller's key) and
return a pydantic model (sent with the route's status), a list of models, a
``Reply`` (other status or headers), or an aiohttp response (pages, the schema).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, get_args, get_origin

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydValidationError

from mesh.apikeys import ApiKey, Scope
from mesh.errors import NotFound
from services.api import paging
from services.api.problems import BAD_REQUEST, INVALID, UNSUPPORTED_MEDIA, ApiProblem, FieldError

if TYPE_CHECKING:
    from services.api.context import ApiContext

PATH_PARAM = re.compile(r"\{([a-z_]+)\}")
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# A target as an operator may name a tenant's: ``~tenant.name`` (mesh/subjects.py).
REF_PATTERN = r"^(~[a-z0-9][a-z0-9_-]{0,63}\.)?[a-z0-9][a-z0-9_-]{0,63}$"


@dataclass
class Call:
    """One request, parsed: what a handler gets."""

    api: ApiContext
    request: web.Request
    key: ApiKey | None
    params: dict[str, str]
    body: Any = None  # the route's request model, validated
    query: Any = None  # the route's query model, validated

    @property
    def actor(self) -> str:
        """Who is acting, for the audit log: ``apikey:<id>`` (never the key itself)."""
        return f"apikey:{self.key.id}" if self.key is not None else "anonymous"

    @property
    def tenant(self) -> str | None:
        """The caller's tenant; None for an operator key (all tenants) or no key."""
        return self.key.tenant if self.key is not None else None

    def header(self, name: str) -> str | None:
        return self.request.headers.get(name)


@dataclass
class Reply:
    body: Any
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """A path or header parameter, for the document (path ones are validated here too)."""

    name: str
    where: str  # "path" | "header"
    description: str
    pattern: str | None = None
    required: bool = True
    max_length: int | None = None


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tags: tuple[str, ...]
    scope: Scope | None  # None: no key needed (the document, the reference page)
    operation_id: str
    body: type[BaseModel] | Any | None = None  # a model, or a type TypeAdapter understands
    query: type[BaseModel] | None = None
    response: type[BaseModel] | Any | None = None
    status: int = 200
    problems: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    description: str = ""
    raw_content_type: str | None = None  # a non-JSON answer (the reference page)
    # Whether the handler keeps a tenant key to its own tenant (services/api/tenancy.py);
    # a route that does not is a 404 for every tenant key (deny by default).
    tenant_aware: bool = False
    # A list answered whole by its handler, paged here: sorted by these fields, cut after
    # the ``cursor`` and at ``limit`` (query ``ListQuery``), the next page's cursor in the
    # ``Next-Cursor`` header (services/api/paging.py).
    paged_by: tuple[str, ...] = ()

    def path_params(self) -> list[str]:
        return PATH_PARAM.findall(self.path)


class RouteTable:
    """Routes from every ``routes_*`` module; each module adds its own with ``register``."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, route: Route) -> None:
        for r in self.routes:
            if (r.method, r.path) == (route.method, route.path):
                raise ValueError(f"route {route.method} {route.path} declared twice")
            if r.operation_id == route.operation_id:
                raise ValueError(f"operation id {route.operation_id} declared twice")
        self.routes.append(route)

    def extend(self, routes: Sequence[Route], *, tenant_aware: bool = False) -> None:
        for r in routes:
            self.add(replace(r, tenant_aware=True) if tenant_aware else r)

    def install(self, app: web.Application, api: ApiContext) -> None:
        for route in self.routes:
            app.router.add_route(route.method, route.path, _endpoint(route, api))


# Request parsing -------------------------------------------------------------------


def field_errors(exc: PydValidationError, where: str) -> list[FieldError]:
    out = []
    for e in exc.errors(include_url=False, include_input=False)[:50]:
        loc: list[str | int] = [where, *(p for p in e["loc"] if isinstance(p, str | int))]
        out.append(FieldError(loc=loc, msg=e["msg"], type=e["type"]))
    return out


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def adapter(tp: Any) -> TypeAdapter[Any]:
    found = _ADAPTERS.get(tp)
    if found is None:
        found = _ADAPTERS[tp] = TypeAdapter(tp)
    return found


def _not_json(name: str) -> Any:
    # Python's json reads NaN and Infinity; they are not JSON, and nothing downstream
    # (the events' JSON views, the webhook bodies) could write them back.
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def body_optional(model: Any) -> bool:
    """A body model whose every field has a default may be left out (``{}``)."""
    fields = getattr(model, "model_fields", None)
    return fields is not None and not any(f.is_required() for f in fields.values())


async def _parse_body(request: web.Request, model: Any) -> Any:
    if not request.body_exists and body_optional(model):
        return adapter(model).validate_python({})
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream") and not ctype.endswith(
        "+json"
    ):
        raise ApiProblem(UNSUPPORTED_MEDIA, f"send application/json, not {ctype!r}")
    raw = await request.read()  # over client_max_size: aiohttp raises 413
    if not raw:
        if body_optional(model):
            return adapter(model).validate_python({})
        raise ApiProblem(BAD_REQUEST, "a JSON body is required")
    try:
        doc = json.loads(raw, parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = getattr(exc, "msg", "not UTF-8")
        raise ApiProblem(BAD_REQUEST, f"malformed JSON: {msg}") from None
    except RecursionError:
        raise ApiProblem(BAD_REQUEST, "malformed JSON: nested too deeply") from None
    try:
        return adapter(model).validate_python(doc)
    except PydValidationError as exc:
        raise ApiProblem(
            INVALID, "the body is not valid", errors=field_errors(exc, "body")
        ) from None


def _is_list(annotation: Any) -> bool:
    """``list[X]``, or ``list[X] | None``."""
    if get_origin(annotation) in (list, tuple, set):
        return True
    return any(get_origin(a) in (list, tuple, set) for a in get_args(annotation))


def _parse_query(request: web.Request, model: type[BaseModel]) -> BaseModel:
    # Repeated parameters become lists; a model field that is not a list takes the last.
    doc: dict[str, Any] = {}
    for k in set(request.query.keys()):
        values = request.query.getall(k)
        field = model.model_fields.get(k)
        doc[k] = values if field is not None and _is_list(field.annotation) else values[-1]
    try:
        return model.model_validate(doc)
    except PydValidationError as exc:
        raise ApiProblem(
            INVALID, "the query is not valid", errors=field_errors(exc, "query")
        ) from None


def _check_params(route: Route, params: dict[str, str]) -> None:
    for p in route.params:
        if p.where != "path" or p.pattern is None:
            continue
        value = params.get(p.name, "")
        if not re.fullmatch(p.pattern.strip("^$"), value):
            raise ApiProblem(
                INVALID,
                f"invalid {p.name} {value[:70]!r}",
                errors=[
                    FieldError(loc=["path", p.name], msg=f"must match {p.pattern}", type="pattern")
                ],
            )


def _dump(body: Any) -> bytes:
    if isinstance(body, BaseModel):
        return body.model_dump_json().encode()
    # Lists of models, dicts, datetimes: pydantic's serializer for Any handles them all.
    return adapter(Any).dump_json(body)


def _endpoint(
    route: Route, api: ApiContext
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        key = await api.auth.check(request, route.scope) if route.scope is not None else None
        if key is not None and key.tenant is not None and not route.tenant_aware:
            raise NotFound("no such resource")  # not for tenant keys: 404, never 403
        params = dict(request.match_info)
        _check_params(route, params)
        call = Call(api=api, request=request, key=key, params=params)
        if route.query is not None:
            call.query = _parse_query(request, route.query)
        if route.body is not None:
            call.body = await _parse_body(request, route.body)
        result = await route.handler(call)
        if isinstance(result, web.StreamResponse):
            return result
        reply = result if isinstance(result, Reply) else Reply(result)
        if route.paged_by:
            items, more = paging.page(route.path, route.paged_by, call.query, reply.body)
            reply = Reply(items, status=reply.status, headers={**reply.headers, **more})
        status = reply.status or route.status
        if status == 204 or reply.body is None:
            return web.Response(status=status, headers=reply.headers)
        return web.Response(
            status=status,
            body=_dump(reply.body),
            content_type="application/json",
            headers=reply.headers,
        )

    handle.__name__ = route.operation_id
    return handle
