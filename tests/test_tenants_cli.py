"""``mesh tenant create|list|quota|delete``, ``mesh apikey create --tenant`` and
``MESH_TENANT`` for ``mesh target add`` / ``mesh propagate`` (real CLI, real broker)."""

from __future__ import annotations

import json

from mesh.client import MeshClient
from mesh.config import Settings
from tests.conftest import env_for
from tests.support.cli import ok, one_line_error
from tests.support.inproc import mesh_inproc as mesh


async def test_tenant_commands(settings: Settings, client: MeshClient) -> None:
    env = env_for(settings)
    ok(await mesh(env, "tenant", "create", "acme", "--max-targets", "2"))
    err = one_line_error(await mesh(env, "tenant", "create", "acme"), "exists")
    assert "acme" in err
    one_line_error(await mesh(env, "tenant", "create", "Bad Name"), "invalid tenant")
    one_line_error(await mesh(env, "tenant", "quota", "acme", "--max-targets", "x"), "number")
    p = ok(await mesh(env, "tenant", "quota", "acme", "--events-per-s", "5", "--json"))
    assert json.loads(p.stdout)["quotas"] == {
        "events_per_s": 5.0,
        "max_targets": 2,
        "stored_days": None,
    }
    ok(await mesh(env, "tenant", "quota", "acme", "--max-targets", "unset"))
    listed = json.loads(ok(await mesh(env, "tenant", "list", "--json")).stdout)
    assert [(t["name"], t["quotas"]["max_targets"]) for t in listed] == [
        ("default", None),
        ("acme", None),
    ]

    acme = {**env, "MESH_TENANT": "acme"}
    ok(await mesh(acme, "target", "add", "acme-billing", "--kind", "nats"))
    ok(
        await mesh(
            acme, "propagate", "unidirectional", "--source", "pos", "--target", "acme-billing"
        )
    )
    assert (await client.registry.get_target("~acme.acme-billing")).tenant == "acme"
    (prop,) = await client.registry.list_propagations()
    assert prop.tenant == "acme"
    assert await client.registry.routes_for("~acme.acme-billing") == [("~acme.pos", None)]
    # the default tenant cannot route to acme's target: it does not see it
    one_line_error(
        await mesh(env, "propagate", "unidirectional", "--source", "x", "--target", "acme-billing"),
        "unknown target",
    )
    one_line_error(
        await mesh({**env, "MESH_TENANT": "ghost"}, "target", "add", "g1", "--kind", "nats"),
        "unknown tenant",
    )

    one_line_error(
        await mesh(env, "apikey", "create", "--name", "k", "--scope", "read", "--tenant", "ghost"),
        "unknown tenant",
    )
    p = ok(
        await mesh(env, "apikey", "create", "--name", "k", "--scope", "read", "--tenant", "acme")
    )
    assert p.stdout.startswith("mk_") and "tenant acme" in p.stderr
    keys = json.loads(ok(await mesh(env, "apikey", "list", "--json")).stdout)
    assert [k["tenant"] for k in keys] == ["acme"]

    err = one_line_error(await mesh(env, "tenant", "delete", "acme"), "still holds")
    assert "1 targets" in err and "1 live API keys" in err
    one_line_error(await mesh(env, "tenant", "delete", "default"), "cannot be deleted")
