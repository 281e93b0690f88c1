"""The dead-letter tools against a real nats-server: list, show, replay, purge."""

from __future__ import annotations

import asyncio
import json

from mesh import dlq
from mesh.client import MeshClient
from mesh.config import Settings
from tests.conftest import add_nats_target, env_for
from tests.support.cli import assert_one_line_errors, mesh, one_line_error, run_cli
from tests.support.tables import table_problems
from tests.test_replay import backlog, drain


async def dlq_depth(client: MeshClient, target: str | None = None) -> int:
    subj = client.subjects.dlq(target) if target else client.subjects.dlq_all
    info = await client.js.stream_info(client.names.dlq, subjects_filter=subj)
    return sum((info.state.subjects or {}).values())


async def dead_letter_all(client: MeshClient, target: str, n: int, error: str) -> list[str]:
    """A receiver that gives up on everything: each event goes to the DLQ, then is acked."""
    ids: list[str] = []
    it = client.consume(target, batch=32, expires=0.5)
    try:
        while len(ids) < n:
            d = await asyncio.wait_for(anext(it), 20)
            await client.deliveries.dead_letter(d.msg, target, error, attempts=4)
            await d.ack()
            ids.append(d.event.id)
    finally:
        await it.aclose()
    return ids


async def test_list_show_replay_leaves_the_dlq(client: MeshClient, settings: Settings) -> None:
    await add_nats_target(client, "alpha")
    await add_nats_target(client, "beta")
    await client.add_propagation("multicast", "shop", ["alpha", "beta"])
    published = [await client.publish("shop", "order.created", {"n": i}) for i in range(6)]
    dead = await dead_letter_all(client, "alpha", 6, "connection refused")
    assert dead == published
    await drain(client, "beta", 6, quiet=0.2)
    assert await dlq_depth(client, "alpha") == 6

    listing = await run_cli(settings, "dlq", "list", "--target", "alpha", "--json")
    assert listing.returncode == 0, listing.stderr
    docs = json.loads(listing.stdout)
    assert [d["event_id"] for d in docs] == published
    assert {(d["target"], d["attempts"], d["error"]) for d in docs} == {
        ("alpha", 4, "connection refused")
    }
    assert all(d["encrypted"] and d["type"] == "order.created" for d in docs)

    # At 80 columns the ids are cut to a prefix; on a wide terminal they are whole.
    table, wide = await asyncio.gather(
        run_cli(settings, "dlq", "list"),
        mesh(env_for(settings) | {"COLUMNS": "200"}, "dlq", "list"),
    )
    assert table.returncode == 0 and published[0][:8] in table.stdout
    assert published[0] not in table.stdout and table_problems(table.stdout, 80) == []
    assert wide.returncode == 0 and published[0] in wide.stdout

    show = await run_cli(settings, "dlq", "show", published[2], "--json")
    assert show.returncode == 0, show.stderr
    one = json.loads(show.stdout)
    assert (one["event_id"], one["headers"]["ce-id"]) == (published[2], published[2])
    by_seq, by_prefix, too_short = await asyncio.gather(
        run_cli(settings, "dlq", "show", str(one["seq"]), "--json"),
        run_cli(settings, "dlq", "show", published[2][:8], "--json"),  # as 80 columns show it
        run_cli(settings, "dlq", "show", published[2][:7], "--json"),
    )
    assert json.loads(by_seq.stdout)["event_id"] == published[2]
    assert json.loads(by_prefix.stdout)["event_id"] == published[2], by_prefix.stderr
    one_line_error(too_short, "no dead letter")

    # The receiver is back: replay sends every dead letter through normal delivery.
    proc = await run_cli(settings, "dlq", "replay", "--target", "alpha")
    assert proc.returncode == 0, proc.stderr
    assert "replayed 6 dead letter(s)" in proc.stdout
    got = await drain(client, "alpha", 6)
    assert [e.id for e in got] == published
    assert all(e.replay for e in got)
    assert [e.data["n"] for e in got] == list(range(6))
    assert await dlq_depth(client) == 0
    assert await backlog(client, "beta") == (0, 0)  # the other target saw nothing again


async def test_replay_keeps_dead_letters_it_could_not_republish(client: MeshClient) -> None:
    await add_nats_target(client, "alpha")
    await client.add_propagation("unidirectional", "shop", ["alpha"])
    for i in range(3):
        await client.publish("shop", "order.created", {"n": i})
    await dead_letter_all(client, "alpha", 3, "HTTP 503")
    entries = (await dlq.list_dead_letters(client, "alpha")).entries
    # No stream takes replayed events now: nothing may leave the DLQ.
    await client.js.delete_stream(client.names.events)
    result = await dlq.replay_dead_letters(client, entries)
    assert result.replayed == 0 and len(result.failed) == 3
    assert await dlq_depth(client, "alpha") == 3


async def test_dead_letters_of_a_removed_target_stay(
    client: MeshClient, settings: Settings
) -> None:
    await add_nats_target(client, "alpha")
    await client.add_propagation("unidirectional", "shop", ["alpha"])
    await client.publish("shop", "order.created", {"n": 1})
    await dead_letter_all(client, "alpha", 1, "timeout")
    await client.remove_target("alpha")
    proc = await run_cli(settings, "dlq", "replay", "--target", "alpha")
    assert proc.returncode == 1
    assert "target 'alpha' no longer exists" in proc.stderr
    assert await dlq_depth(client, "alpha") == 1


