"""Keep only what validation covered.

Owns: `scrub(qname, rdtype, response)`, a copy of the response whose answer section holds only the
chain the validator followed (DNAME/CNAME links from qname, the final RRset, their RRSIGs and the
CNAMEs synthesised from DNAMEs) and whose authority section holds only denial material (SOA, NSEC,
NSEC3, their RRSIGs) and NS RRsets at or above the final name. An upstream (or a poisoned upstream
cache) cannot then slip unvalidated records for other names into an answer we mark AD=1.
Must not: judge signatures (the validator does) or touch the additional section (never covered by AD).
"""

from __future__ import annotations

import copy

import dns.message
import dns.name
import dns.rdatatype

_CNAME, _DNAME, _RRSIG = dns.rdatatype.CNAME, dns.rdatatype.DNAME, dns.rdatatype.RRSIG
_DENIAL = frozenset({dns.rdatatype.SOA, dns.rdatatype.NSEC, dns.rdatatype.NSEC3})


def scrub(qname: dns.name.Name, rdtype: int, response: dns.message.Message, max_chain: int = 12) -> dns.message.Message:
    keep: set[tuple[dns.name.Name, int]] = set()  # (owner, type) kept in the answer section
    sname = qname
    for _ in range(max_chain):
        if any(r.name == sname and r.rdtype == rdtype for r in response.answer):
            keep.add((sname, rdtype))
            break
        dname = next((r for r in response.answer if r.rdtype == _DNAME and sname.is_subdomain(r.name)
                      and sname != r.name), None) if rdtype != _DNAME else None
        if dname is not None:
            keep.add((dname.name, _DNAME))
            keep.add((sname, _CNAME))  # the synthesised CNAME clients expect
            try:
                sname = sname.relativize(dname.name).concatenate(dname[0].target)
            except dns.name.NameTooLong:
                break
            continue
        cname = next((r for r in response.answer if r.name == sname and r.rdtype == _CNAME), None)
        if cname is None or rdtype == _CNAME:
            break
        keep.add((sname, _CNAME))
        sname = cname[0].target
    out = copy.copy(response)
    out.sections = [list(sec) for sec in response.sections]  # `answer` etc. are views of `sections`
    out.answer = [r for r in response.answer
                  if (r.name, r.covers if r.rdtype == _RRSIG else r.rdtype) in keep]
    out.authority = [r for r in response.authority
                     if (r.covers if r.rdtype == _RRSIG else r.rdtype) in _DENIAL
                     or (r.rdtype == dns.rdatatype.NS and sname.is_subdomain(r.name))]
    return out
