"""The DNS service's side of the DNSSEC seam, and the in-process Resolver.

The validator itself (protocols/dns/dnssec) is tested against signed zones and a validating
Unbound oracle in the test_dnssec_* files. Here the lab zone is unsigned, so these tests put a
stand-in validator in its place: a fake, allowed because the real one cannot produce "secure" or a
chosen EDE on unsigned data. They prove what the service does with each result: AD bit, SERVFAIL +
EDE, CD=1 bypass, RRSIG stripping, the status cached with the entry, fail-closed on errors.
"""

from __future__ import annotations

import logging
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest
from dnsfront_lab import dig, pick_ip

from protocols.dns.dnssec import ValidationResult
from protocols.dns.forwarder import NoValidator
from protocols.dns.resolver import Resolver
from tests.protocols.dns.conftest import PROXY_IP, needs_peers, up_yaml

pytestmark = [needs_peers, pytest.mark.lab]


class StandInValidator:
    """Answers by qname from a table; counts calls (see the module docstring for why a fake)."""

    def __init__(self, table: dict[str, tuple[str, int | None]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int, bool]] = []

    async def validate(self, qname: dns.name.Name, rdtype: int, response: dns.message.Message) -> ValidationResult:
        name = qname.to_text(omit_final_dot=True).lower()
        # the upstream was asked with DO=1 and CD=1
        self.calls.append((name, int(rdtype), bool(response.ednsflags & dns.flags.DO)))
        status, ede = self.table.get(name, ("insecure", None))
        return ValidationResult(status, ede, f"stand-in says {status}", 120 if status == "bogus" else None)


async def _validating_proxy(make_proxy, upstream1, table):
    p = await make_proxy(up_yaml(upstream1), "dnssec: validate")
    v = StandInValidator(table)
    p.svc.fw.validator = v
    return p, v


TABLE = {"www.lab.test": ("secure", None), "short.lab.test": ("bogus", 7), "mx.lab.test": ("indeterminate", 5)}


async def test_secure_sets_ad_for_do_or_ad_guests(make_proxy, upstream1) -> None:
    p, v = await _validating_proxy(make_proxy, upstream1, TABLE)
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A", "+dnssec", "+noadflag")
    assert r.status == "NOERROR" and "ad" in r.flags, r.text
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A", "+adflag")
    assert "ad" in r.flags
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A", "+noadflag")
    assert "ad" not in r.flags and r.answers
    # validated once per cache variant; hits reuse the stored status
    assert [c for c in v.calls if c[0] == "www.lab.test"] == [("www.lab.test", 1, True)] * 2
    assert [x["dnssec"] for x in p.records()] == ["secure"] * 3
    assert [x["cache"] for x in p.records()] == ["miss", "miss", "hit"]


async def test_insecure_never_sets_ad(make_proxy, upstream1) -> None:
    p, _ = await _validating_proxy(make_proxy, upstream1, TABLE)
    r = await dig(PROXY_IP, p.port, "alias.lab.test", "A", "+dnssec")
    assert r.status == "NOERROR" and "ad" not in r.flags
    assert p.records()[-1]["dnssec"] == "insecure"


async def test_bogus_is_servfail_with_ede_and_bad_cache(make_proxy, upstream1) -> None:
    p, v = await _validating_proxy(make_proxy, upstream1, TABLE)
    for _ in range(2):
        r = await dig(PROXY_IP, p.port, "short.lab.test", "A")
        assert r.status == "SERVFAIL" and r.ede == [(7, "stand-in says bogus")], r.text
        assert not r.answers
    assert len([c for c in v.calls if c[0] == "short.lab.test"]) == 1  # the bad cache held it
    recs = p.records("short.lab.test")
    assert [x["cache"] for x in recs] == ["miss", "hit"]
    assert recs[0]["dnssec"] == "bogus" and recs[0]["error"] == "stand-in says bogus" and recs[0]["ede"] == 7


