"""Targets and propagations, kept in a JetStream KV bucket.

Keys are ``targets.<name>`` (the default tenant's targets, and tenants' targets made
before target names were per tenant), ``targets.<tenant>.<name>`` (a tenant's:
``mesh.subjects.ref_key`` of its reference ``~tenant.name``) and ``props.<id>``;
values are the pydantic models as JSON. Target secrets are stored encrypted with the
key ring. The routing rules (who receives what) are derived here, in one place:
``compute_rules`` (each with its propagation's ``--filter`` and ``--transform``), and
``routes_for`` (the source/type pairs that consumers and replays read).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from contextlib import suppress
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydValidationError

from mesh._nats.buckets import read
from mesh._nats.types import KeyValue, js_errors
from mesh.crypto import KeyRing
from mesh.destinations import seal_destination
from mesh.errors import Conflict, DecodeError, NotFound, ValidationError
from mesh.ownership import tenant_target
from mesh.registry_cache import (
    SIG_MARKER,
    RecentRevision,
    Snapshot,
    SnapshotCache,
    signature,
    signature_of,
)
from mesh.registry_models import (
    DESTINATION_KINDS,
    EGRESS_KINDS,
    Propagation,
    PropagationMode,
    RetryPolicy,
    Target,
    TargetKind,
    TargetStatus,
    now,
)
from mesh.registry_rules import Rule, compute_routes, compute_rules, route_accepts
from mesh.subjects import (
    DEFAULT_TENANT,
    TENANT_MARK,
    key_ref,
    ref_key,
    validate_name,
    validate_pattern,
    validate_target_ref,
)

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

__all__ = [
    "DESTINATION_KINDS",
    "EGRESS_KINDS",
    "SECRET_PREFIX",
    "Propagation",
    "PropagationMode",
    "Registry",
    "RetryPolicy",
    "Rule",
    "Target",
    "TargetKind",
    "TargetStatus",
    "compute_routes",
    "compute_rules",
    "generate_secret",
    "now",
    "route_accepts",
    "validate_expressions",
]

SECRET_PREFIX = "whsec_"

_M = TypeVar("_M", bound=BaseModel)


def validate_expressions(filter: str | None, transform: str | None) -> None:
    """Compile both now (raises ExpressionError): a bad expression is never stored."""
    if filter is not None:
        from mesh.cesql import compile_expression

        compile_expression(filter, condition=True)
    if transform is not None:
        from mesh.transform import compile_transform

        compile_transform(transform)


def generate_secret() -> str:
    # Standard Webhooks secrets are whsec_ + *standard* base64 of the key bytes; a urlsafe
    # alphabet ('-', '_') is silently dropped (or rejected) by the reference verifiers.
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


class Registry:
    """The registry over a KV bucket."""

    def __init__(
        self, kv: KeyValue, keyring: KeyRing | None, port: JetStreamPort, bucket: str
    ) -> None:
        self.kv = kv
        self.keyring = keyring
        self._port = port
        self._bucket = bucket
        self._cache = SnapshotCache(self._read_snapshot, self.revision)
        self._recent = RecentRevision(self.revision)
        self._signed = False  # propagations written before signatures are indexed

    @classmethod
    async def open(
        cls, port: JetStreamPort, keyring: KeyRing | None, bucket: str, replicas: int = 1
    ) -> Registry:
        kv = await port.open_bucket(bucket, history=10, replicas=replicas)
        return cls(kv, keyring, port, bucket)

    # Low level ----------------------------------------------------------------

    async def _get(self, key: str) -> tuple[bytes, int] | None:
        return await read(self.kv, key)

    async def _snapshot(self) -> dict[str, bytes]:
        """Every live key and its value (mesh/buckets.py: not through a KV watcher)."""
        return await self._port.read_all(self.kv, self._bucket)

    @staticmethod
    def _parsed(snap: dict[str, bytes], prefix: str, model: type[_M]) -> list[_M]:
        """The entries under ``prefix``, in key order; an invalid one is skipped, not fatal
        for everyone."""
        out = []
        for key, raw in sorted(snap.items()):
            if key.startswith(prefix + "."):
                try:
                    out.append(model.model_validate_json(raw))
                except PydValidationError:
                    continue
        return out

    @staticmethod
    def _targets(snap: dict[str, bytes]) -> list[Target]:
        out = []
        for key, raw in sorted(snap.items()):
            ref = key_ref(key)
            if ref is None:
                continue
            try:
                out.append(_at_ref(Target.model_validate_json(raw), ref))
            except PydValidationError:
                continue
        return out

    @classmethod
    def _propagations(cls, snap: dict[str, bytes]) -> list[Propagation]:
        return sorted(cls._parsed(snap, "props", Propagation), key=lambda p: p.created_at)

    async def _read_snapshot(self, revision: int) -> Snapshot:
        snap = await self._snapshot()
        return Snapshot.of(revision, self._targets(snap), self._propagations(snap))

    async def targets_and_propagations(self) -> tuple[list[Target], list[Propagation]]:
        """Both lists, read once per registry revision (mesh/registry_cache.py); copies,
        so a caller may change them."""
        snap = await self._cache.get()
        return [t.model_copy() for t in snap.targets], [p.model_copy() for p in snap.props]

    # Secrets ----------------------------------------------------------------

    def _seal(self, secret: str) -> str:
        if self.keyring is None:
            raise ValidationError("a key ring is needed to store a secret")
        return self.keyring.encrypt(secret.encode()).decode()

    def _unseal(self, token: str) -> str:
        if self.keyring is None:
            raise DecodeError("a key ring is needed to read a secret")
        return self.keyring.decrypt(token.encode()).decode()

    def secrets_for(self, target: Target) -> list[str]:
        """The signing secrets: the current one, then the old one while its grace lasts."""
        out: list[str] = []
        if target.secret_enc:
            out.append(self._unseal(target.secret_enc))
        if (
            target.old_secret_enc
            and target.old_secret_expires
            and target.old_secret_expires > now()
        ):
            out.append(self._unseal(target.old_secret_enc))
        return out

    def destination_url(self, target: Target) -> str:
        """The full URL of a non-HTTP destination, credentials included (never log it)."""
        return self._unseal(target.url_enc) if target.url_enc else (target.url or "")

    # Targets ----------------------------------------------------------------

    async def add_target(self, target: Target, secret: str | None = None) -> Target:
        """Register ``target`` in its tenant: a tenant's under ``~tenant.name`` (another
        tenant's same name is no conflict), the default tenant's under its name."""
        validate_name(target.name, "target name")
        target.scoped = target.tenant != DEFAULT_TENANT
        if target.scoped:
            # The tenant's own older, mesh-wide named target of that name.
            try:
                older = await self.get_target(target.name)
            except NotFound:
                pass
            else:
                if older.tenant == target.tenant:
                    raise Conflict(f"target {target.name!r} already exists")
        validate_expressions(None, target.transform)
        if target.kind == TargetKind.WEBHOOK:
            if not target.url:
                raise ValidationError("a webhook target needs --webhook URL")
            from mesh.netguard import validate_url

            validate_url(target.url)
            if secret is not None and not secret.startswith(SECRET_PREFIX):
                raise ValidationError("a webhook secret must start with 'whsec_'")
            target.secret_enc = self._seal(secret or generate_secret())
        elif target.kind in DESTINATION_KINDS:
            seal_destination(target, self._seal)
        try:
            await self.kv.create(ref_key(target.ref), target.model_dump_json().encode())
        except js_errors.KeyWrongLastSequenceError:
            raise Conflict(f"target {target.name!r} already exists") from None
        return target

    async def get_target(self, ref: str) -> Target:
        """The target with reference ``ref`` (its name, or ``~tenant.name``); to find a
        tenant's target by name, ``mesh.ownership.tenant_target``."""
        validate_target_ref(ref)
        found = await self._get(ref_key(ref))
        if found is None:
            raise NotFound(f"unknown target {ref!r}")
        try:
            return _at_ref(Target.model_validate_json(found[0]), ref)
        except PydValidationError as exc:
            raise DecodeError(f"registry entry for target {ref!r} is invalid: {exc}") from None

    async def put_target(self, target: Target) -> Target:
        target.updated_at = now()
        await self.kv.put(ref_key(target.ref), target.model_dump_json().encode())
        return target

    async def list_targets(self) -> list[Target]:
        return [t.model_copy() for t in (await self._cache.get()).targets]

    async def remove_target(self, ref: str) -> list[str]:
        """Remove a target and its part in its tenant's propagations; returns ids of
        removed propagations.

        Only the receiving side goes: a propagation with this name as its *source*
        (which needs no registration) stays, except a bidirectional one, whose two
        ends are both targets.
        """
        target = await self.get_target(ref)
        name = target.name
        removed = []
        for p in await self.list_propagations():
            if p.tenant != target.tenant:
                continue
            if p.mode == PropagationMode.BROADCAST:
                continue  # reaches whoever is registered; nothing names this target
            if p.mode == PropagationMode.BIDIRECTIONAL:
                if name not in (p.source, *p.targets):
                    continue
            elif name not in p.targets:
                continue
            rest = [t for t in p.targets if t != name]
            await self._unsign(p)
            if p.mode == PropagationMode.MULTICAST and rest:
                p.targets = rest
                await self.kv.put(f"props.{p.id}", p.model_dump_json().encode())
                await self.kv.put(signature_of(p), p.id.encode())
            else:
                await self.kv.delete(f"props.{p.id}")
                removed.append(p.id)
        await self.kv.delete(ref_key(ref))
        return removed

    async def rotate_secret(self, ref: str, grace: timedelta = timedelta(hours=24)) -> str:
        target = await self.get_target(ref)
        if target.kind != TargetKind.WEBHOOK:
            raise ValidationError(f"target {target.name!r} is not a webhook target")
        new = generate_secret()
        target.old_secret_enc = target.secret_enc
        target.old_secret_expires = now() + grace
        target.secret_enc = self._seal(new)
        await self.put_target(target)
        return new

    async def set_status(self, ref: str, status: TargetStatus, reason: str | None) -> Target:
        target = await self.get_target(ref)
        target.status = status
        target.status_reason = reason
        return await self.put_target(target)

    # Propagations -----------------------------------------------------------

    async def add_propagation(
        self,
        mode: PropagationMode,
        source: str,
        targets: list[str] | None = None,
        types: str | None = None,
        *,
        filter: str | None = None,
        transform: str | None = None,
        tenant: str = "default",
    ) -> Propagation:
        validate_name(source, "source name")
        validate_expressions(filter, transform)
        targets = list(dict.fromkeys(targets or []))
        for t in targets:
            validate_name(t, "target name")
        if types is not None:
            validate_pattern(types)
        if mode == PropagationMode.BROADCAST and targets:
            raise ValidationError("broadcast takes no --target: it reaches every target")
        one_to_one = (PropagationMode.UNIDIRECTIONAL, PropagationMode.BIDIRECTIONAL)
        if mode in one_to_one and len(targets) != 1:
            raise ValidationError(f"{mode} takes exactly one --target")
        if mode == PropagationMode.MULTICAST and not targets:
            raise ValidationError("multicast needs at least one --target")
        if source in targets:
            raise ValidationError(f"source {source!r} cannot propagate to itself")
        for t in targets:
            await tenant_target(self, t, tenant)  # another tenant's: not even its name
        if mode == PropagationMode.BIDIRECTIONAL:
            try:
                await tenant_target(self, source, tenant)
            except NotFound:
                raise NotFound(
                    f"bidirectional needs both ends registered: unknown target {source!r}"
                ) from None
        sig = signature(tenant, mode, source, targets, types, filter, transform)
        same = await self._signed_as(sig)
        if same is not None:
            raise Conflict(f"the same propagation exists already: {same}")
        prop = Propagation(
            tenant=tenant,
            mode=mode,
            source=source,
            targets=targets,
            types=types,
            filter=filter,
            transform=transform,
        )
        await self.kv.put(sig, prop.id.encode())
        await self.kv.create(f"props.{prop.id}", prop.model_dump_json().encode())
        return prop

    async def _signed_as(self, sig: str) -> str | None:
        """The id of the live propagation with signature key ``sig``, if there is one."""
        if not self._signed:
            await self._index_signatures()
        found = await self._get(sig)
        if found is None:
            return None
        prop_id = found[0].decode()
        with suppress(NotFound, ValidationError, PydValidationError):
            if signature_of(await self.get_propagation(prop_id)) == sig:
                return prop_id
        return None  # a stale pointer: the new propagation takes it over

    async def _index_signatures(self) -> None:
        """Give every propagation its signature key, once per bucket (``meta.propsig``)."""
        if await self._get(SIG_MARKER) is None:
            for p in await self.list_propagations():
                await self.kv.put(signature_of(p), p.id.encode())
            await self.kv.put(SIG_MARKER, b"1")
        self._signed = True

    async def _unsign(self, prop: Propagation) -> None:
        """Drop ``prop``'s signature key if it still names ``prop``."""
        sig = signature_of(prop)
        found = await self._get(sig)
        if found is not None and found[0].decode() == prop.id:
            await self.kv.delete(sig)

    async def get_propagation(self, prop_id: str) -> Propagation:
        if not prop_id or not all(c.isalnum() or c in "-_" for c in prop_id):
            raise ValidationError(f"invalid propagation id {prop_id!r}")
        found = await self._get(f"props.{prop_id}")
        if found is None:
            raise NotFound(f"unknown propagation {prop_id!r}")
        return Propagation.model_validate_json(found[0])

    async def list_propagations(self) -> list[Propagation]:
        return [p.model_copy() for p in (await self._cache.get()).props]

    async def remove_propagation(self, prop_id: str) -> Propagation:
        prop = await self.get_propagation(prop_id)
        await self._unsign(prop)
        await self.kv.delete(f"props.{prop_id}")
        return prop

    # Routing ----------------------------------------------------------------

    async def revision(self) -> int:
        """A number that changes whenever anything in the registry changes."""
        status = await self.kv.status()
        return int(status.stream_info.state.last_seq or 0)

    async def recent_revision(self, max_age: float) -> int:
        """``revision`` as read at most ``max_age`` seconds ago (one request for everyone)."""
        return await self._recent.get(max_age)

    async def routes_for(self, ref: str) -> list[tuple[str, str | None]]:
        """The routes of the target with reference ``ref``."""
        snap = await self._cache.get()
        name, tenant = snap.name_of(ref)
        return compute_routes(name, snap.by_tenant.get(tenant, []), snap.tenant_names(tenant))

    async def rules_for(self, ref: str) -> tuple[list[Rule], str | None]:
        """The target's rules and its own transform (its tenant's propagations only)."""
        snap = await self._cache.get()
        found = snap.by_ref.get(ref)
        mine = None if found is None else found.transform
        name, tenant = snap.name_of(ref)
        props = snap.by_tenant.get(tenant, [])
        return compute_rules(name, props, snap.tenant_names(tenant)), mine

    async def can_request(self, source: str, target: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Request/reply is allowed along ``tenant``'s bidirectional propagations, either
        way (``target``: a name in that tenant)."""
        for p in await self.list_propagations():
            if p.tenant != tenant:
                continue
            if p.mode == PropagationMode.BIDIRECTIONAL and {source, target} == {
                p.source,
                p.targets[0],
            }:
                return True
        return False

    async def watch(self) -> AsyncIterator[str]:
        """Yield the key of every change, forever (first the current keys)."""
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                yield entry.key
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]


def _at_ref(target: Target, ref: str) -> Target:
    """A target as read at ``ref``: where it is stored says how it is named (an entry at
    ``targets.<T>.<name>`` is per tenant whatever its JSON says)."""
    target.scoped = ref.startswith(TENANT_MARK)
    return target
