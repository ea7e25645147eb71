"""Listen addresses and restart-only settings, written once for every protocol service.

Owns: reading `listen: ["ip:port", ...]` (one address or a list) into `(host, port)` tuples with
located `FILE:LINE:COL` errors — the default port, the IP-literal rule and its wording, the
"empty list" rule and the "used by two listeners" check — for the protocol sections and the admin
listener; and `restart_only_changes` / `warn_restart_only`, the one comparison and log line for
settings a reload cannot apply (listeners, spool, `workers`).
Must not: bind, resolve names, or know any one protocol's section (callers pass their words).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from policy.source import Node
from protocols.addr import hostport

Address = tuple[str, int]


def is_ip(host: str) -> bool:
    """An IP literal as `ipaddress` reads it (an IPv6 zone like `fe80::1%eth0` included)."""
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host) is not None
    return False


@dataclass(frozen=True, slots=True)
class IPOnly:
    """An address that must be an IP literal (we bind it, or a name would need the host's plain
    resolver). `message` is formatted with `what`, `host` and `value` (the text as written)."""

    message: str = "{what} {host!r} must be an IP address"
    hint: str = ""
    accepts: Callable[[str], bool] = is_ip


def parse_address(node: Node, default_port: int | None = None, *, what: str = "listen address",
                  ip: IPOnly | None = IPOnly()) -> Address:
    """One "host:port" / "[v6]:port" (port optional when `default_port` is given); `ip=None`
    accepts a host name."""
    host, port = node.hostport(default_port=default_port, what=what)
    if ip is not None and not ip.accepts(host):
        raise node.fail(ip.message.format(what=what, host=host, value=node.value), ip.hint)
    return host, port


def parse_listen(node: Node, default_port: int, *, items: str = "listen addresses", what: str = "listen address",
                 ip: IPOnly | None = IPOnly(), empty: tuple[str, str] | None = None,
                 seen: dict[Address, str] | None = None, kind: str = "") -> tuple[Address, ...]:
    """A listen list (a single scalar counts as one item). `items` names the list in a type error;
    `empty` = (message, hint) refuses an empty list; `seen` (address -> kind, shared by a section's
    listener lists) refuses an address already used by another listener of `kind`'s section."""
    nodes = node.get_list(items, allow_scalar=True)
    if not nodes and empty is not None:
        raise node.fail(*empty)
    out: list[Address] = []
    for item in nodes:
        addr = parse_address(item, default_port, what=what, ip=ip)
        if seen is not None:
            if addr in seen:
                raise item.fail(f"{hostport(*addr)} is used by both {seen[addr]} and {kind} listeners")
            seen[addr] = kind
        out.append(addr)
    return tuple(out)


def restart_only_changes(old: Any, new: Any, fields: Iterable[str]) -> list[str]:
    """The `fields` whose value differs between two settings objects (in the order given)."""
    return [f for f in fields if getattr(old, f) != getattr(new, f)]


def warn_restart_only(log: logging.Logger, service: str, old: Any, new: Any, fields: Iterable[str]) -> list[str]:
    """On reload: log once which restart-only settings changed (the running ones stay) and
    return them."""
    changed = restart_only_changes(old, new, fields)
    if changed:
        log.warning("%s: %s changed; only a restart applies that (the running ones stay)",
                    service, ", ".join(changed))
    return changed
