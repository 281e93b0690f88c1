"""NATS accounts for tenants' raw NATS clients: the ``accounts`` block of nats.conf.

mesh's own isolation is kept by mesh's processes; a raw NATS client holding the mesh's
credentials could read every subject. A tenant that runs raw NATS clients gets an
account of its own instead (``mesh tenant nats-accounts`` writes the block)::

    MESH account (JetStream, the mesh's services)   tenant account T (no JetStream)
      exports stream  <prefix>.evt.~T.>   ------->   imported as <prefix>.evt.>
      exports service <prefix>.evt.~T.>   <-------   publishes <prefix>.evt.<source>.<type>
      exports service $JS.API.CONSUMER.MSG.NEXT.<events stream>.<consumer>   (pull)
      exports service $JS.ACK.<events stream>.<consumer>.>                   (ack)

So T's clients publish and subscribe with the default tenant's subjects and see only
their own events (a publish is stored as T's qualified source, with a JetStream ack
back); they pull and ack the consumers of T's consumer-read targets (kinds ``nats`` and
``stream``) and nothing else: no stream, no KV bucket, no other consumer, no other
tenant's subject. Passwords are never written here: each user's password is a nats.conf
variable, ``$MESH_NATS_PASSWORD`` for the mesh's own user and
``$MESH_NATS_PASSWORD_<TENANT>`` for a tenant's, which nats-server reads from its
environment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import ValidationError
from mesh.subjects import DEFAULT_TENANT, TENANT_MARK, validate_name

MESH_ACCOUNT = "MESH"
MESH_PASSWORD_VAR = "MESH_NATS_PASSWORD"
_VAR = re.compile(r'"\$(MESH_NATS_PASSWORD[A-Z0-9_]*)"')


@dataclass(frozen=True)
class TenantAccount:
    """One tenant's account: its name and the consumers its clients may pull."""

    tenant: str
    consumers: tuple[str, ...] = field(default_factory=tuple)


def account_name(tenant: str) -> str:
    """The account of ``tenant``: ``T_`` + the name, upper case (``-`` -> ``_``)."""
    return "T_" + tenant.upper().replace("-", "_")


def password_var(tenant: str) -> str:
    return f"{MESH_PASSWORD_VAR}_{tenant.upper().replace('-', '_')}"


def accounts_block(
    prefix: str,
    events_stream: str,
    tenants: Iterable[TenantAccount],
    *,
    mesh_user: str = "mesh",
) -> dict[str, Any]:
    """The ``accounts`` map: the mesh's account (with JetStream and the exports) and one
    account per tenant, each with one user named after the tenant."""
    exports: list[dict[str, Any]] = []
    accounts: dict[str, Any] = {}
    for t in sorted(tenants, key=lambda t: t.tenant):
        validate_name(t.tenant, "tenant")
        if t.tenant == DEFAULT_TENANT:
            raise ValidationError("the default tenant is the mesh's own account, not a tenant's")
        account = account_name(t.tenant)
        if account in accounts or account == MESH_ACCOUNT:
            raise ValidationError(
                f"tenant {t.tenant!r} maps to account {account} that another tenant has:"
                " names that differ only in '-' and '_' cannot both have an account"
            )
        own = f"{prefix}.evt.{TENANT_MARK}{t.tenant}.>"
        local = f"{prefix}.evt.>"
        only = [account]
        exports += [{"stream": own, "accounts": only}, {"service": own, "accounts": only}]
        imports: list[dict[str, Any]] = [
            {"stream": {"account": MESH_ACCOUNT, "subject": own}, "to": local},
            {"service": {"account": MESH_ACCOUNT, "subject": own}, "to": local},
        ]
        for consumer in sorted(set(t.consumers)):
            pull = f"$JS.API.CONSUMER.MSG.NEXT.{events_stream}.{consumer}"
            ack = f"$JS.ACK.{events_stream}.{consumer}.>"
            exports += [
                {"service": pull, "accounts": only, "response_type": "stream"},
                {"service": ack, "accounts": only},
            ]
            imports += [
                {"service": {"account": MESH_ACCOUNT, "subject": pull}},
                {"service": {"account": MESH_ACCOUNT, "subject": ack}},
            ]
        accounts[account] = {
            "users": [{"user": t.tenant, "password": f"${password_var(t.tenant)}"}],
            "imports": imports,
        }
    mesh = {
        "jetstream": "enabled",
        "users": [{"user": mesh_user, "password": f"${MESH_PASSWORD_VAR}"}],
        "exports": exports,
    }
    return {MESH_ACCOUNT: mesh, **accounts}


def render(block: dict[str, Any]) -> str:
    """nats.conf text (its syntax takes JSON) with the passwords as variable references."""
    text = _VAR.sub(r"$\1", json.dumps(block, indent=2))
    return f"{HEADER}accounts: {text}\n"


HEADER = """\
# Written by `mesh tenant nats-accounts`. Regenerate it after adding a tenant or a
# consumer-read target, then reload nats-server (`nats-server --signal reload`).
"""
