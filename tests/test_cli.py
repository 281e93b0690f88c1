"""The `mesh` command against a real nats-server: as a user runs it (a subprocess) where
the process is the point (help, exit codes, signals, a killed consumer), in this process
(tests/support/inproc.py) where the commands' work and answers are."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from tests.conftest import env_for
from tests.support.cli import MESH, mesh, ok, one_line_error
from tests.support.feeds import eventually, stream_count
from tests.support.inproc import mesh_inproc

COMMANDS = [
    "up",
    "serve",
    "init",
    "status",
    "target",
    "propagate",
    "propagation",
    "publish",
    "consume",
    "request",
    "tail",
]


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return env_for(settings)


async def snapshot(client: MeshClient) -> dict[str, Any]:
    """What is stored: stream counts, targets, propagations."""
    return {
        "events": await stream_count(client),
        "dlq": await stream_count(client, client.names.dlq),
        "sys": await stream_count(client, client.names.sys),
        "targets": sorted(t.model_dump_json() for t in await client.registry.list_targets()),
        "props": sorted(p.model_dump_json() for p in await client.registry.list_propagations()),
    }


async def test_help_lists_the_commands(env: dict[str, str]) -> None:
    p = ok(await mesh(env, "--help"))
    for c in COMMANDS:
        assert f" {c} " in p.stdout, c
    # Bare `mesh` shows the help too (exit 2, like any usage error).
    groups = ("target", "propagate", "propagation")
    bare = await mesh(env)
    assert bare.returncode == 2 and "Usage" in bare.stdout + bare.stderr
    for g in groups:  # the groups' help: what is printed, not the process, so in process
        assert "Usage" in ok(await mesh_inproc(env, g, "--help")).stdout


@pytest.mark.slow
async def test_a_session(env: dict[str, str], client: MeshClient) -> None:
    ok(await mesh_inproc(env, "init", "--json"))
    ok(await mesh_inproc(env, "target", "add", "billing", "--kind", "nats"))
    ok(await mesh_inproc(env, "target", "add", "audit", "--kind", "nats"))
    prop = ok(
        await mesh_inproc(
            env,
            "propagate",
            "unidirectional",
            "--source",
            "shop",
            "--target",
            "billing",
            "--types",
            "order.*",
        )
    )
    # User text with brackets is printed as is, not eaten as markup.
    assert "[order.*]" in prop.stdout
    ok(await mesh_inproc(env, "propagate", "broadcast", "--source", "ops"))
    targets = json.loads(ok(await mesh_inproc(env, "target", "list", "--json")).stdout)
    assert [t["name"] for t in targets] == ["audit", "billing"]
    props = json.loads(ok(await mesh_inproc(env, "propagation", "list", "--json")).stdout)
    assert sorted(p["mode"] for p in props) == ["broadcast", "unidirectional"]

    eid = ok(
        await mesh_inproc(
            env, "publish", "--source", "shop", "--type", "order.created", "--data", '{"order": 1}'
        )
    ).stdout.strip()
    ok(
        await mesh_inproc(
            env, "publish", "--source", "shop", "--type", "user.created", "--data", "1"
        )
    )
    ok(
        await mesh_inproc(
            env, "publish", "--source", "ops", "--type", "alert", "--data", "-", stdin='"disk full"'
        )
    )
    ok(await mesh_inproc(env, "publish", "--source", "ops", "--type", "tick", "--count", "5"))

    got = ok(
        await mesh_inproc(
            env, "consume", "--target", "billing", "--count", "7", "--json", "--timeout", "3"
        )
    )
    docs = [json.loads(line) for line in got.stdout.splitlines()]
    assert [(d["source"], d["type"]) for d in docs] == [
        ("shop", "order.created"),
        ("ops", "alert"),
    ] + [("ops", "tick")] * 5
    assert docs[0]["id"] == eid and docs[0]["data"] == {"order": 1}
    assert docs[1]["data"] == "disk full"

    st = json.loads(ok(await mesh_inproc(env, "status", "--json")).stdout)
    lag = {t["name"]: t["lag"] for t in st["targets"]}
    assert lag == {"billing": 0, "audit": 6}
    assert st["streams"]["MESH_EVENTS"]["messages"] == 8
    assert "nats-server" not in st["broker"]["server_version"]
    human = ok(await mesh_inproc(env, "status")).stdout
    assert "MESH_EVENTS: 8 messages" in human and "billing" in human

    # Human-readable consume, then remove what we made.
    text = ok(
        await mesh_inproc(env, "consume", "--target", "audit", "--count", "1", "--timeout", "3")
    )
    assert " ops alert " in text.stdout
    for p in props:
        ok(await mesh_inproc(env, "propagation", "remove", p["id"]))
    ok(await mesh_inproc(env, "target", "remove", "audit"))
    assert json.loads(ok(await mesh_inproc(env, "propagation", "list", "--json")).stdout) == []
    assert [t.name for t in await client.registry.list_targets()] == ["billing"]


async def test_request_from_the_cli(env: dict[str, str], client: MeshClient) -> None:
    from mesh.client import Reply
    from mesh.envelope import Event
    from tests.conftest import add_nats_target

    await add_nats_target(client, "shop")
    await add_nats_target(client, "crm")
    await client.add_propagation("bidirectional", "shop", ["crm"])

    async def answer(e: Event) -> Any:
        if e.type == "fail":
            return Reply(status=503, data={"error": "busy"})
        return {"you_said": e.data}

    sub = await client.serve_requests("crm", answer)
    try:
        p = ok(
            await mesh_inproc(
                env,
                "request",
                "--source",
                "shop",
                "--target",
                "crm",
                "--type",
                "echo",
                "--data",
                '{"x": 1}',
            )
        )
        assert json.loads(p.stdout) == {"status": 200, "data": {"you_said": {"x": 1}}}
        bad = await mesh_inproc(
            env, "request", "--source", "shop", "--target", "crm", "--type", "fail"
        )
        assert bad.returncode == 1
        assert json.loads(bad.stdout)["status"] == 503
        one_line_error(
            await mesh_inproc(
                env,
                "request",
                "--source",
                "crm",
                "--target",
                "shop",
                "--type",
                "x",
                "--timeout",
                "1",
            ),
            "no responder",
        )
    finally:
        await sub.unsubscribe()


async def test_tail_follows_new_events(env: dict[str, str], client: MeshClient) -> None:
    proc = await asyncio.create_subprocess_exec(
        *MESH,
        "tail",
        "--source",
        "shop",
        "--count",
        "2",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        # tail says what it follows once it is subscribed.
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"tailing mesh.evt.shop.>" in line
        await client.publish("crm", "ignored", 0)
        a = await client.publish("shop", "a", 1)
        b = await client.publish("shop", "b", {"k": "v"})
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    docs = [json.loads(x) for x in out.decode().splitlines()]
    assert [(d["id"], d["data"]) for d in docs] == [(a, 1), (b, {"k": "v"})]


# Bad input ----------------------------------------------------------------------


@pytest.mark.slow
async def test_bad_input_is_one_line_and_harms_nothing(
    env: dict[str, str], client: MeshClient, tmp_path: Path
) -> None:
    ok(await mesh_inproc(env, "target", "add", "billing", "--kind", "nats"))
    ok(
        await mesh_inproc(
            env, "propagate", "unidirectional", "--source", "shop", "--target", "billing"
        )
    )
    ok(await mesh_inproc(env, "publish", "--source", "shop", "--type", "x", "--data", "1"))
    before = await snapshot(client)
    bad_file = tmp_path / "bad.json"
    bad_file.write_text("{nope")
    cases: list[tuple[list[str], list[str]]] = [
        (["target", "add", "Bad.Name", "--kind", "nats"], ["invalid target name"]),
        (["target", "add", "x"], ["--webhook"]),
        (["target", "add", "billing", "--kind", "nats"], ["already exists"]),
        (["target", "add", "h", "--webhook", "ftp://x"], []),
        (["target", "add", "h", "--webhook", "https://x", "--timeout", "-1"], ["timeout"]),
        (["target", "remove", "ghost"], ["unknown target 'ghost'"]),
        (["publish", "--source", "Shop", "--type", "x"], ["invalid source name"]),
        (["publish", "--source", "shop", "--type", "a..b"], ["invalid event type"]),
        (["publish", "--source", "shop", "--type", "x", "--data", "{bad"], ["malformed JSON"]),
        (
            ["publish", "--source", "shop", "--type", "x", "--data", f"@{bad_file}"],
            ["malformed JSON", "bad.json"],
        ),
        (
            ["publish", "--source", "shop", "--type", "x", "--data", "@/no/such/file"],
            ["cannot read"],
        ),
        (["publish", "--source", "shop", "--type", "x", "--count", "0"], ["count"]),
        (["publish", "--source", "shop", "--type", "x", "--id", "a", "--count", "2"], ["--id"]),
        (["consume", "--target", "ghost"], ["unknown target 'ghost'"]),
        (["consume", "--target", "Ghost!"], ["invalid target name"]),
        (
            ["propagate", "unidirectional", "--source", "shop", "--target", "ghost"],
            ["unknown target 'ghost'"],
        ),
        (["propagate", "unidirectional", "--source", "billing", "--target", "billing"], ["itself"]),
        (
            [
                "propagate",
                "multicast",
                "--source",
                "shop",
                "--target",
                "billing",
                "--types",
                "a.>.b",
            ],
            ["pattern"],
        ),
        (["propagate", "bidirectional", "--source", "shop", "--target", "billing"], ["both ends"]),
        (["propagate", "sideways", "--source", "a"], ["sideways"]),
        (["propagation", "remove", "nope"], ["unknown propagation"]),
        (
            ["request", "--source", "shop", "--target", "billing", "--type", "x"],
            ["no bidirectional"],
        ),
        (["tail", "--source", "Bad!"], ["invalid source name"]),
        (["serve", "nonsense"], ["unknown service"]),
        (["nonsense"], ["No such command"]),
    ]
    # In this process (a subprocess pays a second of imports per case); the few below run
    # as real processes too, so the exit code and stderr of `mesh` itself stay covered.
    for args, needles in cases:
        p = await mesh_inproc(env, *args, stdin="")
        assert p.args[1:] == args
        one_line_error(p, *needles)
    as_processes = [cases[0], cases[3], cases[8], cases[-1]]  # refused by mesh, click, JSON
    procs = await asyncio.gather(*(mesh(env, *args, stdin="") for args, _ in as_processes))
    for (args, needles), p in zip(as_processes, procs, strict=True):
        assert p.args[len(MESH) :] == args
        one_line_error(p, *needles)
    # stdin JSON errors name stdin.
    one_line_error(
        await mesh_inproc(
            env, "publish", "--source", "shop", "--type", "x", "--data", "-", stdin="[1,"
        ),
        "malformed JSON in stdin",
    )
    assert await snapshot(client) == before


async def test_oversized_payload(tmp_path: Path) -> None:
    small = EmbeddedBroker(tmp_path / "small", port=free_port(), max_payload=2048)
    small.start()
    try:
        s = Settings(home=tmp_path / "home", nats_url=small.url)
        env = env_for(s)
        ok(await mesh_inproc(env, "init"))
        big = tmp_path / "big.json"
        big.write_text(json.dumps("x" * 4000))
        p = await mesh_inproc(
            env, "publish", "--source", "shop", "--type", "x", "--data", f"@{big}"
        )
        one_line_error(p, "exceeds the broker's max_payload of 2048 bytes")
        ok(
            await mesh_inproc(
                env, "publish", "--source", "shop", "--type", "x", "--data", '"small"'
            )
        )
        async with MeshClient(s) as c:
            assert await stream_count(c) == 1
    finally:
        small.stop()


@pytest.mark.slow
async def test_unreachable_broker(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "home", nats_url=f"nats://127.0.0.1:{free_port()}")
    env = env_for(s)
    for args in (["status"], ["target", "list"], ["publish", "--source", "a", "--type", "b"]):
        one_line_error(await mesh_inproc(env, *args), "cannot connect to NATS", "127.0.0.1")


@pytest.fixture
def up_env(tmp_path: Path) -> dict[str, str]:
    """Environment for `mesh up` with the embedded broker: no MESH_NATS_URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_HOME": str(tmp_path / "uphome"),
            "MESH_NATS_PORT": str(free_port()),
            "MESH_HTTP_PORT": str(free_port()),
            "MESH_BRIDGE_PORT": str(free_port()),
            "MESH_API_PORT": str(free_port()),
            "MESH_ALLOW_PRIVATE_TARGETS": "1",
            "MESH_CONFIG": str(tmp_path / "no-mesh.toml"),
            "MESH_LOG_FORMAT": "json",
        }
    )
    return env


