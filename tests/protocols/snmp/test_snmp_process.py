"""Through the real `proxyvm run -c` process: a v2c walk reaches the v3-only agent, traps go out as
v3, policy reloads on SIGHUP, and the audit log has one record per request."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from snmp_helpers import GUEST_IP, PROXY_ENGINE_ID, PROXY_HOST, TRAPPER, creds_yaml, needs_netsnmp

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.labs.snmp_lab import SnmpAgent, TrapReceiverLab, client_env

pytestmark = [needs_netsnmp, pytest.mark.lab, pytest.mark.slow]

RULES = """\
mode: enforce
default: deny
rules:
  - id: read-system
    action: allow
    protocol: snmp
    guests: [mon1]
    match: {op: [get, getnext, getbulk], oid: ["1.3.6.1.2.1.1"]}
  - id: traps
    action: allow
    protocol: snmp
    match: {op: [trap]}
"""


def run(workdir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([argv[0], f"--clientaddr={GUEST_IP}", *argv[1:]], env=client_env(workdir),
                          capture_output=True, text=True, timeout=30)


def test_walk_and_trap_through_proxyvm_run(agent: SnmpAgent, trapd: TrapReceiverLab, tmp_path: Path) -> None:
    from snmp_helpers import MONITOR
    port = free_port(PROXY_HOST, "udp")
    tport = free_port(PROXY_HOST, "udp")
    admin = free_port("127.0.6.2")
    (tmp_path / "rules.yaml").write_text(RULES)
    config = f"""\
guests:
  mon1: {{addresses: [{GUEST_IP}]}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "127.0.6.2:{admin}"}}
state_dir: state
dns: false
http: false
snmp:
  listen: ["{PROXY_HOST}:{port}"]
  traps_listen: ["{PROXY_HOST}:{tport}"]
  communities: [public]
  engine_id: "0x{PROXY_ENGINE_ID}"
  agents:
    lab: {{address: "{agent.address}", community: labcomm, {creds_yaml(tmp_path, MONITOR)}}}
  trap_receivers:
    - {{address: "{trapd.address}", {creds_yaml(tmp_path, TRAPPER)}}}
"""
    with ProxyVM.from_text(tmp_path, config) as pv:
        r = run(tmp_path, "snmpwalk", "-v2c", "-c", "labcomm", "-On", "-t", "3", f"{PROXY_HOST}:{port}",
                "1.3.6.1.2.1.1")
        assert r.returncode == 0, r.stderr + pv.tail()
        assert "proxyvm lab agent" in r.stdout and r.stdout.count("\n") > 5
        r = run(tmp_path, "snmptrap", "-v2c", "-c", "public", f"{PROXY_HOST}:{tport}", "",
                "1.3.6.1.4.1.8072.2.3.0.1", "1.3.6.1.2.1.1.5.0", "s", "via-proxyvm-run")
        assert r.returncode == 0, r.stderr
        trapd.wait_for("via-proxyvm-run")
        rec = pv.wait_audit(lambda x: x.get("protocol") == "snmp" and x["request"].get("op") == "getnext")
        assert rec["guest"] == "mon1" and rec["rule"] == "read-system" and rec["at"].endswith("rules.yaml:4")
        # SIGHUP: a new policy that denies everything applies without a restart
        (tmp_path / "rules.yaml").write_text("mode: enforce\ndefault: deny\nrules: []\n")
        pv.reload()
        deadline = time.monotonic() + 10
        while True:
            r = run(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "2",
                    f"{PROXY_HOST}:{port}", "1.3.6.1.2.1.1.5.0")
            if "authorizationError" in r.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "authorizationError" in r.stderr, r.stdout + r.stderr
        text = pv.audit_path.read_text()
        assert "authpass" not in text and "privpass" not in text and "labcomm" not in text
    assert subprocess.run([sys.executable, "-m", "proxyvm", "audit", "verify", str(pv.audit_path)],
                          capture_output=True).returncode == 0
