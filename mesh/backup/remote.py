"""Archives in S3 (or an S3-compatible store): ``s3://BUCKET[/PREFIX]``.

The s3 extra (``pip install 'mesh[s3]'``, aiobotocore, as the s3 destination uses).
The endpoint is MESH_BACKUP_S3_ENDPOINT, else AWS_ENDPOINT_URL, else AWS's; the
credentials and region come from botocore's usual chain (environment, profile).

- create: the archive is written to a scratch directory (TMPDIR: it needs room for
  one archive, as the tar's headers are rewritten in place), then uploaded in parts
  of 16 MiB, each with its MD5 for the store to check, and the scratch copy goes.
  A multipart upload appears only when it completes, so an interrupted one never
  shows as an archive; a failed one is aborted. The manifest's counts go with the
  object as metadata, so ``list`` does not download archives.
- restore and verify: the object is downloaded to a scratch file and then checked
  and restored exactly as a local archive is (the same refusals).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mesh.backup.archive import NAME_PREFIX, SUFFIX
from mesh.backup.create import BackupResult, create_backup
from mesh.backup.seal import check_passphrase
from mesh.config import Settings
from mesh.errors import ConfigError, StorageError, ValidationError

SCHEME = "s3://"
PART_SIZE = 16 * 1024 * 1024  # S3's minimum part is 5 MiB; at most 10,000 parts
IO_CHUNK = 1024 * 1024
META_PREFIX = "mesh-"

#: Progress callback: (label, done, total).
Progress = Callable[[str, int, int], None]


class MissingS3Extra(ConfigError):
    """aiobotocore is not installed."""


class RemoteError(StorageError):
    """The object store refused or could not be reached (one line)."""


def is_s3(text: str | os.PathLike[str] | None) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b/"

    @classmethod
    def parse(cls, url: str) -> S3Location:
        rest = url.removeprefix(SCHEME)
        bucket, _, prefix = rest.partition("/")
        if not bucket or not url.startswith(SCHEME):
            raise ValidationError(f"not an s3:// location: {url!r} (s3://BUCKET[/PREFIX])")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def url(self, name: str = "") -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}{name}"

    def object_of(self) -> tuple[S3Location, str]:
        """An ``s3://BUCKET/PREFIX/NAME.tar`` URL parsed as its place and object name."""
        if not self.prefix:
            raise ValidationError(f"{self.url()} names no archive: s3://BUCKET/[PREFIX/]NAME.tar")
        parent, _, name = self.prefix.rstrip("/").rpartition("/")
        return S3Location(self.bucket, f"{parent}/" if parent else ""), name


