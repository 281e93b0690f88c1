"""Stream and consumer provisioning: an idempotent reconcile.

Each target T owns one durable pull consumer ``deliver-T`` on the events
stream; its ``filter_subjects`` come from the registry (``compute_routes``) plus
the target's replay subject, reduced so that no two overlap. Reconciling is
safe to repeat and to run from several processes at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from mesh._nats.buckets import transient_js_error
from mesh._nats.types import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    js_errors,
)
from mesh.config import Settings
from mesh.errors import DecodeError, NotFound, ValidationError
from mesh.registry import EGRESS_KINDS, Registry, Target, compute_routes
from mesh.resilience import retry_transient
from mesh.subjects import Subjects, consumer_ref, reduce_filters

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

MIN_ACK_WAIT_S = 30.0
# A reconcile that saw the registry change under it reads and applies it again, this often.
RECONCILE_ROUNDS = 5


@dataclass(frozen=True)
class StreamNames:
    events: str
    dlq: str
    sys: str
    registry: str
    revoked: str  # KV bucket of revoked bridge tokens (mesh/revocations.py)
    apikeys: str  # KV bucket of the HTTP API's keys, hashed (mesh/apikeys.py)
    idempotency: str  # KV bucket of the HTTP API's Idempotency-Key answers (24 h TTL)
    tenants: str = ""  # KV bucket of tenants and their quotas (mesh/tenants.py)

    @classmethod
    def for_prefix(cls, prefix: str) -> StreamNames:
        base = prefix.upper().replace("-", "_").replace(".", "_")
        return cls(
            events=f"{base}_EVENTS",
            dlq=f"{base}_DLQ",
            sys=f"{base}_SYS",
            registry=f"{base}_REGISTRY",
            revoked=f"{base}_REVOKED",
            apikeys=f"{base}_APIKEYS",
            idempotency=f"{base}_IDEMPOTENCY",
            tenants=f"{base}_TENANTS",
        )


def stream_configs(settings: Settings) -> list[StreamConfig]:
    names = StreamNames.for_prefix(settings.prefix)
    subj = Subjects(settings.prefix)
    common = {
        "storage": StorageType.FILE,
        "num_replicas": settings.stream_replicas,
        "retention": RetentionPolicy.LIMITS,
        "discard": DiscardPolicy.OLD,
    }
    max_age = settings.stream_max_age_days * 86400
    return [
        StreamConfig(
            name=names.events,
            description="Every published and replayed event",
            subjects=[subj.evt_all, subj.replay_all],
            duplicate_window=settings.duplicate_window_s,
            max_age=max_age,
            max_consumers=settings.max_consumers,  # one per target (mesh/config.py)
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=names.dlq,
            description="Dead letters, with their last error",
            subjects=[subj.dlq_all],
            duplicate_window=settings.duplicate_window_s,
            max_age=max(max_age, 30 * 86400),
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=names.sys,
            description="One record per delivery attempt; audit records of API changes",
            subjects=[subj.delivery_all, subj.audit_all],
            duplicate_window=settings.duplicate_window_s,
            max_age=max_age,
            **common,  # type: ignore[arg-type]
        ),
    ]


async def ensure_streams(port: JetStreamPort, settings: Settings) -> None:
    """Create or update the mesh's streams; a 503 or a timeout (a cluster still electing
    its meta leader) is tried again for a while instead of failing a service's start."""
    for cfg in stream_configs(settings):
        await retry_transient(partial(_ensure_stream, port, cfg), transient_js_error)


async def _ensure_stream(port: JetStreamPort, cfg: StreamConfig) -> None:
    assert cfg.name is not None
    try:
        await port.stream_info(cfg.name)
    except js_errors.NotFoundError:
        try:
            await port.add_stream(cfg)
        except js_errors.BadRequestError as exc:
            # Another process created it between our look and our add.
            if exc.err_code != 10058:  # stream name already in use
                raise
        return
    await port.update_stream(cfg)


def ack_wait_for(target: Target, min_ack_wait: float = MIN_ACK_WAIT_S) -> float:
    """How long a delivery may stay unacked before the broker hands it out again.

    A webhook attempt may take the whole request timeout (twice, with slack, so a slow
    success is not raced by a redelivery); a nats or stream consumer gets ``timeout_s``
    to handle and ack an event.
    """
    if target.kind in EGRESS_KINDS:
        return max(min_ack_wait, target.timeout_s * 2 + 5)
    return max(min_ack_wait, target.timeout_s)


