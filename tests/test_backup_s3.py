"""Backups in S3: ``mesh backup create --to s3://...``, ``list --dir s3://...``,
``verify`` and ``restore`` of an ``s3://`` archive, against moto's server mode (an
emulator of the S3 API in a subprocess, not AWS), and every refusal as one line that
leaves the target home as it was."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import MESH, mesh, ok, one_line_error
from tests.support.destinations import AWS_KEY, AWS_SECRET, MotoServer, aws_client, moto_server
from tests.test_backup import archive, flip_byte, mesh_with_broker, tree_digest, up_env

__all__ = ["archive"]  # the fixture: a real backup of a small mesh

BUCKET = "mesh-backups"


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


def s3_env(env: dict[str, str], moto: MotoServer) -> dict[str, str]:
    return {
        **env,
        "MESH_BACKUP_S3_ENDPOINT": moto.url,
        "AWS_ACCESS_KEY_ID": AWS_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_create_list_verify_restore_through_s3_and_its_refusals(
    tmp_path: Path, archive: tuple[Path, dict[str, str]], moto: MotoServer
) -> None:
    good, src_env = archive
    async with aws_client("s3", moto.url) as s3:
        await s3.create_bucket(Bucket=BUCKET)
    # The source mesh again (its broker runs for the backup), now written to S3.
    src = s3_env(src_env, moto)
    made = json.loads(
        ok(
            await mesh_with_broker(
                src, "backup", "create", "--to", f"s3://{BUCKET}/nightly", "--json"
            )
        ).stdout
    )
    url = made["archive"]
    assert url.startswith(f"s3://{BUCKET}/nightly/mesh-backup-") and url.endswith(".tar")
    name = url.rpartition("/")[2]
    # Damaged copies beside it, uploaded as archives.
    flipped = tmp_path / "flipped.tar"
    flip_byte(good, flipped)
    data = good.read_bytes()
    async with aws_client("s3", moto.url) as s3:
        for key, body in [
            (f"nightly/{name.replace('mesh-backup-', 'mesh-backup-1')}", flipped.read_bytes()),
            (f"nightly/{name.replace('mesh-backup-', 'mesh-backup-2')}", data[: len(data) // 2]),
        ]:
            await s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        # The upload is the archive, byte for byte (same size; its manifest verifies below).
        head = await s3.head_object(Bucket=BUCKET, Key=f"nightly/{name}")
        assert head["ContentLength"] == made["bytes"]
        assert head["Metadata"]["mesh-messages"] == str(sum(made["streams"].values()))

    target = tmp_path / "target"
    (tmp_path / "t").mkdir()
    env = s3_env(up_env(target, tmp_path / "t"), moto)
    target.mkdir()
    (target / "notes.txt").write_text("an operator's file\n")
    before = tree_digest(target)

    listed = json.loads(
        ok(await mesh(env, "backup", "list", "--dir", f"s3://{BUCKET}/nightly", "--json")).stdout
    )
    by_name = {r["archive"]: r for r in listed}
    assert by_name[name]["messages"] == sum(made["streams"].values())
    assert by_name[name]["rows"] == sum(made["tables"].values())
    assert by_name[name]["problem"] is None
    assert len(listed) == 3
    assert all("no mesh metadata" in r["problem"] for n, r in by_name.items() if n != name)

    wrong = tmp_path / "wrong-passphrase"
    wrong.write_text("not the passphrase at all\n")
    prefix = f"s3://{BUCKET}/nightly/"
    cases = [
        ([prefix + name.replace("mesh-backup-", "mesh-backup-1")], "does not match its checksum"),
        ([prefix + name.replace("mesh-backup-", "mesh-backup-2")], "truncated"),
        ([prefix + name, "--passphrase-file", str(wrong)], "wrong passphrase"),
        ([prefix + "mesh-backup-missing.tar"], "no archive at"),
        ([f"s3://no-such-bucket/{name}"], "NoSuchBucket"),
        ([f"s3://{BUCKET}"], "names no archive"),
    ]
    for args, needle in cases:
        one_line_error(await mesh(env, "restore", *args), needle)
        assert tree_digest(target) == before, args
    one_line_error(
        await mesh(env, "backup", "verify", prefix + name.replace("mesh-backup-", "mesh-backup-1")),
        "does not match its checksum",
    )
    ok(await mesh(env, "backup", "verify", prefix + name))

    restored = json.loads(ok(await mesh(env, "restore", prefix + name, "--json")).stdout)
    assert restored["archive"] == prefix + name
    assert restored["streams"] == made["streams"]
    assert restored["tables"] == made["tables"]
    # Over what is now a mesh: refused without --force, and nothing changes.
    now = tree_digest(target)
    one_line_error(await mesh(env, "restore", prefix + name), "exists", "--force")
    assert tree_digest(target) == now

    # Over the live source (its broker running, its keys there): refused, keys untouched.
    keys = Path(src["MESH_HOME"]) / "keys"
    keys_before = tree_digest(keys)
    one_line_error(await mesh_with_broker(src, "restore", prefix + name), "exists", "--force")
    assert tree_digest(keys) == keys_before

    # A bucket that is not there: refused before anything is read, no object, no scratch.
    one_line_error(
        await mesh_with_broker(src, "backup", "create", "--to", "s3://no-such-bucket/x"),
        "no bucket no-such-bucket",
    )


async def test_s3_without_the_extra_is_one_line(tmp_path: Path) -> None:
    """Without aiobotocore (hidden from the import system), each s3:// command says what
    to install."""
    env = up_env(tmp_path / "home", tmp_path)
    hide = (
        "import sys; sys.modules['aiobotocore'] = None; sys.argv[0] = 'mesh';"
        " from mesh.cli import main; main()"
    )
    assert MESH[0] == sys.executable
    for args in (
        ["backup", "list", "--dir", "s3://b/p"],
        ["backup", "create", "--to", "s3://b/p"],
        ["restore", "s3://b/p/mesh-backup-x.tar"],
        ["backup", "verify", "s3://b/p/mesh-backup-x.tar"],
    ):
        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", hide, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        one_line_error(p, "pip install 'mesh[s3]'")
