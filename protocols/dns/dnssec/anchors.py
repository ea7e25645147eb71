"""Trust anchors: where the chain of trust starts.

Owns: the built-in IANA root anchors (`root-anchors.txt`, DS records for KSK-2017 and KSK-2024) and
reading an operator's anchor file (DS and/or DNSKEY records in presentation format, several anchors,
any zones; `$ORIGIN`/`$TTL` and comments allowed, TTL and class optional).
Must not: fetch anything (RFC 5011 rollover tracking is not done here).
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.dsbase
import dns.zonefile


class TrustAnchorError(ValueError):
    """The anchor file is unreadable or holds no usable DS/DNSKEY record (message names file:line)."""


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """The anchors for one zone: DS records and/or DNSKEY records (either is enough)."""

    zone: dns.name.Name
    ds: tuple[dns.rdtypes.dsbase.DSBase, ...] = ()
    dnskeys: tuple[dns.rdtypes.ANY.DNSKEY.DNSKEY, ...] = ()


def parse_anchors(text: str, source: str = "<anchors>") -> dict[dns.name.Name, TrustAnchor]:
    """Parse DS/DNSKEY presentation-format records into anchors keyed by zone name."""
    try:
        rrsets = dns.zonefile.read_rrsets(
            text, origin=dns.name.root, relativize=False, default_ttl=0, rdclass=None,
            default_rdclass=dns.rdataclass.IN,
        )
    except (dns.exception.DNSException, ValueError) as exc:
        raise TrustAnchorError(str(exc).replace("<input>", source)) from exc
    ds: dict[dns.name.Name, list] = {}
    keys: dict[dns.name.Name, list] = {}
    for rrset in rrsets:
        if rrset.rdtype == dns.rdatatype.DS:
            ds.setdefault(rrset.name, []).extend(rrset)
        elif rrset.rdtype == dns.rdatatype.DNSKEY:
            keys.setdefault(rrset.name, []).extend(rd for rd in rrset if rd.flags & 0x0100)
        else:
            raise TrustAnchorError(
                f"{source}: {rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}: only DS and DNSKEY records "
                "can be trust anchors"
            )
    zones = set(ds) | set(keys)
    if not zones:
        raise TrustAnchorError(f"{source}: no DS or DNSKEY record found")
    return {z: TrustAnchor(z, tuple(ds.get(z, ())), tuple(keys.get(z, ()))) for z in zones}


def load_anchor_file(path: Path | str) -> dict[dns.name.Name, TrustAnchor]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TrustAnchorError(f"{p}: cannot read trust anchors: {exc.strerror}") from exc
    return parse_anchors(text, str(p))


def builtin_anchors() -> dict[dns.name.Name, TrustAnchor]:
    """The IANA root anchors shipped in this package."""
    text = importlib.resources.files(__package__).joinpath("root-anchors.txt").read_text()
    return parse_anchors(text, "root-anchors.txt")
