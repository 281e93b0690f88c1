"""A sweep of bad input over every route of the table, against a real API and nats-server:
malformed JSON, wrong types (top level and per field), unknown fields, bodies over the
limit, bad query values and cursors, odd path values. No answer may be a 5xx; every
refusal is an RFC 9457 problem without a traceback; the kinds are the stable ones.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from services.api import Api
from services.api import service as api_service
from services.api.routes import route_table
from services.api.routing import Route, adapter
from tests.support.api import Http, api_running, make_key

PROBLEM = "application/problem+json"
LIMIT = 64 * 1024  # the body limit for this test (MAX_BODY is 16 MiB in production)
PATH_VALUES = {
    "name": "nope",
    "tenant": "nope",
    "id": "nope-1",
    "ident": "nope-letter",
    "jti": "0" * 32,
}
ODD_PATH_VALUES = ("x" * 300, "%E2%98%83", "..", "%00", "A%20B")
WRONG: tuple[Any, ...] = ({"deep": [1, {"x": None}]}, [[]], "x" * 5000, -(10**40), True)


@pytest.fixture
async def api(
    settings: Settings, client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Api]:
    monkeypatch.setattr(api_service, "MAX_BODY", LIMIT)
    async with api_running(settings) as a:
        yield a


def _path(route: Route, values: dict[str, str] | None = None) -> str:
    path = route.path
    for name in route.path_params():
        path = path.replace("{" + name + "}", (values or PATH_VALUES)[name])
    return path


def _fields(model: Any) -> set[str]:
    """Every property name the body's schema declares (at the top or in a definition)."""
    schema = adapter(model).json_schema()
    names = set(schema.get("properties", {}))
    for d in schema.get("$defs", {}).values():
        names |= set(d.get("properties", {}))
    return names


def _check(route: Route, what: str, status: int, headers: dict[str, str], body: Any) -> None:
    where = (route.method, route.path, what, status, str(body)[:300])
    assert status < 500, where
    assert "Traceback" not in json.dumps(body) and 'File "' not in json.dumps(body), where
    if status >= 400:
        assert headers["Content-Type"].startswith(PROBLEM), where
        assert body["status"] == status and body["type"].startswith("urn:mesh:problem:"), where


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_route_answers_bad_input_with_a_problem(api: Api, client: MeshClient) -> None:
    _, admin = await make_key(client, "admin")
    # Every route that takes a key; /v1/status is a 503 here (no health service runs).
    routes = [r for r in route_table().routes if r.scope is not None and r.path != "/v1/status"]
    assert len(routes) > 25
    async with Http(api.url, admin) as http:

        async def call(route: Route, what: str, path: str | None = None, **kw: Any) -> Any:
            status, headers, body = await http.call(route.method, path or _path(route), **kw)
            _check(route, what, status, headers, body)
            return status, body

        for route in routes:
            for odd in ODD_PATH_VALUES:
                if route.path_params():
                    values = dict.fromkeys(route.path_params(), odd)
                    await call(route, f"path {odd!r}", _path(route, values))
            # A body nobody asked for, or one over the limit: never a 5xx.
            await call(route, "stray body", data=b'{"zz": 1}')
            if route.body is not None:
                status, body = await call(route, "malformed", data=b'{"a": 1,,}')
                assert status == 400 and body["type"] == "urn:mesh:problem:bad-request"
                status, body = await call(route, "NaN", data=b'{"a": NaN}')
                assert status == 400, body
                status, body = await call(route, "huge", data=b"[" + b"1," * LIMIT + b"1]")
                assert status == 413 and body["type"] == "urn:mesh:problem:payload-too-large"
                for top in ("[]", '"x"', "42", "null", "true"):
                    status, body = await call(route, f"top {top}", data=top.encode())
                    assert status in (400, 422), (route.path, top, body)
                await call(route, "unknown field", json_body={"zz_unknown": {"a": 1}})
                for name in sorted(_fields(route.body)):
                    for value in WRONG:
                        await call(route, f"{name}={value!r:.40}", json_body={name: value})
            if route.query is not None:
                fields = route.query.model_fields
                for name in fields:
                    for value in ("", "%ZZ", "x" * 2000, "-1", "1e999", "[]", "%00"):
                        await call(route, f"?{name}={value:.20}", _path(route) + f"?{name}={value}")
                if "cursor" in fields:
                    for bad in ("nope", "WyJldmVudHMiLDFd", "e30", "W10"):
                        status, body = await call(
                            route, "bad cursor", _path(route) + f"?target=nope&cursor={bad}"
                        )
                        assert status in (404, 422), (route.path, bad, body)
                        if status == 422:
                            assert body["type"] == "urn:mesh:problem:validation", body
                if "limit" in fields:
                    for bad in ("0", "abc", "100000"):
                        status, body = await call(
                            route, "bad limit", _path(route) + f"?limit={bad}"
                        )
                        assert status == 422, (route.path, bad, body)


def test_every_list_route_has_a_cursor_and_a_limit() -> None:
    """Every GET that answers a list takes ``cursor`` and ``limit``: the history lists in
    their queries (``next_cursor`` in the body), the registry's lists through
    services/api/paging.py (the ``Next-Cursor`` header)."""
    lists = []
    for r in route_table().routes:
        doc = adapter(r.response).json_schema() if r.response is not None else {}
        is_list = doc.get("type") == "array" or "next_cursor" in doc.get("properties", {})
        if r.method == "GET" and is_list and r.path_params() == []:
            lists.append(r.path)
            assert r.query is not None and {"cursor", "limit"} <= set(r.query.model_fields), r.path
    assert {
        "/v1/events",
        "/v1/deliveries",
        "/v1/dead-letters",
        "/v1/targets",
        "/v1/propagations",
        "/v1/tokens/revoked",
        "/v1/tenants",
    } <= set(lists), lists


@pytest.mark.slow
async def test_registry_lists_page_with_a_cursor(api: Api, client: MeshClient) -> None:
    _, admin = await make_key(client, "admin")
    async with Http(api.url, admin) as http:
        for name in ("c-three", "a-one", "b-two"):
            body = {"name": name, "kind": "webhook", "url": "http://127.0.0.1:9/hook"}
            status, _, made = await http.call("POST", "/v1/targets", body)
            assert status == 201, made
        status, headers, first = await http.call("GET", "/v1/targets?limit=2")
        assert status == 200 and [t["name"] for t in first] == ["a-one", "b-two"]
        cursor = headers["Next-Cursor"]
        assert 'rel="next"' in headers["Link"]
        status, headers, rest = await http.call("GET", f"/v1/targets?limit=2&cursor={cursor}")
        assert status == 200 and [t["name"] for t in rest] == ["c-three"]
        assert "Next-Cursor" not in headers
        status, headers, whole = await http.call("GET", "/v1/targets")
        assert [t["name"] for t in whole] == ["a-one", "b-two", "c-three"]
        assert "Next-Cursor" not in headers
        # Another list's cursor, or none the server made: 422 on cursor.
        status, _, tenants = await http.call("GET", "/v1/tenants?limit=1")
        assert status == 200 and len(tenants) == 1
        for bad in (cursor, "nope", "W10"):
            status, _, problem = await http.call("GET", f"/v1/propagations?cursor={bad}")
            assert status == 422 and problem["errors"][0]["loc"] == ["query", "cursor"], problem
        for bad in ("0", "1001", "x"):
            status, _, problem = await http.call("GET", f"/v1/tokens/revoked?limit={bad}")
            assert status == 422, problem