async def test_purge_asks_unless_yes(client: MeshClient, settings: Settings) -> None:
    await add_nats_target(client, "alpha")
    await add_nats_target(client, "beta")
    await client.add_propagation("multicast", "shop", ["alpha", "beta"])
    for i in range(4):
        await client.publish("shop", "order.created", {"n": i})
    await dead_letter_all(client, "alpha", 4, "HTTP 500")
    await dead_letter_all(client, "beta", 4, "HTTP 500")

    refused = await run_cli(settings, "dlq", "purge", "--target", "alpha")
    assert "needs confirmation: pass --yes" in one_line_error(refused)
    assert await dlq_depth(client, "alpha") == 4

    proc = await run_cli(settings, "dlq", "purge", "--target", "alpha", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"purged": 4}
    assert (await dlq_depth(client, "alpha"), await dlq_depth(client, "beta")) == (0, 4)

    since = await run_cli(settings, "dlq", "purge", "--since", "1h", "--yes")
    assert since.returncode == 0 and "purged 4 dead letter(s)" in since.stdout
    assert await dlq_depth(client) == 0
    empty = await run_cli(settings, "dlq", "purge", "--yes")
    assert empty.returncode == 0 and "no dead letters to purge" in empty.stdout


async def test_bad_input_is_one_line_and_non_zero(client: MeshClient, settings: Settings) -> None:
    await add_nats_target(client, "alpha")
    cases = [
        (["dlq", "list", "--target", "nobody"], "unknown target 'nobody'", 1),
        (["dlq", "list", "--since", "someday"], "invalid time 'someday'", 1),
        (["dlq", "show", "no-such-id"], "no dead letter 'no-such-id'", 1),
        (["dlq", "show", "999"], "no dead letter '999'", 1),
        (["dlq", "replay", "--target", "alpha"], "nothing to replay", 1),
        (["dlq", "replay", "--target", "Bad!"], "invalid target name", 1),
        (["dlq", "purge", "--target", "nobody", "--yes"], "unknown target 'nobody'", 1),
        (["dlq", "frobnicate"], "No such command", 2),
    ]
    await assert_one_line_errors(settings, cases)
    empty = await run_cli(settings, "dlq", "list")
    assert empty.returncode == 0 and "no dead letters" in empty.stdout


# With the real webhook egress --------------------------------------------------------


async def test_events_dead_lettered_while_the_receiver_was_down_all_arrive(
    client: MeshClient, settings: Settings
) -> None:
    from services.egress.service import WebhookEgress
    from tests.support.receiver import Receiver, add_webhook, delivery_records, fast_policy

    rx = Receiver()  # not started: its port refuses connections
    await add_webhook(client, "hook", rx.url, retry=fast_policy(max_retries=2))
    await add_nats_target(client, "other")
    await client.add_propagation("unidirectional", "shop", ["other"])
    egress = WebhookEgress(settings, fetch_expires_s=0.5)
    await egress.start()
    try:
        published = [await client.publish("shop", "order.created", {"n": i}) for i in range(5)]
        deadline = asyncio.get_running_loop().time() + 30
        while await dlq_depth(client, "hook") < 5:
            assert asyncio.get_running_loop().time() < deadline, "dead letters did not arrive"
            await asyncio.sleep(0.1)
        listing = await dlq.list_dead_letters(client, "hook")
        assert sorted(e.event_id for e in listing.entries) == sorted(published)
        assert {e.letter.attempts for e in listing.entries} == {3}

        async with rx:  # the receiver is back
            proc = await run_cli(settings, "dlq", "replay", "--target", "hook")
            assert proc.returncode == 0, proc.stderr
            assert "replayed 5 dead letter(s)" in proc.stdout
            await rx.wait_for(5, timeout=20, unique=True)
            assert rx.unique_ids() == set(published)
            assert all(r.status == 200 for r in rx.requests)
            assert sorted(r.json()["data"]["n"] for r in rx.requests) == list(range(5))
        assert await dlq_depth(client) == 0
        # Fresh attempts: each replayed event went out as attempt 1 of a new series.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            records = await delivery_records(client, "hook")
            ok = [r for r in records if r.outcome == "delivered"]
            if len(ok) >= 5 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert sorted(r.event_id for r in ok) == sorted(published)
        assert {r.attempt for r in ok} == {1}
    finally:
        await egress.stop()
    # The nats target saw its own five once, nothing replayed.
    got = await drain(client, "other", 5, quiet=0.3)
    assert [e.id for e in got] == published and not any(e.replay for e in got)


async def test_replay_by_id_and_a_replayed_event_dead_lettered_again(
    client: MeshClient, settings: Settings
) -> None:
    await add_nats_target(client, "alpha")
    await client.add_propagation("unidirectional", "shop", ["alpha"])
    ids = [await client.publish("shop", "order.created", {"n": i}) for i in range(3)]
    await dead_letter_all(client, "alpha", 3, "HTTP 502")
    proc = await run_cli(settings, "dlq", "replay", "--id", ids[1], "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["replayed"] == 1
    assert sorted(e.event_id for e in (await dlq.list_dead_letters(client)).entries) == sorted(
        [ids[0], ids[2]]
    )
    # The replayed copy fails again: dead-lettered from its replay subject, it still
    # replays to the same target with the same id.
    assert await dead_letter_all(client, "alpha", 1, "HTTP 502 again") == [ids[1]]
    again = [e for e in (await dlq.list_dead_letters(client)).entries if e.event_id == ids[1]]
    assert again[0].letter.original_subject.startswith("mesh.replay.alpha.shop.")
    result = await dlq.replay_dead_letters(client, dlq.iter_dead_letters(client, "alpha"))
    assert (result.replayed, result.failed, result.skipped) == (3, [], [])
    got = await drain(client, "alpha", 3)
    assert sorted(e.id for e in got) == sorted(ids) and all(e.replay for e in got)
    assert await dlq_depth(client) == 0
