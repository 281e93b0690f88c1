"""The HTTP API over real HTTP against a real nats-server: documents, problems, keys, scopes.

Idempotency and the broker restart are in test_api_idempotency.py; schemathesis in
test_api_schema.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from services.api import Api
from services.api.openapi import build_document, dumps
from services.api.service import route_table
from tests.support.api import Http, api_running, make_key

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "application/problem+json"


@pytest.fixture
async def api(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    async with api_running(settings) as a:
        yield a


@pytest.fixture
async def http(api: Api) -> AsyncIterator[Http]:
    async with Http(api.url) as h:
        yield h


def test_checked_in_openapi_is_current() -> None:
    generated = dumps(build_document(route_table()))
    checked_in = (ROOT / "docs" / "openapi.json").read_text()
    assert generated == checked_in, (
        "docs/openapi.json is stale: regenerate with `mesh api openapi > docs/openapi.json`"
    )


def test_document_is_openapi_31_with_every_route() -> None:
    doc = build_document(route_table())
    assert doc["openapi"] == "3.1.0"
    ops = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
    assert {"publishEvent", "publishEvents", "createTarget", "updateTarget", "getStatus"} <= ops
    # every $ref resolves
    text = json.dumps(doc)
    for name in {
        part.split('"')[0] for part in text.split('"#/components/schemas/')[1:]
    }:
        assert name in doc["components"]["schemas"], name


async def test_served_document_and_docs_page(http: Http) -> None:
    status, headers, doc = await http.call("GET", "/v1/openapi.json")
    assert status == 200
    assert doc == build_document(route_table())
    status, headers, page = await http.call("GET", "/v1/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "publishEvent" in page and "urn:mesh:problem:validation" in page
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing fetched from outside
