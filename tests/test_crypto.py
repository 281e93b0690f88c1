"""The key ring: created 0600, refused when too open, corrupt files, rotation."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mesh.crypto import KeyRing
from mesh.errors import DecodeError, KeyFileError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "encryption.key"
    ring = KeyRing.load(path)
    assert path.exists()
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert len(ring.keys) == 1
    # No temporary file left beside it.
    assert [p.name for p in path.parent.iterdir()] == ["encryption.key"]
    # Loading again reads the same key.
    again = KeyRing.load(path)
    assert again.primary == ring.primary
    assert again.decrypt(ring.encrypt(b"hello")) == b"hello"


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    KeyRing.load(shared / "k.json")
    assert mode(shared) == 0o755
    assert mode(shared / "k.json") == 0o600


def test_missing_without_create(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        KeyRing.load(tmp_path / "nope.key", create=False)


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_group_or_world_access(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "k.json"
    KeyRing.load(path)
    os.chmod(path, bad_mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyRing.load(path)


@pytest.mark.parametrize(
    "content",
    [
        "not json at all",
        "",
        "[]",
        '{"version": 1}',
        '{"version": 1, "keys": []}',
        '{"version": 1, "keys": [{"id": "k1"}]}',
        '{"version": 1, "keys": [{"id": "k1", "created": "2024-01-01T00:00:00+00:00",'
        ' "key": "short"}]}',
        '{"version": 1, "keys": [{"id": "k1", "created": "last week", "key": "x"}]}',
    ],
)
def test_corrupt_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "k.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    with pytest.raises(KeyFileError):
        KeyRing.load(path)


def test_a_directory_in_place_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        KeyRing.load(path)


def test_rotate_keeps_old_data_readable(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    ring = KeyRing.load(path)
    old_id = ring.primary.id
    old_token = ring.encrypt(b"before rotation")
    new = ring.rotate()
    assert ring.primary == new and new.id != old_id
    assert [k.id for k in ring.keys] == [new.id, old_id]
    new_token = ring.encrypt(b"after")
    assert ring.key_id_for(new_token) == new.id
    assert ring.key_id_for(old_token) == old_id
    # A fresh load from disk reads both.
    loaded = KeyRing.load(path)
    assert loaded.decrypt(old_token) == b"before rotation"
    assert loaded.decrypt(new_token) == b"after"
    assert mode(path) == 0o600
    # Re-encryption moves old data to the primary key.
    moved = loaded.reencrypt(old_token)
    assert loaded.key_id_for(moved) == new.id
    assert loaded.decrypt(moved) == b"before rotation"


def test_remove_a_key(tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path / "k.json")
    old_id = ring.primary.id
    token = ring.encrypt(b"x")
    ring.rotate()
    with pytest.raises(KeyFileError, match="primary"):
        ring.remove(ring.primary.id)
    with pytest.raises(KeyFileError, match="no key"):
        ring.remove("k-unknown")
    ring.remove(old_id)
    assert KeyRing.load(tmp_path / "k.json").key_id_for(token) is None
    with pytest.raises(DecodeError):
        ring.decrypt(token)


def test_garbage_token_is_a_decode_error(tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path / "k.json")
    with pytest.raises(DecodeError):
        ring.decrypt(b"not a fernet token")
    with pytest.raises(DecodeError):
        ring.reencrypt(b"not a fernet token")


def test_file_is_json_with_versions(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    ring = KeyRing.load(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["keys"][0]["id"] == ring.primary.id
    assert 0 <= ring.primary_age_days() < 1


def test_first_use_race_adopts_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes creating the key file at once must end up with the same key.

    The race is made deterministic: the file appears after this process looked for
    it and before it wrote its own.
    """
    path = tmp_path / "keys" / "k.json"
    winner = KeyRing.load(path)
    token = winner.encrypt(b"from the winner")
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: False if p == path else real_exists(p))
    loser = KeyRing.load(path)
    monkeypatch.undo()
    assert loser.primary == winner.primary
    assert loser.decrypt(token) == b"from the winner"
    assert KeyRing.load(path).primary == winner.primary
    assert sorted(p.name for p in path.parent.iterdir()) == ["k.json"]
