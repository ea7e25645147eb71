"""Unit tests of the pure validator with the RFCs' own worked examples.

RFC 5155 Appendix A/B (NSEC3 proofs, RSASHA1-NSEC3-SHA1 keys of the `example.` zone), RFC 6605 §6
(ECDSA P-256/P-384) and RFC 8080 §6 (Ed25519/Ed448). The RFC 5155 zone is served to the validator by an
in-memory fetch: the validator is a pure component, the fetch is its seam (the lab tests use a real one).
"""

from __future__ import annotations

import calendar
import time

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from protocols.dns.dnssec import Status, Validator, crypto, parse_anchors
from protocols.dns.dnssec.denial import Denial, NSEC3Proof
from protocols.dns.dnssec.result import EDE

N = dns.name.from_text
T = dns.rdatatype.from_text


def ts(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y%m%d%H%M%S"))


# ------------------------------------------------------------------ RFC 5155 Appendix A zone data
SIGTIMES = "20150420235959 20051021000000"
ZSK = "256 3 7 AwEAAaetidLzsKWUt4swWR8yu0wPHPiUi8LUsAD0QPWU+wzt89epO6tHzkMBVDkC7qphQO2hTY4hHn9npWFRw5BYubE="
KSK = "257 3 7 AwEAAcUlFV1vhmqx6NSOUOq2R/dsR7Xm3upJj7IommWSpJABVfW8Q0rOvXdM6kzt+TAu92L9AbsUdblMFin8CVF3n4s="
DNSKEY_SIG = (f"DNSKEY 7 1 3600 {SIGTIMES} 12708 example. "
              "AuU4juU9RaxescSmStrQks3Gh9FblGBlVU31uzMZ/U/FpsUb8aC6QZS+sTsJXnLnz7flGOsmMGQZf3bH+QsCtg==")
SOA = [
    "example. 3600 IN SOA ns1.example. bugs.x.w.example. 1 3600 300 3600000 3600",
    f"example. 3600 IN RRSIG SOA 7 1 3600 {SIGTIMES} 40430 example. "
    "Hu25UIyNPmvPIVBrldN+9Mlp9Zql39qaUd8iq4ZLlYWfUUbbAS41pG+6 8z81q1xhkYAcEyHdVI2LmKusbZsT0Q==",
]
NSEC3 = {
    "0p9m": ["0p9mhaveqvm6t7vbl5lop2u3t2rp3tom.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "2t7b4g4vsa5smi47k61mv5bv1a22bojr NS SOA MX RRSIG DNSKEY NSEC3PARAM",
             "OSgWSm26B+cS+dDL8b5QrWr/dEWhtCsKlwKLIBHYH6blRxK9rC0bMJPw Q4mLIuw85H2EY762BOCXJZMnpuwhpA=="],
    "b4um": ["b4um86eghhds6nea196smvmlo4ors995.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "gjeqe526plbf1g8mklp59enfd789njgi MX RRSIG",
             "ZkPG3M32lmoHM6pa3D6gZFGB/rhL//Bs3Omh5u4m/CUiwtblEVOaAKKZ d7S959OeiX43aLX3pOv0TSTyiTxIZg=="],
    "35mt": ["35mthgpgcu1qg68fab165klnsnk3dpvl.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "b4um86eghhds6nea196smvmlo4ors995 NS DS RRSIG",
             "g6jPUUpduAJKRljUsN8gB4UagAX0NxY9shwQAynzo8EUWH+z6hEIBlUT PGj15eZll6VhQqgZXtAIR3chwgW+SA=="],
    "2t7b": ["2t7b4g4vsa5smi47k61mv5bv1a22bojr.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "2vptu5timamqttgl4luu9kg21e0aor3s A RRSIG",
             "OmBvJ1Vgg1hCKMXHFiNeIYHK9XVW0iLDLwJN4TFoNxZuP03gAXEI634Y wOc4YBNITrj413iqNI6mRk/r1dOSUw=="],
    "ji6n": ["ji6neoaepv8b5o6k4ev33abha8ht9fgc.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "k8udemvp1j2f7eg6jebps17vp3n8i58h",
             "gPkFp1s2QDQ6wQzcg1uSebZ61W33rUBDcTj72F3kQ490fEdp7k1BUIfb cZtPbX3YCpE+sIt0MpzVSKfTwx4uYA=="],
    "q04j": ["q04jkcevqvmu85r014c7dkba38o0ji5r.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "r53bq7cc2uvmubfu5ocmm6pers9tk9en A RRSIG",
             "hV5I89b+4FHJDATp09g4bbN0R1F845CaXpL3ZxlMKimoPAyqletMlEWw LfFia7sdpSzn+ZlNNlkxWcLsIlMmUg=="],
    "k8ud": ["k8udemvp1j2f7eg6jebps17vp3n8i58h.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "kohar7mbb8dc2ce8a9qvl8hon4k53uhi",
             "FtXGbvF0+wf8iWkyo73enAuVx03klN+pILBKS6qCcftVtfH4yVzsEZqu J27NHR7ruxJWDNMtOtx7w9WfcIg62A=="],
    "r53b": ["r53bq7cc2uvmubfu5ocmm6pers9tk9en.example. 3600 IN NSEC3 1 1 12 aabbccdd "
             "t644ebqk9bibcna874givr6joj62mlhv MX RRSIG",
             "aupviViruXs4bDg9rCbezzBMf9h1ZlDvbW/CZFKulIGXXLj8B/fsDJar XVDA9bnUoRhEbKp+HF1FWKW7RIJdtQ=="],
}
MX_WILD = [
    "a.z.w.example. 3600 IN MX 1 ai.example.",
    f"a.z.w.example. 3600 IN RRSIG MX 7 2 3600 {SIGTIMES} 40430 example. "
    "CikebjQwGQPwijVcxgcZcSJKtfynugtlBiKb9FcBTrmOoyQ4InoWVudh CWsh/URX3lc4WRUMivEBP6+4KS3ldA==",
]
NOW = ts("20100101000000")


def nsec3_lines(*keys: str) -> list[str]:
    out = []
    for k in keys:
        rec, sig = NSEC3[k]
        owner = rec.split()[0]
        out += [rec, f"{owner} 3600 IN RRSIG NSEC3 7 2 3600 {SIGTIMES} 40430 example. {sig}"]
    return out


def message(qname: str, qtype: str, rcode: int, answer: list[str] = (), authority: list[str] = ()) -> dns.message.Message:
    q = dns.message.make_query(qname, qtype, want_dnssec=True)
    m = dns.message.make_response(q)
    m.set_rcode(rcode)
    for section, lines in ((m.answer, answer), (m.authority, authority)):
        for line in lines:
            rr = dns.rrset.from_text(*_split(line))
            existing = next((r for r in section if r.name == rr.name and r.rdtype == rr.rdtype
                             and r.covers == rr.covers), None)
            if existing is None:
                section.append(rr)
            else:
                existing.update(rr)
    return m


def _split(line: str):
    parts = line.split()
    return parts[0], int(parts[1]), parts[2], parts[3], " ".join(parts[4:])


class ExampleZone:
    """In-memory answers for the RFC 5155 `example.` zone's own DNSKEY query (a fake of the upstream:
    the RFC's fixed signatures cannot be served by a real server with today's clock)."""

    def __init__(self, extra: dict[tuple[str, str], dns.message.Message] | None = None) -> None:
        self.extra = extra or {}
        self.queries: list[tuple[str, str]] = []

    async def __call__(self, name: dns.name.Name, rdtype: int) -> dns.message.Message:
        key = (name.to_text(), dns.rdatatype.to_text(rdtype))
        self.queries.append(key)
        if key == ("example.", "DNSKEY"):
            return message("example.", "DNSKEY", dns.rcode.NOERROR, answer=[
                f"example. 3600 IN DNSKEY {ZSK}", f"example. 3600 IN DNSKEY {KSK}",
                f"example. 3600 IN RRSIG {DNSKEY_SIG}"])
        if key in self.extra:
            return self.extra[key]
        raise AssertionError(f"unexpected fetch {key}")


def validator(fetch=None) -> Validator:
    anchors = parse_anchors(f"example. IN DNSKEY {KSK}")
    return Validator(anchors, fetch or ExampleZone(), clock=lambda: NOW)


# ------------------------------------------------------------------ RFC 5155 Appendix B


def test_keys_have_the_rfc_key_tags():
    zsk = dns.rrset.from_text("example.", 3600, "IN", "DNSKEY", ZSK)[0]
    ksk = dns.rrset.from_text("example.", 3600, "IN", "DNSKEY", KSK)[0]
    assert (crypto.key_tag(zsk), crypto.key_tag(ksk)) == (40430, 12708)


async def test_b1_name_error_in_opt_out_span_is_insecure():
    # Every NSEC3 of the RFC's zone has the opt-out flag: the next closer name (x.w.example) is covered
    # by an opt-out NSEC3, so an unsigned delegation could hide there (RFC 5155 §9.2): insecure, not secure.
    m = message("a.c.x.w.example.", "A", dns.rcode.NXDOMAIN, authority=SOA + nsec3_lines("0p9m", "b4um", "35mt"))
    r = await validator().validate(N("a.c.x.w.example."), T("A"), m)
    assert r.status == Status.INSECURE, r
    assert "opt-out" in r.reason


async def test_b1_without_the_wildcard_proof_is_bogus():
    m = message("a.c.x.w.example.", "A", dns.rcode.NXDOMAIN, authority=SOA + nsec3_lines("0p9m", "35mt"))
    r = await validator().validate(N("a.c.x.w.example."), T("A"), m)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.NSEC_MISSING), r


