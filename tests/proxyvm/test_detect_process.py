"""Detectors inside the real `proxyvm run -c CONFIG` (supervisor + DNS worker, real Unbound DoT
upstream), with dig as the guest:

* a DNS tunnel (long random labels, TXT) under one base domain raises one `kind: alert` record
  naming the seqs of the triggering queries, the counter `proxyvm_alerts_total{guest, detector}` and
  a log line; `action: quarantine` quarantines the guest by itself (`by: detector:dns_tunnel`), so
  its next query is refused; the other guest is untouched;
* a burst of denials raises a deny_burst alert (action: alert: no quarantine)."""

from __future__ import annotations

import asyncio
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.dns.conftest import PROXY_IP, lab_ca, lab_dir, needs_peers, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig
from tests.proxyvm.test_quarantine import GUEST_IP, OTHER_IP, write_config

pytestmark = [needs_peers, pytest.mark.lab]

DETECT = """\
detect:
  dns_tunnel: {action: quarantine, suspicious: 5}
  deny_burst: {count: 4}
  new_destination: false
  rate_spike: false
"""
RULES = """\
mode: enforce
default: allow
rules:
  - {id: no-blocked, action: deny, protocol: dns, match: {qname: ["*.blocked.test"]}}
"""


async def test_tunnel_alert_quarantines_and_deny_burst_alerts(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    cfg = write_config(tmp_path, lab_ca.ca_pem, upstream1, port, admin, DETECT)
    (tmp_path / "rules.yaml").write_text(RULES)
    pvm = ProxyVM(cfg)
    await asyncio.to_thread(pvm.start)
    try:
        # web2 probes: four denials -> deny_burst (alert only)
        for i in range(4):
            r = await dig(PROXY_IP, port, f"h{i}.blocked.test", "A", "-b", OTHER_IP)
            assert r.status == "REFUSED", r.text
        burst = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("detector") == "deny_burst")
        denied = [x["seq"] for x in pvm.audit_records() if x.get("verdict") == "deny" and x.get("guest") == "web2"]
        assert burst["kind"] == "alert" and burst["guest"] == "web2" and burst["severity"] == "medium", burst
        assert burst["records"] == denied and burst["evidence"]["rules"] == {"no-blocked": 4}
        assert burst["action"] == "alert" and burst["at"] == "detect.deny_burst"

        # web1 tunnels: 5 long random labels under one base domain
        rng = random.Random(7)
        for _ in range(5):
            label = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(50))
            r = await dig(PROXY_IP, port, f"{label}.x.wild.test", "TXT", "-b", GUEST_IP)
            assert r.status == "NOERROR", r.text
        alert = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("detector") == "dns_tunnel")
        tunnel = [x["seq"] for x in pvm.audit_records() if x.get("guest") == "web1" and x.get("protocol") == "dns"
                  and "kind" not in x]
        assert alert["guest"] == "web1" and alert["severity"] == "high" and alert["protocol"] == "dns", alert
        assert alert["records"] == tunnel and alert["evidence"]["base_domain"] == "wild.test"
        assert alert["evidence"]["odd_names"] == 5 and alert["action"] == "quarantine"
        q = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("kind") == "quarantine")
        assert q["guest"] == "web1" and q["by"] == "detector:dns_tunnel" and q["profile"] == "block"
        assert q["seq"] > alert["seq"] and "dns_tunnel: DNS tunnelling suspected" in q["reason"]

        r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        assert r.status == "REFUSED" and r.ede[0][0] == 15 and "dns_tunnel" in r.ede[0][1], r.text
        r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", OTHER_IP)
        assert r.status == "NOERROR" and r.answers[0][3] == "192.0.2.10"

        metrics = await asyncio.to_thread(pvm.metrics)
        assert 'proxyvm_alerts_total{detector="dns_tunnel",guest="web1"} 1.0' in metrics, metrics
        assert 'proxyvm_alerts_total{detector="deny_burst",guest="web2"} 1.0' in metrics
        assert 'proxyvm_quarantined_guests{profile="block"} 1.0' in metrics
        assert "alert dns_tunnel guest=web1 severity=high: DNS tunnelling suspected" in pvm.tail(50000)
        assert [x["detector"] for x in pvm.audit_records() if x.get("kind") == "alert"] == ["deny_burst", "dns_tunnel"]
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()
    ver = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxyvm", "audit", "verify",
                                                   str(tmp_path / "audit.jsonl")], capture_output=True, text=True)
    assert ver.returncode == 0, ver.stdout + ver.stderr
