"""Egress policy for addresses that users choose: a job's callback URL.

A caller of ``POST /v1/jobs`` names the URL the server will POST the finished job to. Without a
policy that lets any caller make the server reach what only the server can reach: its own
loopback services, the private network behind it, the cloud metadata endpoint that hands out
credentials. `check_callback_url` refuses, with the stable code ``callback_not_allowed`` (HTTP 400):

- schemes other than ``http`` and ``https``, and URLs without a host;
- loopback (127.0.0.0/8, ::1, ``localhost`` and ``*.localhost``), private (10/8, 172.16/12,
  192.168/16, fc00::/7), link-local (169.254/16, fe80::/10), unspecified (0.0.0.0, ::),
  multicast and reserved addresses, and anything else that is not globally routable (shared
  100.64/10, documentation and benchmarking ranges);
- cloud metadata endpoints (169.254.169.254, fd00:ec2::254, 100.100.100.200,
  ``metadata.google.internal``): these stay refused even inside an allowed network.

A literal address is judged as written (IPv4-mapped IPv6 such as ``::ffff:10.0.0.1`` as its IPv4
address). A hostname is resolved and refused if ANY of its addresses is refused, so a name with
one public and one private record cannot slip through. A name that does not resolve is refused
with ``callback_unresolvable``: that one may be transient, a caller delivering may try again.

Operators exempt their own receivers with ``jobs.callback_allow``: hostnames (``hooks.internal``),
subdomain patterns (``*.hooks.internal``), addresses or networks (``127.0.0.1``, ``10.0.0.0/8``).
An allowed hostname is trusted whatever it resolves to; an allowed network exempts the resolved
addresses inside it.

When the check runs: once when a job is submitted (a bad URL is a 400 at once) and again right
before every delivery attempt, because DNS answers change. The HTTP client then resolves the name
once more to connect, so a DNS-rebinding attacker who answers the check with a public address and
the connection with a private one a moment later still has a small window: checking at send time
narrows it, it does not close it. Closing it needs the connection pinned to the checked address
(or an egress proxy that applies the same rules).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_SETTING = "jobs.callback_allow"
SCHEMES = ("http", "https")
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)


class CallbackNotAllowed(BadRequest):
    """A callback URL the egress policy refuses (HTTP 400, code ``callback_not_allowed``, or
    ``callback_unresolvable`` for a hostname that does not resolve)."""

    code = "callback_not_allowed"


@dataclass(frozen=True)
class EgressAllow:
    """The operator's exemptions, parsed: exact hostnames, ``*.domain`` suffixes and networks."""

    hosts: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> EgressAllow:
        hosts: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                suffixes.append(entry[1:])  # keeps the dot: "*.a.b" matches "x.a.b", not "a.b"
            elif entry:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(suffixes), tuple(networks))

    def names(self, host: str) -> bool:
        return host in self.hosts or host.endswith(self.suffixes)

    def covers(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def check_callback_url(url: str, allow: Iterable[str] = ()) -> None:
    """Refuse `url` unless it is http(s) to a public address or to a host `allow` exempts.

    `allow` is ``settings.jobs.callback_allow``. Raises `CallbackNotAllowed` (``.code`` is
    ``callback_not_allowed``, or ``callback_unresolvable`` when a hostname does not resolve); returns
    None when the URL may be called. Hostnames are resolved with `socket.getaddrinfo`, which blocks:
    from async code run it in a thread (``await asyncio.to_thread(check_callback_url, url, allow)``).
    Call it right before each delivery attempt, not only when the URL is first accepted.
    """
    host, port = _host_and_port(url)
    if host in METADATA_HOSTS:
        raise _refused(host, "a cloud metadata endpoint", allowable=False)
    rules = EgressAllow.parse(allow)
    if rules.names(host):
        return
    literal = _literal_address(host)
    if literal is None and (host == "localhost" or host.endswith(".localhost")):
        raise _refused(host, "a loopback address")
    addresses = [literal] if literal is not None else _resolve(host, port)
    for address in addresses:
        reason = refusal_reason(address)
        if reason is None:
            continue
        if address_is_metadata(address):
            raise _refused(host, reason, resolved=literal is None, allowable=False)
        if not rules.covers(address):
            raise _refused(host, reason, resolved=literal is None)


def refusal_reason(address: IPAddress) -> str | None:
    """Why a connection to `address` is refused ("a private address", ...), or None if it is public."""
    address = _unmapped(address)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "a non-public address"),
    )
    return next((reason for refused, reason in checks if refused), None)


def address_is_metadata(address: IPAddress) -> bool:
    return _unmapped(address) in METADATA_ADDRESSES


def _host_and_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise CallbackNotAllowed("callback_url must be an http:// or https:// URL")
    try:
        port = parts.port
    except ValueError:
        raise CallbackNotAllowed("callback_url has an invalid port") from None
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise CallbackNotAllowed("callback_url has no host: use http(s)://HOST/path")
    return host, port or (443 if scheme == "https" else 80)


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError; bad IDNA labels a UnicodeError
        infos = []
    addresses = []
    for _family, _type, _proto, _name, sockaddr in infos:
        literal = _literal_address(str(sockaddr[0]))
        if literal is not None:
            addresses.append(literal)
    if not addresses:
        raise CallbackNotAllowed(f"callback host {host!r} does not resolve", code="callback_unresolvable")
    return addresses


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour  # 6to4 (2002::/16) carries an IPv4 address too
        if mapped is not None:
            return mapped
        if address.scope_id:
            return ipaddress.IPv6Address(str(address).split("%", 1)[0])
    return address


def _refused(host: str, reason: str, *, resolved: bool = False, allowable: bool = True) -> CallbackNotAllowed:
    what = f"callback host {host!r} resolves to {reason}" if resolved else f"callback host {host!r} is {reason}"
    fix = f"; an operator can allow it in {ALLOW_SETTING}" if allowable else " and is never allowed"
    return CallbackNotAllowed(what + fix)