async def test_b2_no_data_is_secure():
    m = message("ns1.example.", "MX", dns.rcode.NOERROR, authority=SOA + nsec3_lines("2t7b"))
    r = await validator().validate(N("ns1.example."), T("MX"), m)
    assert r.status == Status.SECURE, r
    assert r.ttl == 3600


async def test_b2_no_data_for_a_type_the_bitmap_lists_is_bogus():
    m = message("ns1.example.", "A", dns.rcode.NOERROR, authority=SOA + nsec3_lines("2t7b"))
    r = await validator().validate(N("ns1.example."), T("A"), m)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.NSEC_MISSING), r


async def test_b2_with_altered_bitmap_fails_the_signature():
    lines = nsec3_lines("2t7b")
    lines[0] = lines[0].replace(" A RRSIG", " RRSIG")
    m = message("ns1.example.", "A", dns.rcode.NOERROR, authority=SOA + lines)
    r = await validator().validate(N("ns1.example."), T("A"), m)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.DNSSEC_BOGUS), r


async def test_b21_empty_non_terminal_no_data_is_secure():
    m = message("y.w.example.", "A", dns.rcode.NOERROR, authority=SOA + nsec3_lines("ji6n"))
    r = await validator().validate(N("y.w.example."), T("A"), m)
    assert r.status == Status.SECURE, r


