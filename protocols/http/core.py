"""Pure HTTP decisions: no sockets, no mitmproxy objects, no clock.

Owns: which headers are hop-by-hop, where an upgraded request goes (scheme and port), how an
upstream failure text maps to the cause a guest reads in a 502, which addresses the SSRF guard
refuses, whether the first bytes on a port-80 connection look like HTTP, and the short text bodies
of the answers the proxy makes itself.
Must not: perform I/O, read settings files, or know about audit records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from policy.addresses import AddressClass, internal_class

# RFC 9110 §7.6.1 plus the de-facto ones. Transfer-Encoding is hop-by-hop in theory but carries the
# body framing mitmproxy re-encodes itself, so it is left alone here.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",  # meant for us, never for the origin
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)


HOP_BY_HOP_BYTES = frozenset(h.encode() for h in HOP_BY_HOP)


def hop_by_hop_names(connection_header_values: list[str]) -> set[str]:
    """Every header that must not be forwarded: the fixed set plus those the Connection header names."""
    names = set(HOP_BY_HOP)
    for value in connection_header_values:
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


def normalize_host(host: str) -> str:
    """Lower-case, no trailing dot, no IPv6 brackets."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    return h


def authority(host: str, port: int, default_port: int = 80) -> str:
    """host[:port] for a Host header (IPv6 in brackets, the default port left out)."""
    h = f"[{host}]" if ":" in host else host
    return h if port == default_port else f"{h}:{port}"


def host_of_authority(value: str) -> str:
    """The normalized host part of a Host header value ("[fd00::1]:8080" -> "fd00::1")."""
    v = value.strip()
    if v.startswith("["):
        end = v.find("]")
        return normalize_host(v[1:end] if end > 0 else v)
    if v.count(":") == 1:
        v = v.split(":", 1)[0]
    return normalize_host(v)


@dataclass(frozen=True, slots=True)
class UpstreamPlan:
    scheme: str  # "https" | "http" (http only for plaintext rules)
    port: int


def plan_upstream(guest_port: int | None, *, plaintext: bool) -> UpstreamPlan:
    """Where a plain guest request goes. Port 80 (or none) becomes 443; another explicit port keeps
    its number but must speak TLS there. Only a plaintext rule keeps http."""
    if plaintext:
        return UpstreamPlan("http", guest_port or 80)
    if guest_port in (None, 80):
        return UpstreamPlan("https", 443)
    return UpstreamPlan("https", guest_port)


class UpstreamFailure(StrEnum):
    UNTRUSTED = "untrusted"
    NAME_MISMATCH = "name_mismatch"
    EXPIRED = "expired"
    NO_TLS = "no_tls"
    TLS_FAILED = "tls_failed"
    CONNECT_FAILED = "connect_failed"
    DNS_FAILED = "dns_failed"
    CLOSED = "closed"
    OTHER = "other"


_UNTRUSTED = re.compile(
    r"unable to get (local )?issuer|self[- ]signed|unable to verify the first certificate|"
    r"certificate signature failure|invalid CA certificate|certificate chain too long|unknown ca|"
    r"certificate rejected|certificate not trusted",
    re.IGNORECASE,
)


def classify_upstream_error(message: str) -> UpstreamFailure:
    """Map mitmproxy's/OpenSSL's error text to a stable cause."""
    m = message or ""
    low = m.lower()
    if "hostname mismatch" in low or "ip address mismatch" in low:
        return UpstreamFailure.NAME_MISMATCH
    if "certificate has expired" in low or "not yet valid" in low:
        return UpstreamFailure.EXPIRED
    if _UNTRUSTED.search(m):
        return UpstreamFailure.UNTRUSTED
    if "does not speak tls" in low or "wrong version number" in low or "packet length too long" in low or (
        "record layer failure" in low
    ):
        return UpstreamFailure.NO_TLS
    if "cannot resolve" in low or "dns" in low and "resolv" in low:
        return UpstreamFailure.DNS_FAILED
    if "certificate verify failed" in low or "tls" in low or "ssl" in low or "handshake" in low:
        return UpstreamFailure.TLS_FAILED
    if "connection refused" in low or "connect call failed" in low or "timed out" in low or (
        "no route" in low or "unreachable" in low or "errno" in low
    ):
        return UpstreamFailure.CONNECT_FAILED
    if "closed" in low:
        return UpstreamFailure.CLOSED
    return UpstreamFailure.OTHER


_CAUSE_TEXT = {
    UpstreamFailure.UNTRUSTED: "upstream certificate untrusted",
    UpstreamFailure.NAME_MISMATCH: "upstream certificate name mismatch",
    UpstreamFailure.EXPIRED: "upstream certificate expired or not yet valid",
    UpstreamFailure.NO_TLS: "upstream does not speak TLS",
    UpstreamFailure.TLS_FAILED: "upstream TLS handshake failed",
    UpstreamFailure.CONNECT_FAILED: "cannot connect to upstream",
    UpstreamFailure.DNS_FAILED: "cannot resolve upstream host",
    UpstreamFailure.CLOSED: "upstream closed the connection",
    UpstreamFailure.OTHER: "upstream error",
}


def cause_text(failure: UpstreamFailure) -> str:
    return _CAUSE_TEXT[failure]


#: Why the SSRF guard refuses an address: the product's one table of internal ranges.
Guarded = AddressClass


def guarded_address(ip: str) -> AddressClass | None:
    """The class of an internal address the SSRF guard protects, or None for a public one."""
    return internal_class(ip)


_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def looks_like_http(data: bytes) -> bool | None:
    """True: the first bytes start an HTTP/1 request line; False: they cannot; None: need more."""
    if not data:
        return None
    sp = data.find(b" ")
    if sp < 0:
        if len(data) > 32 or not _TOKEN.match(data.split(b"\r", 1)[0].split(b"\n", 1)[0] or b"x"):
            return False
        if b"\n" in data or b"\r" in data:
            return False
        return None
    method = data[:sp]
    return bool(method) and len(method) <= 32 and bool(_TOKEN.match(method)) and method.isupper()


def text_body(status: int, reason: str, detail: str = "") -> bytes:
    """The short text/plain body of a response the proxy makes itself."""
    line = f"{status} {reason}" if not detail else f"{status} {reason}: {detail}"
    return (line + "\n").encode("utf-8", "replace")


def split_path(path: str) -> str:
    """The path without the query string (which may hold secrets) or fragment."""
    return path.split("?", 1)[0].split("#", 1)[0] or "/"
