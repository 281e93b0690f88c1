"""The README's five-minute tour, run as written against `mesh up`, at 80 columns.

The commands come from the README itself (its ``sh`` blocks between "Five minutes" and
"Using it from Python"), so the tour and this test cannot drift apart. Each must exit 0
with no traceback and no warning, and every table it prints must fit 80 columns with a
header and content in every column. The commands run in this process
(``tests/support/inproc.py``); `mesh up` runs as the user runs it, in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from mesh.broker import free_port
from tests.support import eventually
from tests.support.cli import MESH
from tests.support.inproc import mesh_inproc
from tests.support.receiver import Receiver, Reply
from tests.support.tables import table_problems, tables_in

README = Path(__file__).resolve().parent.parent / "README.md"
WIDTH = 80


def tour_commands() -> list[list[str]]:
    """Every command line of the tour's ``sh`` blocks, split as a shell would."""
    text = README.read_text()
    section = text.split("## Five minutes", 1)[1].split("\n## ", 1)[0]
    lines: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def test_the_tour_is_where_the_test_looks() -> None:
    cmds = tour_commands()
    assert len(cmds) >= 25
    assert ["mesh", "target", "remove", "crm"] in cmds  # the demo does not leave it failing
    assert any(c[:2] == ["python3", "-m"] for c in cmds)


@pytest.fixture
def up_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_HOME": str(tmp_path / "home"),
            "MESH_NATS_PORT": str(free_port()),
            "MESH_HTTP_PORT": str(free_port()),
            "MESH_BRIDGE_PORT": str(free_port()),
            "MESH_API_PORT": str(free_port()),
            "MESH_ALLOW_PRIVATE_TARGETS": "1",
            "MESH_CONFIG": str(tmp_path / "no-mesh.toml"),
            "MESH_LOG_FORMAT": "json",
            "COLUMNS": str(WIDTH),
        }
    )
    return env


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_readme_tour_at_80_columns(up_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    with log.open("wb") as sink:
        up = await asyncio.create_subprocess_exec(
            *MESH, "up", env=up_env, stdout=sink, stderr=subprocess.STDOUT
        )
    receiver = Receiver(default=Reply(501))  # like python3 -m http.server: POST -> 501
    await receiver.start()
    try:
        ready = f"http://127.0.0.1:{up_env['MESH_HTTP_PORT']}/readyz"
        async with aiohttp.ClientSession() as http:

            async def is_ready() -> bool:
                if up.returncode is not None:
                    raise AssertionError(f"mesh up exited: {log.read_text()}")
                try:
                    async with http.get(ready) as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(is_ready, timeout=90, interval=0.5)

        jti = ""
        crm_event = ""
        seen_tables = 0
        for words in tour_commands():
            if words[0] != "mesh":
                continue  # the demo receiver (started above) and `kill %1`
            args = [w.replace("http://127.0.0.1:8080/hook", receiver.url) for w in words[1:]]
            args = [jti if a == "<jti>" else a for a in args]
            if args[:2] == ["dlq", "list"]:
                # "after the last retry the event is here": 3 retries, 1 + 2 + 4 s apart.
                async def dead() -> bool:
                    p = await mesh_inproc(up_env, "dlq", "list", "--target", "crm", "--json")
                    return p.returncode == 0 and len(json.loads(p.stdout)) == 1

                await eventually(dead, timeout=60, interval=1)
            p = await mesh_inproc(up_env, *args, width=WIDTH)
            shown = " ".join(words)
            assert p.returncode == 0, (shown, p.stdout, p.stderr)
            assert "Traceback" not in p.stdout + p.stderr, shown
            assert "warning" not in p.stderr, (shown, p.stderr)  # the services are running
            assert table_problems(p.stdout, WIDTH) == [], (shown, p.stdout)
            seen_tables += len(tables_in(p.stdout))
            if args[:2] == ["token", "issue"]:
                jti = re.search(r"token ([0-9a-f]{32}) ", p.stderr).group(1)  # type: ignore[union-attr]
            if args[:3] == ["target", "add", "crm"]:
                crm_event = "next"
            elif args[:3] == ["publish", "--source", "shop"] and crm_event == "next":
                crm_event = p.stdout.strip()  # the first event the webhook target gets
            if args[:1] == ["status"]:
                crm = next(line for line in p.stdout.splitlines() if "│ crm " in line)
                assert "webhook" in crm and "closed" in crm, crm
            if args[:2] == ["dlq", "list"]:
                assert "crm" in p.stdout and "501" in p.stdout, p.stdout

        # The prose after the blocks: replay, history, retention, and the tables left.
        extra = [
            ["replay", "--target", "audit", "--since", "2h"],
            ["events", "--source", "shop"],
            ["events", "prune", "--older-than", "90d", "--dry-run"],
            ["target", "list"],
            ["propagation", "list"],
            ["status"],
        ]
        for args in extra:
            if args[0] == "events" and len(args) == 3:

                async def stored() -> bool:
                    p = await mesh_inproc(up_env, "events", "--source", "shop", "--json")
                    return p.returncode == 0 and len(json.loads(p.stdout)) >= 5

                await eventually(stored, timeout=30, interval=0.5)
            p = await mesh_inproc(up_env, *args, width=WIDTH)
            assert p.returncode == 0 and "Traceback" not in p.stderr, (args, p.stderr)
            assert table_problems(p.stdout, WIDTH) == [], (args, p.stdout)
            seen_tables += len(tables_in(p.stdout))
            if args[0] == "replay":
                assert re.search(r"replayed \d+ event\(s\) to audit; \d+ were already", p.stdout)
        # target list, propagation list, status (x2), dlq list, token list-revoked, events
        assert seen_tables >= 7
        deliveries = await mesh_inproc(up_env, "deliveries", "--event", crm_event, width=WIDTH)
        assert deliveries.returncode == 0, deliveries.stderr
        assert table_problems(deliveries.stdout, WIDTH) == [] and "501" in deliveries.stdout
    finally:
        await receiver.stop()
        if up.returncode is None:
            up.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(up.wait(), 60)
            except TimeoutError:
                up.kill()
                await up.wait()
    assert up.returncode == 0, log.read_text()[-3000:]
