"""The key ring: Fernet keys in one file, the first one primary.

Payloads are encrypted with the primary key before they enter JetStream; every
key in the ring can decrypt, so a rotation never strands old data. The file is
JSON, created 0600 in a 0700 directory; a file readable by group or others is
refused rather than trusted.

A long-running process follows the file: when ``mesh keys rotate`` (or
``prune``) rewrote it, the ring adopts the new keys, at once when a token does
not open with the keys it has, and within ``RELOAD_CHECK_S`` before encrypting,
so that events from fresh publishers never dead-letter in old services and old
services move on to the new primary.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from mesh.errors import DecodeError, KeyFileError

FILE_VERSION = 1
RELOAD_CHECK_S = 5.0  # how often encrypt looks whether the key file changed


@dataclass(frozen=True)
class Key:
    id: str
    created: datetime
    secret: str  # urlsafe base64, as Fernet wants it

    def fernet(self) -> Fernet:
        return Fernet(self.secret.encode())


def _new_key() -> Key:
    return Key(
        id=f"k{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(3)}",
        created=datetime.now(UTC),
        secret=Fernet.generate_key().decode(),
    )


class KeyRing:
    """Fernet keys, newest (primary) first."""

    def __init__(self, keys: list[Key], path: Path | None = None) -> None:
        if not keys:
            raise KeyFileError("key ring is empty")
        self.keys = list(keys)
        self.path = path
        self._multi = MultiFernet([k.fernet() for k in self.keys])
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        # The primary's Fernet, built once per primary (not per event): hot path.
        self._enc_key: Key | None = None
        self._enc: Fernet | None = None

    # Loading and saving ----------------------------------------------------

    @classmethod
    def load(cls, path: Path, create: bool = True) -> KeyRing:
        path = Path(path)
        if not path.exists():
            if not create:
                raise KeyFileError(f"key file {path} does not exist (run `mesh init`)")
            ring = cls([_new_key()], path)
            if ring._save(exclusive=True):
                return ring
            # Another process created the file first: everyone must use its key, or
            # events encrypted with ours could never be read.
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise KeyFileError(f"key file {path} cannot be read: {exc.strerror}") from None
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by group or others (mode {mode:o});"
                f" run `chmod 600 {path}`"
            )
        try:
            doc = json.loads(path.read_text())
            keys = [
                Key(id=k["id"], created=datetime.fromisoformat(k["created"]), secret=k["key"])
                for k in doc["keys"]
            ]
            for k in keys:
                k.fernet()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"key file {path} is corrupt: {type(exc).__name__}") from None
        return cls(keys, path)

    def save(self) -> None:
        self._save(exclusive=False)

    def _save(self, *, exclusive: bool) -> bool:
        """Write the file atomically; with ``exclusive``, only if it does not exist yet.

        Returns False when ``exclusive`` and another writer got there first.
        """
        if self.path is None:
            raise KeyFileError("key ring has no file")
        if not self.path.parent.exists():
            # A directory we create is ours to lock down; an existing one is left alone.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path.parent, 0o700)
        doc = {
            "version": FILE_VERSION,
            "keys": [
                {"id": k.id, "created": k.created.isoformat(), "key": k.secret} for k in self.keys
            ],
        }
        # A private temporary name: concurrent writers never share one.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                try:
                    os.link(tmp, self.path)  # atomic, and fails if the file exists
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._stamp = self._file_stamp()
        return True

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self, *, force: bool = False) -> bool:
        """Adopt the key file's keys if another process changed it; True when it did.

        Without ``force`` the file is looked at no more than every ``RELOAD_CHECK_S``.
        A file that fails to load is not adopted: the keys in hand keep working.
        """
        if self.path is None:
            return False
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return False
        self._checked = now
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            fresh = KeyRing.load(self.path, create=False)
        except KeyFileError:
            return False
        self.keys, self._multi, self._stamp = fresh.keys, fresh._multi, fresh._stamp
        return True

    # Use ----------------------------------------------------------------------

    @property
    def primary(self) -> Key:
        return self.keys[0]

    def encrypt(self, plaintext: bytes) -> bytes:
        self.refresh()
        key = self.keys[0]
        if self._enc is None or self._enc_key is not key:
            self._enc, self._enc_key = key.fernet(), key
        return self._enc.encrypt(plaintext)

    def decrypt(self, token: bytes) -> bytes:
        try:
            return self._multi.decrypt(token)
        except InvalidToken:
            pass
        # Perhaps encrypted under a key added since we loaded the file.
        if self.refresh(force=True):
            with contextlib.suppress(InvalidToken):
                return self._multi.decrypt(token)
        raise DecodeError("payload cannot be decrypted with any key in the ring")

    def key_id_for(self, token: bytes) -> str | None:
        """Which key encrypted this token (None if none of ours)."""
        for k in self.keys:
            try:
                k.fernet().decrypt(token)
            except InvalidToken:
                continue
            return k.id
        return None

    def reencrypt(self, token: bytes) -> bytes:
        """The same plaintext under the primary key."""
        try:
            return self._multi.rotate(token)
        except InvalidToken:
            raise DecodeError("payload cannot be decrypted with any key in the ring") from None

    def rotate(self) -> Key:
        key = _new_key()
        self.keys.insert(0, key)
        self._multi = MultiFernet([k.fernet() for k in self.keys])
        if self.path is not None:
            self.save()
        return key

    def remove(self, key_id: str) -> None:
        if key_id == self.primary.id:
            raise KeyFileError("the primary key cannot be removed")
        remaining = [k for k in self.keys if k.id != key_id]
        if len(remaining) == len(self.keys):
            raise KeyFileError(f"no key {key_id!r} in the ring")
        self.keys = remaining
        self._multi = MultiFernet([k.fernet() for k in self.keys])
        if self.path is not None:
            self.save()

    def primary_age_days(self, now: datetime | None = None) -> float:
        now = now or datetime.now(UTC)
        return (now - self.primary.created).total_seconds() / 86400
