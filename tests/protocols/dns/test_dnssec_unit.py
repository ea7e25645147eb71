"""Unit tests of the pure validator on zones signed in the test (Ed25519 via `cryptography`).

The fetch here is an in-memory fake of the upstream: it serves what a real one cannot be made to serve
(NSEC3 chains above dnssec-signzone's 150-iteration cap, a fetch that blocks so concurrent callers
pile up). Real-server behaviour is covered by test_dnssec_lab.py.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import dns.dnssec
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NSEC3
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocols.dns.dnssec import (
    EDE,
    Status,
    TrustAnchorError,
    Validator,
    builtin_anchors,
    crypto,
    load_anchor_file,
    make_validator,
    parse_anchors,
)
from protocols.dns.dnssec.denial import MAX_NSEC3_ITERATIONS, nsec3_hash

N = dns.name.from_text
T = dns.rdatatype.from_text
IN = dns.rdataclass.IN
NOW = 1_800_000_000


class SignedZone:
    """A zone with one Ed25519 key that signs RRsets on demand."""

    def __init__(self, origin: str) -> None:
        self.origin = N(origin)
        self.priv = ed25519.Ed25519PrivateKey.generate()
        pub = self.priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.dnskey = dns.rdata.from_text(IN, T("DNSKEY"), f"257 3 15 {base64.b64encode(pub).decode()}")
        self.tag = crypto.key_tag(self.dnskey)

    def sign(self, rrset: dns.rrset.RRset, *, labels: int | None = None) -> dns.rrset.RRset:
        n = rrset.name
        template = dns.rdtypes.ANY.RRSIG.RRSIG(
            IN, T("RRSIG"), rrset.rdtype, 15, labels if labels is not None else len(n) - 1 - n.is_wild(),
            rrset.ttl, NOW + 86400, NOW - 86400, self.tag, self.origin, b"")
        data = dns.dnssec._make_rrsig_signature_data(rrset, template)
        sig = template.replace(signature=self.priv.sign(data))
        out = dns.rrset.RRset(n, IN, T("RRSIG"), rrset.rdtype)
        out.add(sig, rrset.ttl)
        return out

    def rrset(self, name: str, rtype: str, *rdatas: str, ttl: int = 300) -> dns.rrset.RRset:
        rds = [dns.rdata.from_text(IN, T(rtype), t, origin=self.origin, relativize=False) for t in rdatas]
        return dns.rrset.from_rdata_list(N(name, self.origin), ttl, rds)

    def dnskey_answer(self) -> dns.message.Message:
        m = response(self.origin, "DNSKEY")
        keys = dns.rrset.RRset(self.origin, IN, T("DNSKEY"))
        keys.add(self.dnskey, 300)
        m.answer += [keys, self.sign(keys)]
        return m

    def anchors(self):
        return parse_anchors(f"{self.origin} IN DNSKEY {self.dnskey.to_text()}")


def response(qname, qtype: str, rcode: int = dns.rcode.NOERROR) -> dns.message.Message:
    m = dns.message.make_response(dns.message.make_query(qname, qtype, want_dnssec=True))
    m.set_rcode(rcode)
    return m


class Fetch:
    """In-memory upstream (see module docstring); optional delay to let concurrent callers overlap."""

    def __init__(self, answers: dict[tuple[str, str], dns.message.Message], delay: float = 0.0) -> None:
        self.answers = answers
        self.delay = delay
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, name, rdtype):
        key = (name.to_text(), dns.rdatatype.to_text(rdtype))
        self.calls.append(key)
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answers[key]


def nsec3_nxdomain(z: SignedZone, qname: str, iterations: int) -> dns.message.Message:
    """An NXDOMAIN for qname with a complete closest-encloser proof at `iterations`."""
    salt = b""
    names = [z.origin, N("www", z.origin)]
    hashes = sorted(nsec3_hash(n, salt, iterations) for n in names)
    m = response(qname, "A", dns.rcode.NXDOMAIN)
    soa = z.rrset("@", "SOA", "ns hostmaster 1 3600 600 86400 300")
    m.authority += [soa, z.sign(soa)]
    for i, h in enumerate(hashes):
        nxt = hashes[(i + 1) % len(hashes)]
        owner = dns.name.Name((base64.b32hexencode(h).lower(),) + z.origin.labels)
        types = "SOA NS DNSKEY NSEC3PARAM RRSIG" if h == nsec3_hash(z.origin, salt, iterations) else "A RRSIG"
        rs = dns.rrset.from_text(owner, 300, "IN", "NSEC3",
                                 f"1 0 {iterations} - {base64.b32hexencode(nxt).decode().lower()} {types}")
        m.authority += [rs, z.sign(rs)]
    return m


async def test_nsec3_below_the_iteration_cap_proves_nxdomain():
    z = SignedZone("example.")
    v = Validator(z.anchors(), Fetch({("example.", "DNSKEY"): z.dnskey_answer()}), clock=lambda: NOW)
    r = await v.validate(N("nx.example."), T("A"), nsec3_nxdomain(z, "nx.example.", MAX_NSEC3_ITERATIONS))
    assert r.status == Status.SECURE, r


async def test_nsec3_above_the_iteration_cap_is_insecure_with_ede_27():
    z = SignedZone("example.")
    v = Validator(z.anchors(), Fetch({("example.", "DNSKEY"): z.dnskey_answer()}), clock=lambda: NOW)
    r = await v.validate(N("nx.example."), T("A"), nsec3_nxdomain(z, "nx.example.", MAX_NSEC3_ITERATIONS + 1))
    assert (r.status, r.ede) == (Status.INSECURE, EDE.UNSUPPORTED_NSEC3_ITERATIONS), r


async def test_concurrent_validations_fetch_the_keys_once():
    z = SignedZone("example.")
    fetch = Fetch({("example.", "DNSKEY"): z.dnskey_answer()}, delay=0.05)
    v = Validator(z.anchors(), fetch, clock=lambda: NOW)
    a = z.rrset("www", "A", "192.0.2.1")
    m = response("www.example.", "A")
    m.answer += [a, z.sign(a)]
    results = await asyncio.gather(*(v.validate(N("www.example."), T("A"), m) for _ in range(20)))
    assert {r.status for r in results} == {Status.SECURE}
    assert fetch.calls == [("example.", "DNSKEY")]


async def test_wildcard_answer_signed_as_exact_name_but_labels_lie_is_bogus():
    z = SignedZone("example.")
    v = Validator(z.anchors(), Fetch({("example.", "DNSKEY"): z.dnskey_answer()}), clock=lambda: NOW)
    a = z.rrset("x.wild", "A", "192.0.2.1")
    m = response("x.wild.example.", "A")
    sig = z.sign(a)
    lying = dns.rrset.RRset(a.name, IN, T("RRSIG"), T("A"))
    lying.add(sig[0].replace(labels=4), 300)  # claims more labels than the owner has
    m.answer += [a, lying]
    r = await v.validate(N("x.wild.example."), T("A"), m)
    assert r.status == Status.BOGUS


async def test_key_cache_ttl_is_capped_by_rrsig_expiry():
    z = SignedZone("example.")
    fetch = Fetch({("example.", "DNSKEY"): z.dnskey_answer()})
    clock = [NOW]
    v = Validator(z.anchors(), fetch, clock=lambda: clock[0])
    a = z.rrset("www", "A", "192.0.2.1", ttl=300)
    m = response("www.example.", "A")
    m.answer += [a, z.sign(a)]
    assert (await v.validate(N("www.example."), T("A"), m)).status == Status.SECURE
    clock[0] += 299
    await v.validate(N("www.example."), T("A"), m)
    assert len(fetch.calls) == 1  # still cached (DNSKEY TTL 300)
    clock[0] += 2
    await v.validate(N("www.example."), T("A"), m)
    assert len(fetch.calls) == 2  # TTL over: fetched again
    clock[0] = NOW + 86400 + 10  # past every RRSIG expiry
    r = await v.validate(N("www.example."), T("A"), m)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.SIGNATURE_EXPIRED)


async def test_garbage_answer_is_bogus_not_an_exception():
    z = SignedZone("example.")
    v = Validator(z.anchors(), Fetch({("example.", "DNSKEY"): z.dnskey_answer()}), clock=lambda: NOW)
    a = z.rrset("www", "A", "192.0.2.1")
    sig = z.sign(a)
    broken = dns.rrset.RRset(a.name, IN, T("RRSIG"), T("A"))
    broken.add(sig[0].replace(signature=b"\x00"), 300)  # a one-byte Ed25519 signature
    m = response("www.example.", "A")
    m.answer += [a, broken]
    r = await v.validate(N("www.example."), T("A"), m)
    assert r.status == Status.BOGUS


def test_builtin_root_anchors_are_the_iana_ksks():
    root = builtin_anchors()[dns.name.root]
    assert sorted(d.key_tag for d in root.ds) == [20326, 38696]
    assert {(d.algorithm, d.digest_type) for d in root.ds} == {(8, 2)}


@pytest.mark.parametrize("text, message", [
    ("example. IN A 192.0.2.1\n", "only DS and DNSKEY"),
    ("; nothing\n", "no DS or DNSKEY"),
    ("example. IN DS 1 8 2 00\n", "digest length"),
])
def test_bad_anchor_files_are_errors_naming_the_file(tmp_path, text, message):
    p = tmp_path / "anchors.txt"
    p.write_text(text)
    with pytest.raises(TrustAnchorError) as e:
        load_anchor_file(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_missing_anchor_file_is_an_error(tmp_path):
    with pytest.raises(TrustAnchorError, match="cannot read"):
        make_validator(type("S", (), {"dnssec": "validate", "trust_anchors": tmp_path / "nope"})(), None)


@pytest.mark.parametrize("mode", ["off", False])
def test_dnssec_off_gives_no_validator(mode):
    assert make_validator(type("S", (), {"dnssec": mode, "trust_anchors": None})(), None) is None


def test_default_settings_validate_against_builtin_anchors():
    v = make_validator(object(), None)
    assert v is not None and list(v.anchors) == [dns.name.root]


@pytest.mark.parametrize("alg, digest, usable", [(8, 2, True), (13, 4, True), (8, 1, True), (12, 3, False),
                                                 (100, 2, False), (3, 1, False), (1, 2, False)])
def test_ds_support_per_rfc_8624(alg, digest, usable):
    ds = dns.rdata.from_text(IN, T("DS"), f"1 {alg} {digest} {'00' * {1: 20, 2: 32, 3: 32, 4: 48}[digest]}")
    assert bool(crypto.usable_ds([ds])) is usable


def test_sha1_ds_is_ignored_when_a_sha256_ds_exists():
    sha1 = dns.rdata.from_text(IN, T("DS"), f"1 8 1 {'00' * 20}")
    sha256 = dns.rdata.from_text(IN, T("DS"), f"1 8 2 {'00' * 32}")
    assert crypto.usable_ds([sha1, sha256]) == [sha256]


def test_clock_is_injected_not_read():
    z = SignedZone("example.")
    v = Validator(z.anchors(), Fetch({("example.", "DNSKEY"): z.dnskey_answer()}), clock=lambda: NOW)
    a = z.rrset("www", "A", "192.0.2.1")
    m = response("www.example.", "A")
    m.answer += [a, z.sign(a)]
    # The signatures are valid around NOW (2027), whatever the machine's clock says.
    assert asyncio.run(v.validate(N("www.example."), T("A"), m)).status == Status.SECURE
    assert asyncio.run(v.validate(N("www.example."), T("A"), m, now=NOW + 2 * 86400)).ede == EDE.SIGNATURE_EXPIRED


async def test_deep_names_cannot_make_the_walk_fetch_without_bound():
    # An unsigned answer for a 40-label name in a signed zone: the walk asks DS label by label and
    # would send ~40 queries; it stops at MAX_WALK_CUTS and answers indeterminate (SERVFAIL).
    from protocols.dns.dnssec.validator import MAX_WALK_CUTS

    z = SignedZone("example.")
    answers = {("example.", "DNSKEY"): z.dnskey_answer()}
    deep = N(".".join(f"l{i}" for i in range(40)) + ".example.")
    n = deep
    while n != z.origin:
        answers[(n.to_text(), "DS")] = response(n, "DS")  # NODATA, no proof: "not a cut"
        n = n.parent()
    fetch = Fetch(answers)
    v = Validator(z.anchors(), fetch, clock=lambda: NOW)
    m = response(deep, "A")
    m.answer.append(dns.rrset.from_text(deep, 60, "IN", "A", "192.0.2.1"))
    r = await v.validate(deep, T("A"), m)
    assert r.status == Status.INDETERMINATE, r
    assert len([c for c in fetch.calls if c[1] == "DS"]) == MAX_WALK_CUTS


def _nsec_zone_answer(z: SignedZone, qname: str, covering: tuple[str, str, str]) -> dns.message.Message:
    """qname A answered from *.wild with its real signature, plus one NSEC (owner, next, types)."""
    wild = z.rrset("*.wild", "A", "192.0.2.7")
    sig = z.sign(wild)
    expanded = dns.rrset.from_rdata_list(N(qname), 300, list(wild))
    esig = dns.rrset.RRset(N(qname), IN, T("RRSIG"), T("A"))
    esig.add(sig[0], 300)
    m = response(qname, "A")
    m.answer += [expanded, esig]
    nsec = z.rrset(covering[0], "NSEC", f"{covering[1]}.example. {covering[2]}")
    m.authority += [nsec, z.sign(nsec)]
    return m


async def test_nsec_wildcard_expansion_is_secure_when_only_the_wildcard_can_answer():
    z = SignedZone("example.")
    v = Validator(z.anchors(), Fetch({("example.", "DNSKEY"): z.dnskey_answer()}), clock=lambda: NOW)
    m = _nsec_zone_answer(z, "x.wild.example.", ("*.wild", "zz", "A RRSIG NSEC"))
    assert (await v.validate(N("x.wild.example."), T("A"), m)).status == Status.SECURE


async def test_nsec_wildcard_replayed_below_an_existing_name_is_bogus():
    # b.wild exists, so a.b.wild must not be synthesised from *.wild even though NSEC b.wild -> c.wild
    # covers a.b.wild: the closest encloser is b.wild, not wild.
    z = SignedZone("example.")
    v = Validator(z.anchors(), Fetch({("example.", "DNSKEY"): z.dnskey_answer()}), clock=lambda: NOW)
    m = _nsec_zone_answer(z, "a.b.wild.example.", ("b.wild", "c.wild", "A RRSIG NSEC"))
    r = await v.validate(N("a.b.wild.example."), T("A"), m)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.NSEC_MISSING), r


@pytest.mark.skipif(not Path("/usr/share/dns/root.key").exists(), reason="dns-root-data is not installed")
def test_builtin_root_ds_match_the_real_root_ksks():
    # Debian's dns-root-data ships the IANA root KSKs as DNSKEY records: each built-in DS must be the
    # digest of one of them (so the built-in default can validate the real root zone).
    keys = load_anchor_file("/usr/share/dns/root.key")[dns.name.root].dnskeys
    for ds in builtin_anchors()[dns.name.root].ds:
        assert any(crypto.ds_matches(ds, dns.name.root, k) for k in keys), ds


def test_scrub_keeps_the_validated_chain_and_drops_strays():
    from protocols.dns.dnssec.scrub import scrub

    m = dns.message.from_text("""id 1
