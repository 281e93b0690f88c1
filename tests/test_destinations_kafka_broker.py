"""The Kafka driver against one broker shared by this module's tests, reached directly:
the broker of ``MESH_TEST_KAFKA_URL`` / ``MESH_TEST_KAFKA_SASL_URL`` where they are set
(Apache Kafka, wherever one can be run: no build of it installs from the package
registries this project's machines reach), else two Tansu started here, one of them
requiring a SASL login (``tests/support/kafka.py``, ``shared_kafka``).

What it shows beyond tests/test_destinations_kafka.py (a fresh Tansu per test, behind a
cuttable proxy): 1,000 events published to mesh arrive at a real consumer, exactly the
published set and each key in order, over plaintext and through a SASL login; and a
login the broker refuses is a retry with a clear error that names no password, then a
dead letter, never a silent loss."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("aiokafka")

from mesh.client import MeshClient
from mesh.destinations import DestinationOptions
from mesh.envelope import Event
from mesh.registry import Target, TargetKind
from services.egress.service import WebhookEgress
from tests.support import eventually
from tests.support.destinations import Destination
from tests.support.kafka import SharedKafka, add_keyed_target, shared_kafka
from tests.support.receiver import dead_letters, delivery_records, fast_policy

SUBJECTS = [f"customer-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedKafka]:
    with shared_kafka(Path(tmp_path_factory.mktemp("kafka"))) as b:
        yield b


@pytest.fixture(params=["plaintext", "sasl"])
async def place(
    request: pytest.FixtureRequest, kafka_broker: SharedKafka
) -> AsyncIterator[Destination]:
    """A topic of this test's own at the shared broker, and a consumer of it that logs in
    as the target does."""
    upstream = kafka_broker.url if request.param == "plaintext" else kafka_broker.sasl_url
    if upstream is None:
        pytest.skip(kafka_broker.no_login)
    async with Destination("kafka", upstream, None) as d:
        yield d


def _events(n: int) -> list[Event]:
    return [
        Event(source="shop", type="order.created", subject=SUBJECTS[i % 10], data={"n": i})
        for i in range(n)
    ]


@pytest.mark.slow
async def test_thousand_events_arrive_once_each_key_in_order(
    place: Destination, client: MeshClient, egress: WebhookEgress
) -> None:
    await add_keyed_target(client, place.url, place.tag)
    published = _events(1000)
    assert await client.publish_many(published) == 1000
    want = {e.id for e in published}

    async def arrived() -> bool:
        return want <= set(place.received.ids)

    await eventually(arrived, 60, "the 1,000 events")
    # Exactly the published set, each once (nothing failed, so nothing was sent twice),
    # each with the data it was published with.
    assert sorted(place.received.ids) == sorted(want)
    for e in published:
        assert place.received.data[e.id] == e.data
    # The key is the subject: one key, one partition, in publish order there.
    where = {eid: (partition, key) for eid, partition, key in place.records}
    for subject in SUBJECTS:
        mine = [e.id for e in published if e.subject == subject]
        assert {where[i][1] for i in mine} == {subject.encode()}
        assert len({where[i][0] for i in mine}) == 1
        assert [eid for eid, _, _ in place.records if eid in set(mine)] == mine
    assert not await dead_letters(client, "dest")


async def test_a_refused_login_is_retried_then_dead_lettered_with_a_clear_error(
    kafka_broker: SharedKafka, client: MeshClient, egress: WebhookEgress
) -> None:
    password = urlsplit(kafka_broker.refused_url).password or ""
    await client.add_target(
        Target(
            name="dest",
            kind=TargetKind.KAFKA,
            url=kafka_broker.refused_url,
            timeout_s=5.0,
            retry=fast_policy(max_retries=2),
            circuit_threshold=50,
            options=DestinationOptions(topic="never-reached"),
        )
    )
    await client.add_propagation("unidirectional", "shop", ["dest"])
    event_id = await client.publish("shop", "order.created", {"n": 1})
    dead = await eventually(lambda: dead_letters(client, "dest"), 30, "a dead letter")
    assert [d.event_id for d in dead] == [event_id]  # kept, to replay once the login works
    records = await eventually(lambda: _three(client), 10, "three attempts")
    # Retried (the credentials are the target's, not the event's), then dead-lettered.
    assert [(r.outcome, r.attempt) for r in records] == [("retry", 1), ("retry", 2), ("dead", 3)]
    user = urlsplit(kafka_broker.refused_url).username
    for error in [r.error or "" for r in records] + [d.error or "" for d in dead]:
        assert f"login as {user!r} refused" in error, error
        assert password not in error


async def _three(client: MeshClient) -> list[object] | None:
    records = await delivery_records(client, "dest")
    return records if len(records) >= 3 else None
