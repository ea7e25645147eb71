"""`dns: workers: 2` in the real `proxyvm run -c CONFIG` (supervisor + two DNS workers, each with its
own SO_REUSEPORT sockets) in front of the real Unbound DoT upstream, with dig as the guest:

* many queries from many source ports are answered by both worker processes (their own counters in
  /healthz), every query has exactly one audit record, and the chain verifies;
* `rate: 10/minute` admits 10 in all, not 10 per worker, and the shared bucket survives a SIGHUP;
* kill -9 of one worker: the other keeps answering, the supervisor restarts the killed one, and
  then both answer again."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from dnsfront_lab import dig

from proxyvm.audit import verify
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
    match: {qname: ["rate.lab.test"]}
    rate: 10/minute
"""
RULES = "mode: enforce\ndefault: allow\nrules:\n" + RATE_RULE
RULES_AFTER_RELOAD = "mode: enforce\ndefault: allow\nrules:\n" + """\
  - id: other-deny
    action: deny
    protocol: dns
    match: {qname: ["other.lab.test"]}
""" + RATE_RULE


def write_config(d: Path, ca: Path, upstream: Any, port: int, admin: int) -> Path:
    os.chmod(d, 0o755)  # the workers may drop privileges after binding
    (d / "rules.yaml").write_text(RULES)
    cfg = d / "proxyvm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        guests:
          web1: {{addresses: ["{GUEST_IP}"]}}
        policy: rules.yaml
        audit: {{path: audit.jsonl}}
        admin: {{listen: "{PROXY_IP}:{admin}"}}
        state_dir: state
        dns:
          listen: ["{PROXY_IP}:{port}"]
          workers: 2
          ca_file: {ca}
          dnssec: off
          upstreams:
            - {{address: "{upstream.address}:853", name: {upstream.name}}}
        """))
    return cfg


def workers(pvm: ProxyVM) -> list[dict[str, Any]]:
    return pvm.healthz()[1]["services"]["dns"]["workers"]


async def counts_settle(pvm: ProxyVM, total: int, timeout: float = 10) -> list[int]:
    """Each worker's `queries` counter once their sum reached `total` (health comes every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        ws = await asyncio.to_thread(workers, pvm)
        counts = [int(w["detail"].get("queries", 0)) for w in ws]
        if sum(counts) >= total or time.monotonic() > deadline:
            assert sum(counts) == total, (counts, total)
            return counts
        await asyncio.sleep(0.3)


async def many_digs(qname: str, n: int, parallel: int = 8) -> list[Any]:
    sem = asyncio.Semaphore(parallel)

    async def one() -> Any:
        async with sem:  # dig picks a fresh random source port for every run
            return await dig(PROXY_IP, PORT[0], qname, "A", "-b", GUEST_IP)

    return list(await asyncio.gather(*(one() for _ in range(n))))


PORT = [0]


def dns_records(pvm: ProxyVM, qname: str, after: int = -1) -> list[dict[str, Any]]:
    return [r for r in pvm.audit_records()
            if r.get("protocol") == "dns" and r.get("request", {}).get("qname") == qname and r["seq"] > after]