async def test_b3_opt_out_referral_makes_the_delegation_insecure():
    # B.3's authority section is exactly what the parent gives for "c.example DS": no DS, next closer
    # covered by an opt-out NSEC3. Then an unsigned answer below c.example is insecure.
    ds_answer = message("c.example.", "DS", dns.rcode.NOERROR, authority=SOA + nsec3_lines("35mt", "0p9m"))
    proof = NSEC3Proof(N("example."), [r for r in ds_answer.authority if r.rdtype == T("NSEC3")])
    out = proof.nodata(N("c.example."), T("DS"))
    assert (out.status, out.delegation) == (Denial.INSECURE, True)
    fetch = ExampleZone({("c.example.", "DS"): ds_answer})
    m = message("mc.c.example.", "MX", dns.rcode.NOERROR, answer=["mc.c.example. 3600 IN MX 10 mail.mc.c.example."])
    r = await validator(fetch).validate(N("mc.c.example."), T("MX"), m)
    assert r.status == Status.INSECURE, r
    assert ("c.example.", "DS") in fetch.queries


async def test_b3_unsigned_answer_without_the_opt_out_proof_is_bogus():
    ds_answer = message("c.example.", "DS", dns.rcode.NOERROR, authority=SOA)  # denial stripped
    fetch = ExampleZone({("c.example.", "DS"): ds_answer, ("mc.c.example.", "DS"): ds_answer})
    m = message("mc.c.example.", "MX", dns.rcode.NOERROR, answer=["mc.c.example. 3600 IN MX 10 mail.mc.c.example."])
    r = await validator(fetch).validate(N("mc.c.example."), T("MX"), m)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.RRSIGS_MISSING), r


