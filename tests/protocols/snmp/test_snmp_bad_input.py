"""Bad guest input: each gets the correct SNMP error or a counted, audited drop, and the listener
stays up. Datagrams here are crafted on purpose (no real client sends them)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snmp_helpers import GUEST_IP, PROXY_HOST, needs_netsnmp

from protocols.snmp import ber
from tests.labs.snmp_lab import SnmpAgent

pytestmark = [needs_netsnmp, pytest.mark.lab]

SYS_NAME = ber.oid_parse("1.3.6.1.2.1.1.5.0")


def get(community: bytes = b"labcomm", *, tag: int = ber.GET, version: int = ber.V2C, rid: int = 77,
        oids: list[tuple[int, ...]] | None = None, a: int = 0, b: int = 0) -> bytes:
    vbs = [ber.varbind(o) for o in (oids or [SYS_NAME])]
    return ber.CommunityMessage(version, community, ber.PDU(tag, rid, a, b, vbs)).encode()


class Guest:
    """A raw UDP guest bound to GUEST_IP (guest mon1)."""

    def __init__(self, target: tuple[str, int]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((GUEST_IP, 0))
        self.sock.setblocking(False)
        self.target = target

    async def ask(self, data: bytes, timeout: float = 3.0) -> bytes | None:
        loop = asyncio.get_running_loop()
        self.sock.sendto(data, self.target)
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def proxy(make_proxy, agent: SnmpAgent, tmp_path: Path):
    run = await make_proxy(agent=agent, extra="max_repetitions: 10\nlimits: {max_varbinds: 16, guest_inflight: 64}")
    g = Guest((PROXY_HOST, run.port))
    yield run, g
    g.close()


async def still_up(g: Guest) -> None:
    reply = await g.ask(get(rid=4242))
    for _ in range(1000):  # skip answers to earlier requests still queued on the socket
        assert reply is not None, "listener did not answer a valid GET after bad input"
        m = ber.decode_community(reply)
        if m.pdu.request_id == 4242:
            break
        reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(g.sock, 65535), 3)
    assert m.pdu.request_id == 4242 and m.pdu.error_status == 0 and m.pdu.varbinds[0].tag == ber.OCTET_STRING


BAD = {
    "garbage": b"\x00\x01\x02garbage",
    "truncated": get()[:-5],
    "length-past-end": b"\x30\x82\xff\xff" + get()[4:],
    "indefinite-length": b"\x30\x80" + get()[2:] + b"\x00\x00",
    "trailing-bytes": get() + b"\x00",
    "empty": b"",
    "wrong-version-2": get(version=2),
    "wrong-version-7": get(version=7),
    "getbulk-in-v1": get(version=ber.V1, tag=ber.GETBULK),
    "response-pdu": get(tag=ber.RESPONSE),
    "trap-on-agent-port": get(tag=ber.TRAP_V2),
    "bad-oid": get()[:-6] + b"\x06\x02\x2b\x86" + get()[-2:],
}


@pytest.mark.parametrize("name", list(BAD))
async def test_malformed_is_dropped_and_audited(proxy, name: str) -> None:
    run, g = proxy
    assert await g.ask(BAD[name], timeout=0.3) is None
    rec = run.audit.records[-1]
    assert rec["verdict"] == "deny" and rec["status"] == "dropped" and rec["guest"] == "mon1"
    assert rec["rule"] == "snmp.malformed"
    assert run.service.counters["malformed"] >= 1
    await still_up(g)


async def test_v3_from_guest_is_dropped_with_alarm(proxy) -> None:
    run, g = proxy
    from protocols.snmp import usm
    probe = usm.build_discovery(1, 1)
    assert await g.ask(probe, timeout=0.3) is None
    rec = run.audit.records[-1]
    assert rec["rule"] == "snmp.v3-from-guest" and rec["alarm"] == "snmpv3 from guest"
    assert run.service.counters["v3_from_guest"] == 1
    await still_up(g)


async def test_oversized_varbind_list_gets_toobig(proxy) -> None:
    run, g = proxy
    reply = await g.ask(get(oids=[SYS_NAME] * 17, rid=9))
    assert reply is not None
    m = ber.decode_community(reply)
    assert m.pdu.error_status == ber.TOO_BIG and m.pdu.varbinds == [] and m.pdu.request_id == 9
    reply = await g.ask(get(oids=[SYS_NAME] * 17, rid=10, version=ber.V1))
    m = ber.decode_community(reply)
    assert m.pdu.error_status == ber.TOO_BIG and len(m.pdu.varbinds) == 17  # v1 echoes the request
    assert run.records(status="tooBig")
    await still_up(g)


async def test_huge_max_repetitions_is_clamped(proxy) -> None:
    run, g = proxy
    reply = await g.ask(get(tag=ber.GETBULK, oids=[ber.oid_parse("1.3.6.1.2.1.1")], a=0, b=2**31 - 1))
    m = ber.decode_community(reply)
    assert m.pdu.error_status == 0 and 0 < len(m.pdu.varbinds) <= 10
    rec = run.records(request__op="getbulk")[-1]
    assert rec["request"]["max_repetitions"] == 10 and rec["clamped_from"] == 2**31 - 1
    # negative non-repeaters/max-repetitions are treated as 0 (RFC 3416 §4.2.3)
    reply = await g.ask(get(tag=ber.GETBULK, oids=[ber.oid_parse("1.3.6.1.2.1.1")], a=-5, b=-5, rid=11))
    m = ber.decode_community(reply)
    assert m.pdu.request_id == 11 and m.pdu.error_status == 0 and m.pdu.varbinds == []


async def test_response_size_is_bounded(make_proxy, agent: SnmpAgent) -> None:
    run = await make_proxy(agent=agent, extra="limits: {max_response_size: 484}")
    g = Guest((PROXY_HOST, run.port))
    try:
        reply = await g.ask(get(tag=ber.GETBULK, oids=[ber.oid_parse("1.3.6.1.2.1.1")], a=0, b=40))
        assert reply is not None and len(reply) <= 484
        m = ber.decode_community(reply)
        assert m.pdu.error_status == 0 and 1 <= len(m.pdu.varbinds) < 40
        # a GET whose answer cannot fit (40 x sysDescr): tooBig with no varbinds
        reply = await g.ask(get(oids=[ber.oid_parse("1.3.6.1.2.1.1.1.0")] * 40, rid=5))
        m = ber.decode_community(reply)
        assert len(reply) <= 484
        assert m.pdu.error_status == ber.TOO_BIG, m.pdu
    finally:
        g.close()


async def test_flood_from_one_guest_is_dropped_and_counted(make_proxy, agent: SnmpAgent) -> None:
    run = await make_proxy(agent=agent, extra="limits: {guest_rate: 50}")
    g = Guest((PROXY_HOST, run.port))
    try:
        for i in range(300):
            g.sock.sendto(get(rid=1000 + i), g.target)
        await asyncio.sleep(1.0)
        assert run.service.counters["flood_dropped"] >= 200
        flood = run.records(rule="snmp.limits")
        assert 1 <= len(flood) <= 3  # audited, but not one record per dropped packet
        assert "dropped" in flood[0]["reason"]
        await asyncio.sleep(0.2)
        await still_up(g)
    finally:
        g.close()


async def test_handle_datagram_survives_fuzz(make_proxy, agent: SnmpAgent) -> None:
    """Random and mutated datagrams straight into the service: never an exception, and any reply
    is a well-formed v1/v2c Response."""
    run = await make_proxy(agent=agent, extra="timeout: 100ms\nretries: 0")
    svc = run.service
    seeds = [get(), get(tag=ber.GETNEXT), get(tag=ber.GETBULK, b=3), get(version=ber.V1), get(tag=ber.SET)]
    results: list[bytes | None] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.one_of(
        st.binary(max_size=300),
        st.tuples(st.sampled_from(seeds), st.integers(0, 200), st.binary(min_size=1, max_size=4)).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]):]),
    ))
    def fuzz(data: bytes) -> None:
        results.append(data)

    fuzz()
    for data in results:
        reply = await svc.handle_datagram(data, (GUEST_IP, 40000), None)
        if reply is not None:
            m = ber.decode_community(reply)
            assert m.pdu.tag == ber.RESPONSE
    assert svc.counters["internal_errors"] == 0
