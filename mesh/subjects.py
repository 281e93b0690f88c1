"""The subject grammar: names, event types, type patterns and the subjects built from them.

::

    <prefix>.evt.<source>.<type tokens>             every published event
    <prefix>.replay.<target>.<source>.<type tokens> replayed events aimed at one target
    <prefix>.rpc.<target>.<type tokens>             request/reply (core NATS)
    <prefix>.dlq.<target>                           dead letters
    <prefix>.sys.delivery.<target>                  delivery attempt records
    <prefix>.sys.health.<service>.<instance>        heartbeats
    <prefix>.sys.audit.<entity kind>                changes made through the HTTP API

Tenants (mesh/tenants.py): the ``default`` tenant's events are exactly as above; a
source of tenant T travels as the *qualified source* ``~T.<source>`` (two tokens), so
tenant T's events are ``<prefix>.evt.~T.<source>.<type>``, all in the one events
stream, and ``<prefix>.evt.~T.>`` is all of T's. ``~`` is outside the name grammar:
no default-tenant source can look like a tenant's (docs/ARCHITECTURE.md, Tenants).

Targets are named the same way: tenant T's target ``orders`` has the *target reference*
``~T.orders`` (``target_ref``), and every subject naming a target takes the reference:
``<prefix>.dlq.~T.orders``, ``<prefix>.sys.delivery.~T.orders``,
``<prefix>.replay.~T.orders.~T.<source>.<type>``, ``<prefix>.rpc.~T.orders.<type>``. Its
registry key is ``targets.T.orders`` (``ref_key``: KV keys cannot hold ``~``; the token
count tells it from ``targets.<name>``) and its consumer ``deliver-T~orders``
(``consumer_of``). A default-tenant target's reference is its name: all as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.errors import InvalidName, ValidationError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TYPE_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TYPE_LEN = 255


def validate_name(name: str, what: str = "name") -> str:
    """A service/target name: one safe subject token."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-64 of a-z, 0-9, '_' or '-', starting with a letter"
            " or digit"
        )
    return name


TENANT_MARK = "~"
DEFAULT_TENANT = "default"


def qualify(tenant: str | None, source: str) -> str:
    """The qualified source of ``source`` in ``tenant``: itself in ``default``."""
    if tenant is None or tenant == DEFAULT_TENANT or source.startswith(TENANT_MARK):
        return source
    return f"{TENANT_MARK}{tenant}.{source}"


def split_source(qualified: str) -> tuple[str, str]:
    """(tenant, source) of a qualified source."""
    if qualified.startswith(TENANT_MARK):
        tenant, _, source = qualified[1:].partition(".")
        return tenant, source
    return DEFAULT_TENANT, qualified


def _validate_qualified(qualified: str, what: str) -> str:
    """A name, or a tenant's qualified name ``~tenant.name`` (sources, target references)."""
    if isinstance(qualified, str) and qualified.startswith(TENANT_MARK):
        tenant, name = split_source(qualified)
        validate_name(tenant, "tenant")
        validate_name(name, what)
        return qualified
    return validate_name(qualified, what)


def validate_source(qualified: str) -> str:
    """A source name, or a tenant's qualified source ``~tenant.source``."""
    return _validate_qualified(qualified, "source name")


def target_ref(tenant: str | None, name: str) -> str:
    """The reference of tenant ``tenant``'s target ``name``: the name itself in ``default``,
    else ``~tenant.name`` (the qualified form sources have), unique across the mesh."""
    return qualify(tenant, name)


def validate_target_ref(ref: str) -> str:
    """A target name, or a tenant's target reference ``~tenant.name``."""
    return _validate_qualified(ref, "target name")


TARGETS_KEY = "targets"
CONSUMER_PREFIX = "deliver-"
CONSUMER_MARK = "~"  # between tenant and name in a consumer name (no '.' allowed there)


def ref_kv(ref: str) -> str:
    """A target reference as a KV key suffix (no ``~``): ``<name>`` or ``<T>.<name>``."""
    if ref.startswith(TENANT_MARK):
        tenant, name = split_source(ref)
        return f"{tenant}.{name}"
    return ref


def kv_ref(token: str) -> str:
    """The target reference of a ``ref_kv`` form."""
    tenant, dot, name = token.partition(".")
    return f"{TENANT_MARK}{tenant}.{name}" if dot else token


