"""The route table's parsing of query strings and its document, on a table of its own
(the read-side routes take queries; none of the core ones do)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel, Field

from services.api.openapi import build_document
from services.api.problems import problem_middleware
from services.api.routing import Call, Route, RouteTable
from tests.support.api import Http


class Filters(BaseModel):
    source: list[str] | None = Field(default=None, description="Repeat for several")
    limit: int = Field(default=10, ge=1, le=100)


class Echo(BaseModel):
    source: list[str] | None
    limit: int


async def echo(call: Call) -> Echo:
    return Echo(source=call.query.source, limit=call.query.limit)


def table() -> RouteTable:
    t = RouteTable()
    t.add(
        Route(
            "GET", "/v1/echo", echo, "Echo", ("test",), None, "echo", query=Filters, response=Echo
        )
    )
    return t


@pytest.fixture
async def base() -> AsyncIterator[str]:
    app = web.Application(middlewares=[problem_middleware])
    table().install(app, api=None)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_query_lists_defaults_and_problems(base: str) -> None:
    async with Http(base) as http:
        assert (await http.call("GET", "/v1/echo"))[2] == {"source": None, "limit": 10}
        status, _, body = await http.call("GET", "/v1/echo?source=a&source=b&limit=5&limit=7")
        assert (status, body) == (200, {"source": ["a", "b"], "limit": 7})
        status, _, problem = await http.call("GET", "/v1/echo?limit=0")
        assert status == 422 and problem["errors"][0]["loc"] == ["query", "limit"]
        status, _, problem = await http.call("GET", "/v1/echo?limit=many")
        assert status == 422 and problem["type"] == "urn:mesh:problem:validation"


def test_query_parameters_in_the_document() -> None:
    doc: dict[str, Any] = build_document(table())
    params = {p["name"]: p for p in doc["paths"]["/v1/echo"]["get"]["parameters"]}
    assert params["source"]["in"] == "query" and params["source"]["explode"] is True
    assert params["limit"]["schema"]["maximum"] == 100 and not params["limit"]["required"]
    assert "422" in doc["paths"]["/v1/echo"]["get"]["responses"]


def test_a_route_declared_twice_is_refused() -> None:
    t = table()
    with pytest.raises(ValueError, match="declared twice"):
        t.add(Route("GET", "/v1/echo", echo, "Again", ("test",), None, "echo2"))


def test_target_url_pattern_takes_every_tcp_port() -> None:
    """The OpenAPI pattern for target URLs refused ports from 60000 (a receiver on an
    ephemeral port got a 422); it takes 1-65535 as netguard does, and no more."""
    import re

    from services.api.routes_targets import URL_PATTERN

    pattern = re.compile(URL_PATTERN)
    for port in (1, 80, 9999, 59999, 60000, 60541, 65535):
        assert pattern.match(f"http://127.0.0.1:{port}/hook"), port
    for port in (0, 65536, 70000, 99999):
        assert not pattern.match(f"http://127.0.0.1:{port}/hook"), port
