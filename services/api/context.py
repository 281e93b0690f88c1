"""What a handler may use of the running API: the seam between the parts and the service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.config import Settings
    from mesh.history import PayloadReader
    from mesh.revocations import RevocationStore
    from mesh.storage import Store
    from services.api.audit import Auditor
    from services.api.auth import Auth
    from services.api.idempotency import IdempotencyStore


class ApiContext(Protocol):
    settings: Settings
    client: MeshClient
    document: dict[str, Any]
    document_text: str  # the document as served (built once)

    @property
    def auth(self) -> Auth: ...

    @property
    def idempotency(self) -> IdempotencyStore: ...

    @property
    def audit(self) -> Auditor: ...

    #: Decrypts stored payloads for display (the key ring loaded on first need).
    reader: PayloadReader

    async def store(self) -> Store:
        """The sink's database (read side), opened on first use."""
        ...

    async def revocations(self) -> RevocationStore:
        """The revocation bucket (portal links, bridge tokens), opened on first use."""
        ...
