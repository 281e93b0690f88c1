"""The HTTP API over real HTTP against a real nats-server: documents, problems, keys, scopes.

Idempotency and the broker restart are in test_api_idempotency.py; schemathesis in
test_api_schema.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.apikeys import Scope
from mesh.client import MeshClient
from mesh.config import Settings
from services.api import Api
from services.api.auth import CACHE_S
from services.api.openapi import build_document, dumps
from services.api.routes import route_table
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
        "docs/openapi.json is stale: regenerate it with"
        " `python scripts/openapi.py > docs/openapi.json`"
    )


def test_document_is_openapi_31_with_every_route() -> None:
    doc = build_document(route_table())
    assert doc["openapi"] == "3.1.0"
    ops = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
    assert {"publishEvent", "publishEvents", "createTarget", "updateTarget", "getStatus"} <= ops
    # every $ref resolves
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split('"#/components/schemas/')[1:]}:
        assert name in doc["components"]["schemas"], name


async def test_served_document_and_docs_page(http: Http) -> None:
    status, headers, doc = await http.call("GET", "/v1/openapi.json")
    assert status == 200
    assert doc == build_document(route_table())
    status, headers, page = await http.call("GET", "/v1/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "publishEvent" in page and "urn:mesh:problem:validation" in page
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing fetched from outside


# Keys and scopes -------------------------------------------------------------------


async def test_keys_wrong_expired_revoked_and_scopes(
    api: Api, http: Http, client: MeshClient
) -> None:
    from datetime import timedelta

    from mesh.apikeys import ApiKeyStore

    _, read = await make_key(client, "read")
    _, publish = await make_key(client, "publish")
    admin_id, admin = await make_key(client, "admin")
    _, expired = await make_key(client, "admin", ttl=timedelta(milliseconds=1))

    # no key, a malformed one, a wrong secret for a real id, an expired one: 401
    status, headers, body = await http.call("GET", "/v1/targets")
    assert status == 401 and headers["Content-Type"].startswith(PROBLEM)
    assert body["type"] == "urn:mesh:problem:unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await http.call("GET", "/v1/targets", key="nonsense"))[0] == 401
    forged = admin[:-4] + ("AAAA" if not admin.endswith("AAAA") else "BBBB")
    status, _, body = await http.call("GET", "/v1/targets", key=forged)
    assert status == 401 and body["detail"] == "unknown API key"
    status, _, body = await http.call("GET", "/v1/targets", key=expired)
    assert status == 401 and body["detail"] == "API key expired"

    target = {"name": "orders", "kind": "nats"}
    # read can read, cannot change anything: every route of the table that is not a
    # GET answers 403 (before it looks at the body), and every route needs a key
    assert (await http.call("GET", "/v1/targets", key=read))[0] == 200
    samples = {
        "name": "orders",
        "id": "abc123",
        "jti": "0" * 32,
        "ident": "abc123",
        "tenant": "acme",
    }
    changing = 0
    for route in route_table().routes:
        path = route.path.format(**{p: samples[p] for p in route.path_params()})
        if route.scope is not None:
            assert (await http.call(route.method, path, {}))[0] == 401, path
        if route.method == "GET":
            assert route.scope in (None, Scope.READ), path
            continue
        changing += 1
        status, _, body = await http.call(route.method, path, {}, key=read)
        assert status == 403, (route.method, path, status, body)
        assert body["type"] == "urn:mesh:problem:forbidden"
    assert changing >= 12
    # publish can publish and read, not manage
    status, _, body = await http.call(
        "POST", "/v1/events", {"source": "shop", "type": "order.created"}, key=publish
    )
    assert status == 202 and body["id"]
    assert (await http.call("POST", "/v1/targets", target, key=publish))[0] == 403
    # admin can do all
    status, _, body = await http.call("POST", "/v1/targets", target, key=admin)
    assert status == 201, body
    assert (await client.registry.get_target("orders")).name == "orders"

    # revoked: 401 (within the verification cache's lifetime)
    store = await ApiKeyStore.open(client.port, client.names.apikeys)
    await store.revoke(admin_id)
    api.auth._cache.clear()  # what CACHE_S seconds do on their own
    status, _, body = await http.call("GET", "/v1/targets", key=admin)
    assert status == 401 and body["detail"] == "API key revoked"


async def test_rate_limit_answers_429_with_retry_after(http: Http, client: MeshClient) -> None:
    _, key = await make_key(client, "read", rate=2)
    statuses = [(await http.call("GET", "/v1/targets", key=key))[:2] for _ in range(6)]
    codes = [s for s, _ in statuses]
    assert codes[0] == 200 and 429 in codes
    limited = next(h for s, h in statuses if s == 429)
    assert int(limited["Retry-After"]) >= 1


# Problems for bad input ---------------------------------------------------------------


async def test_bad_input_is_a_problem_never_a_500(http: Http, client: MeshClient) -> None:
    _, admin = await make_key(client, "admin")
    cases: list[tuple[str, str, dict[str, object]]] = [
        ("POST", "/v1/events", {"data": b"{not json"}),
        ("POST", "/v1/events", {"data": b"[1, 2]"}),
        ("POST", "/v1/events", {"data": b""}),
        ("POST", "/v1/events", {"data": '"' + "[" * 100_000}),
        ("POST", "/v1/events", {"json_body": {"source": "BAD NAME", "type": "x"}}),
        ("POST", "/v1/events", {"json_body": {"source": "shop", "type": "a..b"}}),
        ("POST", "/v1/events", {"json_body": {"source": 5, "type": ["x"]}}),
        ("POST", "/v1/events", {"data": b"x" * (17 * 1024 * 1024)}),
        (
            "POST",
            "/v1/events",
            {"json_body": {"source": "s", "type": "t", "data": "x" * 2_000_000}},
        ),
        ("POST", "/v1/events:batch", {"json_body": {"events": []}}),
        ("POST", "/v1/events", {"json_body": {"source": "s", "type": "t", "data": 10**30}}),
        ("POST", "/v1/events", {"data": b'{"source": "s", "type": "t", "data": NaN}'}),
        ("POST", "/v1/events", {"data": b"{}", "headers": {"Content-Type": "text/plain"}}),
        ("POST", "/v1/targets", {"json_body": {"name": "x", "kind": "webhook"}}),
        ("POST", "/v1/targets", {"json_body": {"name": "x", "kind": "webhook", "url": "ftp://a"}}),
        ("GET", "/v1/targets/NOT..A..NAME", {}),
        ("GET", "/v1/targets/missing", {}),
        ("PATCH", "/v1/targets/missing", {"json_body": {"timeout_s": -1}}),
        ("DELETE", "/v1/propagations/nope", {}),
        ("POST", "/v1/propagations", {"json_body": {"mode": "sideways", "source": "a"}}),
        ("POST", "/v1/propagations", {"json_body": {"mode": "unidirectional", "source": "a"}}),
        ("POST", "/v1/tokens/zz/revoke", {"json_body": {}}),
        ("PUT", "/v1/targets", {}),
        ("GET", "/v1/nothing-here", {}),
    ]
    for method, path, kwargs in cases:
        status, headers, body = await http.call(method, path, key=admin, **kwargs)  # type: ignore[arg-type]
        assert 400 <= status < 500, (method, path, kwargs.keys(), status, body)
        assert headers["Content-Type"].startswith(PROBLEM), (method, path, headers)
        assert body["status"] == status and body["type"].startswith("urn:mesh:problem:")
        assert "Traceback" not in json.dumps(body)
    status, _, body = await http.call("GET", "/v1/targets/missing", key=admin)
    assert (status, body["type"]) == (404, "urn:mesh:problem:not-found")
    status, _, body = await http.call(
        "POST", "/v1/events", {"source": "BAD NAME", "type": "x"}, key=admin
    )
    assert status == 422 and body["errors"][0]["loc"] == ["body", "source"]


# The CLI ---------------------------------------------------------------------------


async def test_apikey_cli_create_list_revoke(
    settings: Settings, client: MeshClient, http: Http
) -> None:
    from tests.conftest import env_for
    from tests.support.cli import ok, one_line_error
    from tests.support.inproc import mesh_inproc

    env = env_for(settings)

    async def run_cli(_: Settings, *args: str) -> subprocess.CompletedProcess[str]:
        # in this process: the subprocess path is test_api_schema's `mesh apikey create`
        return await mesh_inproc(env, *args)

    made = ok(await run_cli(settings, "apikey", "create", "--name", "ci", "--scope", "read"))
    key = made.stdout.strip()
    assert key.startswith("mk_") and len(made.stdout.splitlines()) == 1
    assert key not in made.stderr and "shown once" in made.stderr
    key_id = key.split("_")[1]
    assert (await http.call("GET", "/v1/targets", key=key))[0] == 200

    listed = ok(await run_cli(settings, "apikey", "list", "--json"))
    [doc] = json.loads(listed.stdout)
    assert (doc["id"], doc["name"], doc["scope"], doc["state"]) == (key_id, "ci", "read", "active")
    assert "hash" not in doc and key.split("_", 2)[2] not in listed.stdout
    table = ok(await run_cli(settings, "apikey", "list")).stdout
    assert key_id in table and "active" in table and key.split("_", 2)[2] not in table

    timed = ok(
        await run_cli(
            settings, "apikey", "create", "--name", "t", "--scope", "admin", "--expires", "90d"
        )
    )
    assert timed.stdout.startswith("mk_") and "expires 20" in timed.stderr

    ok(await run_cli(settings, "apikey", "revoke", key_id))
    again = ok(await run_cli(settings, "apikey", "revoke", key_id))
    assert "already" in again.stdout
    one_line_error(await run_cli(settings, "apikey", "revoke", "0123456789ab"), "unknown API key")
    one_line_error(
        await run_cli(settings, "apikey", "create", "--name", "x", "--scope", "root"), "root"
    )
    await asyncio.sleep(CACHE_S + 0.2)  # a verified key is remembered for CACHE_S at most
    status, _, body = await http.call("GET", "/v1/targets", key=key)
    assert status == 401 and body["detail"] == "API key revoked"


async def test_tls_when_a_certificate_is_configured(
    settings: Settings, client: MeshClient, tmp_path: Path
) -> None:
    import ssl

    import aiohttp

    from mesh.errors import ConfigError
    from tests.support.tls import self_signed

    cert, key_file = self_signed(tmp_path, "127.0.0.1")
    _, key = await make_key(client, "read")
    async with api_running(settings, api_tls_cert=cert, api_tls_key=key_file) as api:
        assert api.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                api.url + "/v1/targets", ssl=ctx, headers={"Authorization": f"Bearer {key}"}
            ) as resp,
        ):
            assert resp.status == 200 and await resp.json() == []
    with pytest.raises(ConfigError, match="MESH_API_TLS_CERT and MESH_API_TLS_KEY"):
        async with api_running(settings, api_tls_cert=cert):
            pass