def endpoint() -> str | None:
    return os.environ.get("MESH_BACKUP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        code, message = err.get("Code", "?"), err.get("Message", "")
        return f"{code} ({message})" if message else str(code)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@contextlib.asynccontextmanager
async def s3_client() -> AsyncIterator[Any]:
    try:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
    except ImportError:
        raise MissingS3Extra("s3:// archives need aiobotocore: pip install 'mesh[s3]'") from None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = AioConfig(
        connect_timeout=10, read_timeout=120, retries={"max_attempts": 3, "mode": "standard"}
    )
    session = get_session()
    async with session.create_client(  # type: ignore[call-overload]
        "s3", region_name=region, endpoint_url=endpoint(), config=config
    ) as client:
        yield client


@contextlib.asynccontextmanager
async def _remote(what: str) -> AsyncIterator[None]:
    """botocore's errors (refusals, no endpoint, no credentials) as one line."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - aiobotocore brings botocore
        raise MissingS3Extra("s3:// archives need aiobotocore: pip install 'mesh[s3]'") from None
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise RemoteError(f"{what}: {_describe(exc)}") from None


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


async def upload(
    path: Path, loc: S3Location, metadata: dict[str, str], progress: Progress | None = None
) -> str:
    """Upload the archive at ``path`` as ``loc/<its name>``; its URL."""
    key = loc.key(path.name)
    meta = {f"{META_PREFIX}{k}": v for k, v in metadata.items()}
    total = await asyncio.to_thread(os.path.getsize, path)
    async with s3_client() as s3, _remote(f"upload to {loc.url(path.name)}"):
        if total <= PART_SIZE:
            data = await asyncio.to_thread(path.read_bytes)
            await s3.put_object(
                Bucket=loc.bucket, Key=key, Body=data, ContentMD5=_md5(data), Metadata=meta
            )
            if progress:
                progress("upload", total, total)
            return loc.url(path.name)
        started = await s3.create_multipart_upload(Bucket=loc.bucket, Key=key, Metadata=meta)
        upload_id = started["UploadId"]
        parts: list[dict[str, Any]] = []
        done = 0
        try:
            with path.open("rb") as f:
                while data := await asyncio.to_thread(f.read, PART_SIZE):
                    n = len(parts) + 1
                    got = await s3.upload_part(
                        Bucket=loc.bucket,
                        Key=key,
                        PartNumber=n,
                        UploadId=upload_id,
                        Body=data,
                        ContentMD5=_md5(data),
                    )
                    parts.append({"ETag": got["ETag"], "PartNumber": n})
                    done += len(data)
                    if progress:
                        progress("upload", done, total)
            await s3.complete_multipart_upload(
                Bucket=loc.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await s3.abort_multipart_upload(Bucket=loc.bucket, Key=key, UploadId=upload_id)
            raise
    return loc.url(path.name)


async def download(url: str, directory: Path, progress: Progress | None = None) -> Path:
    """The archive at ``url`` (``s3://BUCKET/PREFIX/NAME.tar``) copied into ``directory``."""
    loc, name = S3Location.parse(url).object_of()
    if not name or "/" in name or name in (".", ".."):
        raise ValidationError(f"{url} names no archive: s3://BUCKET/[PREFIX/]NAME.tar")
    dest = directory / name
    async with s3_client() as s3:
        try:
            async with _remote(f"download of {url}"):
                got = await s3.get_object(Bucket=loc.bucket, Key=loc.key(name))
                total = int(got.get("ContentLength") or 0)
                done = 0
                with dest.open("wb") as out:
                    async with got["Body"] as body:
                        while chunk := await body.read(IO_CHUNK):
                            out.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress("download", done, total)
        except RemoteError as exc:
            if "NoSuchKey" in str(exc) or "404" in str(exc):
                raise ValidationError(f"no archive at {url}") from None
            raise
    return dest


async def list_remote(loc: S3Location) -> list[dict[str, Any]]:
    """The archives under ``loc``, oldest first, with the counts their metadata holds."""
    rows: list[dict[str, Any]] = []
    async with s3_client() as s3, _remote(f"list of {loc.url()}"):
        paginator = s3.get_paginator("list_objects_v2")
        keys: list[tuple[str, int]] = []
        async for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(loc.prefix) :]
                if "/" not in name and name.startswith(NAME_PREFIX) and name.endswith(SUFFIX):
                    keys.append((name, int(obj["Size"])))
        for name, size in sorted(keys):
            head = await s3.head_object(Bucket=loc.bucket, Key=loc.key(name))
            meta = {
                k.removeprefix(META_PREFIX): v
                for k, v in (head.get("Metadata") or {}).items()
                if k.startswith(META_PREFIX)
            }
            problem = None
            try:
                messages, table_rows = int(meta["messages"]), int(meta["rows"])
                if int(meta["bytes"]) != size:
                    problem = f"has {size} bytes, its metadata says {meta['bytes']}"
            except (KeyError, ValueError):
                messages = table_rows = None  # type: ignore[assignment]
                problem = "no mesh metadata (not written by mesh backup create)"
            rows.append(
                {
                    "archive": name,
                    "created": meta.get("created"),
                    "bytes": size,
                    "messages": messages,
                    "rows": table_rows,
                    "problem": problem,
                }
            )
    return rows


@contextlib.contextmanager
def scratch_dir(what: str) -> Any:
    """A private scratch directory (TMPDIR) removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"mesh-{what}-") as tmp:
        os.chmod(tmp, 0o700)
        yield Path(tmp)


def _need_extra() -> None:
    import importlib.util

    if importlib.util.find_spec("aiobotocore") is None:
        raise MissingS3Extra("s3:// archives need aiobotocore: pip install 'mesh[s3]'")


async def create_backup_s3(
    settings: Settings, url: str, passphrase: bytes | None, progress: Progress | None = None
) -> BackupResult:
    """A backup written to the scratch directory and uploaded to ``url``."""
    loc = S3Location.parse(url)
    _need_extra()
    if passphrase is not None:
        check_passphrase(passphrase)
    try:
        async with s3_client() as s3, _remote(f"backup to {loc.url()}"):
            await s3.head_bucket(Bucket=loc.bucket)  # fail before reading the streams
    except RemoteError as exc:
        if "404" in str(exc) or "NoSuchBucket" in str(exc):
            raise RemoteError(f"no bucket {loc.bucket} at {endpoint() or 'AWS'}") from None
        raise
    with scratch_dir("backup") as tmp:
        result = await create_backup(settings, tmp, passphrase, progress)
        m = result.manifest
        meta = {
            "id": m["id"],
            "created": m["created"],
            "bytes": str(result.size),
            "messages": str(sum(v["messages"] for v in m["streams"].values())),
            "rows": str(sum(m["tables"].values())),
        }
        where = await upload(result.path, loc, meta, progress)
    return replace(result, location=where)


async def fetch_archive(url: str, directory: Path, progress: Progress | None = None) -> Path:
    """``download`` after checking the extra (one line when it is missing)."""
    _need_extra()
    return await download(url, directory, progress)
