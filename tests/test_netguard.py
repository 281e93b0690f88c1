"""SSRF guard: private, loopback, link-local and unique-local destinations are refused."""

from __future__ import annotations

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import ValidationError
from mesh.netguard import (
    DestinationRefused,
    check_destination,
    check_literal,
    forbidden_reason,
    is_forbidden,
    validate_url,
)
from mesh.registry import Target, TargetKind
from tests.support.cli import one_line_error, run_cli


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "127.1.2.3",
        "10.0.0.5",
        "172.16.4.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd12:3456::1",  # IPv6 unique-local
        "fc00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:10.1.1.1",
        "224.0.0.1",
    ],
)
def test_forbidden_addresses(addr: str) -> None:
    assert is_forbidden(addr)


@pytest.mark.parametrize("addr", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_allowed(addr: str) -> None:
    assert not is_forbidden(addr)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00::1]/x",
        "https://10.0.0.1/x",
        "http://localhost:9/x",  # a hostname that resolves to loopback
    ],
)
async def test_private_destinations_refused_unless_allowed(url: str) -> None:
    with pytest.raises(DestinationRefused) as info:
        await check_destination(url, allow_private=False)
    assert "MESH_ALLOW_PRIVATE_TARGETS" in str(info.value)
    await check_destination(url, allow_private=True)  # allowed: no error


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "not a url", "http://", "http://host:notaport/x", "file:///etc"]
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(ValidationError):
        validate_url(url)


# --- at registration (issue #14) --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:9/hook", "127.0.0.1"),
        ("https://10.1.2.3/x", "10.1.2.3"),
        ("http://169.254.169.254/latest", "169.254.169.254"),
        ("http://[::1]:8080/", "::1"),
        ("http://[fe80::1]/", "fe80::1"),
    ],
)
def test_a_private_ip_literal_is_refused_at_registration(url: str, host: str) -> None:
    with pytest.raises(DestinationRefused) as info:
        check_literal(url, allow_private=False)
    assert str(info.value) == forbidden_reason(host, host)
    check_literal(url, allow_private=True)  # the operator allowed private targets


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/", "https://example.com/", "http://localhost/"]
)
def test_names_and_public_literals_wait_for_the_egress(url: str) -> None:
    # A name is checked when the egress resolves it (DNS may change); only literals now.
    check_literal(url, allow_private=False)


async def test_mesh_target_add_refuses_a_loopback_webhook(
    settings: Settings, client: MeshClient
) -> None:
    strict = settings.model_copy(update={"allow_private_targets": False})
    p = await run_cli(strict, "target", "add", "hook", "--webhook", "http://127.0.0.1:9/x")
    one_line_error(p, forbidden_reason("127.0.0.1", "127.0.0.1"))
    assert await client.registry.list_targets() == []
    # Allowed (the fixture's settings): registered as before.
    await client.add_target(
        Target(name="hook", kind=TargetKind.WEBHOOK, url="http://127.0.0.1:9/x")
    )
    assert [t.name for t in await client.registry.list_targets()] == ["hook"]
