"""Settings: defaults, MESH_* variables, mesh.toml, derived paths, one-line errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from mesh.config import Settings, load_settings
from mesh.errors import ConfigError


def test_defaults() -> None:
    s = Settings()
    assert s.home == Path(".mesh")
    assert s.embedded
    assert s.servers == ["nats://127.0.0.1:4222"]
    assert s.key_path == Path(".mesh/keys/encryption.key")
    assert s.db_url == "sqlite:///.mesh/mesh.db"
    assert (s.http_port, s.bridge_port) == (9400, 9401)
    assert s.encryption is True
    assert s.max_hops == 8
    assert s.nats_store_dir == Path(".mesh/nats")
    assert s.ack_wait_min_s == 30


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_HOME", str(tmp_path))
    monkeypatch.setenv("MESH_NATS_PORT", "4333")
    monkeypatch.setenv("MESH_ENCRYPTION", "0")
    monkeypatch.setenv("MESH_ALLOW_PRIVATE_TARGETS", "1")
    s = load_settings()
    assert s.servers == ["nats://127.0.0.1:4333"]
    assert s.key_path == tmp_path / "keys" / "encryption.key"
    assert s.db_url == f"sqlite:///{tmp_path / 'mesh.db'}"
    assert s.encryption is False
    assert s.allow_private_targets is True


def test_nats_url_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_NATS_URL", "nats://a:4222, nats://b:4222,")
    s = load_settings()
    assert not s.embedded
    assert s.servers == ["nats://a:4222", "nats://b:4222"]


def test_explicit_paths_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_KEY_FILE", str(tmp_path / "my.key"))
    monkeypatch.setenv("MESH_DB_URL", "postgresql://u@h/db")
    s = load_settings()
    assert s.key_path == tmp_path / "my.key"
    assert s.db_url == "postgresql://u@h/db"


def test_toml_file_and_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "mesh.toml"
    toml.write_text('home = "/srv/mesh"\nnats_port = 5000\nmax_hops = 3\n')
    monkeypatch.setenv("MESH_CONFIG", str(toml))
    monkeypatch.setenv("MESH_NATS_PORT", "6000")
    s = load_settings()
    assert s.home == Path("/srv/mesh")
    assert s.max_hops == 3
    assert s.nats_port == 6000  # environment beats the file
    assert load_settings(nats_port=7000).nats_port == 7000  # arguments beat both


@pytest.mark.parametrize(
    ("var", "value", "name"),
    [
        ("MESH_NATS_PORT", "eighty", "MESH_NATS_PORT"),
        ("MESH_NATS_PORT", "70000", "MESH_NATS_PORT"),
        ("MESH_HTTP_PORT", "-1", "MESH_HTTP_PORT"),
        ("MESH_ENCRYPTION", "maybe", "MESH_ENCRYPTION"),
        ("MESH_ACK_WAIT_MIN_S", "0", "MESH_ACK_WAIT_MIN_S"),
    ],
)
def test_invalid_setting_is_one_line(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, name: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert name in msg
    assert "\n" not in msg


def test_connect_options_pass_credentials(tmp_path: Path) -> None:
    s = Settings(nats_url="tls://h:4222", nats_user="u", nats_password="p", connect_timeout=2)
    opts = s.connect_options()
    assert opts["servers"] == ["tls://h:4222"]
    assert (opts["user"], opts["password"], opts["connect_timeout"]) == ("u", "p", 2)
    assert "tls" not in opts
    tok = Settings(nats_token="t", nats_creds=tmp_path / "x.creds").connect_options()
    assert tok["token"] == "t"
    assert tok["user_credentials"] == str(tmp_path / "x.creds")


def test_connect_options_tls_context() -> None:
    ca = ssl.get_default_verify_paths().cafile
    if ca is None:
        pytest.skip("no system CA file to build a TLS context from")
    opts = Settings(nats_tls_ca=Path(ca)).connect_options()
    assert isinstance(opts["tls"], ssl.SSLContext)


def test_broken_toml_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "mesh.toml"
    toml.write_text("home = \n")
    monkeypatch.setenv("MESH_CONFIG", str(toml))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()
