"""Outbound HTTP to addresses a tenant chose (webhooks): refuse the server's own networks.

A `notify.url` is attacker-controlled. Without a check, the service would POST to 127.0.0.1, the cloud
metadata address or a private range and tell the tenant what answered — a port scanner inside our
network. So:

- at submit, `url_problem` refuses what is bad without asking DNS (IP literals in any spelling
  `getaddrinfo` accepts — `2130706433`, `0x7f.1`, `[::1]` — and `localhost` names);
- at delivery, `pin` resolves the host once, refuses it when any address is not a public unicast one,
  and the request is sent to the address that was checked (the `Host` header and TLS SNI carry the
  name), so a DNS answer that changes between check and connect (rebinding) cannot redirect it;
- hosts on the operator's allow list (`ALLOY_WEBHOOK_ALLOW`) are trusted as named: with a list set,
  only they are reachable, whatever they resolve to.

What the tenant reads back is a status class ("HTTP 5xx", "connection failed"), never a raw
transport error, so a failed delivery says nothing about the inside of the network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class EgressRefused(Exception):
    """The destination is not one the service may contact; the message is safe to show the tenant."""


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (what a connect would try)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(addr: Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return addr.is_global and not addr.is_multicast


def literal_address(host: str) -> Address | None:
    """The address a host written as an IP literal stands for, in any spelling the resolver accepts."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:  # legacy IPv4 forms: 2130706433, 0x7f.1, 0177.0.0.1, 127.1
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def url_problem(url: str, allow: list[str]) -> str | None:
    """Why this URL may not receive webhooks (checked without DNS), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "notify.url must be an http:// or https:// URL"
    host = parts.hostname
    if allow:
        return None if host in allow else f"notify.url host {host!r} is not in the allowed webhook hosts"
    addr = literal_address(host)
    if host.rstrip(".").lower() in _LOCAL_NAMES or (addr is not None and not is_public(addr)):
        return (f"notify.url host {host!r} is a loopback, private, link-local or reserved address: webhooks "
                "go to public hosts only (an operator can allow a host with ALLOY_WEBHOOK_ALLOW)")
    try:
        parts.port  # noqa: B018  (raises on a port out of range)
    except ValueError:
        return "notify.url has an invalid port"
    return None


@dataclass(frozen=True)
class Pinned:
    """A request target fixed to one checked address."""

    url: str  # the URL to send to (host replaced by the checked address unless allow-listed)
    headers: dict[str, str]  # Host header when the address replaced the name
    extensions: dict[str, str]  # TLS SNI / certificate name when the address replaced the name


def pin(url: str, allow: list[str], resolver: Resolver = resolve) -> Pinned:
    """Check `url` for delivery now; raises EgressRefused with a message safe to show the tenant."""
    problem = url_problem(url, allow)
    if problem is not None:
        raise EgressRefused(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    if allow:  # the operator named these hosts: trusted as named
        return Pinned(url, {}, {})
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addrs = [ipaddress.ip_address(a.split("%")[0]) for a in resolver(host, port)]
    except (OSError, UnicodeError, ValueError):
        raise EgressRefused(f"notify.url host {host!r} does not resolve") from None
    if not addrs:
        raise EgressRefused(f"notify.url host {host!r} does not resolve")
    if not all(is_public(a) for a in addrs):
        raise EgressRefused(f"notify.url host {host!r} resolves to a non-public address: webhooks go to "
                            "public hosts only")
    addr = addrs[0]
    netloc = (f"[{addr}]" if addr.version == 6 else str(addr)) + (f":{parts.port}" if parts.port else "")
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = host + (f":{parts.port}" if parts.port else "")
    ext = {"sni_hostname": host} if parts.scheme == "https" else {}
    return Pinned(target, {"host": host_header}, ext)


def status_class(code: int | None) -> str:
    """What a tenant may read about an attempt: the HTTP status class, or that no answer came."""
    if code is None:
        return "connection failed"
    return f"HTTP {code // 100}xx"
