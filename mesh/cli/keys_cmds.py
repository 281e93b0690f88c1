"""``mesh keys``: status, rotate, reencrypt and prune the encryption key ring."""

from __future__ import annotations

from typing import Any

import typer

from mesh import keys as key_ops
from mesh import reencrypt as reencrypt_ops
from mesh.cli._common import (
    arun,
    confirm,
    connected,
    note,
    print_json,
    print_table,
    say,
    settings,
)
from mesh.cli._progress import progress_bar
from mesh.cli._tables import Col
from mesh.errors import BrokerUnavailable, MeshError

keys_app = typer.Typer(
    help="Encryption keys: status, rotate, reencrypt, prune.", no_args_is_help=True
)


# At 80 columns the creation time gives way first (the age says it).
KEY_COLUMNS = [
    Col("key", keep=0),
    Col("role", keep=0),
    Col("created", keep=2),
    Col("age (days)", keep=1),
    Col("still protects", keep=0, flex=True),
]


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


@keys_app.command("status")
def keys_status(
    usage: bool = typer.Option(
        False, "--usage", help="Also count what each key still protects (scans every store)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The key ring: keys, ages, and a warning when the primary is due for rotation."""
    s = settings()
    ring = key_ops.load_ring(s)
    st = key_ops.key_status(s, ring)
    used: key_ops.KeyUsage | None = None
    if usage:

        async def run() -> key_ops.KeyUsage:
            async with connected(s) as c:
                with progress_bar("scan") as update:
                    return await key_ops.key_usage(s, ring, c, update)

        used = arun(run())
    if as_json:
        doc = st.doc()
        if used is not None:
            doc["usage"] = used.doc()
        print_json(doc)
    else:
        rows = []
        for k in st.keys:
            row: list[Any] = [
                k.id,
                "primary" if k.primary else "old (read only)",
                k.created.isoformat(timespec="seconds"),
                f"{k.age_days:.1f}",
            ]
            if used is not None:
                row.append(", ".join(f"{n} {s}" for s, n in used.for_key(k.id).items()) or "-")
            rows.append(row)
        cols = KEY_COLUMNS if used else KEY_COLUMNS[:-1]
        print_table(f"keys in {st.file}", cols, rows)
        if used is not None:
            for store, n in used.undecryptable().items():
                note(f"{n} token(s) in {store} open with no key in the ring")
            for text in used.notes:
                note(text)
    if st.warning:
        note(f"warning: {st.warning}")


@keys_app.command("rotate")
def keys_rotate(
    reencrypt: bool = typer.Option(
        False, "--reencrypt", help="Then rewrite stored payloads under the new key."
    ),
    batch_size: int = typer.Option(key_ops.DEFAULT_BATCH, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Add a new primary key; old keys stay for reading."""
    s = settings()
    key = key_ops.rotate(s)
    doc: dict[str, Any] = {"primary": key.id}
    if not as_json:
        say(f"new primary key {key.id}; older keys still decrypt")
        note(
            f"processes using {s.key_path} follow it by themselves (new events use the new"
            " key within seconds); copy the file to any other machine that shares this mesh"
        )
    if reencrypt:
        doc["reencrypt"] = _reencrypt(s, batch_size, restart=False, as_json=as_json).doc()
    if as_json:
        print_json(doc)


@keys_app.command("reencrypt")
def keys_reencrypt(
    batch_size: int = typer.Option(key_ops.DEFAULT_BATCH, "--batch-size", min=1),
    restart: bool = typer.Option(
        False, "--restart", help="Ignore the checkpoint of a stopped run."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rewrite stored payloads under the primary key (resumes a run that was interrupted)."""
    result = _reencrypt(settings(), batch_size, restart=restart, as_json=as_json)
    if as_json:
        print_json(result.doc())


def _reencrypt(
    s: Any, batch_size: int, *, restart: bool, as_json: bool
) -> reencrypt_ops.ReencryptResult:
    ring = key_ops.load_ring(s)

    async def run() -> reencrypt_ops.ReencryptResult:
        with progress_bar("re-encrypt") as update:
            try:
                async with connected(s) as c:
                    return await reencrypt_ops.reencrypt(
                        s, ring, c, batch_size=batch_size, progress=update, restart=restart
                    )
            except BrokerUnavailable:
                return await reencrypt_ops.reencrypt(
                    s, ring, None, batch_size=batch_size, progress=update, restart=restart
                )

    try:
        result = arun(run())
    except KeyboardInterrupt:
        raise MeshError("re-encryption interrupted: run `mesh keys reencrypt` to resume") from None
    if not as_json:
        if result.resumed:
            say("resumed an interrupted re-encryption")
        for table, t in result.tables.items():
            say(
                f"{table}: {t.rewritten} row(s) re-encrypted under {result.primary},"
                f" {t.current} already were"
                + (f", {t.undecryptable} open with no key in the ring" if t.undecryptable else "")
            )
        say(f"registry secrets re-sealed: {result.secrets_resealed}")
        for text in result.notes:
            note(text)
    return result


@keys_app.command("prune")
def keys_prune(
    key_ids: list[str] = typer.Argument(
        None, metavar="[KEY_ID]...", help="Default: every old key."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Remove old keys that nothing stored needs any more; refuse (and say why) otherwise."""
    s = settings()
    ring = key_ops.load_ring(s)
    candidates = key_ops.prune_candidates(ring, key_ids or None)
    if not candidates:
        if as_json:
            print_json({"removed": [], "refused": {}})
        else:
            say("nothing to prune: the ring holds only the primary key")
        return

    async def run() -> key_ops.KeyPruneResult:
        async with connected(s) as c:
            with progress_bar("scan") as update:
                usage = await key_ops.key_usage(s, ring, c, update)
        return key_ops.plan_prune(usage, candidates)

    plan = arun(run())
    if plan.removed and not yes:
        listed = ", ".join(plan.removed)
        confirm(f"removing key(s) {listed}", f"remove key(s) {listed} for good?")
    plan.removed = key_ops.apply_prune(s, plan) if plan.removed else []
    if as_json:
        print_json({"removed": plan.removed, "refused": plan.refused})
    else:
        for key_id in plan.removed:
            say(f"removed key {key_id}")
    if plan.refused:
        raise MeshError("; ".join(plan.reasons()) + f" ({plan.hint()})")


__all__ = ["register"]
