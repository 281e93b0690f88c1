"""Sealing the key directory with a passphrase: scrypt, then AES-256-GCM.

Why scrypt: it is memory-hard (an attacker's GPU or ASIC pays for memory per guess,
not only for time) and it ships in ``cryptography``, which mesh already depends on for
Fernet; argon2id would be the first choice of OWASP but adds a C extension
(argon2-cffi) for the same protection at these parameters. N=2**17, r=8 costs
128 MiB and a few hundred milliseconds per derivation (OWASP's scrypt minimum is
N=2**17, r=8, p=1).

The sealed blob is ``MAGIC | params (JSON, authenticated) | salt | nonce | ciphertext``;
the archive id is authenticated too, so keys sealed for one archive do not open
in another.
"""

from __future__ import annotations

import json
import os
import struct
from base64 import b64decode, b64encode
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mesh.errors import ValidationError

MAGIC = b"MESHSEAL1"
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
MIN_PASSPHRASE = 8


class SealError(ValidationError):
    """Keys that do not open: wrong passphrase, or a sealed blob that was changed."""


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def check_passphrase(passphrase: bytes) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise ValidationError(f"the backup passphrase must have at least {MIN_PASSPHRASE} bytes")


@dataclass(frozen=True)
class SealingKey:
    """A key derived from the passphrase, with the salt and parameters that made it."""

    params: bytes
    salt: bytes
    key: bytes


def derive(passphrase: bytes, *, n: int = SCRYPT_N) -> SealingKey:
    """The slow part of sealing (a backup runs it while the streams are read)."""
    check_passphrase(passphrase)
    params = json.dumps({"kdf": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P}).encode()
    salt = os.urandom(16)
    return SealingKey(params, salt, _derive(passphrase, salt, n, SCRYPT_R, SCRYPT_P))


def pack_files(files: dict[str, bytes]) -> bytes:
    """The plaintext a seal encrypts: the files as JSON, contents in base64."""
    return json.dumps({name: b64encode(data).decode() for name, data in files.items()}).encode()


def unpack_files(plain: bytes) -> dict[str, bytes]:
    return {name: b64decode(data) for name, data in json.loads(plain).items()}


def write_private(path: Path, data: bytes) -> None:
    """``data`` into ``path``, 0600, atomically (a dot-file beside it, fsynced, renamed)."""
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seal_with(sk: SealingKey, files: dict[str, bytes], archive_id: str) -> bytes:
    nonce = os.urandom(12)
    plain = pack_files(files)
    aad = MAGIC + sk.params + archive_id.encode()
    body = AESGCM(sk.key).encrypt(nonce, plain, aad)
    return MAGIC + struct.pack(">H", len(sk.params)) + sk.params + sk.salt + nonce + body


def seal(
    files: dict[str, bytes], passphrase: bytes, archive_id: str, *, n: int = SCRYPT_N
) -> bytes:
    """``files`` (name -> content) sealed under ``passphrase`` for archive ``archive_id``."""
    return seal_with(derive(passphrase, n=n), files, archive_id)


def unseal(blob: bytes, passphrase: bytes, archive_id: str) -> dict[str, bytes]:
    """The files sealed in ``blob``; ``SealError`` when the passphrase does not open it."""
    try:
        if not blob.startswith(MAGIC):
            raise ValueError
        (plen,) = struct.unpack_from(">H", blob, len(MAGIC))
        at = len(MAGIC) + 2
        params_raw = blob[at : at + plen]
        params = json.loads(params_raw)
        at += plen
        salt, nonce, body = blob[at : at + 16], blob[at + 16 : at + 28], blob[at + 28 :]
        if params.get("kdf") != "scrypt" or len(nonce) != 12:
            raise ValueError
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        if not (2**10 <= n <= 2**22 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError  # a changed header must not make us allocate gigabytes
    except (ValueError, KeyError, TypeError, struct.error):
        raise SealError("the sealed keys are damaged") from None
    key = _derive(passphrase, salt, n, r, p)
    try:
        plain = AESGCM(key).decrypt(nonce, body, MAGIC + params_raw + archive_id.encode())
    except InvalidTag:
        raise SealError("wrong passphrase: the sealed keys do not open") from None
    return unpack_files(plain)


def read_key_dir(key_dir: Path) -> dict[str, bytes]:
    """Every regular file of the key directory (the key ring, the bridge key, ...)."""
    if not key_dir.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(key_dir.iterdir()) if p.is_file()}


def write_key_dir(key_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``key_dir`` (0700), each 0600, each atomically."""
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(key_dir, 0o700)
    for name, data in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise SealError(f"the sealed keys hold a bad file name {name!r}")
        write_private(key_dir / name, data)


def read_passphrase(path: Path | None) -> bytes:
    """The passphrase from a file (its first line, without the newline)."""
    if path is None:
        raise ValidationError(
            "refusing to write keys unsealed: give --passphrase-file F"
            " (or MESH_BACKUP_PASSPHRASE_FILE)"
        )
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    passphrase = raw.split(b"\n", 1)[0].rstrip(b"\r")
    check_passphrase(passphrase)
    return passphrase
