"""The real process: `proxyvm run -c CONFIG` (supervisor + DNS worker) in front of a real Unbound
DoT upstream, with dig as the guest; audit records read from the hash-chained file."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest
from dnsfront_lab import dig

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.dns.conftest import PROXY_IP, needs_peers

pytestmark = [needs_peers, pytest.mark.lab]

RULES = """
mode: enforce
default: allow
rules:
  - id: block-blocked
    action: deny
    protocol: dns
    match: {qname: ["blocked.lab.test"]}
"""

RULES_AFTER_RELOAD = """
mode: enforce
default: allow
rules:
  - id: block-www-now
    action: deny
    protocol: dns
    guests: [web1]
    match: {qname: ["www.lab.test"]}
"""


async def test_proxyvm_run_serves_dns(tmp_path: Path, upstream1, lab_ca) -> None:
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    os.chmod(tmp_path, 0o755)  # the worker may drop privileges after binding
    cfg = tmp_path / "proxyvm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        guests:
          web1: {{addresses: [127.0.0.1]}}
        policy: rules.yaml
        audit: {{path: audit.jsonl}}
        admin: {{listen: "{PROXY_IP}:{admin}"}}
        state_dir: state
        dns:
          listen: ["{PROXY_IP}:{port}"]
          ca_file: {lab_ca.ca_pem}
          dnssec: off
          upstreams:
            - {{address: "{upstream1.address}:853", name: {upstream1.name}}}
        """))
    pvm = ProxyVM(cfg)
    await asyncio.to_thread(pvm.start)
    try:
        r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", "127.0.0.1")
        assert r.status == "NOERROR" and r.answers[0][3] == "192.0.2.10", r.text + pvm.tail()
        r = await dig(PROXY_IP, port, "blocked.lab.test", "A", "-b", "127.0.0.1")
        assert r.status == "REFUSED" and r.ede == [(15, "block-blocked")]
        r = await dig(PROXY_IP, port, "big.lab.test", "TXT", "+tcp", "-b", "127.0.0.1")
        assert len(r.answers) == 12
        rec = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("request", {}).get("qname") == "blocked.lab.test")
        assert rec["guest"] == "web1" and rec["verdict"] == "deny" and rec["rule"] == "block-blocked"
        ok = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("request", {}).get("qname") == "www.lab.test")
        assert ok["upstream"]["address"] == f"{upstream1.address}:853" and ok["upstream"]["tls"].startswith("TLSv1.")
        assert "seq" in ok and "prev" in ok
        code, health = await asyncio.to_thread(pvm.healthz)
        assert code == 200 and health["services"]["dns"]["state"] == "ok", health
        # SIGHUP: a new policy applies to the next query, on the same listener
        rules.write_text(RULES_AFTER_RELOAD)
        await asyncio.to_thread(pvm.reload)
        for _ in range(50):
            r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", "127.0.0.1")
            if r.status == "REFUSED":
                break
            await asyncio.sleep(0.1)
        assert r.status == "REFUSED" and r.ede == [(15, "block-www-now")], r.text + pvm.tail()
        r = await dig(PROXY_IP, port, "blocked.lab.test", "A", "-b", "127.0.0.1")
        assert r.status == "NOERROR"  # the old rule is gone
    finally:
        rc = await asyncio.to_thread(pvm.stop)
    assert rc == 0, pvm.tail()
