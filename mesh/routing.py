"""Who gets an event, and in what shape: the one route check every delivering process
(egress, bridge, ``consume``) runs after decrypting an event.

``RouteCache`` keeps each target's rules (``registry.compute_rules``); ``verdict`` applies
the loop and hop checks, then the rules: source and type, then the propagation's CESQL
``--filter`` (evaluated here, on the decoded event in memory: nothing is written), then
its ``--transform`` followed by the target's. Compiled expressions are cached by text.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC
from functools import lru_cache
from typing import Any

from mesh.cesql import Expression, compile_expression
from mesh.envelope import JSON, Event, to_jsonable
from mesh.errors import ExpressionError
from mesh.registry import Registry, Rule
from mesh.transform import TransformFailed, compile_transform

SHOWN = 120  # characters of an expression quoted in a delivery record
# How old cached rules may get before a hit, too, looks at the registry revision: a
# filter or transform replaced under the same source and type must not live on for long.
REFRESH_S = 2.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one event for one target: skip it (``skip`` says why), dead-letter
    it (``dead`` says why: its transform failed), or deliver ``event``."""

    skip: str | None = None
    dead: str | None = None
    event: Event | None = None


class EventInput:
    """An event as CESQL sees it: context attributes, extensions, and ``data``."""

    __slots__ = ("_event",)

    def __init__(self, event: Event) -> None:
        self._event = event

    @property
    def data(self) -> Any:
        return self._event.data

    def attribute(self, name: str) -> Any:
        e = self._event
        if name == "type":
            return e.type
        if name == "source":
            return e.source
        if name == "id":
            return e.id
        if name == "subject":
            return e.subject
        if name == "time":
            return e.time.astimezone(UTC).isoformat().replace("+00:00", "Z")
        if name == "specversion":
            return "1.0"
        if name == "datacontenttype":
            return e.datacontenttype
        if name == "meshorigin":
            return e.origin
        if name == "meshhops":
            return e.hops
        if name == "meshreplay":
            return True if e.replay else None
        return e.extensions.get(name)


@lru_cache(maxsize=512)
def _filter(text: str) -> Expression | str:
    """The compiled filter, or why it does not compile (stored by an older version)."""
    try:
        return compile_expression(text, condition=True)
    except ExpressionError as exc:
        return str(exc)


def _quote(text: str) -> str:
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def check_filter(rule: Rule, event: Event) -> str | None:
    """None when the rule's filter passes the event, else why not (naming the filter)."""
    if rule.filter is None:
        return None
    expr = _filter(rule.filter)
    named = f"filter of propagation {rule.prop} ({_quote(rule.filter)})"
    if isinstance(expr, str):
        return f"{named} does not compile: {expr}"
    passed, errors = expr.matches(EventInput(event))
    if passed:
        return None
    if errors:
        return f"{named}: evaluation error, {errors[0]}"
    return f"{named} is false"


def transformed(event: Event, texts: list[str], size: int) -> Event:
    """A copy of ``event`` with its data run through each transform in turn.
    Raises TransformFailed."""
    data = event.data
    for text in texts:
        try:
            t = compile_transform(text)
        except ExpressionError as exc:
            raise TransformFailed(f"transform does not compile: {exc}") from None
        data, size = t.run(data, size)
    out = object.__new__(Event)  # a shallow copy: copy.copy costs 3x as much here
    out.__dict__.update(event.__dict__)
    out.data = to_jsonable(data)  # bytes picked from the input become text, as elsewhere
    out.datacontenttype = JSON
    return out


class RouteCache:
    """Per-target rules, re-read on a miss when the registry changed since.

    A miss is trusted only at the registry revision the rules were read at: an event on a
    propagation added a moment ago must not be skipped (and acked) by a cache that
    predates it. A miss means no rule takes the event's source and type; a filter that
    says no is not a miss (the rules were current enough to hold it).
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._rules: dict[str, list[Rule]] = {}
        self._own: dict[str, str | None] = {}
        self._revision: dict[str, int] = {}
        self._read_at: dict[str, float] = {}
        self._first: dict[str, asyncio.Lock] = {}

    async def rules(
        self, target: str, source: str, event_type: str, *, trust_miss: bool = False
    ) -> list[Rule]:
        """The target's rules taking this source and type (empty: none). With
        ``trust_miss`` a miss is not re-checked against the registry (replays)."""
        rules = self._rules.get(target)
        if rules is None:
            # The first read of a target's rules, once: a whole fetched batch misses
            # together (an egress starting on a backlog), and each event reading the
            # registry for itself cost a status request and two KV listings apiece.
            async with self._first.setdefault(target, asyncio.Lock()):
                if target not in self._rules:
                    await self._read(target)
            rules = self._rules[target]
        elif time.monotonic() - self._read_at.get(target, 0.0) > REFRESH_S:
            # Shared by every target (one status request per interval, not per target).
            revision = await self.registry.recent_revision(REFRESH_S / 4)
            if self._revision.get(target) != revision:
                await self._read(target, revision)
            self._read_at[target] = time.monotonic()
            rules = self._rules[target]
        found = [r for r in rules if r.takes(source, event_type)]
        if found or trust_miss:
            return found
        # Read the revision before the rules: a change in between makes the next miss
        # look again rather than trust stale rules.
        revision = await self.registry.revision()
        if self._revision.get(target) == revision:
            return []
        await self._read(target, revision)
        return [r for r in self._rules[target] if r.takes(source, event_type)]

    def own_transform(self, target: str) -> str | None:
        return self._own.get(target)

    async def accepts(self, target: str, source: str, event_type: str) -> bool:
        return bool(await self.rules(target, source, event_type))

    async def _read(self, target: str, revision: int | None = None) -> None:
        if revision is None:
            revision = await self.registry.revision()
        self._rules[target], self._own[target] = await self.registry.rules_for(target)
        self._revision[target] = revision
        self._read_at[target] = time.monotonic()

    async def verdict(
        self, target: str, event: Event, *, size: int = 0, transform: bool = True
    ) -> Verdict:
        """The rules' verdict on an event that passed the loop and hop checks.

        A replay (chosen by an operator) passes whatever its rules' filters say, but is
        still reshaped: by the first rule whose filter passes, else the first rule for its
        source and type. ``size`` is the event's encoded size (the transforms' bound).
        """
        # A replay is delivered whatever the rules say: its miss needs no registry read.
        rules = await self.rules(target, event.source, event.type, trust_miss=event.replay)
        chosen: Rule | None = None
        reasons: list[str] = []
        for rule in rules:
            reason = check_filter(rule, event)
            if reason is None:
                chosen = rule
                break
            reasons.append(reason)
        if chosen is None and not event.replay:
            if not rules:
                return Verdict(skip="no propagation routes this source/type to the target")
            return Verdict(skip="; ".join(reasons))
        if chosen is None and rules:
            chosen = rules[0]
        if not transform:
            return Verdict(event=event)
        texts = [t for t in (chosen.transform if chosen else None, self._own.get(target)) if t]
        if not texts:
            return Verdict(event=event)
        try:
            return Verdict(event=transformed(event, texts, size))
        except TransformFailed as exc:
            return Verdict(dead=str(exc))
