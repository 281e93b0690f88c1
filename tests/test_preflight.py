"""The CLI checks what it talks to: a server too old for the mesh is one clear error before
anything is created on it, and a mesh with no service running gets a warning that
``--quiet`` or ``MESH_QUIET`` silences."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mesh.config import Settings
from mesh.serverinfo import MIN_SERVER_VERSION, parse_version, refusal
from tests.conftest import env_for
from tests.support import migrate, running
from tests.support.cli import mesh, ok, one_line_error
from tests.support.inproc import mesh_inproc


def test_versions() -> None:
    assert parse_version("2.9.25") == (2, 9, 25)
    assert parse_version("v2.11.0-beta.2") == (2, 11, 0)
    assert parse_version("2.12") == (2, 12, 0)
    assert parse_version("dev") is None
    where = "nats://h:4222"
    old = refusal({"version": "2.10.22", "jetstream": True}, where)
    assert old is not None and "2.10.22" in old and "2.11 or newer" in old and where in old
    assert refusal({"version": "2.11.0", "jetstream": True}, where) is None
    assert refusal({"version": "2.12.1", "jetstream": True}, where) is None
    assert "no JetStream" in (refusal({"version": "2.11.1", "jetstream": False}, where) or "")
    assert MIN_SERVER_VERSION == (2, 11, 0)


@asynccontextmanager
async def fake_server(version: str, jetstream: bool = True) -> AsyncIterator[tuple[int, list[str]]]:
    """A TCP server speaking just enough NATS: the INFO line, PONG to PING. Yields its port
    and every line clients sent it."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {
            "server_id": "FAKE",
            "server_name": "fake",
            "version": version,
            "proto": 1,
            "host": "127.0.0.1",
            "port": port,
            "headers": True,
            "max_payload": 1048576,
            "jetstream": jetstream,
        }
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        await writer.drain()
        try:
            while line := await reader.readline():
                text = line.decode(errors="replace").strip()
                seen.append(text)
                if text == "PING":
                    writer.write(b"PONG\r\n")
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, seen
    finally:
        server.close()
        await server.wait_closed()


async def test_an_old_server_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    async with fake_server("2.9.25") as (port, seen):
        env = env_for(Settings(home=tmp_path / "home", nats_url=f"nats://127.0.0.1:{port}"))
        # One as a user runs it (a subprocess), the rest in this process (no 1 s of imports).
        procs = [
            await mesh(env, "target", "add", "billing", "--kind", "nats"),
            await mesh_inproc(env, "token", "list-revoked"),
            await mesh_inproc(env, "status"),
        ]
    for p in procs:
        line = one_line_error(p, "nats-server 2.9.25", f"127.0.0.1:{port}", "2.11 or newer")
        assert "per-message TTL" in line
    # They connected (CONNECT, PING) and then stopped: no JetStream API call, no bucket.
    assert any(s.startswith("CONNECT") for s in seen)
    assert not [s for s in seen if "$JS" in s or "$KV" in s]


async def test_a_server_without_jetstream_is_refused(tmp_path: Path) -> None:
    async with fake_server("2.11.4", jetstream=False) as (port, _):
        env = env_for(Settings(home=tmp_path / "home", nats_url=f"nats://127.0.0.1:{port}"))
        one_line_error(await mesh_inproc(env, "target", "list"), "has no JetStream", "-js")


WARNING = "mesh: warning: no mesh services are running on nats://127.0.0.1:{port}:"


@pytest.mark.slow
async def test_no_services_warning_and_quiet(settings: Settings, tmp_path: Path) -> None:
    env = {k: v for k, v in env_for(settings).items() if k != "MESH_QUIET"}
    port = settings.nats_url.rsplit(":", 1)[1] if settings.nats_url else ""
    warning = WARNING.format(port=port)
    loud = await mesh(env, "target", "list")
    flag = await mesh_inproc(env, "--quiet", "target", "list")
    by_env = await mesh_inproc({**env, "MESH_QUIET": "1"}, "target", "list")
    ok(loud)
    lines = [line for line in loud.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(warning), loud.stderr
    assert "start them with `mesh up`" in lines[0]
    assert loud.stdout.strip()  # the command still did its work
    for quiet in (flag, by_env):
        assert ok(quiet).stderr.strip() == "", quiet.stderr

    # With a mesh service running, no warning.
    from services.health import Health

    s = settings.model_copy(update={"db_url": f"sqlite:///{tmp_path / 'db' / 'mesh.db'}"})
    await migrate(s.db_url)
    async with running(Health(s, host="127.0.0.1")):
        calm = ok(await mesh_inproc(env, "target", "list"))
    assert "warning" not in calm.stderr, calm.stderr
