"""Delivery-record messages: the egress's batches and single records read alike."""

from __future__ import annotations

import json

import pytest

from mesh.errors import DecodeError
from mesh.records import (
    MAX_BATCH_BYTES,
    BatchStamps,
    DeliveryRecord,
    Outcome,
    batch_bodies,
    read_delivery_message,
    read_records,
)


def _rec(n: int, error: str | None = None) -> DeliveryRecord:
    return DeliveryRecord(f"e{n}", "crm", 1, Outcome.DELIVERED, 200, 1.5, error, "egress-1")


def test_a_batch_reads_back_as_its_records() -> None:
    recs = [_rec(i) for i in range(5)]
    [body] = batch_bodies(recs)
    assert read_delivery_message(body) == (recs, True)
    assert json.loads(body)["v"] == 2


def test_a_single_record_still_reads() -> None:
    rec = _rec(1)
    assert read_delivery_message(rec.to_bytes()) == ([rec], False)
    assert DeliveryRecord.from_bytes(rec.to_bytes()) == rec


def test_a_large_batch_is_split_under_the_limit() -> None:
    recs = [_rec(i, error="x" * 5000) for i in range(200)]
    bodies = batch_bodies(recs)
    assert len(bodies) > 1 and all(len(b) <= MAX_BATCH_BYTES for b in bodies)
    assert [r for b in bodies for r in read_records(b)] == recs


@pytest.mark.parametrize(
    "body",
    [
        b"\xff not json",
        b"[1, 2]",
        b'{"v": 3, "records": []}',
        b'{"v": 2, "records": [{"nope": 1}]}',
        b'{"v": 2, "records": {"a": 1}}',
    ],
)
def test_what_is_not_a_record_is_refused(body: bytes) -> None:
    with pytest.raises(DecodeError):
        read_records(body)


def test_record_ids_are_random_hex() -> None:
    ids = {_rec(0).id for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_batch_stamps_share_a_time_and_never_an_id() -> None:
    stamps = BatchStamps()
    first = [stamps.next() for _ in range(70)]
    stamps.reset()
    second = [stamps.next() for _ in range(3)]
    ids = [i for i, _ in first + second]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len({at for _, at in first}) == 1
    assert ids[0][:24] != second[0][0][:24]  # a new batch draws a new prefix
