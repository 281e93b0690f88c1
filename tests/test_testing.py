"""``mesh.testing``: the same user code (publish -> handler -> ack) run against the
in-memory ``TestMesh`` (no nats-server) and against a real server (issue #24)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.client import MeshClient
from mesh.envelope import Event
from mesh.errors import BrokerError, ValidationError
from mesh.port import Port
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.testing import MemoryPort, TestMesh, subject_matches_filter

# The user's program: an order service publishes, a billing handler bills and acks.


async def setup_routes(mesh: MeshClient) -> None:
    await mesh.add_target(Target(name="billing", kind=TargetKind.NATS))
    await mesh.add_propagation(PropagationMode.UNIDIRECTIONAL, "shop", ["billing"], "order.>")


async def place_orders(mesh: MeshClient, n: int) -> list[str]:
    return [
        await mesh.publish("shop", "order.created", {"id": i, "total": 10 * i}) for i in range(n)
    ]


def bill(event: Event) -> int:
    if event.data["total"] < 0:
        raise ValueError("negative total")
    return int(event.data["total"])


async def run_billing(mesh: MeshClient, expected: int) -> tuple[list[int], list[str]]:
    """Handle ``expected`` events: bill each and ack it (a bad one is terminated)."""
    billed: list[int] = []
    ids: list[str] = []
    handled = 0
    async with asyncio.timeout(30):
        async for delivery in mesh.consume("billing", expires=0.5):
            handled += 1
            try:
                billed.append(bill(delivery.event))
            except ValueError:
                await delivery.term()
            else:
                ids.append(delivery.event.id)
                await delivery.ack()
            if handled >= expected:
                break
    return billed, ids


async def user_scenario(mesh: MeshClient) -> None:
    await setup_routes(mesh)
    sent = await place_orders(mesh, 3)
    # a type no propagation carries never reaches billing
    await mesh.publish("shop", "refund.created", {"id": 99, "total": 1})
    # the same id twice is one event
    assert await mesh.publish("shop", "order.created", {"id": 0, "total": 0}, id=sent[0]) == sent[0]
    billed, ids = await run_billing(mesh, 3)
    assert billed == [0, 10, 20]
    assert ids == sent


async def test_user_code_against_mesh_testing_without_a_server() -> None:
    async with TestMesh() as mesh:
        await user_scenario(mesh)
        # everything was acked: nothing is left in the queue
        consumer = mesh.memory.consumers["deliver-billing"]
        assert consumer.queue.empty() and not consumer.unacked


async def test_same_user_code_against_a_real_server(client: MeshClient) -> None:
    await user_scenario(client)
    info = await client.port.consumer_info(client.names.events, "deliver-billing")
    assert info.num_pending == 0


async def test_a_nak_comes_again_with_the_next_attempt() -> None:
    async with TestMesh() as mesh:
        await setup_routes(mesh)
        await mesh.publish("shop", "order.created", {"id": 1, "total": 5})
        attempts: list[int] = []
        async with asyncio.timeout(5):
            async for delivery in mesh.consume("billing", expires=0.2):
                attempts.append(delivery.attempt)
                if delivery.attempt == 1:
                    await delivery.nak()
                    continue
                await delivery.ack()
                break
        assert attempts == [1, 2]


async def test_loops_and_the_hop_limit_are_skipped_with_a_record() -> None:
    async with TestMesh() as mesh:
        await setup_routes(mesh)
        looped = mesh.build("shop", "order.created", {"total": 1})
        looped.origin = "billing"
        await mesh.publish_event(looped)
        ok = await mesh.publish("shop", "order.created", {"total": 2})
        async with asyncio.timeout(5):
            async for delivery in mesh.consume("billing", expires=0.2):
                assert delivery.event.id == ok
                await delivery.ack()
                break
        assert [r.event_id for r in mesh.records] == [looped.id]


async def test_publish_many_counts_new_events() -> None:
    async with TestMesh() as mesh:
        await setup_routes(mesh)
        events = [mesh.build("shop", "order.created", {"total": i}) for i in range(4)]
        assert await mesh.publish_many(events) == 4
        assert await mesh.publish_many(events[:2]) == 0


async def test_what_needs_a_server_says_so() -> None:
    async with TestMesh() as mesh:
        await setup_routes(mesh)
        with pytest.raises(BrokerError, match="needs a NATS server"):
            await mesh.deliveries.dlq_depths()
        with pytest.raises(ValidationError, match="no filters"):
            await mesh.add_propagation("unidirectional", "shop", ["billing"], filter="total > 1")


def test_both_ports_are_ports() -> None:
    from mesh._nats.port import JetStreamPort

    assert isinstance(MemoryPort(), Port)
    assert isinstance(JetStreamPort(), Port)


@pytest.mark.parametrize(
    ("subject", "pattern", "match"),
    [
        ("mesh.evt.shop.order.created", "mesh.evt.shop.>", True),
        ("mesh.evt.shop", "mesh.evt.shop.>", False),
        ("mesh.evt.shop.order", "mesh.evt.*.order", True),
        ("mesh.evt.shop.order.x", "mesh.evt.*.order", False),
        ("mesh.evt.crm.order", "mesh.evt.shop.*", False),
    ],
)
def test_subject_filters_match_as_nats_does(subject: str, pattern: str, match: Any) -> None:
    assert subject_matches_filter(subject, pattern) is match
