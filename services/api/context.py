"""What a handler may use of the running API: the seam between the parts and the service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.config import Settings
    from services.api.audit import Auditor
    from services.api.auth import Auth
    from services.api.history_store import HistoryAccess
    from services.api.idempotency import IdempotencyStore


class ApiContext(Protocol):
    settings: Settings
    client: MeshClient
    document: dict[str, Any]

    @property
    def auth(self) -> Auth: ...

    @property
    def idempotency(self) -> IdempotencyStore: ...

    @property
    def audit(self) -> Auditor: ...

    #: The sink's database, for the history routes and GraphQL (opened on first need).
    history: HistoryAccess
