"""The backup key: archives sealed to a public key, so a backup derives no passphrase.

A backup used to derive its sealing key from the passphrase with scrypt every time
(~0.5 s of a core by design, as long as the rest of a 100,000-event backup), and a
scheduled service had to keep the passphrase on the server. Now the passphrase seals
one X25519 private key, once (``enroll``), and the home keeps its public half with the
sealed private half in ``backup-recipient.json``. Every backup seals the key directory
to that public key: a fresh ephemeral X25519 key, ECDH, HKDF-SHA256, AES-256-GCM; it
needs neither the passphrase nor scrypt. Each archive carries the sealed private key,
so opening an archive still takes the passphrase through scrypt (the memory-hard
derivation an attacker pays per guess) and nothing but the archive.

The sealed blob is ``MAGIC2 | header length | header (JSON: the recipient's public key,
the ephemeral public key, the sealed private key; authenticated) | nonce | ciphertext``,
and the archive id is authenticated too. ``open_keys`` opens both this and the older
passphrase-only format (``seal.MAGIC``).
"""

from __future__ import annotations

import json
import os
import struct
from base64 import b64decode, b64encode
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from mesh.backup.seal import (
    MAGIC,
    SCRYPT_N,
    SealError,
    pack_files,
    seal,
    unpack_files,
    unseal,
    write_private,
)
from mesh.errors import ValidationError

MAGIC2 = b"MESHSEAL2"
RECIPIENT_FILE = "backup-recipient.json"
_INFO = b"mesh backup keys v2"


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _label(public: bytes) -> str:
    """What the sealed private key is bound to (the archive id of a passphrase seal)."""
    return "recipient:" + public.hex()


@dataclass(frozen=True)
class Recipient:
    """A backup key: the public half, and the private half sealed by the passphrase."""

    public: bytes
    sealed_private: bytes

    @property
    def fingerprint(self) -> str:
        return sha256(self.public).hexdigest()[:16]

    def doc(self) -> dict[str, object]:
        return {
            "version": 1,
            "kind": "x25519",
            "public": b64encode(self.public).decode(),
            "sealed_private": b64encode(self.sealed_private).decode(),
        }

    @classmethod
    def parse(cls, raw: bytes) -> Recipient:
        try:
            doc = json.loads(raw)
            public = b64decode(doc["public"], validate=True)
            sealed = b64decode(doc["sealed_private"], validate=True)
            if doc.get("kind") != "x25519" or len(public) != 32 or not sealed.startswith(MAGIC):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise SealError("the backup key is damaged") from None
        return cls(public, sealed)


def enroll(passphrase: bytes, *, n: int = SCRYPT_N) -> Recipient:
    """A new backup key whose private half only ``passphrase`` opens (one scrypt)."""
    private = X25519PrivateKey.generate()
    public = _raw_public(private.public_key())
    sealed = seal({"x25519": _raw_private(private)}, passphrase, _label(public), n=n)
    return Recipient(public, sealed)


def open_private(recipient: Recipient, passphrase: bytes) -> X25519PrivateKey:
    """The private key, if ``passphrase`` opens it (``SealError`` if not)."""
    files = unseal(recipient.sealed_private, passphrase, _label(recipient.public))
    try:
        private = X25519PrivateKey.from_private_bytes(files["x25519"])
    except (KeyError, ValueError):
        raise SealError("the backup key is damaged") from None
    if _raw_public(private.public_key()) != recipient.public:
        raise SealError("the backup key is damaged: its halves do not match")
    return private


def _aead_key(shared: bytes, ephemeral: bytes, public: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + public, info=_INFO).derive(shared)


def seal_to(recipient: Recipient, files: dict[str, bytes], archive_id: str) -> bytes:
    """``files`` sealed so that only the recipient's private key opens them."""
    ephemeral = X25519PrivateKey.generate()
    eph_public = _raw_public(ephemeral.public_key())
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient.public))
    header = json.dumps(
        {
            "kind": "x25519",
            "recipient": b64encode(recipient.public).decode(),
            "ephemeral": b64encode(eph_public).decode(),
            "sealed_private": b64encode(recipient.sealed_private).decode(),
        }
    ).encode()
    nonce = os.urandom(12)
    plain = pack_files(files)
    key = _aead_key(shared, eph_public, recipient.public)
    body = AESGCM(key).encrypt(nonce, plain, MAGIC2 + header + archive_id.encode())
    return MAGIC2 + struct.pack(">I", len(header)) + header + nonce + body


