"""The API itself and the mesh's status: ``/v1/openapi.json``, ``/v1/docs``, ``/v1/status``."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from mesh.apikeys import Scope
from mesh.errors import BrokerError
from services.api.openapi import render_docs
from services.api.routing import Call, Route, RouteTable

STATUS_TIMEOUT_S = 3.0
DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'"


class StatusDocument(BaseModel):
    """The document health's ``/status`` serves (services, targets, deliveries, ...)."""

    model_config = ConfigDict(extra="allow")

    generated_at: str
    instance: str
    prefix: str
    services: list[dict[str, Any]]
    targets: list[dict[str, Any]]


async def openapi_json(call: Call) -> web.Response:
    return web.Response(
        text=call.api.document_text,
        content_type="application/json",
        headers={"Cache-Control": "no-cache"},
    )


async def docs_page(call: Call) -> web.Response:
    return web.Response(
        text=render_docs(call.api.document),
        content_type="text/html",
        headers={"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff"},
    )


async def status(call: Call) -> web.Response:
    client = call.api.client
    try:
        msg = await client.port.request(client.subjects.status_doc, b"", timeout=STATUS_TIMEOUT_S)
    except Exception as exc:  # no responders, timeout: no health service is running
        raise BrokerError(
            f"no health service answered for the status ({type(exc).__name__}):"
            " run `mesh serve health` (mesh up runs it)"
        ) from None
    try:
        json.loads(msg.data)
    except ValueError:
        raise BrokerError("the health service answered with something that is not JSON") from None
    return web.Response(
        body=msg.data, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def register(table: RouteTable) -> None:
    table.extend(
        [
            Route(
                "GET",
                "/v1/openapi.json",
                openapi_json,
                "This OpenAPI 3.1 document",
                ("meta",),
                None,
                "getOpenapi",
                raw_content_type="application/json",
            ),
            Route(
                "GET",
                "/v1/docs",
                docs_page,
                "A browsable reference page (generated from the document)",
                ("meta",),
                None,
                "getDocs",
                raw_content_type="text/html",
            ),
            Route(
                "GET",
                "/v1/status",
                status,
                "The mesh's status: the document health's /status serves",
                ("status",),
                Scope.READ,
                "getStatus",
                response=StatusDocument,
                description="Answered by a health service over NATS; 503 when none runs.",
            ),
        ]
    )