async def test_b4_wildcard_expansion_is_secure():
    m = message("a.z.w.example.", "MX", dns.rcode.NOERROR, answer=MX_WILD, authority=nsec3_lines("q04j"))
    r = await validator().validate(N("a.z.w.example."), T("MX"), m)
    assert r.status == Status.SECURE, r


async def test_b4_wildcard_expansion_without_next_closer_proof_is_bogus():
    m = message("a.z.w.example.", "MX", dns.rcode.NOERROR, answer=MX_WILD)
    r = await validator().validate(N("a.z.w.example."), T("MX"), m)
    assert (r.status, r.ede) == (Status.BOGUS, EDE.NSEC_MISSING), r


async def test_b4_after_expiry_is_bogus_signature_expired():
    m = message("a.z.w.example.", "MX", dns.rcode.NOERROR, answer=MX_WILD, authority=nsec3_lines("q04j"))
    # the keys themselves are expired too: the DNSKEY RRset fails first
    r = await validator().validate(N("a.z.w.example."), T("MX"), m, now=ts("20160101000000"))
    assert (r.status, r.ede) == (Status.BOGUS, EDE.SIGNATURE_EXPIRED), r


async def test_b4_before_inception_is_bogus_not_yet_valid():
    m = message("a.z.w.example.", "MX", dns.rcode.NOERROR, answer=MX_WILD, authority=nsec3_lines("q04j"))
    r = await validator().validate(N("a.z.w.example."), T("MX"), m, now=ts("20040101000000"))
    assert (r.status, r.ede) == (Status.BOGUS, EDE.SIGNATURE_NOT_YET_VALID), r


async def test_b5_wildcard_no_data_is_secure():
    m = message("a.z.w.example.", "AAAA", dns.rcode.NOERROR, authority=SOA + nsec3_lines("k8ud", "q04j", "r53b"))
    r = await validator().validate(N("a.z.w.example."), T("AAAA"), m)
    assert r.status == Status.SECURE, r


async def test_b5_wildcard_no_data_for_the_wildcards_own_type_is_bogus():
    m = message("a.z.w.example.", "MX", dns.rcode.NOERROR, authority=SOA + nsec3_lines("k8ud", "q04j", "r53b"))
    r = await validator().validate(N("a.z.w.example."), T("MX"), m)
    assert r.status == Status.BOGUS, r


async def test_keys_are_cached_and_bogus_results_too():
    fetch = ExampleZone()
    v = validator(fetch)
    good = message("ns1.example.", "MX", dns.rcode.NOERROR, authority=SOA + nsec3_lines("2t7b"))
    for _ in range(3):
        assert (await v.validate(N("ns1.example."), T("MX"), good)).status == Status.SECURE
    assert fetch.queries == [("example.", "DNSKEY")]
    bad = message("ns1.example.", "A", dns.rcode.NOERROR, authority=SOA + nsec3_lines("2t7b"))
    first = await v.validate(N("ns1.example."), T("A"), bad)
    assert first.status == Status.BOGUS and first.ttl == v.bogus_ttl
    assert v.cached_bogus(N("ns1.example."), T("A")) == first
    # while the bad-cache entry lives, even a good-looking answer is not re-validated
    assert (await v.validate(N("ns1.example."), T("A"), good)).status == Status.BOGUS
    assert v.cached_bogus(N("ns1.example."), T("A"), now=NOW + v.bogus_ttl + 1) is None