async def test_up_with_a_taken_port(up_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(up_env["MESH_NATS_PORT"])))
        squatter.listen()
        p = await mesh(up_env, "up", timeout=60)
    line = one_line_error(p, "MESH_NATS_PORT", "MESH_NATS_URL", up_env["MESH_NATS_PORT"])
    assert "taken" in line


@pytest.mark.slow
async def test_up_runs_the_mesh_and_stops_on_sigterm(
    up_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "up.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *MESH, "up", env=up_env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        # `mesh status` with the same environment reaches the embedded broker.
        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"mesh up exited: {log.read_text()}")
            return (await mesh_inproc(up_env, "status", "--json")).returncode == 0

        # `mesh up` is the process under test; the commands talking to it run in process.
        await eventually(ready, timeout=60, interval=0.5)
        ok(await mesh_inproc(up_env, "target", "add", "billing", "--kind", "nats"))
        ok(await mesh_inproc(up_env, "propagate", "broadcast", "--source", "ops"))
        ok(
            await mesh_inproc(
                up_env, "publish", "--source", "ops", "--type", "hello", "--data", "1"
            )
        )
        got = ok(
            await mesh_inproc(up_env, "consume", "--target", "billing", "--count", "1", "--json")
        )
        assert json.loads(got.stdout)["data"] == 1
        assert (Path(up_env["MESH_HOME"]) / "keys" / "encryption.key").exists()
        assert (Path(up_env["MESH_HOME"]) / "nats").is_dir()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    # The embedded broker went with it.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(up_env["MESH_NATS_PORT"]))) != 0


