"""The fault checker's counting (pure logic, no broker)."""

from __future__ import annotations

import pytest

from tests.faults.checker import check

ACKED = {"a": ["a1", "a2", "a3", "a4"], "b": ["b1", "b2"]}


def test_everything_in_order_is_clean() -> None:
    report = check(ACKED, {"stream": ["a1", "b1", "a2", "a3", "b2", "a4"]})
    place = report["stream"]
    assert (place.lost, place.duplicated, place.reordered, place.unacked) == (0, 0, 0, 0)
    assert place.expected == 6 and report.ok


def test_lost_ids_are_counted_and_named() -> None:
    report = check(ACKED, {"sink": ["a1", "a3", "b1"]})
    assert report["sink"].lost == 3
    assert report["sink"].lost_ids == ("a2", "a4", "b2")
    assert not report.ok and report.lost == 3
    assert "lost=3" in str(report) and "a2" in str(report)


def test_duplicates_count_extra_copies_including_unacked_ids() -> None:
    report = check(ACKED, {"rx": ["a1", "a1", "a1", "a2", "a3", "a4", "b1", "b2", "x", "x"]})
    assert report["rx"].duplicated == 3
    assert report["rx"].unacked == 1
    assert report["rx"].lost == 0


def test_reordered_is_the_fewest_moves_per_publisher() -> None:
    # a4 moved to the front: one move restores order; b's order is independent of a's.
    report = check(ACKED, {"rx": ["b1", "a4", "a1", "a2", "a3", "b2"]})
    assert report["rx"].reordered == 1
    # a fully reversed: 3 of 4 must move.
    report = check(ACKED, {"rx": ["a4", "a3", "a2", "a1", "b1", "b2"]})
    assert report["rx"].reordered == 3


def test_redelivered_copy_does_not_count_as_reordering() -> None:
    report = check(ACKED, {"rx": ["a1", "a2", "a1", "a3", "a4", "b1", "b2"]})
    assert report["rx"].reordered == 0
    assert report["rx"].duplicated == 1


def test_unordered_places_report_no_reorder_count() -> None:
    report = check(ACKED, {"table": ["a4", "a1", "b2", "a2", "a3", "b1"]}, unordered={"table"})
    assert report["table"].reordered is None
    assert report.reordered == 0
    assert "reordered=-" in str(report)


def test_publishers_narrow_what_a_place_should_hold() -> None:
    report = check(ACKED, {"rx-b": ["b1", "b2"], "all": ["b1", "b2"]}, publishers={"rx-b": ["b"]})
    assert report["rx-b"].lost == 0 and report["rx-b"].expected == 2
    assert report["all"].lost == 4
    assert report.lost == 4


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="acknowledged twice"):
        check({"a": ["x"], "b": ["x"]}, {})
    with pytest.raises(ValueError, match="unknown publishers"):
        check(ACKED, {"rx": []}, publishers={"rx": ["nobody"]})
