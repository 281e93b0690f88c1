"""Replay: a target's past events re-injected for that target only (real nats-server)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.envelope import Event
from mesh.errors import NotFound, ValidationError
from mesh.replay import ReplayProgress, narrow, replay, replay_headers, source_filters
from mesh.subjects import Subjects
from tests.conftest import add_nats_target
from tests.support.cli import assert_one_line_errors, one_line_error, run_cli

# Helpers shared with test_dlq.py and test_keys.py ----------------------------------


async def drain(
    client: MeshClient, target: str, expect: int = 0, quiet: float = 1.0
) -> list[Event]:
    """Consume (and ack) a target's feed: wait for ``expect`` events, then for ``quiet`` s more."""
    events: list[Event] = []
    stop = asyncio.Event()
    it = client.consume(target, batch=64, expires=0.5, stop=stop)
    try:
        while True:
            timeout = quiet if len(events) >= expect else 20.0
            try:
                d = await asyncio.wait_for(anext(it), timeout)
            except (TimeoutError, StopAsyncIteration):
                break
            events.append(d.event)
            await d.ack()
    finally:
        stop.set()
        await it.aclose()
    return events


async def backlog(client: MeshClient, target: str) -> tuple[int, int]:
    """(pending, unacked) of the target's durable consumer."""
    ci = await client.js.consumer_info(client.names.events, f"deliver-{target}")
    return int(ci.num_pending or 0), int(ci.num_ack_pending or 0)


async def stored(client: MeshClient) -> int:
    info = await client.js.stream_info(client.names.events)
    return int(info.state.messages)


async def fence() -> datetime:
    """A point in time strictly between what was stored before and after it."""
    await asyncio.sleep(0.01)
    t = datetime.now(UTC)
    await asyncio.sleep(0.01)
    return t


# Pure logic -------------------------------------------------------------------------


def test_narrow_type_patterns() -> None:
    assert narrow(None, None) is None
    assert narrow(None, "order.*") == "order.*"
    assert narrow("order.>", "order.created") == "order.created"
    assert narrow("order.created", "order.*") == "order.created"
    assert narrow("order.*", "*.created") == "order.*"  # overlap: checked per event
    assert narrow("order.*", "user.*") is False


def test_source_filters_reduce_and_narrow() -> None:
    s = Subjects("mesh")
    routes: list[tuple[str, str | None]] = [("shop", None), ("shop", "order.*"), ("crm", "user.>")]
    assert source_filters(s, routes, None) == ["mesh.evt.crm.user.>", "mesh.evt.shop.>"]
    assert source_filters(s, routes, "order.*") == ["mesh.evt.shop.order.*"]
    assert source_filters(s, [("crm", "user.>")], "order.*") == []


def test_replay_headers_keep_id_mark_replay_new_msg_id() -> None:
    original = {
        "Nats-Msg-Id": "e1",
        "ce-id": "e1",
        "ce-source": "shop",
        "ce-type": "order.created",
        "ce-specversion": "1.0",
        "mesh-encryption": "fernet",
        "mesh-dlq-error": "boom",
    }
    h = replay_headers(
        original, b"token", source="shop", event_type="order.created", msg_id="replay-a-e1"
    )
    assert h["ce-id"] == "e1"
    assert h["ce-meshreplay"] == "true"
    assert h["Nats-Msg-Id"] == "replay-a-e1"
    assert h["mesh-encryption"] == "fernet"
    assert not any(k.startswith("mesh-dlq-") for k in h)


def test_replay_headers_for_a_plain_message_keep_its_derived_id() -> None:
    h = replay_headers({}, b'{"x": 1}', source="shop", event_type="raw", msg_id="m", seq=42)
    assert h["ce-id"] == "seq-42"
    assert h["ce-source"] == "shop" and h["ce-type"] == "raw"
    assert h["ce-datacontenttype"] == "application/json"


# Against a real broker ------------------------------------------------------------


async def _two_targets(client: MeshClient) -> None:
    await add_nats_target(client, "alpha")
    await add_nats_target(client, "beta")
    await client.add_propagation("multicast", "shop", ["alpha", "beta"])