def ref_key(ref: str) -> str:
    """The registry key of a target reference: ``targets.<name>`` or ``targets.<T>.<name>``."""
    return f"{TARGETS_KEY}.{ref_kv(ref)}"


def key_ref(key: str) -> str | None:
    """The target reference of a registry key (None: not a target's key)."""
    kind, _, rest = key.partition(".")
    if kind != TARGETS_KEY or not rest:
        return None
    return kv_ref(rest)


def consumer_of(ref: str) -> str:
    """The durable consumer of a target reference: ``deliver-<name>`` or ``deliver-T~<name>``."""
    if ref.startswith(TENANT_MARK):
        tenant, name = split_source(ref)
        return f"{CONSUMER_PREFIX}{tenant}{CONSUMER_MARK}{name}"
    return f"{CONSUMER_PREFIX}{ref}"


def consumer_ref(consumer: str) -> str | None:
    """The target reference a ``deliver-*`` consumer belongs to (None: not one)."""
    if not consumer.startswith(CONSUMER_PREFIX):
        return None
    rest = consumer.removeprefix(CONSUMER_PREFIX)
    tenant, mark, name = rest.partition(CONSUMER_MARK)
    return f"{TENANT_MARK}{tenant}.{name}" if mark else rest


def validate_type(event_type: str) -> str:
    """An event type such as ``order.created``: dot-separated tokens, no wildcards."""
    if not isinstance(event_type, str) or not event_type or len(event_type) > MAX_TYPE_LEN:
        raise ValidationError(f"invalid event type {event_type!r}: must be 1-255 characters")
    for token in event_type.split("."):
        if not TYPE_TOKEN_RE.fullmatch(token):
            raise ValidationError(
                f"invalid event type {event_type!r}: tokens are A-Z, a-z, 0-9, '_' or '-',"
                " separated by dots"
            )
    return event_type


