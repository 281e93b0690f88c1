"""Random CESQL filters with an independent Python oracle, and random events to test them.

A filter is built from clauses over ``type``, ``subject`` and ``data.n`` / ``data.tag``;
each clause comes with the predicate it means, written here in plain Python, so the
engine is checked against something it does not share code with.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TYPES = ["order.created", "order.paid", "user.created", "ping"]
TAGS = ["red", "green", "blue"]

Pred = Callable[[dict[str, Any]], bool]


@dataclass
class Ev:
    source: str
    type: str
    subject: str | None
    n: int | None  # None: data has no "n"
    tag: str

    def data(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"tag": self.tag}
        if self.n is not None:
            doc["n"] = self.n
        return doc


@dataclass
class Filt:
    text: str
    pred: Callable[[Ev], bool]


def _clause(rng: random.Random) -> Filt:
    k = rng.randrange(6)
    if k == 0:
        t = rng.choice(TYPES)
        return Filt(f"type = '{t}'", lambda e: e.type == t)
    if k == 1:
        prefix = rng.choice(["order", "user", "p"])
        return Filt(f"type LIKE '{prefix}%'", lambda e: e.type.startswith(prefix))
    if k == 2:
        v = rng.randrange(-5, 6)
        op = rng.choice(["<", "<=", ">", ">=", "=", "<>"])
        ops: dict[str, Callable[[int, int], bool]] = {
            "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b,
            ">": lambda a, b: a > b,
            ">=": lambda a, b: a >= b,
            "=": lambda a, b: a == b,
            "<>": lambda a, b: a != b,
        }
        f = ops[op]
        # An absent data.n is an error, which fails the whole filter (see _value).
        return Filt(f"data.n {op} {v}", lambda e: e.n is not None and f(e.n, v))
    if k == 3:
        tags = rng.sample(TAGS, rng.randrange(1, 3))
        listed = ", ".join(f"'{t}'" for t in tags)
        return Filt(f"data.tag IN ({listed})", lambda e: e.tag in tags)
    if k == 4:
        return Filt("EXISTS subject", lambda e: e.subject is not None)
    return Filt("EXISTS data.n", lambda e: e.n is not None)


def random_filter(rng: random.Random, depth: int = 2) -> Filt:
    """A filter and its meaning. Errors make a filter fail as a whole, so the oracle for
    an expression reading ``data.n`` where it is absent is: false, unless a short circuit
    (AND's false left side, OR's true left side) skipped the read."""
    if depth == 0 or rng.random() < 0.3:
        return _clause(rng)
    k = rng.randrange(3)
    a = random_filter(rng, depth - 1)
    if k == 2:
        return Filt(f"NOT ({a.text})", _not(a))
    b = random_filter(rng, depth - 1)
    if k == 0:
        return Filt(f"({a.text}) AND ({b.text})", _and(a, b))
    return Filt(f"({a.text}) OR ({b.text})", _or(a, b))


# The oracle tracks errors: value(e) -> (bool, erred).


def _value(f: Filt, e: Ev) -> tuple[bool, bool]:
    inner = getattr(f.pred, "three", None)
    if inner is not None:
        result: tuple[bool, bool] = inner(e)
        return result
    reads_n = "data.n" in f.text and "EXISTS data.n" not in f.text
    if reads_n and e.n is None:
        return False, True
    return f.pred(e), False


def _tagged(fn: Callable[[Ev], tuple[bool, bool]]) -> Callable[[Ev], bool]:
    def pred(e: Ev) -> bool:
        v, erred = fn(e)
        return v and not erred

    pred.three = fn  # type: ignore[attr-defined]
    return pred


def _not(a: Filt) -> Callable[[Ev], bool]:
    def three(e: Ev) -> tuple[bool, bool]:
        v, err = _value(a, e)
        return (False if err else not v), err

    return _tagged(three)


def _and(a: Filt, b: Filt) -> Callable[[Ev], bool]:
    def three(e: Ev) -> tuple[bool, bool]:
        v, err = _value(a, e)
        if err or not v:
            return False, err
        return _value(b, e)

    return _tagged(three)


def _or(a: Filt, b: Filt) -> Callable[[Ev], bool]:
    def three(e: Ev) -> tuple[bool, bool]:
        v, err = _value(a, e)
        if err:
            return False, True
        if v:
            return True, False
        return _value(b, e)

    return _tagged(three)


def random_event(rng: random.Random, sources: list[str]) -> Ev:
    return Ev(
        source=rng.choice(sources),
        type=rng.choice(TYPES),
        subject=rng.choice([None, "s1"]),
        n=rng.choice([None, *range(-6, 7)]),
        tag=rng.choice(TAGS),
    )


def accepted(f: Filt, e: Ev) -> bool:
    v, err = _value(f, e)
    return v and not err
