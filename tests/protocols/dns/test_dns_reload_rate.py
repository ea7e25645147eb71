"""The real `proxyvm run -c CONFIG` process (supervisor + DNS worker) in front of the real Unbound DoT
upstream, with dig as the guest:

* a rule's `rate:` bucket survives a SIGHUP that leaves the rule's id and rate unchanged (the file
  around it changes: a new rule goes in before it, so its index and line move);
* an IPv6 guest (dig over ::1 to a listener on [::1]:PORT) is audited as `[::1]:PORT`, the format
  every other service writes (and IPv4 stays `a.b.c.d:port`)."""

from __future__ import annotations

import asyncio
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from dnsfront_lab import dig

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.dns.conftest import PROXY_IP, needs_peers

pytestmark = [needs_peers, pytest.mark.lab]

GUEST_IP = "127.0.0.1"

RATE_RULE = """\
  - id: www-rate
    action: allow
    protocol: dns
    guests: [web1]
    match: {qname: ["www.lab.test"]}
    rate: 3/hour
"""
RULES = "mode: enforce\ndefault: allow\nrules:\n" + RATE_RULE
# The reload: an unrelated rule goes in *before* the limited one; the limited rule's id and rate
# are unchanged (its index and line number are not).
RULES_AFTER_RELOAD = "mode: enforce\ndefault: allow\nrules:\n" + """\
  - id: other-deny
    action: deny
    protocol: dns
    match: {qname: ["other.lab.test"]}
""" + RATE_RULE


def write_config(d: Path, ca: Path, upstream: Any, listen: str, admin: int, addresses: str) -> Path:
    os.chmod(d, 0o755)  # the worker may drop privileges after binding
    cfg = d / "proxyvm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        guests:
          web1: {{addresses: {addresses}}}
        policy: rules.yaml
        audit: {{path: audit.jsonl}}
        admin: {{listen: "{PROXY_IP}:{admin}"}}
        state_dir: state
        dns:
          listen: ["{listen}"]
          ca_file: {ca}
          dnssec: off
          upstreams:
            - {{address: "{upstream.address}:853", name: {upstream.name}}}
        """))
    return cfg


def dns_records(pvm: ProxyVM, qname: str, after: int = -1) -> list[dict[str, Any]]:
    return [r for r in pvm.audit_records()
            if r.get("protocol") == "dns" and r.get("request", {}).get("qname") == qname and r["seq"] > after]


async def wait_dns_records(pvm: ProxyVM, qname: str, n: int, after: int = -1, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        recs = dns_records(pvm, qname, after)
        if len(recs) >= n or asyncio.get_running_loop().time() > deadline:
            assert len(recs) == n, f"want {n} audit records for {qname} after seq {after}, have {recs}"
            return recs
        await asyncio.sleep(0.1)


def assert_rate_limited(r: Any, rec: dict[str, Any]) -> None:
    assert r.status == "REFUSED" and r.ede == [(18, "rate limit, rule www-rate")], r.text
    assert rec["verdict"] == "deny" and rec["rule"] == "www-rate" and rec["rcode"] == "REFUSED", rec
    assert "over rate 3/hour for guest web1" in rec["reason"], rec


async def test_rate_bucket_survives_sighup(tmp_path: Path, upstream1, lab_ca) -> None:
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    cfg = write_config(tmp_path, lab_ca.ca_pem, upstream1, f"{PROXY_IP}:{port}", admin, f"[{GUEST_IP}]")
    pvm = ProxyVM(cfg)
    await asyncio.to_thread(pvm.start)
    try:
        for i in range(3):
            r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
            assert r.status == "NOERROR" and r.answers[0][3] == "192.0.2.10", f"query {i + 1}: {r.text}{pvm.tail()}"
        r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        recs = await wait_dns_records(pvm, "www.lab.test", 4)
        assert [x["verdict"] for x in recs[:3]] == ["allow"] * 3 and {x["rule"] for x in recs[:3]} == {"www-rate"}
        assert recs[0]["src"].startswith(f"{GUEST_IP}:") and recs[0]["upstream"]["address"] == f"{upstream1.address}:853"
        assert_rate_limited(r, recs[3])

        rules.write_text(RULES_AFTER_RELOAD)
        last = max(x["seq"] for x in pvm.audit_records())
        await asyncio.to_thread(pvm.reload)
        rel = await asyncio.to_thread(
            pvm.wait_audit, lambda x: x.get("request", {}).get("event") == "reload" and x["seq"] > last, 20)
        assert rel["protocol"] == "proxyvm" and rel["services"] == {"dns": True}, rel

        r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        (rec,) = await wait_dns_records(pvm, "www.lab.test", 1, after=rel["seq"])
        assert_rate_limited(r, rec)
        # the reload did take effect: the new rule decides its name
        r = await dig(PROXY_IP, port, "other.lab.test", "A", "-b", GUEST_IP)
        assert r.status == "REFUSED" and r.ede == [(15, "other-deny")], r.text
    finally:
        rc = await asyncio.to_thread(pvm.stop)
    assert rc == 0, pvm.tail()


async def test_ipv6_guest_is_audited_with_brackets(tmp_path: Path, upstream1, lab_ca) -> None:
    port, admin = free_port("::1"), free_port(PROXY_IP)
    (tmp_path / "rules.yaml").write_text(RULES_AFTER_RELOAD)
    cfg = write_config(tmp_path, lab_ca.ca_pem, upstream1, f"[::1]:{port}", admin, '["::1"]')
    pvm = ProxyVM(cfg)
    await asyncio.to_thread(pvm.start)
    try:
        r = await dig("::1", port, "www.lab.test", "A", "-b", "::1")
        assert r.status == "NOERROR" and r.answers[0][3] == "192.0.2.10", r.text + pvm.tail()
        r = await dig("::1", port, "other.lab.test", "A", "-b", "::1", "+tcp")
        assert r.status == "REFUSED" and r.ede == [(15, "other-deny")], r.text
        (ok,) = await wait_dns_records(pvm, "www.lab.test", 1)
        (denied,) = await wait_dns_records(pvm, "other.lab.test", 1)
        for rec in (ok, denied):
            assert rec["guest"] == "web1", rec
            assert re.fullmatch(r"\[::1\]:\d+", rec["src"]), rec["src"]
        assert ok["verdict"] == "allow" and ok["rule"] == "www-rate"
        assert denied["verdict"] == "deny" and denied["rule"] == "other-deny"
        # the upstream (IPv4 here) keeps the plain a.b.c.d:port form
        assert ok["upstream"]["address"] == f"{upstream1.address}:853", ok["upstream"]
    finally:
        rc = await asyncio.to_thread(pvm.stop)
    assert rc == 0, pvm.tail()
