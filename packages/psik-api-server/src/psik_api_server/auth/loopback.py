"""Which addresses and ``Host`` names are this machine's own: what ``authz: local``
serves (:mod:`.local`) and where ``psik-api-server serve`` agrees to listen (``cli``)."""

from __future__ import annotations

import ipaddress
import re

#: An IP address, IPv4-mapped IPv6 ones as their IPv4 address.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_of(text: str) -> IPAddress | None:
    """``text`` as an IP address (a zone, ``%eth0``, dropped; IPv4-mapped IPv6 as IPv4),
    None when it is a name or no address at all."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and others."""
    ip = ip_of(host)
    if ip is None:
        return host == "localhost"
    return ip.is_loopback


_PORT = re.compile(r"(:[0-9]{1,5})?")


def is_loopback_authority(host: str) -> bool:
    """A ``Host`` header naming this machine by a name no DNS answer can change:
    ``localhost``, an IPv4 loopback address, ``[::1]``; with any port or none."""
    host = host.lower()
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or not _PORT.fullmatch(port):
            return False
        try:
            return ipaddress.IPv6Address(name).is_loopback
        except ValueError:
            return False
    name, _, port = host.partition(":")
    if not _PORT.fullmatch(host[len(name) :]):
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False