opcode QUERY
rcode NOERROR
flags QR RD RA
;QUESTION
www.a.example. IN A
;ANSWER
www.a.example. 300 IN CNAME x.b.example.
www.a.example. 300 IN RRSIG CNAME 15 3 300 20300101000000 20200101000000 1 a.example. AAAA
x.b.example. 300 IN CNAME x.c.example.
x.c.example. 300 IN A 192.0.2.1
bank.example. 300 IN A 203.0.113.66
bank.example. 300 IN RRSIG A 15 2 300 20300101000000 20200101000000 1 example. AAAA
;AUTHORITY
c.example. 300 IN NS ns.c.example.
evil.example. 300 IN NS ns.evil.example.
c.example. 300 IN SOA ns hm 1 2 3 4 5
;ADDITIONAL
ns.c.example. 300 IN A 192.0.2.53
""")
    s = scrub(N("www.a.example."), T("A"), m)
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in s.answer] == [
        ("www.a.example.", "CNAME"), ("www.a.example.", "RRSIG"), ("x.b.example.", "CNAME"), ("x.c.example.", "A")]
    assert {r.name.to_text() for r in s.authority} == {"c.example."}
    assert s.additional == m.additional and len(m.answer) == 6  # the original is untouched


def test_scrub_keeps_dname_and_its_synthesised_cname():
    from protocols.dns.dnssec.scrub import scrub

    m = dns.message.from_text("""id 1