async def test_replay_window_and_types_reach_only_that_target(client: MeshClient) -> None:
    await _two_targets(client)
    await client.publish("shop", "order.created", {"n": 0})
    await client.publish("shop", "user.signup", {"n": 1})
    since = await fence()
    wanted = [
        await client.publish("shop", "order.created", {"n": 2}),
        await client.publish("shop", "order.paid", {"n": 3}),
    ]
    await client.publish("shop", "user.signup", {"n": 4})  # in the window, not the types
    wanted.append(await client.publish("shop", "order.created", {"n": 5}))
    until = await fence()
    await client.publish("shop", "order.created", {"n": 6})  # after the window
    # Normal delivery first: both targets got all seven.
    assert len(await drain(client, "alpha", 7, quiet=0.3)) == 7
    assert len(await drain(client, "beta", 7, quiet=0.3)) == 7

    seen: list[ReplayProgress] = []
    result = await replay(
        client, "alpha", since, until, "order.*", progress=lambda p: seen.append(p)
    )
    assert (result.matched, result.published, result.duplicates) == (3, 3, 0)
    assert seen and seen[-1].published == 3

    assert await backlog(client, "beta") == (0, 0)
    assert await backlog(client, "alpha") == (3, 0)
    got = await drain(client, "alpha", 3)
    assert [e.id for e in got] == wanted
    assert all(e.replay for e in got)
    assert [e.data["n"] for e in got] == [2, 3, 5]
    assert await drain(client, "beta", quiet=0.5) == []
    assert await backlog(client, "alpha") == (0, 0)
    assert await backlog(client, "beta") == (0, 0)


async def test_rerun_is_stored_once_and_dry_run_publishes_nothing(client: MeshClient) -> None:
    await _two_targets(client)
    since = await fence()
    ids = [await client.publish("shop", "order.created", {"n": i}) for i in range(5)]
    await drain(client, "alpha", 5, quiet=0.2)

    before = await stored(client)
    dry = await replay(client, "alpha", since, dry_run=True)
    assert dry.matched == 5 and dry.published == 0
    assert [i.id for i in dry.sample] == ids
    assert await stored(client) == before

    first = await replay(client, "alpha", since)
    # An interrupted run, run again: the duplicate window keeps one copy of each.
    again = await replay(client, "alpha", since)
    assert (first.published, first.duplicates) == (5, 0)
    assert (again.published, again.duplicates) == (0, 5)
    assert await backlog(client, "alpha") == (5, 0)
    assert sorted(e.id for e in await drain(client, "alpha", 5)) == sorted(ids)


async def test_plain_nats_message_replays_with_the_id_receivers_saw(client: MeshClient) -> None:
    await add_nats_target(client, "alpha")
    await client.add_propagation("unidirectional", "legacy", ["alpha"])
    since = await fence()
    ack = await client.js.publish("mesh.evt.legacy.thing.done", b'{"ok": true}')
    first = await drain(client, "alpha", 1)
    assert [e.id for e in first] == [f"seq-{ack.seq}"]
    await replay(client, "alpha", since)
    again = await drain(client, "alpha", 1)
    assert [(e.id, e.data, e.replay) for e in again] == [(f"seq-{ack.seq}", {"ok": True}, True)]


async def test_replay_skips_events_that_originated_at_the_target(client: MeshClient) -> None:
    await add_nats_target(client, "alpha")
    await add_nats_target(client, "beta")
    await client.add_propagation("bidirectional", "alpha", ["beta"])
    since = await fence()
    cause = client.build("alpha", "ping")
    await client.publish_event(cause)
    # beta reacts to alpha's event: its origin stays alpha, so alpha must not get it.
    echo = await client.publish("beta", "pong", cause=cause)
    own = await client.publish("beta", "hello")
    assert [e.id for e in await drain(client, "alpha", 1, quiet=0.3)] == [own]
    result = await replay(client, "alpha", since)
    assert (result.matched, result.skipped) == (1, 1)
    assert [(e.id, e.replay) for e in await drain(client, "alpha", 1)] == [(own, True)]
    assert echo != own


async def test_library_errors(client: MeshClient) -> None:
    await _two_targets(client)
    await add_nats_target(client, "lonely")
    now = datetime.now(UTC)
    with pytest.raises(NotFound, match="unknown target"):
        await replay(client, "nobody", now - timedelta(hours=1))
    with pytest.raises(NotFound, match="no propagation routes"):
        await replay(client, "lonely", now - timedelta(hours=1))
    with pytest.raises(NotFound, match="nothing to replay"):
        await replay(client, "alpha", now - timedelta(hours=1))
    with pytest.raises(ValidationError, match="in the future"):
        await replay(client, "alpha", now + timedelta(hours=1))
    with pytest.raises(ValidationError, match="not after"):
        await replay(client, "alpha", now - timedelta(hours=1), now - timedelta(hours=2))
    with pytest.raises(ValidationError, match="invalid type pattern"):
        await replay(client, "alpha", now - timedelta(hours=1), types="order..x")
    await client.add_propagation("unidirectional", "crm", ["lonely"], types="user.*")
    with pytest.raises(NotFound, match="carries types"):
        await replay(client, "lonely", now - timedelta(hours=1), types="order.*")


# The command ------------------------------------------------------------------------


