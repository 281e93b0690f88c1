"""SSRF guard: webhook destinations in private, loopback or link-local ranges are refused.

``validate_url`` checks syntax and ``check_literal`` an IP-literal host (at registration);
``check_destination`` resolves
the host and checks every address (at connect time), so a hostname that
resolves to a private address is refused too. ``MESH_ALLOW_PRIVATE_TARGETS=1``
lifts the address check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from mesh.errors import ValidationError


class DestinationRefused(ValidationError):
    pass


def validate_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"invalid webhook URL {url!r}: use http(s)://host[:port]/path")
    try:
        _ = parts.port
    except ValueError:
        raise ValidationError(f"invalid webhook URL {url!r}: bad port") from None
    return url


def is_forbidden(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.ip_network("fc00::/7"))
    )


def forbidden_reason(host: str, addr: str) -> str:
    """Why ``host`` is refused when it resolved to the forbidden ``addr``."""
    return (
        f"destination {host!r} resolves to a private/loopback/link-local address"
        f" ({addr}); set MESH_ALLOW_PRIVATE_TARGETS=1 to allow it"
    )


def check_literal(url: str, allow_private: bool) -> None:
    """At registration: refuse a URL whose host is a forbidden IP literal, with the egress's
    words (a hostname is only checked when it is resolved, at delivery)."""
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    try:
        forbidden = is_forbidden(host)
    except ValueError:
        return  # a name, not an address
    if forbidden:
        raise DestinationRefused(forbidden_reason(host, host))


async def check_destination(url: str, allow_private: bool) -> None:
    """Raise DestinationRefused when the URL's host resolves to a forbidden address."""
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    port = urlsplit(url).port or (443 if url.startswith("https") else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DestinationRefused(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
    for info in infos:
        addr = str(info[4][0])
        if is_forbidden(addr):
            raise DestinationRefused(forbidden_reason(host, addr))