opcode QUERY
rcode NOERROR
flags QR RD RA
;QUESTION
www.dn.example. IN A
;ANSWER
dn.example. 300 IN DNAME other.example.
www.dn.example. 300 IN CNAME www.other.example.
www.other.example. 300 IN A 192.0.2.1
stray.example. 300 IN TXT "x"
""")
    s = scrub(N("www.dn.example."), T("A"), m)
    assert [dns.rdatatype.to_text(r.rdtype) for r in s.answer] == ["DNAME", "CNAME", "A"]


async def test_key_rollover_refetches_the_dnskey_set_once():
    old = SignedZone("example.")
    new = SignedZone("example.")
    # the anchor is the old KSK; after the roll the DNSKEY set holds both keys, signed by the old one
    both = dns.rrset.RRset(old.origin, IN, T("DNSKEY"))
    both.add(old.dnskey, 300)
    both.add(new.dnskey, 300)
    rolled = response(old.origin, "DNSKEY")
    rolled.answer += [both, old.sign(both)]
    fetch = Fetch({("example.", "DNSKEY"): old.dnskey_answer()})
    clock = [NOW]
    v = Validator(old.anchors(), fetch, clock=lambda: clock[0])
    a = old.rrset("www", "A", "192.0.2.1")
    m_old = response("www.example.", "A")
    m_old.answer += [a, old.sign(a)]
    assert (await v.validate(N("www.example."), T("A"), m_old)).status == Status.SECURE
    fetch.answers[("example.", "DNSKEY")] = rolled
    m_new = response("x.example.", "A")
    b = new.rrset("x", "A", "192.0.2.2")
    m_new.answer += [b, new.sign(b)]
    clock[0] += 2  # too soon: no refetch, the unknown key tag is bogus (EDE 9)
    r = await v.validate(N("x.example."), T("A"), m_new)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.DNSKEY_MISSING)
    clock[0] += 10
    m_y = response("y.example.", "A")
    c = new.rrset("y", "A", "192.0.2.3")
    m_y.answer += [c, new.sign(c)]
    assert (await v.validate(N("y.example."), T("A"), m_y)).status == Status.SECURE
    assert fetch.calls.count(("example.", "DNSKEY")) == 2
