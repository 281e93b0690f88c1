"""The OpenAPI 3.1 document and the reference page, generated from the route table.

Schemas come from the pydantic models the routes validate with
(``TypeAdapter.json_schemas``: requests in validation mode, answers in
serialization mode; a model that differs between the two gets ``-Input`` and
``-Output`` names), collected under ``components/schemas`` and referenced with
``$ref``. Nothing here is written by hand but the prose. ``docs/openapi.json`` is
this document, checked in: ``python scripts/openapi.py > docs/openapi.json``
regenerates it.
"""

from __future__ import annotations

import html
import json
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from mesh import __version__
from services.api.problems import CATALOGUE, PROBLEM_JSON, Problem
from services.api.routing import Route, RouteTable, adapter, body_optional

REF = "#/components/schemas/{model}"
TITLE = "mesh HTTP API"
DESCRIPTION = (
    "Publish events and manage the mesh over HTTP. Authenticate with"
    " `Authorization: Bearer <API key>` (`mesh apikey create`). Scopes: `read` (every GET),"
    " `publish` (read, and publishing events), `admin` (everything). Errors are RFC 9457"
    " `application/problem+json` documents whose `type` is a stable `urn:mesh:problem:*` URI."
)
REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "Bad request (malformed JSON, missing body)",
    401: "Missing, wrong, expired or revoked API key",
    403: "The key's scope does not allow this",
    404: "Not found",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Validation failed",
    429: "Rate limited (see Retry-After)",
    503: "The broker or the database is unavailable",
}


def _problem_codes(route: Route) -> list[int]:
    codes = set(route.problems)
    if route.scope is not None:
        codes |= {401, 403, 429, 503}
    if route.body is not None:
        codes |= {400, 413, 415, 422}
    if route.query is not None or any(p.pattern for p in route.params):
        codes.add(422)
    return sorted(codes)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def build_document(table: RouteTable) -> dict[str, Any]:
    # Every type the table mentions, once per mode.
    inputs: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = []
    seen: set[tuple[str, str]] = set()

    def want(tp: Any, mode: JsonSchemaMode) -> None:
        if (str(id(tp)), mode) not in seen:
            seen.add((str(id(tp)), mode))
            inputs.append((str(id(tp)), mode, adapter(tp)))

    want(Problem, "serialization")
    for r in table.routes:
        for tp, mode in (
            (r.body, "validation"),
            (r.query, "validation"),
            (r.response, "serialization"),
        ):
            if tp is not None:
                want(tp, mode)  # type: ignore[arg-type]
    schemas, defs = TypeAdapter.json_schemas(inputs, ref_template=REF)
    components: dict[str, Any] = dict(defs.get("$defs", {}))

    def schema_of(tp: Any, mode: str) -> dict[str, Any]:
        return dict(schemas[(str(id(tp)), mode)])  # type: ignore[index]

    problem_ref = schema_of(Problem, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for r in table.routes:
        op: dict[str, Any] = {
            "operationId": r.operation_id,
            "summary": r.summary,
            "tags": list(r.tags),
        }
        desc = r.description
        if r.scope is not None:
            desc = (desc + "\n\n" if desc else "") + f"Needs an API key with scope `{r.scope}`."
            op["security"] = [{"bearerAuth": []}]
            op["x-required-scope"] = str(r.scope)
        else:
            op["security"] = []
        if desc:
            op["description"] = desc
        params: list[dict[str, Any]] = []
        for name in r.path_params():
            declared = next((p for p in r.params if p.name == name), None)
            schema: dict[str, Any] = {"type": "string"}
            if declared is not None and declared.pattern:
                schema["pattern"] = declared.pattern
            params.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": schema,
                    **({"description": declared.description} if declared else {}),
                }
            )
        for p in r.params:
            if p.where == "header":
                hs: dict[str, Any] = {"type": "string"}
                if p.pattern:
                    hs["pattern"] = p.pattern
                if p.max_length:
                    hs["maxLength"] = p.max_length
                params.append(
                    {
                        "name": p.name,
                        "in": "header",
                        "required": p.required,
                        "description": p.description,
                        "schema": hs,
                    }
                )
        if r.query is not None:
            qs = schema_of(r.query, "validation")
            ref = qs.get("$ref", "")
            body = components.get(ref.rsplit("/", 1)[-1], qs) if ref else qs
            required = set(body.get("required", []))
            for fname, fschema in body.get("properties", {}).items():
                entry: dict[str, Any] = {
                    "name": fname,
                    "in": "query",
                    "required": fname in required,
                    "schema": {
                        k: v for k, v in fschema.items() if k not in ("title", "description")
                    },
                }
                if "description" in fschema:
                    entry["description"] = fschema["description"]
                if fschema.get("type") == "array" or "array" in json.dumps(
                    fschema.get("anyOf", "")
                ):
                    entry["style"] = "form"
                    entry["explode"] = True
                params.append(entry)
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": not body_optional(r.body),
                "content": {"application/json": {"schema": schema_of(r.body, "validation")}},
            }
        responses: dict[str, Any] = {}
        ok: dict[str, Any] = {"description": REASONS.get(r.status, "OK")}
        if r.raw_content_type is not None:
            raw = {"type": "object"} if r.raw_content_type.endswith("json") else {"type": "string"}
            ok["content"] = {r.raw_content_type: {"schema": raw}}
        elif r.response is not None:
            ok["content"] = {"application/json": {"schema": schema_of(r.response, "serialization")}}
        responses[str(r.status)] = ok
        for code in _problem_codes(r):
            resp: dict[str, Any] = {
                "description": REASONS.get(code, "Error"),
                "content": {PROBLEM_JSON: {"schema": problem_ref}},
            }
            if code == 429:
                resp["headers"] = {
                    "Retry-After": {
                        "description": "Seconds to wait before trying again",
                        "schema": {"type": "integer"},
                    }
                }
            responses[str(code)] = resp
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": __version__, "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `mesh apikey create` (mk_...)",
                }
            },
        },
        "tags": sorted(
            ({"name": t} for t in {t for r in table.routes for t in r.tags}),
            key=lambda t: t["name"],
        ),
    }