def recipient_of(blob: bytes) -> Recipient | None:
    """The backup key an archive's keys were sealed to (None for the passphrase format)."""
    if not blob.startswith(MAGIC2):
        return None
    header, _ = _split(blob)
    return _sealed_to(header)


def _sealed_to(header: dict[str, str]) -> Recipient:
    return Recipient(b64decode(header["recipient"]), b64decode(header["sealed_private"]))


def _split(blob: bytes) -> tuple[dict[str, str], bytes]:
    try:
        (hlen,) = struct.unpack_from(">I", blob, len(MAGIC2))
        at = len(MAGIC2) + 4
        if hlen > 64 * 1024:
            raise ValueError
        header = json.loads(blob[at : at + hlen])
        if header.get("kind") != "x25519":
            raise ValueError
        for field in ("recipient", "ephemeral", "sealed_private"):
            b64decode(header[field], validate=True)
    except (ValueError, KeyError, TypeError, struct.error):
        raise SealError("the sealed keys are damaged") from None
    return header, blob[at : at + hlen]


def open_keys(blob: bytes, passphrase: bytes, archive_id: str) -> dict[str, bytes]:
    """The key directory sealed in an archive, in either format."""
    if not blob.startswith(MAGIC2):
        return unseal(blob, passphrase, archive_id)
    header, raw_header = _split(blob)
    at = len(MAGIC2) + 4 + len(raw_header)
    nonce, body = blob[at : at + 12], blob[at + 12 :]
    recipient = _sealed_to(header)
    private = open_private(recipient, passphrase)
    eph_public = b64decode(header["ephemeral"])
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_public))
    except ValueError:
        raise SealError("the sealed keys are damaged") from None
    key = _aead_key(shared, eph_public, recipient.public)
    try:
        plain = AESGCM(key).decrypt(nonce, body, MAGIC2 + raw_header + archive_id.encode())
    except (InvalidTag, ValueError):
        raise SealError("the sealed keys are damaged") from None
    return unpack_files(plain)


def load(home: Path) -> Recipient | None:
    """The home's backup key, if one was made."""
    path = home / RECIPIENT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValidationError(f"cannot read the backup key {path}: {exc.strerror}") from None
    return Recipient.parse(raw)


def save(home: Path, recipient: Recipient) -> Path:
    """Write the backup key into the home (atomically, 0600: it is not secret, but private)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / RECIPIENT_FILE
    write_private(path, json.dumps(recipient.doc(), indent=2).encode() + b"\n")
    return path


@dataclass(frozen=True)
class Prepared:
    recipient: Recipient
    made: bool  # a new backup key was made (first backup, or a new passphrase)


def prepare(home: Path, passphrase: bytes | None, *, n: int = SCRYPT_N) -> Prepared:
    """The backup key to seal to (blocking: scrypt when a passphrase is given).

    - no passphrase: the home's key; none yet is an error (a first backup needs one);
    - a passphrase that opens the home's key: that key;
    - a passphrase and no key, or one it does not open: a new key, saved in the home.
      Archives sealed before still open with the passphrase they were made with.
    """
    current = load(home)
    if passphrase is None:
        if current is None:
            raise ValidationError(
                "refusing to write keys unsealed: give --passphrase-file F"
                " (or MESH_BACKUP_PASSPHRASE_FILE), or make a backup key first"
                " with `mesh backup key --passphrase-file F`"
            )
        return Prepared(current, made=False)
    if current is not None:
        try:
            open_private(current, passphrase)
            return Prepared(current, made=False)
        except SealError:
            pass
    fresh = enroll(passphrase, n=n)
    save(home, fresh)
    return Prepared(fresh, made=True)