async def test_indeterminate_is_servfail_and_not_cached(make_proxy, upstream1) -> None:
    p, v = await _validating_proxy(make_proxy, upstream1, TABLE)
    for _ in range(2):
        r = await dig(PROXY_IP, p.port, "mx.lab.test", "MX")
        assert r.status == "SERVFAIL" and r.ede and r.ede[0][0] == 5
    assert len([c for c in v.calls if c[0] == "mx.lab.test"]) == 2


async def test_cd_guest_gets_data_without_validation(make_proxy, upstream1) -> None:
    p, v = await _validating_proxy(make_proxy, upstream1, TABLE)
    r = await dig(PROXY_IP, p.port, "short.lab.test", "A", "+cdflag", "+dnssec")
    assert r.status == "NOERROR" and r.answers and "ad" not in r.flags and "cd" in r.flags
    assert not any(c[0] == "short.lab.test" for c in v.calls)
    r = await dig(PROXY_IP, p.port, "short.lab.test", "A")  # a CD=0 guest still gets SERVFAIL
    assert r.status == "SERVFAIL"


async def test_validator_failure_fails_closed(make_proxy, upstream1) -> None:
    class Broken:
        async def validate(self, *a):
            raise RuntimeError("boom")

    p = await make_proxy(up_yaml(upstream1), "dnssec: validate")
    p.svc.fw.validator = Broken()
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A")
    assert r.status == "SERVFAIL" and r.ede and r.ede[0][0] == 6
    p.svc.fw.validator = NoValidator()  # dnssec: validate but the validator package is missing
    r = await dig(PROXY_IP, p.port, "www.lab.test", "AAAA")
    assert r.status == "SERVFAIL" and r.ede == [(0, "DNSSEC validator not installed")]


# -- the in-process Resolver -------------------------------------------------------------------

async def test_resolver_follows_cnames_and_reports_status(tmp_path, upstream1, lab_ca) -> None:
    from tests.protocols.dns.conftest import settings_from_yaml

    s = settings_from_yaml(f"""
    dns:
      ca_file: {lab_ca.ca_pem}
      dnssec: off
      upstreams:
        - {{address: "{upstream1.address}:853", name: {upstream1.name}}}
    """, tmp_path)
    r = Resolver.from_settings(s, log=logging.getLogger("test.resolver"))
    try:
        a = await r.resolve_validated("alias.lab.test", "A")
        assert a.rcode == dns.rcode.NOERROR and [x.address for x in a.rrset] == ["192.0.2.10"]
        assert a.status == "insecure" and a.ttl == 300 and a.ede is None
        mx = await r.resolve_validated("mx.lab.test.", dns.rdatatype.MX)
        assert [(x.preference, x.exchange.to_text()) for x in mx.rrset] == [(10, "mail.lab.test.")]
        nx = await r.resolve_validated(f"nx{time.time_ns()}.lab.test", "TXT")
        assert nx.rcode == dns.rcode.NXDOMAIN and nx.rrset == []
        again = await r.resolve_validated("alias.lab.test", "A")  # from the cache
        assert again.rrset == a.rrset and again.ttl <= 300
        r.fw.validator = StandInValidator(TABLE)
        r.fw.cache.clear()
        bogus = await r.resolve_validated("short.lab.test", "A")
        assert bogus.rcode == dns.rcode.SERVFAIL and bogus.status == "bogus" and bogus.ede == 7
        sec = await r.resolve_validated("www.lab.test", "A")
        assert sec.secure and sec.rrset
    finally:
        await r.close()


async def test_resolver_unreachable(tmp_path, lab_ca) -> None:
    from tests.protocols.dns.conftest import settings_from_yaml

    s = settings_from_yaml(f"""
    dns:
      ca_file: {lab_ca.ca_pem}
      dnssec: off
      timeouts: {{query: 1s, upstream: 500ms, connect: 500ms}}
      upstreams:
        - {{address: "{pick_ip()}:853", name: nobody.lab.test}}
    """, tmp_path)
    r = Resolver.from_settings(s)
    try:
        res = await r.resolve_validated("www.lab.test", "A")
        assert res.rcode == dns.rcode.SERVFAIL and res.ede == 22 and res.rrset == []
    finally:
        await r.close()