def dumps(doc: dict[str, Any]) -> str:
    """The document as checked in: sorted keys are not used (order follows the table)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# The reference page ------------------------------------------------------------------

_CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ddd;margin-top:2rem}
.op{border:1px solid #e3e3e3;border-radius:6px;padding:.5rem 1rem;margin:.75rem 0}
.m{display:inline-block;min-width:4.5rem;font-weight:600;font-family:monospace}
code,pre{font-family:ui-monospace,monospace;font-size:13px}
pre{background:#f6f8fa;padding:.5rem;overflow:auto;max-height:24rem}
.s{color:#666;font-size:13px}
"""


def render_docs(doc: dict[str, Any]) -> str:
    """A plain HTML page listing every operation, its scope, parameters and schemas."""
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(doc['info']['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(doc['info']['title'])} <span class='s'>{e(doc['info']['version'])}</span></h1>",
        f"<p>{e(doc['info']['description'])}</p>",
        "<p>The machine-readable document: <a href='/v1/openapi.json'>/v1/openapi.json</a>.</p>",
    ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            by_tag.setdefault(op["tags"][0] if op["tags"] else "other", []).append(
                (method, path, op)
            )
    for tag in sorted(by_tag):
        out.append(f"<h2 id='tag-{e(tag)}'>{e(tag)}</h2>")
        for method, path, op in by_tag[tag]:
            scope = op.get("x-required-scope")
            out.append(f"<div class='op' id='{e(op['operationId'])}'>")
            out.append(
                f"<div><span class='m'>{e(method.upper())}</span><code>{e(path)}</code>"
                f" — {e(op['summary'])}"
                + (f" <span class='s'>(scope: {e(scope)})</span>" if scope else "")
                + "</div>"
            )
            if op.get("description"):
                out.append(f"<p class='s'>{e(op['description'])}</p>")
            for p in op.get("parameters", []):
                out.append(
                    f"<div class='s'>{e(p['in'])} <code>{e(p['name'])}</code>"
                    f"{' (required)' if p.get('required') else ''}: {e(p.get('description', ''))}"
                    f" <code>{e(json.dumps(p['schema']))}</code></div>"
                )
            if "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                out.append(f"<div class='s'>body: <code>{e(json.dumps(schema))}</code></div>")
            codes = ", ".join(op["responses"])
            out.append(f"<div class='s'>answers: {e(codes)}</div></div>")
    out.append("<h2 id='problems'>Problem types</h2><ul>")
    for kind in CATALOGUE:
        out.append(
            f"<li id='problem-{e(kind.slug)}'><code>{e(kind.uri)}</code> {kind.status}"
            f" — {e(kind.title)}</li>"
        )
    out.append("</ul><h2 id='schemas'>Schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f"<h3 id='schema-{e(name)}'>{e(name)}</h3>")
        out.append(f"<pre>{e(json.dumps(schema, indent=2))}</pre>")
    out.append("</body></html>")
    return "\n".join(out)