async def wait_records(pvm: ProxyVM, qname: str, n: int, after: int = -1, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = dns_records(pvm, qname, after)
        if len(recs) >= n or time.monotonic() > deadline:
            await asyncio.sleep(0.3)  # and no more than n
            recs = dns_records(pvm, qname, after)
            assert len(recs) == n, f"want {n} records for {qname}, have {len(recs)}"
            return recs
        await asyncio.sleep(0.1)


@pytest.fixture
def pvm(tmp_path: Path, upstream1, lab_ca):
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    PORT[0] = port
    p = ProxyVM(write_config(tmp_path, lab_ca.ca_pem, upstream1, port, admin))
    p.start()
    yield p
    rc = p.stop()
    assert rc == 0, p.tail()
    res = verify([p.audit_path])
    assert res.ok, res


async def test_queries_spread_over_both_workers_one_record_each(pvm: ProxyVM) -> None:
    ws = await asyncio.to_thread(workers, pvm)
    assert len(ws) == 2 and len({w["pid"] for w in ws}) == 2 and all(w["state"] == "ok" for w in ws), ws
    body = (await asyncio.to_thread(pvm.healthz))[1]["services"]["dns"]
    assert body["state"] == "ok" and body["listening"] == [f"udp {PROXY_IP}:{PORT[0]}", f"tcp {PROXY_IP}:{PORT[0]}"]
    n = 80
    answers = await many_digs("www.lab.test", n)
    assert all(r.status == "NOERROR" and r.answers[0][3] == "192.0.2.10" for r in answers), \
        [r.text for r in answers if r.status != "NOERROR"][:2]
    tcp = [await dig(PROXY_IP, PORT[0], "www.lab.test", "A", "-b", GUEST_IP, "+tcp") for _ in range(8)]
    assert all(r.status == "NOERROR" for r in tcp)
    counts = await counts_settle(pvm, n + len(tcp))
    assert min(counts) > 0, f"the kernel gave every query to one worker: {counts}"
    recs = await wait_records(pvm, "www.lab.test", n + len(tcp))
    assert len({r["seq"] for r in recs}) == n + len(tcp)
    # /metrics: the service's counters are the sum over its workers
    text = await asyncio.to_thread(pvm.metrics)
    line = next(x for x in text.splitlines() if x.startswith("proxyvm_dns_queries_total "))
    assert float(line.split()[1]) == n + len(tcp), line


async def test_rate_shared_by_the_workers_and_kept_over_sighup(pvm: ProxyVM) -> None:
    started = time.monotonic()
    first = await many_digs("rate.lab.test", 14)
    phase1 = time.monotonic() - started
    allowed = sum(r.status != "REFUSED" for r in first)  # rate.lab.test: NXDOMAIN upstream
    counts = await counts_settle(pvm, 14)
    assert min(counts) > 0, counts  # both workers took part
    # 10/minute refills one token every 6 s: within that time exactly 10 (one bucket, not one per worker)
    assert allowed == 10 + int(phase1 // 6), (allowed, phase1, [r.status for r in first])
    refused = [r for r in first if r.status == "REFUSED"]
    assert {(r.status, tuple(r.ede)) for r in refused} == {("REFUSED", ((18, "rate limit, rule www-rate"),))}

    (Path(pvm.config).parent / "rules.yaml").write_text(RULES_AFTER_RELOAD)
    last = max(x["seq"] for x in pvm.audit_records())
    await asyncio.to_thread(pvm.reload)
    rel = await asyncio.to_thread(
        pvm.wait_audit, lambda x: x.get("request", {}).get("event") == "reload" and x["seq"] > last, 20)
    assert rel["services"] == {"dns": True}, rel
    second = await many_digs("rate.lab.test", 8)
    elapsed = time.monotonic() - started
    allowed2 = sum(r.status != "REFUSED" for r in second)
    assert allowed + allowed2 <= 10 + int(elapsed // 6), (allowed, allowed2, elapsed)
    counts = await counts_settle(pvm, 22)
    assert min(counts) > 0
    recs = await wait_records(pvm, "rate.lab.test", 22)
    assert sum(r["verdict"] == "allow" for r in recs) == allowed + allowed2
    # the reload took effect in both workers
    other = await many_digs("other.lab.test", 8)
    assert {r.status for r in other} == {"REFUSED"}


async def test_kill_9_of_one_worker(pvm: ProxyVM) -> None:
    ws = await asyncio.to_thread(workers, pvm)
    victim, survivor = ws[0]["pid"], ws[1]["pid"]
    await asyncio.to_thread(ProxyVM.kill_worker, victim)
    answers = await many_digs("www.lab.test", 24)  # meanwhile: the other worker answers everything
    assert all(r.status == "NOERROR" for r in answers), [r.text for r in answers if r.status != "NOERROR"][:1]
    deadline = time.monotonic() + 20
    while True:
        ws = await asyncio.to_thread(workers, pvm)
        if ws[0]["pid"] not in (victim, None) and ws[0]["state"] == "ok" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert ws[0]["pid"] not in (victim, survivor, None) and ws[0]["state"] == "ok" and ws[0]["restarts"] == 1, ws
    assert ws[1]["pid"] == survivor and ws[1]["restarts"] == 0
    crash = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("request", {}).get("event") == "service_crash", 10)
    assert crash["service"] == "dns" and crash["worker"] == 0 and "killed by signal 9" in crash["reason"], crash
    # the survivor answered all 24 (the restarted worker's counter starts again at 0)
    before = await counts_settle(pvm, 24)
    assert before == [0, 24], before
    more = await many_digs("www.lab.test", 40)
    assert all(r.status == "NOERROR" for r in more)
    counts = await counts_settle(pvm, sum(before) + 40)
    assert counts[0] > before[0] and counts[1] > before[1], (before, counts)
    await wait_records(pvm, "www.lab.test", 64)