@pytest.mark.slow
async def test_target_added_later_gets_all_history(client: MeshClient, settings: Settings) -> None:
    await add_nats_target(client, "early")
    await client.add_propagation("broadcast", "shop")
    events = [client.build("shop", "order.created", {"n": i}) for i in range(1000)]
    for i in range(0, len(events), 250):
        await client.publish_many(events[i : i + 250])
    # Registered after the fact: its consumer starts at new events only.
    await add_nats_target(client, "late")
    assert await backlog(client, "late") == (0, 0)

    dry = await run_cli(settings, "replay", "--target", "late", "--since", "1h", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 1000 event(s) to late" in dry.stdout
    assert await backlog(client, "late") == (0, 0)

    proc = await run_cli(settings, "replay", "--target", "late", "--since", "1h")
    assert proc.returncode == 0, proc.stderr
    assert "replayed 1000 event(s) to late" in proc.stdout
    got = await drain(client, "late", 1000)
    assert sorted(e.id for e in got) == sorted(e.id for e in events)
    assert all(e.replay for e in got)
    # Replay aims at one target: the one that was there all along gets nothing more.
    assert (await backlog(client, "early"))[0] == 1000  # its normal feed, untouched
    assert len(await drain(client, "early", 1000, quiet=0.5)) == 1000


async def test_cli_says_what_was_already_queued(client: MeshClient, settings: Settings) -> None:
    """`replayed 6` and a consume that then gets 10: the CLI says both numbers."""
    await _two_targets(client)
    for i in range(4):
        await client.publish("shop", "order.created", {"n": i})  # 4 queued for alpha
    proc = await run_cli(settings, "replay", "--target", "alpha", "--since", "1h")
    assert proc.returncode == 0, proc.stderr
    assert "replayed 4 event(s) to alpha; 4 were already queued for alpha (8 in all)" in (
        proc.stdout
    )
    assert len(await drain(client, "alpha", 8, quiet=0.5)) == 8
    doc = json.loads(
        (await run_cli(settings, "replay", "--target", "beta", "--since", "1h", "--json")).stdout
    )
    assert (doc["published"], doc["already_queued"]) == (4, 4)


async def test_cli_json_and_until(client: MeshClient, settings: Settings) -> None:
    await _two_targets(client)
    since = await fence()
    first = await client.publish("shop", "order.created", {"n": 1})
    until = await fence()
    await client.publish("shop", "order.created", {"n": 2})
    proc = await run_cli(
        settings,
        "replay",
        "--target",
        "beta",
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat(),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    import json

    doc: dict[str, Any] = json.loads(proc.stdout)
    assert (doc["matched"], doc["published"]) == (1, 1)
    assert [s["id"] for s in doc["sample"]] == [first]
    assert await backlog(client, "alpha") == (2, 0)  # normal feed only
    assert (await backlog(client, "beta"))[0] == 3  # normal feed + 1 replayed


async def test_cli_bad_input_is_one_line_and_non_zero(
    client: MeshClient, settings: Settings
) -> None:
    await _two_targets(client)
    await add_nats_target(client, "lonely")
    cases = [
        (["--target", "nobody", "--since", "1h"], "unknown target 'nobody'"),
        (["--target", "Bad Name", "--since", "1h"], "invalid target name"),
        (["--target", "alpha", "--since", "yesterday"], "invalid time 'yesterday'"),
        (["--target", "alpha", "--since", "1h", "--until", "2h"], "is not after --since"),
        (["--target", "alpha", "--since", "1h"], "nothing to replay"),
        (["--target", "lonely", "--since", "1h"], "no propagation routes"),
        (["--target", "alpha", "--since", "1h", "--types", "a..b"], "invalid type pattern"),
    ]
    await assert_one_line_errors(settings, [(["replay", *a], text, 1) for a, text in cases])
    missing = await run_cli(settings, "replay", "--since", "1h")
    assert missing.returncode == 2 and "--target" in one_line_error(missing)


async def test_replay_a_sequence_range(client: MeshClient) -> None:
    await _two_targets(client)
    ids = [await client.publish("shop", "order.created", {"n": i}) for i in range(6)]
    await drain(client, "alpha", 6, quiet=0.2)
    info = await client.js.stream_info(client.names.events)
    first = info.state.last_seq - 5  # the six events are the stream's last six messages
    dry = await replay(client, "alpha", None, from_seq=first + 2, to_seq=first + 4, dry_run=True)
    assert [i.id for i in dry.sample] == ids[2:5]
    assert [i.seq for i in dry.sample] == [first + 2, first + 3, first + 4]
    result = await replay(client, "alpha", None, from_seq=first + 4)
    assert result.published == 2
    assert sorted(e.id for e in await drain(client, "alpha", 2)) == sorted(ids[4:])

    with pytest.raises(ValidationError, match="not both"):
        await replay(client, "alpha", datetime.now(UTC), from_seq=1)
    with pytest.raises(ValidationError, match="before the first"):
        await replay(client, "alpha", None, from_seq=5, to_seq=4)
    with pytest.raises(ValidationError, match="or a first sequence"):
        await replay(client, "alpha", None)
    with pytest.raises(NotFound, match="from seq"):
        await replay(client, "alpha", None, from_seq=info.state.last_seq + 100)
