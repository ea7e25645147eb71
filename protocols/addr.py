"""The one way the product writes a socket address as text: `hostport(host, port)`.

Owns: "a.b.c.d:port" for IPv4 and names, "[v6]:port" for IPv6 (RFC 3986 authority form), used for
`src`, `orig_dst` and upstream addresses in audit records, log lines and /healthz listeners.
Must not: resolve names or import anything of ours (every layer may use it).
"""

from __future__ import annotations

from typing import Any


def hostport(host: Any, port: Any) -> str:
    """`host:port`, with an IPv6 host in brackets (an already bracketed one is kept as is)."""
    h = str(host)
    if ":" in h and not h.startswith("["):
        return f"[{h}]:{port}"
    return f"{h}:{port}"


def addr_text(addr: Any) -> str:
    """`hostport` of a socket address tuple ((host, port) or the 4-tuple of AF_INET6)."""
    return hostport(addr[0], addr[1])
