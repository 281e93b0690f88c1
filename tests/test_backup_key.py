"""The backup key (mesh/backup/recipient.py): archives sealed to a public key, opened by
the passphrase that seals its private half; the older passphrase-only format still opens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh.backup import SealError
from mesh.backup import recipient as backup_key
from mesh.backup.seal import seal
from mesh.errors import ValidationError

FAST_N = 2**14  # the production cost (2**17) is for attackers, not for unit tests
PASS = b"a long passphrase"
FILES = {"encryption.key": b'{"keys": []}', "bridge.key": b"\x00\x01secret"}


def test_sealed_to_the_key_and_opened_by_the_passphrase() -> None:
    key = backup_key.enroll(PASS, n=FAST_N)
    blob = backup_key.seal_to(key, FILES, "archive-1")
    assert b"secret" not in blob and blob.startswith(backup_key.MAGIC2)
    assert backup_key.open_keys(blob, PASS, "archive-1") == FILES
    assert backup_key.recipient_of(blob) == key  # the archive carries the sealed private key
    # two sealings of the same files differ (a fresh ephemeral key and nonce each time)
    assert backup_key.seal_to(key, FILES, "archive-1") != blob


def test_refusals_wrong_passphrase_other_archive_and_tampering() -> None:
    key = backup_key.enroll(PASS, n=FAST_N)
    blob = backup_key.seal_to(key, FILES, "archive-1")
    with pytest.raises(SealError, match="wrong passphrase"):
        backup_key.open_keys(blob, b"another passphrase", "archive-1")
    with pytest.raises(SealError, match="damaged"):
        backup_key.open_keys(blob, PASS, "archive-2")  # keys bound to their archive
    for at in (-5, len(blob) // 2):
        tampered = bytearray(blob)
        tampered[at] ^= 0x40
        with pytest.raises(SealError):
            backup_key.open_keys(bytes(tampered), PASS, "archive-1")
    with pytest.raises(SealError, match="damaged"):
        backup_key.open_keys(backup_key.MAGIC2 + b"\xff\xff\xff\xff{}", PASS, "archive-1")


def test_a_header_naming_another_recipient_does_not_open() -> None:
    """Swapping in another key's sealed private half (opened by the attacker's passphrase)
    gives a key that does not match the ephemeral exchange: refused, nothing decrypted."""
    mine = backup_key.enroll(PASS, n=FAST_N)
    theirs = backup_key.enroll(b"attacker passphrase", n=FAST_N)
    blob = backup_key.seal_to(mine, FILES, "a")
    swapped = blob.replace(
        json.dumps(mine.doc()["sealed_private"]).encode(),
        json.dumps(theirs.doc()["sealed_private"]).encode(),
    )
    assert swapped != blob
    with pytest.raises(SealError):
        backup_key.open_keys(swapped, b"attacker passphrase", "a")


def test_the_passphrase_format_still_opens() -> None:
    blob = seal(FILES, PASS, "archive-1", n=FAST_N)
    assert backup_key.open_keys(blob, PASS, "archive-1") == FILES
    assert backup_key.recipient_of(blob) is None


def test_prepare_makes_checks_and_replaces_the_home_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="refusing to write keys unsealed"):
        backup_key.prepare(tmp_path, None, n=FAST_N)
    first = backup_key.prepare(tmp_path, PASS, n=FAST_N)
    assert first.made
    path = tmp_path / backup_key.RECIPIENT_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert b"secret" not in path.read_bytes()
    assert backup_key.load(tmp_path) == first.recipient
    # the same passphrase: the same key; none: the home's key with no derivation
    assert backup_key.prepare(tmp_path, PASS, n=FAST_N) == backup_key.Prepared(
        first.recipient, made=False
    )
    assert backup_key.prepare(tmp_path, None).recipient == first.recipient
    # another passphrase: a new key, which that passphrase opens; old archives keep theirs
    old = backup_key.seal_to(first.recipient, FILES, "old")
    second = backup_key.prepare(tmp_path, b"a new passphrase!", n=FAST_N)
    assert second.made and second.recipient != first.recipient
    new = backup_key.seal_to(backup_key.prepare(tmp_path, None).recipient, FILES, "new")
    assert backup_key.open_keys(new, b"a new passphrase!", "new") == FILES
    assert backup_key.open_keys(old, PASS, "old") == FILES
    with pytest.raises(SealError):
        backup_key.open_keys(new, PASS, "new")


def test_a_damaged_home_key_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / backup_key.RECIPIENT_FILE).write_bytes(os.urandom(40))
    with pytest.raises(SealError, match="backup key is damaged"):
        backup_key.prepare(tmp_path, None)
