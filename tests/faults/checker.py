"""Lost / duplicated / reordered counts: what publishers were acknowledged against what each
place holds (a stream, a sink table, a receiver).

Usage::

    from tests.faults.checker import check

    report = check(
        acked={"pub-a": ["a1", "a2", "a3"], "pub-b": ["b1", "b2"]},  # ack order per publisher
        observed={
            "stream": ["a1", "b1", "a2", "b2", "a3"],                 # in stream order
            "sink.events": ["a1", "a2", "a3", "b1", "b2"],
            "receiver:t1": ["a1", "a3", "a2", "a2"],                  # in arrival order
        },
        unordered={"sink.events"},          # row order means nothing there: no reorder count
        publishers={"receiver:t1": {"pub-a"}},  # t1 only receives pub-a's events
    )
    print(report)                           # one line per place
    assert report.lost == 0                 # total over every place

Definitions, per place (only the publishers that place should hold, ``publishers``; all
by default):

* **lost**: acknowledged ids that never appear there.
* **duplicated**: copies beyond the first of any id there (acknowledged or not).
* **reordered**: among a publisher's acknowledged ids, in first-seen order, the fewest
  that must move to restore ack order (length minus the longest increasing run by ack
  index), summed over publishers. ``None`` for places named in ``unordered``.
* **unacked**: distinct ids there that no publisher was acknowledged for: a publish whose
  ack was lost in the fault. Not an error; reported so a harness can see it.

Nothing here does I/O: the harness collects the ids, this module only counts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["PlaceResult", "Report", "check"]


@dataclass(frozen=True)
class PlaceResult:
    """The counts for one place; ``lost_ids`` keeps a few examples for the failure message."""

    place: str
    expected: int
    observed: int
    lost: int
    duplicated: int
    reordered: int | None
    unacked: int
    lost_ids: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        """No acknowledged event lost (duplicates and reordering are counted, not failures)."""
        return self.lost == 0

    def __str__(self) -> str:
        reordered = "-" if self.reordered is None else str(self.reordered)
        line = (
            f"{self.place}: expected={self.expected} observed={self.observed} "
            f"lost={self.lost} duplicated={self.duplicated} reordered={reordered} "
            f"unacked={self.unacked}"
        )
        if self.lost_ids:
            line += f" (lost e.g. {', '.join(self.lost_ids)})"
        return line


@dataclass(frozen=True)
class Report:
    """Every place's result; totals as properties; ``str()`` prints one line per place."""

    places: tuple[PlaceResult, ...]

    @property
    def lost(self) -> int:
        return sum(p.lost for p in self.places)

    @property
    def duplicated(self) -> int:
        return sum(p.duplicated for p in self.places)

    @property
    def reordered(self) -> int:
        return sum(p.reordered or 0 for p in self.places)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.places)

    def __getitem__(self, place: str) -> PlaceResult:
        for p in self.places:
            if p.place == place:
                return p
        raise KeyError(place)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.places)


def check(
    acked: Mapping[str, Sequence[str]],
    observed: Mapping[str, Iterable[str]],
    *,
    unordered: Collection[str] = (),
    publishers: Mapping[str, Collection[str]] | None = None,
    examples: int = 5,
) -> Report:
    """Count lost, duplicated, reordered and unacknowledged ids at each observed place.

    ``acked`` maps a publisher to the ids it was acknowledged, in ack order (an id must be
    acknowledged to one publisher only). ``observed`` maps a place to the ids it holds, in
    its own order. ``publishers`` narrows, per place, which publishers' ids it should hold.
    """
    owner: dict[str, tuple[str, int]] = {}
    for pub, ids in acked.items():
        for index, eid in enumerate(ids):
            if eid in owner:
                raise ValueError(f"id {eid!r} acknowledged twice ({owner[eid][0]} and {pub})")
            owner[eid] = (pub, index)
    results = []
    for place, seen_iter in observed.items():
        seen = list(seen_iter)
        wanted = (
            set(acked) if publishers is None or place not in publishers else set(publishers[place])
        )
        unknown = wanted - set(acked)
        if unknown:
            raise ValueError(f"{place}: unknown publishers {sorted(unknown)}")
        counts = Counter(seen)
        expected_ids = [eid for pub in acked if pub in wanted for eid in acked[pub]]
        lost_ids = [eid for eid in expected_ids if eid not in counts]
        duplicated = sum(n - 1 for n in counts.values())
        unacked = sum(1 for eid in counts if eid not in owner)
        reordered = None if place in unordered else _reordered(seen, owner, wanted)
        results.append(
            PlaceResult(
                place=place,
                expected=len(expected_ids),
                observed=len(seen),
                lost=len(lost_ids),
                duplicated=duplicated,
                reordered=reordered,
                unacked=unacked,
                lost_ids=tuple(lost_ids[:examples]),
            )
        )
    return Report(tuple(results))


def _reordered(seen: Sequence[str], owner: Mapping[str, tuple[str, int]], wanted: set[str]) -> int:
    """Per publisher: first sightings minus the longest increasing run of ack indexes."""
    firsts: dict[str, list[int]] = {}
    met: set[str] = set()
    for eid in seen:
        if eid in met or eid not in owner:
            continue
        met.add(eid)
        pub, index = owner[eid]
        if pub in wanted:
            firsts.setdefault(pub, []).append(index)
    return sum(len(indexes) - _lis_length(indexes) for indexes in firsts.values())


def _lis_length(values: Sequence[int]) -> int:
    """Length of the longest strictly increasing subsequence (patience sorting)."""
    tails: list[int] = []
    for v in values:
        i = bisect_left(tails, v)
        if i == len(tails):
            tails.append(v)
        else:
            tails[i] = v
    return len(tails)
