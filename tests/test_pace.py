"""A target's adaptive in-flight limit (services/egress/pace.py): the rule alone, then a
real egress against a receiver that stops answering and starts again."""

from __future__ import annotations

import asyncio

from mesh.client import MeshClient
from services.egress.pace import START, Pace
from services.egress.service import WebhookEgress
from tests.support.receiver import Receiver, Reply, add_webhook, fast_policy


def test_it_starts_low_and_grows_with_each_answer_up_to_the_ceiling() -> None:
    pace = Pace(64, timeout_s=1.0)
    assert pace.limit == START
    assert pace.open(START - 1) and not pace.open(START)
    pace.done(ok=10, timed_out=0, now=0.0)
    assert pace.limit == START + 10
    pace.done(ok=100, timed_out=0, now=0.1)
    assert pace.limit == 64
    assert Pace(3, timeout_s=1.0).ceiling == 3


def test_a_chunk_starts_with_room_for_all_that_waits_unless_nothing_is_out() -> None:
    pace = Pace(32, timeout_s=1.0)
    assert pace.fits(0, 32)  # slow start: nothing out, so one goes (nothing else would)
    assert not pace.fits(1, 1)
    pace.done(ok=31, timed_out=0, now=0.0)
    assert pace.limit == 32
    assert pace.fits(0, 100)
    # Something out: no sliver of a batch goes beside it, the rest following later.
    assert not pace.fits(1, 32) and pace.fits(1, 31)
    assert not pace.fits(16, 17) and pace.fits(16, 16)  # two halves (``Driver.overlap``)
    assert not pace.fits(1, 500)  # more than the limit: once the wire is empty
    assert not pace.fits(32, 1) and not pace.fits(40, 0)  # over the limit (a cut)


def test_a_timeout_keeps_what_the_target_answered_in_the_last_timeout() -> None:
    pace = Pace(64, timeout_s=1.0)
    pace.done(ok=64, timed_out=0, now=10.0)
    assert pace.limit == 64
    pace.done(ok=0, timed_out=1, now=10.5)  # one blip among many answers: no cut
    assert pace.limit == 64 and pace.cuts == 0
    pace.done(ok=5, timed_out=0, now=11.8)
    pace.done(ok=0, timed_out=20, now=12.0)  # only 5 answered in the last second
    assert pace.limit == 5 and pace.cuts == 1
    pace.done(ok=0, timed_out=5, now=14.0)  # none answered: one at a time
    assert pace.limit == 1
    pace.done(ok=0, timed_out=1, now=15.0)  # never below one
    assert pace.limit == 1
    pace.done(ok=1, timed_out=0, now=16.0)
    assert pace.limit == 2


def test_configure_lowers_the_ceiling_and_the_limit() -> None:
    pace = Pace(64, timeout_s=1.0)
    pace.done(ok=64, timed_out=0, now=0.0)
    pace.configure(16, timeout_s=2.0)
    assert pace.limit == 16 and pace.ceiling == 16 and pace.timeout_s == 2.0


async def test_a_target_that_stops_answering_gets_one_request_at_a_time(
    client: MeshClient, egress: WebhookEgress
) -> None:
    async with Receiver(default=Reply(delay=3.0)) as rx:  # past every timeout
        await add_webhook(
            client,
            "slow",
            rx.url,
            max_in_flight=32,
            timeout_s=0.5,
            circuit_threshold=1_000_000,  # the breaker never opens: the pace alone
            retry=fast_policy(max_retries=100),
        )
        published = [client.build("shop", "a.b", {"n": i}) for i in range(200)]
        assert await client.publish_many(published) == 200
        await rx.wait_for(1)
        first = rx.requests[0].at
        await asyncio.sleep(3.5)
        arrivals = [r.at - first for r in rx.requests]
        # Before the first timeout: the start (one), not the 32 allowed.
        assert 1 <= len([t for t in arrivals if t < 0.45]) <= START
        # After it nothing answered, so one request at a time: one arrival per timeout
        # (0.5 s) from 1.0 s to 3.5 s, where 32 at a time would be some 160.
        late = [t for t in arrivals if t >= 1.0]
        assert 1 <= len(late) <= 7, late
        assert egress.stats()["targets"]["slow"]["pace"] == 1

        # It answers again: the limit grows back with the answers and every event arrives.
        rx.set_default(Reply(204))
        await rx.wait_for(200, unique=True, timeout=60)
        assert {e.id for e in published} <= set(rx.ids())
        assert egress.stats()["targets"]["slow"]["pace"] == 32