def validate_pattern(pattern: str) -> str:
    """A type pattern: type tokens plus ``*`` (one token) and a final ``>`` (the rest)."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_TYPE_LEN:
        raise ValidationError(f"invalid type pattern {pattern!r}")
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == "*":
            continue
        if token == ">":
            if i != len(tokens) - 1:
                raise ValidationError(f"invalid type pattern {pattern!r}: '>' must come last")
            continue
        if not TYPE_TOKEN_RE.fullmatch(token):
            raise ValidationError(
                f"invalid type pattern {pattern!r}: tokens are A-Z, a-z, 0-9, '_', '-', '*' or '>'"
            )
    return pattern


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match of a concrete subject (or type) against a pattern."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(p) == len(s)


def subsumes(wide: str, narrow: str) -> bool:
    """True when every subject matched by ``narrow`` is matched by ``wide``."""
    w = wide.split(".")
    n = narrow.split(".")
    for i, tok in enumerate(w):
        if tok == ">":
            return len(n) > i
        if i >= len(n):
            return False
        if n[i] == ">":
            return False
        if tok == "*":
            continue
        if n[i] == "*" or n[i] != tok:
            return False
    return len(w) == len(n)


def collide(a: str, b: str) -> bool:
    """True when some subject is matched by both patterns."""
    x = a.split(".")
    y = b.split(".")
    for i in range(max(len(x), len(y))):
        xt = x[i] if i < len(x) else None
        yt = y[i] if i < len(y) else None
        if xt == ">" or yt == ">":
            return xt is not None and yt is not None
        if xt is None or yt is None:
            return False
        if xt != "*" and yt != "*" and xt != yt:
            return False
    return True


def reduce_filters(subjects: list[str]) -> list[str]:
    """Drop duplicates and patterns subsumed by another; merge partial overlaps.

    JetStream rejects a consumer whose filter subjects overlap. Two patterns that
    overlap without one containing the other are widened to their common
    prefix plus ``>``; delivery then re-checks the type against the propagation.
    """
    result = sorted(set(subjects), key=lambda s: (s.count(">") == 0, s.count("*") == 0, s))
    changed = True
    while changed:
        changed = False
        for a in result:
            for b in result:
                if a == b or not collide(a, b):
                    continue
                if subsumes(a, b):
                    result.remove(b)
                elif subsumes(b, a):
                    result.remove(a)
                else:
                    common: list[str] = []
                    for ta, tb in zip(a.split("."), b.split("."), strict=False):
                        if ta != tb or ta in ("*", ">"):
                            break
                        common.append(ta)
                    merged = ".".join([*common, ">"])
                    result.remove(a)
                    result.remove(b)
                    result.append(merged)
                changed = True
                break
            if changed:
                break
    return sorted(set(result))


@dataclass(frozen=True)
class Subjects:
    """Subject builders for one prefix."""

    prefix: str = "mesh"

    def evt(self, source: str, event_type: str) -> str:
        return f"{self.prefix}.evt.{source}.{event_type}"

    def evt_filter(self, source: str, pattern: str | None = None) -> str:
        return f"{self.prefix}.evt.{source}.{pattern or '>'}"

    @property
    def evt_all(self) -> str:
        return f"{self.prefix}.evt.>"

    def evt_tenant(self, tenant: str) -> str:
        """Every event of one tenant (for ``default``: every event, tenants' included)."""
        if tenant == DEFAULT_TENANT:
            return self.evt_all
        return f"{self.prefix}.evt.{TENANT_MARK}{tenant}.>"

    def replay(self, target: str, source: str, event_type: str) -> str:
        return f"{self.prefix}.replay.{target}.{source}.{event_type}"

    def replay_filter(self, target: str) -> str:
        return f"{self.prefix}.replay.{target}.>"

    @property
    def replay_all(self) -> str:
        return f"{self.prefix}.replay.>"

    def rpc(self, target: str, event_type: str) -> str:
        return f"{self.prefix}.rpc.{target}.{event_type}"

    def rpc_filter(self, target: str) -> str:
        return f"{self.prefix}.rpc.{target}.>"

    def dlq(self, target: str) -> str:
        return f"{self.prefix}.dlq.{target}"

    @property
    def dlq_all(self) -> str:
        return f"{self.prefix}.dlq.>"

    def delivery(self, target: str) -> str:
        return f"{self.prefix}.sys.delivery.{target}"

    @property
    def delivery_all(self) -> str:
        return f"{self.prefix}.sys.delivery.>"

    def audit(self, kind: str) -> str:
        return f"{self.prefix}.sys.audit.{kind}"

    @property
    def audit_all(self) -> str:
        return f"{self.prefix}.sys.audit.>"

    @property
    def status_doc(self) -> str:
        """Request/reply: a health instance answers with its /status document."""
        return f"{self.prefix}.sys.statusdoc"

    def health(self, service: str, instance: str) -> str:
        return f"{self.prefix}.sys.health.{service}.{instance}"

    @property
    def health_all(self) -> str:
        return f"{self.prefix}.sys.health.>"

    def parse_event(self, subject: str) -> tuple[str, str, str | None]:
        """Return ``(source, type, replay_target)`` for an evt or replay subject."""
        parts = subject.split(".")
        pre = self.prefix.split(".")
        n = len(pre)
        if parts[:n] != pre or len(parts) < n + 3:
            raise ValidationError(f"not an event subject: {subject!r}")
        kind = parts[n]
        at = n + 1 if kind == "evt" else n + 2
        if kind not in ("evt", "replay") or len(parts) < at + 2:
            raise ValidationError(f"not an event subject: {subject!r}")
        replay_target = None
        if kind == "replay":
            twidth = 2 if parts[n + 1].startswith(TENANT_MARK) else 1  # ~tenant.target
            replay_target = ".".join(parts[n + 1 : n + 1 + twidth])
            at += twidth - 1
        if len(parts) < at + 2:
            raise ValidationError(f"not an event subject: {subject!r}")
        width = 2 if parts[at].startswith(TENANT_MARK) else 1  # ~tenant.source
        if len(parts) < at + width + 1:
            raise ValidationError(f"not an event subject: {subject!r}")
        source = ".".join(parts[at : at + width])
        return source, ".".join(parts[at + width :]), replay_target

    def target_of(self, subject: str, kind: str) -> str:
        """The target reference of a ``dlq`` or ``sys.delivery`` subject ('' if another)."""
        head = self.dlq("") if kind == "dlq" else self.delivery("")
        return subject.removeprefix(head) if subject.startswith(head) else ""
