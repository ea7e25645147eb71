"""`snmp: workers: 2` in the real `proxyvm run -c CONFIG` in front of the real v3-only snmpd, with
net-snmp's snmpget as the v2c guest (every run a fresh source port):

* requests are answered by both worker processes (their own counters in /healthz), each has exactly
  one audit record in the one chain, which verifies;
* a `rate: 3/hour` is the service's: 3 answered in all, not 3 per worker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from snmp_helpers import GUEST_IP, PROXY_HOST, needs_netsnmp

from proxyvm.audit import verify
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.labs.snmp_lab import SnmpAgent
from tests.protocols.snmp.test_snmp_reload_rate import (
    ADMIN_IP,
    SYS_DESCR,
    SYS_LOCATION,
    snmpget,
    wait_snmp_records,
    write_config,
)

pytestmark = [needs_netsnmp, pytest.mark.lab]

RULES = """\
mode: enforce
default: deny
rules:
  - {id: read-descr, action: allow, protocol: snmp, match: {op: [get], oid: ["1.3.6.1.2.1.1.1"]}}
  - id: location-rate
    action: allow
    protocol: snmp
    guests: [mon1]
    match: {op: [get], oid: ["1.3.6.1.2.1.1.6"]}
    rate: 3/hour
"""


def per_worker(pv: ProxyVM, total: int) -> list[int]:
    def counts(ws: list[dict]) -> list[int]:
        return [sum((w.get("detail") or {}).get("by_op", {}).values()) for w in ws]

    ws = pv.wait_workers("snmp", lambda ws: sum(counts(ws)) >= total)
    return counts(ws)


def test_two_workers_answer_and_share_the_rate(agent: SnmpAgent, tmp_path: Path) -> None:
    port, admin = free_port(PROXY_HOST, "udp"), free_port(ADMIN_IP)
    target = f"{PROXY_HOST}:{port}"
    guest = f"--clientaddr={GUEST_IP}"
    (tmp_path / "rules.yaml").write_text(RULES)
    text = write_config(tmp_path, agent, target, admin, f"[{GUEST_IP}]").replace("snmp:\n", "snmp:\n  workers: 2\n")
    with ProxyVM.from_text(tmp_path, text) as pv:
        ws = pv.workers("snmp")
        assert len(ws) == 2 and len({w["pid"] for w in ws}) == 2, ws
        with ThreadPoolExecutor(4) as pool:
            res = list(pool.map(lambda _: snmpget(tmp_path, target, SYS_DESCR, 5, guest), range(24)))
        bad = [r.stdout + r.stderr for r in res if r.returncode != 0 or "proxyvm lab agent" not in r.stdout]
        assert not bad, bad[:2] + [pv.tail()]
        counts = per_worker(pv, 24)
        assert sum(counts) == 24 and min(counts) > 0, counts
        recs = wait_snmp_records(pv, 24)
        assert {(r["rule"], r["status"]) for r in recs} == {("read-descr", "noError")}

        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            res = list(pool.map(lambda _: snmpget(tmp_path, target, SYS_LOCATION, 2, guest), range(10)))
        assert time.monotonic() - t0 < 1200  # 3/hour: no refill within the test
        assert sum(r.returncode == 0 for r in res) == 3, [r.stdout + r.stderr for r in res]
        after = per_worker(pv, 34)
        assert sum(after) == 34 and all(b > a for a, b in zip(counts, after, strict=True)), (counts, after)
        limited = wait_snmp_records(pv, 34)[24:]
        assert sorted(r["status"] for r in limited) == ["dropped (rate limited)"] * 7 + ["noError"] * 3
    assert verify([pv.audit_path]).ok
