"""Guests' v1/v2c requests through the in-process service to a real v3-only snmpd."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from snmp_helpers import MONITOR, needs_netsnmp, tool

from tests.labs.snmp_lab import SnmpAgent

pytestmark = [needs_netsnmp, pytest.mark.lab]

SYS_DESCR = "1.3.6.1.2.1.1.1.0"
SYS_NAME = "1.3.6.1.2.1.1.5.0"
SYS_CONTACT = "1.3.6.1.2.1.1.4.0"
SYSTEM = "1.3.6.1.2.1.1"
IF_NUMBER = "1.3.6.1.2.1.2.1.0"
IF_IN_OCTETS_HC = "1.3.6.1.2.1.31.1.1.1.6"


def values(out: str) -> dict[str, str]:
    """`-On` output lines -> {oid: "TYPE: value"}."""
    res = {}
    for line in out.splitlines():
        m = re.match(r"^\.?([\d.]+) = (.*)$", line.strip())
        if m:
            res[m.group(1)] = m.group(2)
    return res


async def test_v2c_get_equals_direct_v3(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(agent=agent)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_DESCR, SYS_NAME, IF_NUMBER)
    assert rc == 0, err
    direct = agent.tool("snmpget", MONITOR, SYS_DESCR, SYS_NAME, IF_NUMBER)
    assert direct.returncode == 0, direct.stderr
    assert values(out) == values(direct.stdout)
    assert "proxyvm lab agent" in out
    rec = run.records(request__op="get")[-1]
    assert rec["verdict"] == "allow" and rec["rule"] == "snmp-read" and rec["guest"] == "mon1"
    assert rec["request"]["agent"] == "lab" and rec["request"]["oid_count"] == 3
    assert rec["request"]["oids"][0] == SYS_DESCR
    assert rec["status"] == "noError" and rec["upstream"]["security"] == "authPriv"
    assert "duration_ms" in rec
    text = repr(run.audit.records)
    assert "authpass" not in text and "privpass" not in text and "labcomm" not in text
