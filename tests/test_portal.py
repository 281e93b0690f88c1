"""The endpoint-owner portal: signed links, sessions limited to the portal's routes, and
the whole page driven in Debian's headless Chromium (playwright-core from npm, see
``tests/browser``) against a real API, sink, webhook egress, receiver and nats-server.

Screenshots of every step are kept in ``test-artifacts/portal-*.png`` (gitignored).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh import portal, signing
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import Target, TargetKind
from mesh.tenants import TenantStore
from services.api import Api
from services.egress import WebhookEgress
from services.sink import Sink
from tests.conftest import env_for
from tests.support.api import Http, api_running, make_key
from tests.support.receiver import Receiver, Reply

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
HAS_PLAYWRIGHT = (BROWSER_DIR / "node_modules" / "playwright-core").is_dir()


def _key(settings: Settings) -> bytes:
    return portal.load_key_file(portal.key_path(settings))


def tampered(token: str) -> str:
    """The same link with one character of its signature changed."""
    head, payload, sig = token.split(".")
    i = len(sig) // 2
    return f"{head}.{payload}.{sig[:i]}{'A' if sig[i] != 'A' else 'B'}{sig[i + 1 :]}"


def expired_link(key: bytes, tenant: str = "default") -> str:
    past = datetime.now(UTC) - timedelta(hours=2)
    token, _ = portal.issue_link(key, tenant, ttl=timedelta(hours=1), now=past)
    return token


# Tokens (pure) -----------------------------------------------------------------------


def test_link_and_session_tokens() -> None:
    key = b"k" * 32
    token, claims = portal.issue_link(key, "acme", ttl=timedelta(minutes=10))
    assert portal.verify(key, token, portal.LINK_AUDIENCE) == claims
    session = portal.issue_session(key, claims)
    s = portal.verify(key, session, portal.SESSION_AUDIENCE)
    assert s.tenant == "acme" and s.expires_at <= claims.expires_at
    # A link is not a session and a session is not a link.
    with pytest.raises(portal.PortalError):
        portal.verify(key, token, portal.SESSION_AUDIENCE)
    with pytest.raises(portal.PortalError):
        portal.verify(key, session.removeprefix(portal.SESSION_PREFIX), portal.LINK_AUDIENCE)
    with pytest.raises(portal.PortalError) as bad:
        portal.verify(key, tampered(token), portal.LINK_AUDIENCE)
    assert not bad.value.expired
    with pytest.raises(portal.PortalError) as old:
        portal.verify(key, expired_link(key), portal.LINK_AUDIENCE)
    assert old.value.expired
    with pytest.raises(portal.PortalError):
        portal.verify(b"x" * 32, token, portal.LINK_AUDIENCE)  # another mesh's key
    with pytest.raises(portal.PortalError):
        portal.issue_link(key, "acme", ttl=timedelta(days=8))
    with pytest.raises(Exception, match="invalid tenant name"):
        portal.issue_link(key, "Not A Name")


async def _mesh(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_prints_a_link(settings: Settings, client: MeshClient) -> None:
    await (await TenantStore.open(client.port, client.names.tenants)).create("acme")
    env = {**env_for(settings), "MESH_API_PORT": "9555"}
    code, out, err = await _mesh(env, "portal", "link", "--tenant", "acme", "--ttl", "15m")
    assert code == 0, err
    url = out.strip()
    assert url.startswith("http://127.0.0.1:9555/portal/?link=")
    claims = portal.verify(_key(settings), url.split("link=", 1)[1], portal.LINK_AUDIENCE)
    assert claims.tenant == "acme"
    assert timedelta(minutes=14) < claims.expires_at - datetime.now(UTC) <= timedelta(minutes=15)
    code, out, err = await _mesh(env, "portal", "link", "--ttl", "30d")
    assert code != 0 and out == "" and "at most 7d" in err and "Traceback" not in err
    code, out, err = await _mesh(env, "portal", "link", "--tenant", "nobody")
    assert code != 0 and out == "" and "nobody" in err and "Traceback" not in err, err


# The pages and sessions over HTTP -----------------------------------------------------


async def _get(url: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def test_links_sessions_and_refusals(settings: Settings, client: MeshClient) -> None:
    async with api_running(settings) as api, Http(api.url) as http:
        _, admin = await make_key(client, "admin")
        _, reader = await make_key(client, "read")
        status, _, doc = await http.call(
            "POST", "/v1/portal/links", {"tenant": "default"}, key=reader
        )
        assert status == 403
        status, _, doc = await http.call(
            "POST", "/v1/portal/links", {"tenant": "default", "ttl_s": 600}, key=admin
        )
        assert status == 201 and doc["tenant"] == "default", doc
        link = doc["url"]
        assert link.startswith(f"{api.url}/portal/?link=")

        status, headers, page = await _get(link)
        assert status == 200 and '<script src="/portal/portal.js"' in page
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and headers["Referrer-Policy"] == "no-referrer"
        session = page.split('name=mesh-session content="', 1)[1].split('"', 1)[0]
        assert session.startswith(portal.SESSION_PREFIX)

        # The session is a bearer credential for the portal's routes, and only those.
        status, _, targets = await http.call("GET", "/v1/targets", key=session)
        assert status == 200 and targets == []
        for method, path, body in [
            ("POST", "/v1/tokens", {"target": "x"}),  # bridge credentials
            ("DELETE", "/v1/dead-letters?target=*", None),  # purge
            ("GET", "/v1/status", None),
        ]:
            status, _, problem = await http.call(method, path, body, key=session)
            assert status == 403 and "portal session" in problem["detail"], (path, problem)
        status, _, _ = await http.call("POST", "/v1/portal/links", {}, key=session)
        assert status == 403
        status, _, _ = await http.call(
            "POST", "/v1/graphql", {"query": "{targets{name}}"}, key=session
        )
        assert status == 403
        status, _, problem = await http.call("GET", "/v1/targets", key=tampered(session))
        assert status == 401 and "session" in problem["detail"]

        # A session belongs to its link's tenant: another tenant's endpoint is not there.
        status, _, doc = await http.call("POST", "/v1/portal/links", {"tenant": "acme"}, key=admin)
        assert status == 404, doc  # no such tenant yet
        await (await TenantStore.open(client.port, client.names.tenants)).create("acme")
        await client.add_target(Target(name="acme-hook", kind=TargetKind.NATS, tenant="acme"))
        status, _, doc = await http.call("POST", "/v1/portal/links", {"tenant": "acme"}, key=admin)
        assert status == 201, doc
        status, _, page = await _get(doc["url"])
        acme = page.split('name=mesh-session content="', 1)[1].split('"', 1)[0]
        status, _, targets = await http.call("GET", "/v1/targets", key=acme)
        assert [t["name"] for t in targets] == ["acme-hook"]
        status, _, targets = await http.call("GET", "/v1/targets", key=session)
        assert targets == []  # the default tenant's session does not see acme's
        for method, path, body in [
            ("GET", "/v1/deliveries?target=acme-hook", None),
            ("GET", "/v1/dead-letters?target=acme-hook", None),
            ("POST", "/v1/targets/acme-hook/replay", {"from_seq": 1}),
            ("POST", "/v1/targets/acme-hook/pause", None),
        ]:
            status, _, problem = await http.call(method, path, body, key=session)
            assert status == 404 and problem["detail"] == "unknown target 'acme-hook'", problem
            status, _, _ = await http.call(method, path, body, key=acme)
            assert status in (200, 404 if "replay" in path else 200), (path, status)
        status, _, page = await http.call("GET", "/v1/deliveries", key=acme)
        assert status == 200 and page["items"] == [], page  # acme's own: none yet

        # Refused links: a clear page, 401 expired, 403 tampered, 401 missing.
        key = _key(api.settings)
        token = link.split("link=", 1)[1]
        status, headers, page = await _get(f"{api.url}/portal/?link={expired_link(key)}")
        assert status == 401 and "expired" in page and "mesh-session" not in page
        assert headers["Content-Security-Policy"] == csp
        status, _, page = await _get(f"{api.url}/portal/?link={tampered(token)}")
        assert status == 403 and "not valid" in page and "mesh-session" not in page
        status, _, page = await _get(f"{api.url}/portal/")
        assert status == 401 and "portal link" in page
        status, headers, script = await _get(f"{api.url}/portal/portal.js")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript")
        assert "innerHTML" not in script and "http" not in script.replace("https?", "")
        status, _, _ = await _get(f"{api.url}/portal/portal.html")
        assert status == 404  # only the script and the style sheet are served as they are


async def test_a_revoked_link_and_its_sessions_are_refused(
    settings: Settings, client: MeshClient
) -> None:
    """Revoked over the API (by its id) and with ``mesh portal revoke URL``: the page and
    every session it opened are refused at once; another link keeps working."""
    async with api_running(settings) as api, Http(api.url) as http:
        _, admin = await make_key(client, "admin")
        links = []
        for _ in range(3):
            status, _, doc = await http.call("POST", "/v1/portal/links", {}, key=admin)
            assert status == 201 and len(doc["id"]) == 32, doc
            status, _, page = await _get(doc["url"])
            assert status == 200, page
            session = page.split('name=mesh-session content="', 1)[1].split('"', 1)[0]
            assert (await http.call("GET", "/v1/targets", key=session))[0] == 200
            links.append((doc, session))
        (first, first_session), (second, second_session), (kept, kept_session) = links

        path = f"/v1/portal/links/{first['id']}/revoke"
        status, _, out = await http.call("POST", path, {"reason": "left"}, key=admin)
        assert status == 200 and out == {"id": first["id"], "new": True}, out
        status, _, out = await http.call("POST", path, {}, key=admin)
        assert status == 200 and out["new"] is False
        status, _, bad = await http.call("POST", "/v1/portal/links/xyz/revoke", {}, key=admin)
        assert status in (404, 422), bad

        code, out, err = await _mesh(env_for(settings), "portal", "revoke", second["url"])
        assert code == 0 and second["id"] in err, err
        code, out, err = await _mesh(env_for(settings), "portal", "revoke", "not-a-link")
        assert code != 0 and "not a portal link" in err and "Traceback" not in err, err

        for doc, session in ((first, first_session), (second, second_session)):
            status, _, page = await _get(doc["url"])
            assert status == 403 and "revoked" in page and "mesh-session" not in page
            status, _, problem = await http.call("GET", "/v1/targets", key=session)
            assert status == 401 and "revoked" in problem["detail"], problem
        assert (await _get(kept["url"]))[0] == 200
        assert (await http.call("GET", "/v1/targets", key=kept_session))[0] == 200


# In a real browser -----------------------------------------------------------------------


@pytest.fixture
async def mesh(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    """The API with a sink and a webhook egress beside it."""
    sink = Sink(settings, batch_size=100, fetch_wait=0.2)
    egress = WebhookEgress(settings, fetch_expires_s=0.5)
    await sink.start()
    await egress.start()
    try:
        async with api_running(settings) as api:
            yield api
    finally:
        await egress.stop()
        await sink.stop()


def _receiver() -> Receiver:
    return Receiver()


async def _drive(config: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(BROWSER_DIR / "portal_flow.js"),
        json.dumps(config),
        cwd=BROWSER_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-4000:]
    seen: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return seen


@pytest.mark.slow
@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.skipif(
    NODE is None or not HAS_PLAYWRIGHT,
    reason="needs node and playwright-core (npm ci --prefix tests/browser; .ci/run does it)",
)
async def test_portal_in_chromium(client: MeshClient, mesh: Api) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("portal-*.png"):  # this run's screenshots only
        old.unlink()
    async with _receiver() as rx, _receiver() as rx2:
        # Test 1 fails (500), its retry succeeds, test 2 fails into the DLQ, its replay succeeds.
        rx.script(Reply(500, body=b"database down\n"), Reply(200), Reply(500, body=b"again\n"))
        key = _key(mesh.settings)
        token, _ = portal.issue_link(key, "default", ttl=timedelta(minutes=10))
        seen = await _drive(
            {
                "chromium": CHROMIUM,
                "artifacts": str(ARTIFACTS),
                "base": mesh.url,
                "link": portal.link_url(mesh.url, token),
                "expired": portal.link_url(mesh.url, expired_link(key)),
                "tampered": portal.link_url(mesh.url, tampered(token)),
                "endpoint": "orders-hook",
                "receiver": rx.url,
                "receiver2": rx2.url,
            }
        )

        assert seen["open_status"] == 200 and seen["tenant"] == "default"
        assert "link=" not in seen["url_after_open"]
        assert "default-src 'none'" in seen["csp"]
        assert seen["console_errors"] == [], seen["console_errors"]
        assert seen["external_requests"] == [], seen["external_requests"]
        assert seen["endpoint_sources"] == "shop", seen
        # What the page showed is what the mesh did.
        target = await client.registry.get_target("orders-hook")
        assert target.url == rx2.url and target.retry.max_retries == 0, target
        assert target.old_secret_enc is not None  # rotated: the old one signs for a grace
        assert seen["rotated_secret"] != seen["secret"]
        assert seen["failed_status"] == "500" and "database down" in seen["failed_excerpt"], seen
        assert seen["test1"] in seen["request_shown"]

        test1 = [r for r in rx.requests if r.webhook_id == seen["test1"]]
        assert [r.status for r in test1] == [500, 200], seen
        test2 = [r for r in rx.requests if r.webhook_id == seen["test2"]]
        assert [r.status for r in test2] == [500, 200], seen
        # The secret the page showed once is the one the deliveries were signed with.
        ok = test1[-1]
        assert signing.verify(ok.body, ok.headers, [seen["secret"]]) == ok.webhook_id

        assert seen["expired_status"] == 401 and "expired" in seen["expired_reason"]
        assert seen["tampered_status"] == 403 and "not valid" in seen["tampered_reason"]
        names = {Path(p).name for p in seen["screenshots"]}
        assert {"portal-1-opened.png", "portal-9-expired-link.png"} <= names
        sizes = [len(await asyncio.to_thread(Path(p).read_bytes)) for p in seen["screenshots"]]
        assert min(sizes) > 5000
