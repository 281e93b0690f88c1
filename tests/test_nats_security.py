"""The mesh against a nats-server that requires a user and TLS (certificates made here)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import BrokerUnavailable
from tests.conftest import env_for

USER, PASSWORD = "meshsvc", "s3cret-pass-for-test"


def _write_pki(d: Path) -> dict[str, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def secure_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    pki = _write_pki(tmp_path)
    conf = tmp_path / "secure.conf"
    conf.write_text(
        f"""
tls {{
  cert_file: "{pki["cert"]}"
  key_file: "{pki["key"]}"
  ca_file: "{pki["ca"]}"
  timeout: 2
}}
authorization {{
  users: [ {{ user: "{USER}", password: "{PASSWORD}" }} ]
}}
"""
    )
    b = EmbeddedBroker(tmp_path / "nats", port=free_port(), extra_args=["-c", str(conf)])
    b.start()
    yield b, pki
    b.stop()


def _settings(tmp_path: Path, url: str, ca: Path, password: str) -> Settings:
    return Settings(
        home=tmp_path / "home",
        nats_url=url,
        nats_user=USER,
        nats_password=password,
        nats_tls_ca=ca,
        connect_timeout=2,
    )


async def test_publish_and_consume_over_tls_with_user(secure_broker, tmp_path: Path) -> None:
    broker, pki = secure_broker
    s = _settings(tmp_path, f"tls://127.0.0.1:{broker.port}", pki["ca"], PASSWORD)
    async with MeshClient(s) as c:
        await c.init()
        from mesh.registry import Target, TargetKind

        await c.add_target(Target(name="billing", kind=TargetKind.NATS))
        await c.add_propagation("unidirectional", "shop", ["billing"])
        eid = await c.publish("shop", "order.created", {"n": 1})
        async for d in c.consume("billing"):
            assert d.event.id == eid
            assert d.event.data == {"n": 1}
            await d.ack()
            break
        assert c.nc.connected_url is not None and c.nc.connected_url.scheme == "tls"


async def test_wrong_password_is_a_clear_error(secure_broker, tmp_path: Path) -> None:
    broker, pki = secure_broker
    s = _settings(tmp_path, f"tls://127.0.0.1:{broker.port}", pki["ca"], "wrong")
    client = MeshClient(s, reconnect_forever=False)
    with pytest.raises(BrokerUnavailable) as info:
        await client.connect()
    msg = str(info.value)
    assert "authorization" in msg.lower()
    assert "wrong" not in msg  # the password never appears in an error


async def test_untrusted_server_certificate_is_refused(secure_broker, tmp_path: Path) -> None:
    broker, _ = secure_broker
    (tmp_path / "other").mkdir()
    other = _write_pki(tmp_path / "other")
    s = _settings(tmp_path, f"tls://127.0.0.1:{broker.port}", other["ca"], PASSWORD)
    client = MeshClient(s, reconnect_forever=False)
    with pytest.raises(BrokerUnavailable) as info:
        await client.connect()
    assert "certificate" in str(info.value)


def test_cli_wrong_credentials_one_line(secure_broker, tmp_path: Path) -> None:
    broker, pki = secure_broker
    s = _settings(tmp_path, f"tls://127.0.0.1:{broker.port}", pki["ca"], "wrong")
    env = env_for(s)
    env.update(
        {
            "MESH_NATS_USER": USER,
            "MESH_NATS_PASSWORD": "wrong-password-xyz",
            "MESH_NATS_TLS_CA": str(pki["ca"]),
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", "from mesh.cli import main; main()", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "authorization" in lines[0].lower()
    assert "wrong-password-xyz" not in proc.stderr + proc.stdout
