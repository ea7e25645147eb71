"""Forensic capture of SNMP (protocols.capture) in the real `proxyvm run -c CONFIG` in front of the real
v3-only snmpd, net-snmp's snmpget as the v2c guest, tshark reading the pcap back:

* a GET denied by policy is in the guest's pcap ring: the request from the guest's address and port
  to the proxy's, naming the OID, and our authorizationError reply; the community string is masked
  (same length, the BER stays valid);
* an allowed GET is not captured."""

from __future__ import annotations

from pathlib import Path

import pytest
from snmp_helpers import GUEST_IP, PROXY_HOST, needs_netsnmp

from tests.labs.pcap import all_packets, needs_tshark, ring, wait_for
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.labs.snmp_lab import SnmpAgent
from tests.protocols.snmp.test_snmp_reload_rate import (
    ADMIN_IP,
    SYS_DESCR,
    SYS_LOCATION,
    snmpget,
    write_config,
)

pytestmark = [needs_netsnmp, needs_tshark, pytest.mark.lab]

RULES = f"""mode: enforce
default: allow
rules:
  - {{id: no-location, action: deny, protocol: snmp, match: {{oid: ["{SYS_LOCATION}"]}}}}
"""


def test_denied_get_captured(agent: SnmpAgent, tmp_path: Path) -> None:
    port, admin = free_port(PROXY_HOST, "udp"), free_port(ADMIN_IP)
    target = f"{PROXY_HOST}:{port}"
    (tmp_path / "rules.yaml").write_text(RULES)
    fields = ("ip.src", "udp.srcport", "ip.dst", "udp.dstport", "snmp.community", "snmp.name", "snmp.error_status")
    with ProxyVM.from_text(tmp_path, write_config(tmp_path, agent, target, admin, f"[{GUEST_IP}]")) as pv:
        r = snmpget(tmp_path, target, SYS_DESCR, 5, f"--clientaddr={GUEST_IP}")
        assert r.returncode == 0 and "proxyvm lab agent" in r.stdout, r.stdout + r.stderr + pv.tail()
        r = snmpget(tmp_path, target, SYS_LOCATION, 5, f"--clientaddr={GUEST_IP}")
        assert r.returncode != 0 and "authorizationError" in r.stderr, r.stdout + r.stderr
        state = tmp_path / "state"
        pk = wait_for(lambda: (p := all_packets(ring(state, "mon1"), *fields, decode=(f"udp.port=={port},snmp",)))
                      and p, 15, "the pcap")
        # snmpget picks its own port: the audit record names it, as the proxy's socket saw it
        rec = pv.wait_audit(lambda x: x.get("protocol") == "snmp" and x.get("rule") == "no-location")
        gport = rec["src"].rpartition(":")[2]
    assert [(p["ip.src"], p["udp.srcport"], p["ip.dst"], p["udp.dstport"], p["snmp.name"]) for p in pk] == [
        (GUEST_IP, str(gport), PROXY_HOST, str(port), SYS_LOCATION),
        (PROXY_HOST, str(port), GUEST_IP, str(gport), SYS_LOCATION)], pk
    assert pk[1]["snmp.error_status"] == "16", pk  # authorizationError, as the guest got it
    assert {p["snmp.community"] for p in pk} == {"*******"}  # "labcomm", masked
    raw = b"".join(f.read_bytes() for f in ring(state, "mon1"))
    assert b"labcomm" not in raw and SYS_DESCR.encode() not in raw
