"""The validator against real signed zones, with a validating Unbound as the oracle; and end to end,
`proxyvm run` (the real process) validating the same lab for guests asking with dig.

Every case of `tests.labs.dnssec_lab.CASES` is fetched from the non-validating Unbound over DoT (DO=1,
CD=1, exactly what the DNS service sends), validated by our `Validator`, and the rcode/AD a guest would
get is compared with what a validating Unbound (same root trust anchor) answers to `dig +dnssec`.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

sys.path.insert(1, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.labs

from protocols.dns.dnssec import Status, ValidationResult, Validator, make_validator, parse_anchors  # noqa: E402
from tests.labs.dnssec_lab import CASES, MISSING, TLD, DNSSECLab, dig, oracle  # noqa: E402
from tests.labs.proc import free_port  # noqa: E402
from tests.labs.proxy import ProxyVM  # noqa: E402

pytestmark = [pytest.mark.lab, pytest.mark.skipif(bool(MISSING), reason=f"missing peers: {', '.join(MISSING)}")]

N = dns.name.from_text
T = dns.rdatatype.from_text


@pytest.fixture(scope="session")
def dnssec_lab(tmp_path_factory: pytest.TempPathFactory):
    lab = DNSSECLab(tmp_path_factory.mktemp("dnsseclab")).start()
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def verdicts(dnssec_lab: DNSSECLab) -> SimpleNamespace:
    """Every case validated once (cold caches, in one event loop), then all of them again (warm)."""

    async def run() -> SimpleNamespace:
        fetch = dnssec_lab.fetch()
        v = Validator(parse_anchors(dnssec_lab.root_ds), fetch)
        answers: dict[str, dns.message.Message] = {}
        first: dict[str, ValidationResult] = {}
        for c in CASES:
            answers[c.id] = await fetch.query(c.qname, c.qtype)
            first[c.id] = await v.validate(N(c.qname), T(c.qtype), answers[c.id])
        cold_fetches = v.fetches
        second = {c.id: await v.validate(N(c.qname), T(c.qtype), answers[c.id]) for c in CASES}
        await fetch.close()
        return SimpleNamespace(answers=answers, first=first, second=second, validator=v,
                               cold_fetches=cold_fetches, warm_fetches=v.fetches - cold_fetches)

    return asyncio.run(run())


def guest_view(answer: dns.message.Message, result: ValidationResult) -> tuple[str, bool]:
    """What a guest asking with DO=1 gets: bogus/indeterminate -> SERVFAIL; AD only when secure."""
    if result.status in (Status.BOGUS, Status.INDETERMINATE):
        return "SERVFAIL", False
    return dns.rcode.to_text(answer.rcode()), result.status == Status.SECURE


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_matches_the_oracle(case, verdicts):
    result = verdicts.first[case.id]
    want = oracle(case.qname, case.qtype)
    assert guest_view(verdicts.answers[case.id], result) == (want.rcode, want.ad), f"ours {result}, oracle {want}"
    assert result.status == case.status, result
    if case.ede is not None:
        assert result.ede == case.ede, result
    if result.status == Status.BOGUS:
        assert result.ede == want.ede, f"ours {result}, oracle {want}"  # Unbound 1.17 with `ede: yes`
        assert result.reason and result.ttl == verdicts.validator.bogus_ttl
    if result.status == Status.SECURE:
        assert result.ttl is not None and 0 < result.ttl <= 300


def test_lab_setup_is_quick(dnssec_lab):
    assert dnssec_lab.setup_seconds < 60


def test_warm_key_cache_needs_no_more_fetches(verdicts):
    assert verdicts.cold_fetches > 10
    assert verdicts.warm_fetches == 0
    assert verdicts.second == verdicts.first


def test_cd_queries_get_bogus_data_from_upstream_but_it_does_not_validate(dnssec_lab, verdicts):
    # With CD=1 the upstream must hand over bogus data (so that we, not it, decide); the oracle, asked
    # with +cd, serves it too but without AD (RFC 4035 §3.2.2) — the service's job for guests' CD=1.
    answer = verdicts.answers["corrupted-rrsig"]
    assert answer.rcode() == dns.rcode.NOERROR
    assert any(r.rdtype == dns.rdatatype.A for r in answer.answer)
    assert any(r.rdtype == dns.rdatatype.RRSIG for r in answer.answer)
    assert verdicts.first["corrupted-rrsig"].status == Status.BOGUS
    cd = oracle(f"www.badsig.{TLD}", "A", "+cd")
    assert (cd.rcode, cd.ad) == ("NOERROR", False)
    assert "192.0.2.1" in cd.text


def test_validator_does_not_modify_the_response(verdicts):
    answer = verdicts.answers["nsec3-nxdomain"]
    before = answer.to_wire()
    asyncio.run(verdicts.validator.validate(N(f"nx.nsec3.{TLD}"), T("A"), answer))
    assert answer.to_wire() == before


def test_dnskey_trust_anchor_file_and_make_validator(dnssec_lab, tmp_path):
    key = next((dnssec_lab.dir / "keys").glob("K.+008+*.key"))
    ksk = [line for line in key.read_text().splitlines() if " 257 " in line and not line.startswith(";")]
    if not ksk:  # the ZSK file came first
        ksk = [line for k in (dnssec_lab.dir / "keys").glob("K.+008+*.key")
               for line in k.read_text().splitlines() if " 257 " in line and not line.startswith(";")]
    anchors = tmp_path / "root.key"
    anchors.write_text("; the lab root KSK as a DNSKEY anchor\n" + "\n".join(ksk) + "\n")
    settings = SimpleNamespace(dnssec="validate", trust_anchors=anchors)

    async def run() -> tuple[ValidationResult, ValidationResult]:
        fetch = dnssec_lab.fetch()
        v = make_validator(settings, fetch)
        assert v is not None
        good = await v.validate(N(f"www.alg13.{TLD}"), T("A"), await fetch.query(f"www.alg13.{TLD}", "A"))
        bad = await v.validate(N(f"www.badsig.{TLD}"), T("A"), await fetch.query(f"www.badsig.{TLD}", "A"))
        await fetch.close()
        return good, bad

    good, bad = asyncio.run(run())
    assert good.status == Status.SECURE
    assert bad.status == Status.BOGUS
    assert make_validator(SimpleNamespace(dnssec="off", trust_anchors=anchors), None) is None


# ---------------------------------------------------------------- end to end through `proxyvm run`
# The DNS service forwards over DoT to the lab's iterator Unbound and validates with our validator from
# the lab's root trust anchor (a `trust_anchors` DS file); bogus answers carry the validator's EDE and
# its reason reaches the audit log.

PROXY_IP = "127.0.4.20"
E2E_CASES = [c for c in CASES if c.id in {
    "alg13-secure", "alg16-secure", "nsec3-nxdomain", "nsec-wildcard", "unsigned-nsec3-optout",
    "corrupted-rrsig", "expired", "ds-mismatch", "nxdomain-proof-removed", "rrsig-missing",
    "cname-secure-to-insecure", "cname-secure-to-bogus", "unsupported-algorithm"}]


@pytest.fixture(scope="module")
def proxy(dnssec_lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("dnssec-e2e")
    (d / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules: []\n")
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    text = textwrap.dedent(f"""\
        policy: rules.yaml
        audit: {{path: audit.jsonl}}
        admin: {{listen: "{PROXY_IP}:{admin}"}}
        state_dir: state
        dns:
          listen: ["{PROXY_IP}:{port}"]
          upstreams:
            - {{address: "127.0.4.10:853", name: upstream.dnssec.lab}}
          ca_file: {dnssec_lab.ca.ca_pem}
          dnssec: validate
          trust_anchors: {dnssec_lab.dir / "root.ds"}
        """)
    p = ProxyVM.from_text(d, text)
    p.port = port  # type: ignore[attr-defined]
    p.start()
    yield p
    p.stop()


@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: c.id)
def test_guest_with_do_sees_what_the_oracle_says(proxy, case):
    got = dig(PROXY_IP, case.qname, case.qtype, port=proxy.port)
    want = oracle(case.qname, case.qtype)
    assert (got.rcode, got.ad) == (want.rcode, want.ad), got.text
    if case.status == "bogus":
        assert got.ede == case.ede, got.text


def test_bogus_reason_is_in_the_audit_record(proxy):
    qname = f"www.badsig.{TLD}"
    dig(PROXY_IP, qname, "A", port=proxy.port)
    rec = proxy.wait_audit(lambda r: r.get("request", {}).get("qname", "").rstrip(".") == qname.rstrip("."))
    assert "does not verify" in str(rec), rec


def test_cd_guest_gets_the_bogus_data_without_ad(proxy):
    got = dig(PROXY_IP, f"www.badsig.{TLD}", "A", "+cd", port=proxy.port)
    assert (got.rcode, got.ad) == ("NOERROR", False), got.text
    assert "192.0.2.1" in got.text


def test_do0_guest_gets_no_dnssec_records_and_no_ad(proxy):
    # dig 9.18 sets AD in its queries by default (RFC 6840 §5.7 then allows AD back): turn it off.
    got = dig(PROXY_IP, f"www.alg13.{TLD}", "A", "+nodnssec", "+noadflag", port=proxy.port)
    assert (got.rcode, got.ad) == ("NOERROR", False), got.text
    assert "RRSIG" not in got.text and "192.0.2.1" in got.text


def test_ad_without_do_is_answered_with_ad(proxy):
    got = dig(PROXY_IP, f"www.alg15.{TLD}", "A", "+nodnssec", "+adflag", port=proxy.port)
    assert (got.rcode, got.ad) == ("NOERROR", True), got.text
    assert "RRSIG" not in got.text
