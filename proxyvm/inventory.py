"""Guest inventory: which guest (VM instance) a source address belongs to.

Owns: the `Guest` value (name, addresses, MAC), the address normalisation every service relies
on (IPv4-mapped IPv6 -> IPv4, scope ids stripped, canonical text), and the `Inventory` lookup.
Must not: parse YAML (see `proxyvm.config`), learn addresses from traffic, or ever answer a name
for an address that was not configured: anything not listed is "unknown".
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

UNKNOWN = "unknown"
"""The guest name of every source that is not listed; reserved (no guest may be called this)."""

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_MAC = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$")
GUEST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def normalise_address(address: str) -> str | None:
    """Canonical text of an IP address as guests are keyed: "::ffff:198.18.0.10" -> "198.18.0.10",
    "fe80::1%eth1" -> "fe80::1", "FD00:0::11" -> "fd00::11". None when it is not an IP address.

    The canonical form is the C library's `inet_ntop`, the very text Python sockets report for
    a peer, so the first dict lookup in `Inventory.lookup` hits without any parsing; the C calls
    keep the miss path (unknown sources) cheap too."""
    text = address.strip()
    if "%" in text:
        text = text.split("%", 1)[0]
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    if packed[:12] == _V4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def normalise_mac(mac: str) -> str | None:
    """"52-54-00-AA-00-11" -> "52:54:00:aa:00:11"; None when it is not a 48-bit MAC."""
    text = mac.strip().lower()
    if not _MAC.match(text):
        return None
    return text.replace("-", ":")


@dataclass(frozen=True, slots=True)
class Guest:
    """One VM instance on the bridge, as policy rules name it."""

    name: str
    addresses: tuple[str, ...]  # canonical text (see normalise_address)
    mac: str | None = None  # lower-case, colon-separated


class Inventory:
    """Source address -> guest name, one dict lookup per request.

    Implements `protocols.base.GuestLookup`. Built once per config load; a reload swaps a new
    table in with `replace()`, so every service holding this object sees new guest addresses."""

    __slots__ = ("_by_address", "_by_mac", "_count", "guests", "names")

    def __init__(self, guests: Mapping[str, Guest] | Iterable[Guest] = ()) -> None:
        items = list(guests.values()) if isinstance(guests, Mapping) else list(guests)
        by_address: dict[str, str] = {}
        aliases: dict[str, str] = {}
        by_mac: dict[str, str] = {}
        table: dict[str, Guest] = {}
        for g in items:
            if g.name == UNKNOWN or not GUEST_NAME.match(g.name):
                raise ValueError(f"bad guest name {g.name!r}")
            if g.name in table:
                raise ValueError(f"guest {g.name!r} listed twice")
            table[g.name] = g
            for a in g.addresses:
                key = normalise_address(a)
                if key is None:
                    raise ValueError(f"guest {g.name!r}: bad address {a!r}")
                if by_address.setdefault(key, g.name) != g.name:
                    raise ValueError(f"address {key} belongs to {by_address[key]!r} and {g.name!r}")
                if ":" not in key:
                    # Dual-stack sockets report IPv4 peers as "::ffff:a.b.c.d": answer that
                    # spelling from the dict too, without parsing.
                    aliases[f"::ffff:{key}"] = g.name
            if g.mac is not None:
                mac = normalise_mac(g.mac)
                if mac is None:
                    raise ValueError(f"guest {g.name!r}: bad MAC {g.mac!r}")
                if by_mac.setdefault(mac, g.name) != g.name:
                    raise ValueError(f"MAC {mac} belongs to {by_mac[mac]!r} and {g.name!r}")
        self._by_address = {**aliases, **by_address}
        self._count = len(by_address)
        self._by_mac = by_mac
        self.guests: Mapping[str, Guest] = table
        self.names: frozenset[str] = frozenset(table)

    def replace(self, other: Inventory) -> None:
        """Take `other`'s tables (a reload). Lookups see either the old or the new table whole:
        the address dict is swapped in one assignment."""
        self._by_mac = other._by_mac
        self._count = other._count
        self.guests = other.guests
        self.names = other.names
        self._by_address = other._by_address

    def lookup(self, address: str) -> str:
        """The guest owning `address` (IPv4/IPv6 text as a socket reports it), or "unknown"."""
        name = self._by_address.get(address)  # fast path: sockets already give canonical text
        if name is not None:
            return name
        key = normalise_address(address)
        if key is None:
            return UNKNOWN
        return self._by_address.get(key, UNKNOWN)

    def by_mac(self, mac: str) -> str:
        """The guest with this MAC address, or "unknown"."""
        key = normalise_mac(mac)
        if key is None:
            return UNKNOWN
        return self._by_mac.get(key, UNKNOWN)

    def __len__(self) -> int:
        return len(self.guests)

    def __repr__(self) -> str:
        return f"Inventory({len(self.guests)} guests, {self._count} addresses)"
