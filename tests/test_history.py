"""Paged history queries on both backends: filters, time ranges and keyset cursors."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mesh.errors import ValidationError
from mesh.history import response_excerpt
from mesh.storage import MAX_PAGE, Page, Store
from mesh.storage._history import decode_cursor, encode_cursor
from tests.test_storage import T0, delivery, event


async def _all_pages(store: Store, limit: int, **filters: object) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page: Page = await store.list_events(cursor=cursor, limit=limit, **filters)  # type: ignore[arg-type]
        pages.append([e.id for e in page.items])
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


async def test_events_pages_walk_every_row_once_newest_first(store: Store) -> None:
    await store.write_batch([event(n) for n in range(1, 24)])
    pages = await _all_pages(store, limit=5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    flat = [i for p in pages for i in p]
    assert flat == [f"evt-{n:05d}" for n in range(23, 0, -1)]

    # An exact multiple of the page size ends without an empty trailing page.
    assert [len(p) for p in await _all_pages(store, limit=23)] == [23]


async def test_cursor_is_stable_while_rows_arrive(store: Store) -> None:
    await store.write_batch([event(n) for n in range(1, 11)])
    first = await store.list_events(limit=4)
    assert [e.id for e in first.items] == [f"evt-{n:05d}" for n in (10, 9, 8, 7)]
    assert first.next_cursor is not None
    # Newer events and an event with the same time as the cursor row but a larger id
    # land between pages: the next page neither repeats nor skips a row it promised.
    await store.write_batch(
        [event(50), event(51), event(99, id="evt-00007z", time=T0 + timedelta(seconds=7))]
    )
    second = await store.list_events(cursor=first.next_cursor, limit=4)
    assert [e.id for e in second.items] == [f"evt-{n:05d}" for n in (6, 5, 4, 3)]


async def test_equal_times_are_ordered_by_id(store: Store) -> None:
    same = T0 + timedelta(minutes=5)
    await store.write_batch([event(n, time=same) for n in range(1, 8)])
    pages = await _all_pages(store, limit=3)
    assert [i for p in pages for i in p] == [f"evt-{n:05d}" for n in range(7, 0, -1)]


async def test_event_filters_and_time_range(store: Store) -> None:
    await store.write_batch([event(n) for n in range(1, 13)])
    await store.write_batch([event(100, type="order.line.added")])

    billing = await store.list_events(source="billing")
    assert [e.id for e in billing.items] == ["evt-00012", "evt-00009", "evt-00006", "evt-00003"]
    assert billing.next_cursor is None

    window = await store.list_events(
        since=T0 + timedelta(seconds=4), until=T0 + timedelta(seconds=8)
    )
    assert [e.id for e in window.items] == ["evt-00007", "evt-00006", "evt-00005", "evt-00004"]

    deep = await store.list_events(type="order.>", source="shop", limit=2)
    assert [e.id for e in deep.items] == ["evt-00100", "evt-00011"]
    rest = await store.list_events(type="order.>", source="shop", cursor=deep.next_cursor)
    assert all(e.source == "shop" for e in rest.items)
    assert "evt-00100" not in {e.id for e in rest.items} and len(rest.items) == 7

    paid = await store.list_events(type="order.paid", since=T0 + timedelta(seconds=9))
    assert [e.id for e in paid.items] == ["evt-00012", "evt-00010"]


async def test_deliveries_filter_by_target_outcome_event_and_time(store: Store) -> None:
    rows = [
        delivery(1),
        delivery(2),
        delivery(3),
        delivery(4, target="erp", outcome="dead", status_code=500, error="HTTP 500"),
        delivery(5, target="erp", outcome="retry", error="timeout after 5s"),
        delivery(6, event_id="evt-00002", target="erp", outcome="delivered"),
    ]
    await store.write_batch(deliveries=rows)

    crm = await store.list_deliveries(target="crm")
    assert [d.id for d in crm.items] == ["att-00003", "att-00002", "att-00001"]

    failures = await store.list_deliveries(target="erp", outcomes={"dead", "retry"})
    assert [(d.id, d.outcome) for d in failures.items] == [
        ("att-00005", "retry"),
        ("att-00004", "dead"),
    ]
    assert (await store.list_deliveries(outcomes=())).items == []

    of_event = await store.list_deliveries(event_id="evt-00002")
    assert [d.id for d in of_event.items] == ["att-00006"]

    window = await store.list_deliveries(
        since=T0 + timedelta(seconds=12), until=T0 + timedelta(seconds=15)
    )
    assert [d.id for d in window.items] == ["att-00004", "att-00003", "att-00002"]

    first = await store.list_deliveries(limit=4)
    assert first.next_cursor is not None
    second = await store.list_deliveries(limit=4, cursor=first.next_cursor)
    assert [d.id for d in first.items + second.items] == [f"att-{n:05d}" for n in range(6, 0, -1)]
    assert second.next_cursor is None


async def test_bad_input_is_a_validation_error(store: Store) -> None:
    await store.write_batch([event(1), event(2)], deliveries=[delivery(1), delivery(2)])
    page = await store.list_events(limit=1)
    assert page.next_cursor is not None
    with pytest.raises(ValidationError, match="cursor for the deliveries list"):
        await store.list_deliveries(cursor=page.next_cursor)
    for junk in ("", "not-a-cursor", "!!!", encode_cursor("events", T0, "x")[:-3]):
        with pytest.raises(ValidationError, match="invalid cursor"):
            await store.list_events(cursor=junk)
    with pytest.raises(ValidationError, match="at most"):
        await store.list_events(limit=MAX_PAGE + 1)
    with pytest.raises(ValidationError):
        await store.list_deliveries(limit=0)
    assert await store.list_events(since=T0, until=T0) == Page([])
    assert await store.list_deliveries(since=T0, until=T0 - timedelta(days=1)) == Page([])
    with pytest.raises(ValidationError):
        await store.list_events(type="order.>.x")


def test_cursor_round_trip_and_opacity() -> None:
    at = T0 + timedelta(microseconds=123456)
    cursor = encode_cursor("events", at, "evt-1")
    assert decode_cursor("events", cursor) == (at, "evt-1")
    assert "evt-1" not in cursor and "=" not in cursor


def test_response_excerpt_from_the_egress_error_text() -> None:
    assert response_excerpt("HTTP 500 Internal Server Error: db down: retry") == "db down: retry"
    assert response_excerpt("HTTP 404 Not Found") is None
    assert response_excerpt("timeout after 5s") is None
    assert response_excerpt("connection error: refused: HTTP 500 x: y") is None
    assert response_excerpt(None) is None