@pytest.mark.slow
async def test_killed_consumer_gets_its_events_again(
    settings: Settings, client: MeshClient
) -> None:
    """`mesh consume` SIGKILLed with events delivered but unacked: they come back."""
    env = env_for(settings) | {"MESH_ACK_WAIT_MIN_S": "1"}
    ok(await mesh_inproc(env, "target", "add", "billing", "--kind", "nats", "--timeout", "1"))
    ok(
        await mesh_inproc(
            env, "propagate", "unidirectional", "--source", "shop", "--target", "billing"
        )
    )
    # Lines of ~40 KB into a pipe nobody reads (64 KB of kernel buffer): the first line
    # fits, the second blocks the consumer in its write, after printing and acking
    # event 0 and before acking 1 and 2.
    blob = "y" * 40_000
    ids = [await client.publish("shop", "big", {"i": i, "blob": blob}) for i in range(3)]
    read_end, write_end = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *MESH,
            "consume",
            "--target",
            "billing",
            "--json",
            "--timeout",
            "60",
            env=env,
            stdout=write_end,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_end)
        try:

            async def stuck() -> bool:
                info = await client.js.consumer_info(client.names.events, "deliver-billing")
                return info.num_pending == 0 and info.num_ack_pending == 2

            await eventually(stuck, timeout=30)
            assert proc.returncode is None
            proc.kill()  # SIGKILL: no cleanup, no nak
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        os.close(read_end)
    start = time.monotonic()
    again = ok(  # the killed process is the point; who reads them again is not
        await mesh_inproc(
            env, "consume", "--target", "billing", "--count", "2", "--json", "--timeout", "20"
        )
    )
    docs = [json.loads(line) for line in again.stdout.splitlines()]
    assert [d["id"] for d in docs] == ids[1:]
    assert [d["data"]["i"] for d in docs] == [1, 2]
    assert time.monotonic() - start < 60  # sanity: not waiting out a long ack_wait
    info = await client.js.consumer_info(client.names.events, "deliver-billing")
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
