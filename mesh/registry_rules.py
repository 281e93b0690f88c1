"""The routing rules: which events reach a target, derived from its tenant's propagations
(``compute_rules``), and the source/type pairs its consumer and replays read
(``compute_routes``). ``mesh.registry`` re-exports them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache

from mesh.registry_models import Propagation, PropagationMode
from mesh.subjects import qualify, subject_matches


@dataclass(frozen=True, slots=True)
class Rule:
    """One way events reach a target: from ``source``, types matching ``types``, passing
    ``filter``, reshaped by ``transform``; ``prop`` is the propagation's id."""

    source: str
    types: str | None
    prop: str
    filter: str | None = None
    transform: str | None = None
    # What the consumer's subject filter may narrow to: ``types``, else a type the filter
    # implies (``type = 'x'``: mesh/cesql type_pattern), so the server drops the rest.
    narrow: str | None = None

    def takes(self, source: str, event_type: str) -> bool:
        return self.source == source and (
            self.types is None or subject_matches(self.types, event_type)
        )


def compute_rules(
    target: str, props: list[Propagation], all_targets: Collection[str]
) -> list[Rule]:
    """The rules by which ``target`` receives events (``props``: its tenant's), in order."""
    rules: list[Rule] = []
    for p in props:
        source: str | None = None
        if p.mode == PropagationMode.BROADCAST:
            if target != p.source and target in all_targets:
                source = p.source
        elif p.mode == PropagationMode.BIDIRECTIONAL:
            a, b = p.source, p.targets[0]
            if target == b:
                source = a
            elif target == a:
                source = b
        elif target in p.targets and target != p.source:
            source = p.source
        if source is not None:
            narrow = p.types or (_implied_types(p.filter) if p.filter else None)
            source = qualify(p.tenant, source)  # a tenant's events: ~tenant.source
            rules.append(Rule(source, p.types, p.id, p.filter, p.transform, narrow))
    return rules


@lru_cache(maxsize=512)
def _implied_types(filter: str) -> str | None:
    from mesh.cesql import type_pattern

    return type_pattern(filter)


def compute_routes(
    target: str, props: list[Propagation], all_targets: Collection[str]
) -> list[tuple[str, str | None]]:
    """(source, type pattern or None) pairs whose events ``target`` receives (consumer
    subjects and replays read these; a filter's implied type narrows them)."""
    return [(r.source, r.narrow) for r in compute_rules(target, props, all_targets)]


def route_accepts(routes: list[tuple[str, str | None]], source: str, event_type: str) -> bool:
    return any(
        s == source and (pat is None or subject_matches(pat, event_type)) for s, pat in routes
    )
