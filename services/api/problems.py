"""RFC 9457 problem details: every error the API answers is ``application/problem+json``.

Each kind of error has a stable ``type`` URI (``urn:mesh:problem:<slug>``; clients
branch on it, never on ``title`` or ``detail``), a fixed HTTP status and title.
``problem_middleware`` turns whatever a handler raises into one: an ``ApiProblem``
as it is, a ``MeshError`` by its class, aiohttp's HTTP errors (404 route, 405,
413 body too large) by status, and anything else into a 500 whose body says
nothing of the cause (the traceback goes to the log, with a reference).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel, Field

from mesh.errors import (
    BrokerError,
    Conflict,
    MeshError,
    NotFound,
    PayloadTooLarge,
    StorageError,
    ValidationError,
)
from mesh.observability import scrub_text

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:mesh:problem:"

log = structlog.get_logger("mesh.api")


@dataclass(frozen=True)
class ProblemType:
    slug: str
    status: int
    title: str

    @property
    def uri(self) -> str:
        return TYPE_PREFIX + self.slug


# The catalogue. Slugs are a contract: add new ones, never rename.
BAD_REQUEST = ProblemType("bad-request", 400, "Bad request")
UNAUTHORIZED = ProblemType("unauthorized", 401, "Missing or invalid API key")
FORBIDDEN = ProblemType("forbidden", 403, "The API key's scope does not allow this")
NOT_FOUND = ProblemType("not-found", 404, "Not found")
METHOD_NOT_ALLOWED = ProblemType("method-not-allowed", 405, "Method not allowed")
CONFLICT = ProblemType("conflict", 409, "Conflict")
IDEMPOTENCY_REUSED = ProblemType(
    "idempotency-key-reused", 409, "Idempotency-Key reused with a different request"
)
IDEMPOTENCY_IN_PROGRESS = ProblemType(
    "idempotency-in-progress", 409, "A request with this Idempotency-Key is still in progress"
)
TOO_LARGE = ProblemType("payload-too-large", 413, "Payload too large")
UNSUPPORTED_MEDIA = ProblemType("unsupported-media-type", 415, "Unsupported media type")
INVALID = ProblemType("validation", 422, "The request is not valid")
RATE_LIMITED = ProblemType("rate-limited", 429, "Too many requests")
INTERNAL = ProblemType("internal", 500, "Internal error")
UNAVAILABLE = ProblemType("unavailable", 503, "A backing service is unavailable")

CATALOGUE: tuple[ProblemType, ...] = (
    BAD_REQUEST,
    UNAUTHORIZED,
    FORBIDDEN,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    CONFLICT,
    IDEMPOTENCY_REUSED,
    IDEMPOTENCY_IN_PROGRESS,
    TOO_LARGE,
    UNSUPPORTED_MEDIA,
    INVALID,
    RATE_LIMITED,
    INTERNAL,
    UNAVAILABLE,
)


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: body, query, path or header, then the field")
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(description="A stable URI naming the kind of problem (urn:mesh:problem:*)")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = Field(default=None, description="The request path")
    errors: list[FieldError] | None = Field(
        default=None, description="Each invalid field (validation problems only)"
    )


class ApiProblem(Exception):
    """Raised by handlers (and the request parsing) to answer with a problem."""

    def __init__(
        self,
        kind: ProblemType,
        detail: str | None = None,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or kind.title)
        self.kind = kind
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


def problem_response(
    kind: ProblemType,
    detail: str | None = None,
    *,
    instance: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    doc = Problem(
        type=kind.uri,
        title=kind.title,
        status=kind.status,
        detail=detail,
        instance=instance,
        errors=errors,
    )
    return web.Response(
        status=kind.status,
        body=doc.model_dump_json(exclude_none=True).encode(),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def kind_of(exc: MeshError) -> ProblemType:
    """The problem a MeshError answers with (the most specific class first)."""
    if isinstance(exc, PayloadTooLarge):
        return TOO_LARGE
    if isinstance(exc, ValidationError):
        return INVALID
    if isinstance(exc, NotFound):
        return NOT_FOUND
    if isinstance(exc, Conflict):
        return CONFLICT
    if isinstance(exc, BrokerError | StorageError):
        return UNAVAILABLE
    from mesh.tokens import TokenError  # a bad token id or lifetime is bad input

    if isinstance(exc, TokenError):
        return INVALID
    return INTERNAL


_HTTP_KINDS = {
    400: BAD_REQUEST,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    413: TOO_LARGE,
    415: UNSUPPORTED_MEDIA,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _oops(request: web.Request, exc: BaseException, what: str) -> web.Response:
    ref = uuid.uuid4().hex[:12]
    # exc_info: the traceback goes to the server log only; the client gets the reference.
    log.error(what, ref=ref, path=request.path, method=request.method, exc_info=exc)
    return problem_response(
        INTERNAL, f"an unexpected error occurred (reference {ref})", instance=request.path
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiProblem as exc:
        return problem_response(
            exc.kind, exc.detail, instance=request.path, errors=exc.errors, headers=exc.headers
        )
    except MeshError as exc:
        kind = kind_of(exc)
        if kind is INTERNAL:
            return _oops(request, exc, "request failed")
        detail = scrub_text(str(exc) or type(exc).__name__)
        return problem_response(kind, detail, instance=request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        known = _HTTP_KINDS.get(exc.status)
        if known is None:
            return problem_response(
                ProblemType("http-" + str(exc.status), exc.status, exc.reason),
                instance=request.path,
            )
        text = exc.text or ""
        answer = text if text and not text.startswith(str(exc.status)) else None
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem_response(known, answer, instance=request.path, headers=headers)
    except Exception as exc:
        return _oops(request, exc, "request failed unexpectedly")


def problem_json(kind: ProblemType, detail: str | None = None) -> dict[str, Any]:
    """A problem as a dict (tests and the docs page)."""
    doc: dict[str, Any] = json.loads(
        Problem(type=kind.uri, title=kind.title, status=kind.status, detail=detail).model_dump_json(
            exclude_none=True
        )
    )
    return doc