def consumer_config(
    target: Target, filters: list[str], min_ack_wait: float = MIN_ACK_WAIT_S
) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=target.consumer,
        description=f"deliveries to {target.kind} target {target.name}",
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_for(target, min_ack_wait),
        max_deliver=-1,
        filter_subjects=filters,
        max_ack_pending=1 if target.ordered else max(target.max_in_flight * 4, 64),
        max_waiting=512,
        metadata={"mesh_target": target.ref, "mesh_kind": str(target.kind)},
    )


def filters_for(subjects: Subjects, target: str, routes: list[tuple[str, str | None]]) -> list[str]:
    """A consumer's filters: its routes' event subjects and its replay subject (``target``:
    the target's reference)."""
    wanted = [subjects.evt_filter(src, pat) for src, pat in routes]
    wanted.append(subjects.replay_filter(target))
    return reduce_filters(wanted)


class Provisioner:
    """Reconciles JetStream consumers with the registry."""

    def __init__(self, port: JetStreamPort, registry: Registry, settings: Settings) -> None:
        self.port = port
        self.registry = registry
        self.settings = settings
        self.subjects = Subjects(settings.prefix)
        self.names = StreamNames.for_prefix(settings.prefix)

    async def reconcile_target(
        self, target: Target, routes: list[tuple[str, str | None]] | None = None
    ) -> ConsumerInfo:
        """Create or update ``target``'s consumer from the registry (or from ``routes``).

        Reading the registry and writing the consumer are two steps, and other processes
        reconcile too (the CLI after each change, a service finding a consumer missing).
        A reconcile whose reading went stale meanwhile (a propagation added in between,
        and its own reconcile already applied) would write the old filters over the new
        ones, and the target would silently stop receiving. So the registry revision is
        compared after the write: when it moved, the registry is read and applied again.
        """
        if routes is not None:
            return await self._apply(target, routes)
        for _ in range(RECONCILE_ROUNDS):
            revision = await self.registry.revision()
            info = await self._apply(target, await self.registry.routes_for(target.ref))
            if await self.registry.revision() == revision:
                return info
            with contextlib.suppress(NotFound):  # a removed target is reconcile_all's
                target = await self.registry.get_target(target.ref)
        return info

    async def _apply(self, target: Target, routes: list[tuple[str, str | None]]) -> ConsumerInfo:
        cfg = consumer_config(
            target,
            filters_for(self.subjects, target.ref, routes),
            self.settings.ack_wait_min_s,
        )
        try:
            existing = await self.port.consumer_info(self.names.events, target.consumer)
        except js_errors.NotFoundError:
            existing = None
        if existing is not None:
            # Fields that cannot change on update are kept as they were.
            cfg.deliver_policy = existing.config.deliver_policy
            cfg.opt_start_seq = existing.config.opt_start_seq
            cfg.opt_start_time = existing.config.opt_start_time
            cfg.pause_until = existing.config.pause_until
        return await self.port.ensure_consumer(self.names.events, cfg)

    async def reconcile_all(self) -> dict[str, list[str]]:
        """Bring every deliver-* consumer in line; returns target -> filters.

        Like ``reconcile_target``, done again when the registry changed meanwhile.
        """
        result: dict[str, list[str]] = {}
        for _ in range(RECONCILE_ROUNDS):
            revision = await self.registry.revision()
            result = await self._reconcile_all_once()
            if await self.registry.revision() == revision:
                break
        return result

    async def _reconcile_all_once(self) -> dict[str, list[str]]:
        targets, props = await self.registry.targets_and_propagations()
        refs = {t.ref for t in targets}
        names: dict[str, set[str]] = {}  # a broadcast reaches its tenant's targets
        for t in targets:
            names.setdefault(t.tenant, set()).add(t.name)
        result: dict[str, list[str]] = {}
        for t in targets:
            mine = [p for p in props if p.tenant == t.tenant]
            info = await self._apply(t, compute_routes(t.name, mine, names[t.tenant]))
            result[t.ref] = list(info.config.filter_subjects or [])
        async for name in self._deliver_consumers():
            ref = consumer_ref(name) or ""
            if ref not in refs and not await self._target_exists(ref):
                await self.delete_consumer(name)
        return result

    async def _target_exists(self, ref: str) -> bool:
        """Asked once more, by key, before a consumer is deleted: deleting drops what is
        queued for the target, and a listing that missed it must not cost that."""
        try:
            await self.registry.get_target(ref)
        except NotFound:
            return False
        except ValidationError:
            return False  # not a name a target can have
        except DecodeError:
            return True  # an entry is there, unreadable: keep what is queued for it
        return True

    async def _deliver_consumers(self) -> AsyncIterator[str]:
        for name in await self.port.consumer_names(self.names.events):
            if name.startswith("deliver-"):
                yield name

    async def delete_consumer(self, consumer: str) -> None:
        await self.port.delete_consumer(self.names.events, consumer)  # gone already: fine