async def test_fetch_failure_is_indeterminate_and_not_cached():
    async def broken(name, rdtype):
        raise OSError("connection refused")

    v = validator(broken)
    m = message("ns1.example.", "MX", dns.rcode.NOERROR, authority=SOA + nsec3_lines("2t7b"))
    r = await v.validate(N("ns1.example."), T("MX"), m)
    assert r.status == Status.INDETERMINATE and "connection refused" in r.reason
    assert v.cached_bogus(N("ns1.example."), T("MX")) is None


async def test_upstream_servfail_is_indeterminate():
    m = message("ns1.example.", "MX", dns.rcode.SERVFAIL)
    r = await validator().validate(N("ns1.example."), T("MX"), m)
    assert r.status == Status.INDETERMINATE


async def test_name_outside_every_anchor_is_insecure():
    m = message("www.other.", "A", dns.rcode.NOERROR, answer=["www.other. 60 IN A 192.0.2.1"])
    r = await validator().validate(N("www.other."), T("A"), m)
    assert r.status == Status.INSECURE and "no trust anchor" in r.reason


# ------------------------------------------------------------------ RFC 6605 and RFC 8080 signatures

SIG_VECTORS = {
    # RFC 6605 §6.1 (ECDSAP256SHA256) and §6.2 (ECDSAP384SHA384)
    "rfc6605-p256": ("example.net.", "257 3 13 GojIhhXUN/u4v54ZQqGSnyhWJwaubCvTmeexv7bR6edbkrSqQpF64cYbcB7wNcP+e+MAnLr+Wi9xMWyQLc8NAA==",
                     "www.example.net. 3600 IN A 192.0.2.1",
                     "A 13 3 3600 20100909100439 20100812100439 55648 example.net. qx6wLYqmh+l9oCKTN6qIc+bw6ya+KJ8oMz0YP107epXAyGmt+3SNruPFKG7tZoLBLlUzGGus7ZwmwWep666VCw==",
                     "55648 13 2 b4c8c1fe2e7477127b27115656ad6256f424625bf5c1e2770ce6d6e37df61d17"),
    "rfc6605-p384": ("example.net.", "257 3 14 xKYaNhWdGOfJ+nPrL8/arkwf2EY3MDJ+SErKivBVSum1w/egsXvSADtNJhyem5RCOpgQ6K8X1DRSEkrbYQ+OB+v8/uX45NBwY8rp65F6Glur8I/mlVNgF6W/qTI37m40",
                     "www.example.net. 3600 IN A 192.0.2.1",
                     "A 14 3 3600 20100909102025 20100812102025 10771 example.net. /L5hDKIvGDyI1fcARX3z65qrmPsVz73QD1Mr5CEqOiLP95hxQouuroGCeZOvzFaxsT8Glr74hbavRKayJNuydCuzWTSSPdz7wnqXL5bdcJzusdnI0RSMROxxwGipWcJm",
                     "10771 14 4 72d7b62976ce06438e9c0bf319013cf801f09ecc84b8d7e9495f27e305c6a9b0563a9b5f4d288405c3008a946df983d6"),
    # RFC 8080 §6.1 (Ed25519, two keys) and §6.2 (Ed448, two keys)
    "rfc8080-ed25519-1": ("example.com.", "257 3 15 l02Woi0iS8Aa25FQkUd9RMzZHJpBoRQwAQEX1SxZJA4=",
                          "example.com. 3600 IN MX 10 mail.example.com.",
                          "MX 15 2 3600 1440021600 1438207200 3613 example.com. oL9krJun7xfBOIWcGHi7mag5/hdZrKWw15jPGrHpjQeRAvTdszaPD+QLs3fx8A4M3e23mRZ9VrbpMngwcrqNAg==",
                          None),
    "rfc8080-ed25519-2": ("example.com.", "257 3 15 zPnZ/QwEe7S8C5SPz2OfS5RR40ATk2/rYnE9xHIEijs=",
                          "example.com. 3600 IN MX 10 mail.example.com.",
                          "MX 15 2 3600 1440021600 1438207200 35217 example.com. zXQ0bkYgQTEFyfLyi9QoiY6D8ZdYo4wyUhVioYZXFdT410QPRITQSqJSnzQoSm5poJ7gD7AQR0O7KuI5k2pcBg==",
                          None),
    "rfc8080-ed448-1": ("example.com.", "257 3 16 3kgROaDjrh0H2iuixWBrc8g2EpBBLCdGzHmn+G2MpTPhpj/OiBVHHSfPodx1FYYUcJKm1MDpJtIA",
                        "example.com. 3600 IN MX 10 mail.example.com.",
                        "MX 16 2 3600 1440021600 1438207200 9713 example.com. 3cPAHkmlnxcDHMyg7vFC34l0blBhuG1qpwLmjInI8w1CMB29FkEAIJUA0amxWndkmnBZ6SKiwZSAxGILn/NBtOXft0+Gj7FSvOKxE/07+4RQvE581N3Aj/JtIyaiYVdnYtyMWbSNyGEY2213WKsJlwEA",
                        None),
    "rfc8080-ed448-2": ("example.com.", "257 3 16 kkreGWoccSDmUBGAe7+zsbG6ZAFQp+syPmYUurBRQc3tDjeMCJcVMRDmgcNLp5HlHAMy12VoISsA",
                        "example.com. 3600 IN MX 10 mail.example.com.",
                        "MX 16 2 3600 1440021600 1438207200 38353 example.com. E1/oLjSGIbmLny/4fcgM1z4oL6aqo+izT3urCyHyvEp4Sp8Syg1eI+lJ57CSnZqjJP41O/9l4m0AsQ4f7qI1gVnML8vWWiyW2KXhT9kuAICUSxv5OWbf81Rq7Yu60npabODB0QFPb/rkW3kUZmQ0YQUA",
                        None),
}


