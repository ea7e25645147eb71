"""The DoT upstream pool against real Unbound instances: strict authentication (name, pin, no
plaintext ever), failover with in-flight retry, probing back, keepalive, session resumption, ID
remapping and stampede protection."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from dnsfront_lab import dig, pick_ip, start_unbound

from tests.labs.pki import LabCA, spki_pin
from tests.protocols.dns.conftest import PROXY_IP, needs_peers, up_yaml

pytestmark = [needs_peers, pytest.mark.lab]


def _no_plaintext_queries(up, qname: str) -> None:
    assert up.queries_logged(qname) == [], "the upstream received the query in plaintext"


async def test_wrong_certificate_name_is_servfail_with_alarm(make_proxy, upstream1) -> None:
    p = await make_proxy(up_yaml(upstream1, name="other.lab.test"))
    r = await dig(PROXY_IP, p.port, "wrongname.lab.test", "A")
    assert r.status == "SERVFAIL" and r.ede and r.ede[0][0] == 23, r.text
    [rec] = p.records()
    assert rec["rcode"] == "SERVFAIL" and rec["ede"] == 23
    assert "alarm" in rec and "other.lab.test" in rec["alarm"]
    _no_plaintext_queries(upstream1, "wrongname.lab.test")
    h = p.svc.health()
    assert h["state"] == "degraded" and h["upstreams"][0]["state"] == "down"


async def test_certificate_from_another_ca_is_refused(make_proxy, upstream1, tmp_path: Path) -> None:
    other = LabCA(tmp_path / "other-ca", name="someone else")
    p = await make_proxy(up_yaml(upstream1), f"ca_file: {other.ca_pem}")
    r = await dig(PROXY_IP, p.port, "otherca.lab.test", "A")
    assert r.status == "SERVFAIL" and r.ede[0][0] == 23
    _no_plaintext_queries(upstream1, "otherca.lab.test")


async def test_spki_pins(make_proxy, upstream1, lab_ca: LabCA, tmp_path: Path) -> None:
    wrong_cert, _ = lab_ca.issue(["unrelated.lab.test"], stem="unrelated")
    p = await make_proxy(up_yaml(upstream1, pins=[spki_pin(wrong_cert)]))
    r = await dig(PROXY_IP, p.port, "wrongpin.lab.test", "A")
    assert r.status == "SERVFAIL" and r.ede[0][0] == 23, r.text
    assert "pin" in p.records()[-1]["alarm"]
    _no_plaintext_queries(upstream1, "wrongpin.lab.test")
    # the right pin (next to a wrong one: any listed pin may match) works
    p2 = await make_proxy(up_yaml(upstream1, pins=[spki_pin(wrong_cert), spki_pin(upstream1.cert)]))
    r = await dig(PROXY_IP, p2.port, "www.lab.test", "A")
    assert r.status == "NOERROR"


@pytest.mark.skipif(not shutil.which("tcpdump"), reason="tcpdump is not installed")
async def test_plaintext_only_upstream_gets_no_plaintext(make_proxy, lab_dir: Path, tmp_path: Path) -> None:
    """An upstream that only speaks plain DNS on the configured port: SERVFAIL, and a capture of
    every packet to it shows the query name never crossed the wire."""
    ip = pick_ip((8853,))
    plain = start_unbound(lab_dir, None, ip, dot_port=8853, plain_only=True)
    pcap = tmp_path / "lo.pcap"
    cap = await asyncio.create_subprocess_exec(
        "tcpdump", "-i", "lo", "-U", "-n", "-w", str(pcap), "host", ip,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert cap.stderr is not None
        await asyncio.wait_for(cap.stderr.readline(), 10)  # "listening on lo ..." once it runs
        p = await make_proxy(
            f'- {{address: "{ip}:8853", name: plain.lab.test}}', "timeouts: {connect: 700ms, query: 2s}"
        )
        r = await dig(PROXY_IP, p.port, "secretname.lab.test", "A")
        assert r.status == "SERVFAIL" and r.ede and r.ede[0][0] in (22, 23), r.text
        await asyncio.sleep(0.3)
    finally:
        cap.terminate()
        await asyncio.wait_for(cap.wait(), 5)
        plain.stop()
    data = pcap.read_bytes()
    assert len(data) > 200  # the capture saw our connection attempt (TLS ClientHello)
    assert b"secretname" not in data
    assert plain.queries_logged("secretname.lab.test") == []


async def test_failover_when_upstream_killed_mid_run(make_proxy, upstream1, lab_dir: Path, lab_ca: LabCA) -> None:
    vip = pick_ip()
    victim = start_unbound(lab_dir, lab_ca, vip, name="dot2.lab.test")
    try:
        p = await make_proxy(up_yaml(victim) + "\n" + up_yaml(upstream1), "timeouts: {probe: 300ms}")
        base = time.time_ns()

        async def one(i: int) -> str:
            m = dns.message.make_query(f"fo{base}-{i}.wild.test", "A")
            r = await dns.asyncquery.udp(m, p.ip, port=p.port, timeout=6)
            return dns.rcode.to_text(r.rcode())

        first = await asyncio.gather(*(one(i) for i in range(30)))
        assert set(first) == {"NOERROR"}
        assert {x["upstream"]["address"] for x in p.records()} == {f"{vip}:853"}  # config order
        # kill it while queries are in flight
        batch = [asyncio.ensure_future(one(i)) for i in range(30, 130)]
        await asyncio.sleep(0.01)
        victim.daemon.kill9()
        results = await asyncio.gather(*batch)
        assert set(results) == {"NOERROR"}, results
        used = {x["upstream"]["address"] for x in p.records()[30:]}
        assert f"{upstream1.address}:853" in used
        h = {u["address"]: u for u in p.svc.health()["upstreams"]}
        assert h[f"{vip}:853"]["state"] == "down", [(x["address"], x["last_error"], x["failures"], x["connects"]) for x in h.values()]
        # it comes back: the prober re-establishes a verified connection
        victim = start_unbound(lab_dir, lab_ca, vip, name="dot2.lab.test")
        for _ in range(50):
            await asyncio.sleep(0.1)
            if {u["address"]: u for u in p.svc.health()["upstreams"]}[f"{vip}:853"]["state"] == "up":
                break
        else:
            pytest.fail("upstream not probed back into rotation")
    finally:
        victim.stop()


async def test_keepalive_resumption_and_idle_reconnect(make_proxy, upstream1) -> None:
    p = await make_proxy(up_yaml(upstream1), "timeouts: {upstream_idle: 400ms}")
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A")
    assert r.status == "NOERROR"
    up = p.svc.fw.pool.upstreams[0]
    # Unbound answered our empty keepalive option with its 20 s timeout; we keep our own 0.4 s
    assert up.conn is not None and up.conn.keepalive_seen and up.conn.idle_timeout == pytest.approx(0.4)
    await asyncio.sleep(0.8)  # idle close
    assert up.conn is None or up.conn.closed
    r = await dig(PROXY_IP, p.port, "short.lab.test", "A")
    assert r.status == "NOERROR"
    recs = p.records()
    assert recs[0]["upstream"]["resumed"] is False
    assert recs[1]["upstream"]["resumed"] is True  # TLS session resumption on reconnect
    assert up.connects == 2 and up.resumptions == 1


async def test_server_keepalive_lowers_our_idle_timeout(make_proxy, upstream1) -> None:
    p = await make_proxy(up_yaml(upstream1), "timeouts: {upstream_idle: 5m}")
    await dig(PROXY_IP, p.port, "www.lab.test", "A")
    conn = p.svc.fw.pool.upstreams[0].conn
    assert conn is not None and conn.idle_timeout == pytest.approx(19.5)  # 20 s from Unbound - margin


async def test_same_guest_ids_do_not_collide_upstream(make_proxy, upstream1) -> None:
    p = await make_proxy(up_yaml(upstream1))
    base = time.time_ns()
    qs = []
    for i in range(20):
        m = dns.message.make_query(f"id{base}-{i}.wild.test", "A")
        m.id = 4711  # every guest picked the same ID
        qs.append(m)
    rs = await asyncio.gather(*(dns.asyncquery.udp(m, p.ip, port=p.port, timeout=5) for m in qs))
    for q, r in zip(qs, rs, strict=True):
        assert r.id == 4711 and r.question[0].name == q.question[0].name
        assert r.rcode() == 0 and r.answer[0][0].address == "192.0.2.1"


async def test_stampede_one_upstream_query_for_many_misses(make_proxy, upstream1) -> None:
    p = await make_proxy(up_yaml(upstream1))
    name = f"herd{time.time_ns()}.wild.test"
    rs = await asyncio.gather(*(
        dns.asyncquery.udp(dns.message.make_query(name, "A"), p.ip, port=p.port, timeout=5) for _ in range(25)
    ))
    assert all(r.rcode() == 0 for r in rs)
    assert len(upstream1.queries_logged(name)) == 1
    assert p.svc.fw.coalesced + p.svc.fw.cache.hits >= 24


async def test_no_upstream_reachable_is_servfail_ede22(make_proxy) -> None:
    p = await make_proxy(f'- {{address: "{pick_ip()}:853", name: nobody.lab.test}}')
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A")
    assert r.status == "SERVFAIL" and r.ede and r.ede[0][0] == 22, r.text
    assert "alarm" not in p.records()[-1]


async def test_serve_stale_when_upstreams_fail(make_proxy, lab_dir: Path, lab_ca: LabCA) -> None:
    up = start_unbound(lab_dir, lab_ca, pick_ip(), name="dot6.lab.test")
    try:
        p = await make_proxy(up_yaml(up), "cache: {serve_stale: 1h}\ntimeouts: {query: 1s, upstream: 500ms}")
        r = await dig(PROXY_IP, p.port, "short.lab.test", "A")
        assert r.status == "NOERROR" and r.answers[0][1] == 3
    finally:
        up.stop()
    await asyncio.sleep(3.3)
    r = await dig(PROXY_IP, p.port, "short.lab.test", "A")
    assert r.status == "NOERROR" and r.answers[0][1] == 30 and r.ede == [(3, "")], r.text
    assert p.records()[-1]["cache"] == "stale"
    # without serve_stale the same situation is SERVFAIL
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A")
    assert r.status == "SERVFAIL"


async def test_busy_upstream_gets_more_connections(make_proxy, upstream1) -> None:
    import socket

    p = await make_proxy(up_yaml(upstream1), "limits: {upstream_connections: 3}")
    await dig(PROXY_IP, p.port, "www.lab.test", "A")
    base = time.time_ns()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    for i in range(150):  # one burst: many misses in flight on the first connection at once
        s.sendto(dns.message.make_query(f"busy{base}-{i}.wild.test", "A").to_wire(), (p.ip, p.port))
    loop = asyncio.get_running_loop()
    rs = [dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(s, 4096), 8)) for _ in range(150)]
    s.close()
    assert all(r.rcode() == 0 for r in rs)
    up = p.svc.fw.pool.upstreams[0]
    assert 2 <= up.connects <= 3 and len(up.conns) <= 3
    assert up.resumptions >= 1  # the extra connections resumed the first one's TLS session


async def test_reload_swaps_upstreams_and_keeps_cache(make_proxy, upstream1, lab_dir: Path, lab_ca: LabCA) -> None:
    import dataclasses

    from policy import load_policy

    other = start_unbound(lab_dir, lab_ca, pick_ip(), name="dot9.lab.test")
    try:
        p = await make_proxy(up_yaml(upstream1))
        await dig(PROXY_IP, p.port, "www.lab.test", "A")
        ups = (dataclasses.replace(p.settings.upstreams[0], host=other.address, name=other.name),)
        new = dataclasses.replace(p.settings, upstreams=ups)
        rules = next(iter(Path(p.svc.engine.file).parent.glob("rules-*.yaml")))
        await p.svc.reload(new, load_policy(rules))
        r = await dig(PROXY_IP, p.port, "www.lab.test", "A")  # still cached
        assert r.status == "NOERROR" and p.records()[-1]["cache"] == "hit"
        r = await dig(PROXY_IP, p.port, f"after{time.time_ns()}.wild.test", "A")
        assert r.status == "NOERROR"
        assert p.records()[-1]["upstream"]["address"] == f"{other.address}:853"
    finally:
        other.stop()


async def test_stalled_upstream_in_flight_queries_retried_elsewhere(make_proxy, upstream1, lab_dir: Path,
                                                                    lab_ca: LabCA) -> None:
    """SIGSTOP the preferred upstream with queries in flight: each is retried on the other one
    within the guest's patience, and the stalled one leaves rotation."""
    import os
    import signal

    vip = pick_ip()
    victim = start_unbound(lab_dir, lab_ca, vip, name="dot3.lab.test")
    try:
        p = await make_proxy(up_yaml(victim) + "\n" + up_yaml(upstream1),
                             "timeouts: {upstream: 300ms, query: 3s, probe: 1h}")
        assert (await dig(PROXY_IP, p.port, "www.lab.test", "A")).status == "NOERROR"
        assert p.records()[-1]["upstream"]["address"] == f"{vip}:853"
        os.kill(victim.daemon.pid, signal.SIGSTOP)
        base = time.time_ns()
        t0 = time.monotonic()
        rs = await asyncio.gather(*(
            dns.asyncquery.udp(dns.message.make_query(f"st{base}-{i}.wild.test", "A"), p.ip, port=p.port, timeout=5)
            for i in range(20)
        ))
        elapsed = time.monotonic() - t0
        assert all(r.rcode() == 0 for r in rs)
        assert elapsed < 2.0, elapsed  # one 300 ms attempt on the stalled upstream, then the other
        assert {x["upstream"]["address"] for x in p.records()[1:]} == {f"{upstream1.address}:853"}
        h = {u["address"]: u for u in p.svc.health()["upstreams"]}
        assert h[f"{vip}:853"]["state"] == "down" and "timeout" in h[f"{vip}:853"]["last_error"]
        # later queries go straight to the healthy upstream
        t0 = time.monotonic()
        r = await dns.asyncquery.udp(dns.message.make_query(f"after{base}.wild.test", "A"), p.ip, port=p.port,
                                     timeout=5)
        assert r.rcode() == 0 and time.monotonic() - t0 < 0.25
    finally:
        os.kill(victim.daemon.pid, signal.SIGCONT)
        victim.stop()


async def test_expired_upstream_certificate_is_refused(make_proxy, lab_dir: Path, lab_ca: LabCA) -> None:
    up = start_unbound(lab_dir, lab_ca, pick_ip(), name="old.lab.test", expired=True)
    try:
        p = await make_proxy(up_yaml(up))
        r = await dig(PROXY_IP, p.port, "expiredcert.lab.test", "A")
        assert r.status == "SERVFAIL" and r.ede and r.ede[0][0] == 23, r.text
        assert "expired" in p.records()[-1]["alarm"]
        _no_plaintext_queries(up, "expiredcert.lab.test")
    finally:
        up.stop()
