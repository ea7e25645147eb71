"""Transparent mode seam: the gateway hands `handle_datagram(data, src, orig_dst)` a guest datagram
and the original destination; the agent is chosen by that address."""

from __future__ import annotations

from pathlib import Path

import pytest
from snmp_helpers import GUEST_IP, MONITOR, PROXY_ENGINE_ID, PROXY_HOST, creds_yaml, needs_netsnmp

from protocols.snmp import ber
from tests.labs.snmp_lab import SnmpAgent

pytestmark = [needs_netsnmp, pytest.mark.lab]

SYS_NAME = ber.oid_parse("1.3.6.1.2.1.1.5.0")


def request(community: bytes, rid: int = 5, version: int = ber.V2C) -> bytes:
    return ber.CommunityMessage(version, community, ber.PDU(ber.GET, rid, 0, 0, [ber.varbind(SYS_NAME)])).encode()


def transparent_yaml(d: Path, port: int, trap_port: int) -> str:
    return f"""\
listen: ["{PROXY_HOST}:{port}"]
communities: [public]
engine_id: "0x{PROXY_ENGINE_ID}"
default_agent_credentials: {{{creds_yaml(d, MONITOR)}}}
timeout: 300ms
retries: 0
"""


async def test_original_destination_picks_the_agent(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(lambda p, t: transparent_yaml(tmp_path, p, t))
    reply = await run.service.handle_datagram(request(b"public"), (GUEST_IP, 40001), (agent.host, agent.port))
    assert reply is not None
    m = ber.decode_community(reply)
    direct = agent.get("1.3.6.1.2.1.1.5.0", MONITOR).stdout
    assert m.pdu.request_id == 5 and m.pdu.error_status == 0
    assert m.pdu.varbinds[0].value.decode() in direct
    rec = run.audit.records[-1]
    assert rec["request"]["agent"] == f"{agent.host}:{agent.port}" and rec["orig_dst"] == f"{agent.host}:{agent.port}"
    assert rec["guest"] == "mon1" and rec["src"] == f"{GUEST_IP}:40001"


async def test_transparent_unknown_community_is_silent(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(lambda p, t: transparent_yaml(tmp_path, p, t))
    reply = await run.service.handle_datagram(request(b"private"), (GUEST_IP, 40002), (agent.host, agent.port))
    assert reply is None
    assert run.audit.records[-1]["rule"] == "snmp.community"


async def test_transparent_without_default_credentials_is_silent(make_proxy, agent: SnmpAgent,
                                                                 tmp_path: Path) -> None:
    """Fail closed: no credentials for that destination -> nothing leaves, audited."""
    run = await make_proxy(lambda p, t: transparent_yaml(tmp_path, p, t).replace("default_agent_credentials", "#"))
    reply = await run.service.handle_datagram(request(b"public"), (GUEST_IP, 40003), (agent.host, agent.port))
    assert reply is None and run.audit.records[-1]["verdict"] == "deny"
