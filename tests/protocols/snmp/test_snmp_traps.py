"""Guests' v1/v2c traps and v2c informs upgraded to SNMPv3 authPriv TRAP/INFORM toward a real
v3-only snmptrapd (which has no community configured, so anything it logs came through as v3)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from snmp_helpers import GUEST_IP, INFORMER, TRAPD_HOST, TRAPPER, creds_yaml, needs_netsnmp, tool

from tests.labs.proc import free_port
from tests.labs.snmp_lab import TrapReceiverLab

pytestmark = [needs_netsnmp, pytest.mark.lab]

TRAP_ADDRESS = "1.3.6.1.6.3.18.1.3.0"


def receivers(d: Path, trapd: TrapReceiverLab, *, dead_inform: str | None = None) -> str:
    lines = ["trap_receivers:"]
    if dead_inform is None:
        lines.append(f'  - {{address: "{trapd.address}", {creds_yaml(d, TRAPPER)}, inform: false}}')
        lines.append(f'  - {{address: "{trapd.address}", {creds_yaml(d, INFORMER)}, inform: true}}')
    else:
        lines.append(f'  - {{address: "{dead_inform}", {creds_yaml(d, INFORMER)}, inform: true, '
                     "timeout: 200ms, retries: 1}")
    return "\n".join(lines)


async def test_v2c_trap_reaches_receiver_as_v3_trap_and_inform(make_proxy, trapd: TrapReceiverLab,
                                                                tmp_path: Path) -> None:
    run = await make_proxy(receivers=receivers(tmp_path, trapd))
    marker = "hello-v2c-trap"
    rc, out, err = await tool(tmp_path, "snmptrap", "-v2c", "-c", "public", run.trap_address, "",
                              "1.3.6.1.4.1.8072.2.3.0.1", "1.3.6.1.2.1.1.5.0", "s", marker)
    assert rc == 0, err
    got = await asyncio.to_thread(trapd.wait_for, marker, count=2)
    kinds = sorted(line.split(",")[0] for line in got)
    assert kinds == ["TRAP INFORM", "TRAP TRAP2"], got
    assert any("user trapper" in g for g in got) and any("user informer" in g for g in got)
    for line in got:
        assert "SNMP v3" in line and f"{TRAP_ADDRESS} = IpAddress: {GUEST_IP}" in line
        assert "1.3.6.1.6.3.1.1.4.1.0 = OID: .1.3.6.1.4.1.8072.2.3.0.1" in line
    for _ in range(100):  # the receiver logs the inform before its ack reaches the proxy
        recs = run.records(request__op="trap")
        if {r["status"] for r in recs} == {"sent", "acknowledged"}:
            break
        await asyncio.sleep(0.05)
    assert {r["status"] for r in recs} == {"sent", "acknowledged"} and all(r["guest"] == "mon1" for r in recs)
    assert all(r["rule"] == "traps" for r in recs)


async def test_v1_trap_is_translated(make_proxy, trapd: TrapReceiverLab, tmp_path: Path) -> None:
    run = await make_proxy(receivers=receivers(tmp_path, trapd))
    marker = "hello-v1-trap"
    rc, out, err = await tool(tmp_path, "snmptrap", "-v1", "-c", "public", run.trap_address,
                              "1.3.6.1.4.1.8072.9", GUEST_IP, "6", "17", "", "1.3.6.1.2.1.1.5.0", "s", marker)
    assert rc == 0, err
    got = await asyncio.to_thread(trapd.wait_for, marker, count=2)
    for line in got:
        # RFC 3584 §3.1.2: enterprise.0.specific
        assert "1.3.6.1.6.3.1.1.4.1.0 = OID: .1.3.6.1.4.1.8072.9.0.17" in line, line
        assert f"{TRAP_ADDRESS} = IpAddress: {GUEST_IP}" in line
    assert run.records(request__version="v1", request__op="trap")


async def test_guest_inform_acked_after_receiver_acked(make_proxy, trapd: TrapReceiverLab, tmp_path: Path) -> None:
    run = await make_proxy(receivers=receivers(tmp_path, trapd))
    marker = "hello-v2c-inform"
    rc, out, err = await tool(tmp_path, "snmpinform", "-v2c", "-c", "public", "-r", "0", "-t", "5",
                              run.trap_address, "", "1.3.6.1.4.1.8072.2.3.0.2", "1.3.6.1.2.1.1.5.0", "s", marker)
    assert rc == 0, err
    await asyncio.to_thread(trapd.wait_for, marker, count=2)
    recs = run.records(request__op="inform")
    assert "acknowledged" in {r["status"] for r in recs}
    assert run.service.counters["informs_acked"] >= 1


async def test_inform_not_acked_when_receiver_is_down(make_proxy, tmp_path: Path) -> None:
    dead = f"{TRAPD_HOST}:{free_port(TRAPD_HOST, 'udp')}"
    run = await make_proxy(receivers=receivers(tmp_path, None, dead_inform=dead))  # type: ignore[arg-type]
    rc, out, err = await tool(tmp_path, "snmpinform", "-v2c", "-c", "public", "-r", "0", "-t", "2",
                              run.trap_address, "", "1.3.6.1.4.1.8072.2.3.0.2", "1.3.6.1.2.1.1.5.0", "s", "lost")
    assert rc != 0 and "Timeout" in err, out + err
    rec = run.records(request__op="inform")[-1]
    assert "receiver timeout" in rec["status"] and rec["upstream"]["address"] == dead
    assert run.service.counters["traps_dropped"] == 1


async def test_trap_with_unknown_community_is_dropped(make_proxy, trapd: TrapReceiverLab, tmp_path: Path) -> None:
    run = await make_proxy(receivers=receivers(tmp_path, trapd))
    rc, out, err = await tool(tmp_path, "snmptrap", "-v2c", "-c", "wrong", run.trap_address, "",
                              "1.3.6.1.4.1.8072.2.3.0.1", "1.3.6.1.2.1.1.5.0", "s", "never-forwarded")
    assert rc == 0  # traps are fire and forget
    rec = None
    for _ in range(50):
        recs = run.records(rule="snmp.community")
        if recs:
            rec = recs[-1]
            break
        await asyncio.sleep(0.05)
    assert rec is not None and rec["status"] == "dropped"
    assert "never-forwarded" not in trapd.text()