@pytest.mark.parametrize("name", sorted(SIG_VECTORS))
def test_rfc_signature_vectors(name):
    zone, key_text, rr_text, sig_text, ds_text = SIG_VECTORS[name]
    key = dns.rrset.from_text(zone, 3600, "IN", "DNSKEY", key_text)
    owner, ttl, _, rtype, *rdata = rr_text.split(maxsplit=4) + [""]
    rrset = dns.rrset.from_text(owner, int(ttl), "IN", rtype, rr_text.split(maxsplit=4)[4])
    sig = dns.rrset.from_text(owner, int(ttl), "IN", "RRSIG", sig_text)
    when = sig[0].inception + 3600
    kc = crypto.KeyCache()
    ok = crypto.verify_rrset(rrset, sig, N(zone), list(key), when, kc)
    assert isinstance(ok, crypto.Verified), ok
    assert crypto.key_tag(key[0]) == sig[0].key_tag
    if ds_text:
        ds = dns.rrset.from_text(zone, 3600, "IN", "DS", ds_text)[0]
        assert crypto.ds_matches(ds, N(zone), key[0])
    # one changed bit of data breaks it
    other = dns.rrset.from_text(owner, int(ttl), "IN", rtype,
                                rr_text.split(maxsplit=4)[4].replace("192.0.2.1", "192.0.2.2").replace("10 mail", "11 mail"))
    bad = crypto.verify_rrset(other, sig, N(zone), list(key), when, kc)
    assert isinstance(bad, crypto.VerifyFailure) and bad.ede == EDE.DNSSEC_BOGUS
    late = crypto.verify_rrset(rrset, sig, N(zone), list(key), sig[0].expiration + 1, kc)
    assert isinstance(late, crypto.VerifyFailure) and late.ede == EDE.SIGNATURE_EXPIRED
