"""The SNMP service inside the real `proxyvm run -c CONFIG` process, in front of the real v3-only
snmpd (net-snmp's snmpget is the v2c guest):

* a rule's `rate:` bucket survives a SIGHUP that leaves the rule's id and rate unchanged while the
  rules file around it changes (a new rule goes in before it);
* an IPv6 guest (snmpget udp6:[::1]:PORT to a listener on [::1]:PORT) is audited as `[::1]:PORT`.

Over its rate a request gets no answer at all (SNMP has no "try later" status; the service drops it
like an overloaded agent would), so the guest sees a timeout; every snmpget here runs with
`-r 0`, so one command is one request and one token."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from snmp_helpers import GUEST_IP, MONITOR, PROXY_ENGINE_ID, PROXY_HOST, creds_yaml, needs_netsnmp

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.labs.snmp_lab import SnmpAgent, client_env

pytestmark = [needs_netsnmp, pytest.mark.lab]

ADMIN_IP = "127.0.6.2"
SYS_LOCATION, SYS_DESCR = "1.3.6.1.2.1.1.6.0", "1.3.6.1.2.1.1.1.0"

RATE_RULE = """\
  - id: location-rate
    action: allow
    protocol: snmp
    guests: [mon1]
    match: {op: [get], oid: ["1.3.6.1.2.1.1.6"]}
    rate: 3/hour
"""
RULES = "mode: enforce\ndefault: deny\nrules:\n" + RATE_RULE
# The reload: an unrelated rule goes in *before* the limited one; the limited rule's id and rate
# are unchanged (its index and line number are not).
RULES_AFTER_RELOAD = "mode: enforce\ndefault: deny\nrules:\n" + """\
  - id: read-descr
    action: allow
    protocol: snmp
    match: {op: [get], oid: ["1.3.6.1.2.1.1.1"]}
""" + RATE_RULE


def write_config(d: Path, agent: SnmpAgent, listen: str, admin: int, addresses: str) -> str:
    return f"""\
guests:
  mon1: {{addresses: {addresses}}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{ADMIN_IP}:{admin}"}}
state_dir: state
dns: false
http: false
snmp:
  listen: ["{listen}"]
  communities: [public]
  engine_id: "0x{PROXY_ENGINE_ID}"
  agents:
    lab: {{address: "{agent.address}", community: labcomm, {creds_yaml(d, MONITOR)}}}
"""


def snmpget(workdir: Path, target: str, oid: str, timeout: int, *pre: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["snmpget", *pre, "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", str(timeout), target, oid],
                          env=client_env(workdir), capture_output=True, text=True, timeout=60)


def snmp_records(pv: ProxyVM, after: int = -1) -> list[dict[str, Any]]:
    return [r for r in pv.audit_records() if r.get("protocol") == "snmp" and r["seq"] > after]


def wait_snmp_records(pv: ProxyVM, n: int, after: int = -1, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = snmp_records(pv, after)
        if len(recs) >= n or time.monotonic() > deadline:
            assert len(recs) == n, f"want {n} snmp records after seq {after}, have {recs}"
            return recs
        time.sleep(0.1)


def assert_rate_limited(r: subprocess.CompletedProcess[str], target: str, rec: dict[str, Any]) -> None:
    assert r.returncode != 0 and f"Timeout: No Response from {target}" in r.stderr, r.stdout + r.stderr
    assert "STRING" not in r.stdout
    assert rec["verdict"] == "deny" and rec["rule"] == "location-rate" and rec["guest"] == "mon1", rec
    assert rec["status"] == "dropped (rate limited)", rec
    assert "over rate 3/hour for guest mon1" in rec["reason"], rec
    assert rec["request"]["oids"] == [SYS_LOCATION] and rec["request"]["op"] == "get"


def test_rate_bucket_survives_sighup(agent: SnmpAgent, tmp_path: Path) -> None:
    port, admin = free_port(PROXY_HOST, "udp"), free_port(ADMIN_IP)
    target = f"{PROXY_HOST}:{port}"
    guest = f"--clientaddr={GUEST_IP}"
    (tmp_path / "rules.yaml").write_text(RULES)
    with ProxyVM.from_text(tmp_path, write_config(tmp_path, agent, target, admin, f"[{GUEST_IP}]")) as pv:
        for i in range(3):
            r = snmpget(tmp_path, target, SYS_LOCATION, 5, guest)
            assert r.returncode == 0 and r.stdout.strip() == f".{SYS_LOCATION} = STRING: \"lab\"", \
                f"request {i + 1}: {r.stdout}{r.stderr}{pv.tail()}"
        r = snmpget(tmp_path, target, SYS_LOCATION, 2, guest)
        recs = wait_snmp_records(pv, 4)
        assert [(x["verdict"], x["rule"], x["status"]) for x in recs[:3]] == [("allow", "location-rate", "noError")] * 3
        assert recs[0]["upstream"]["address"] == agent.address, recs[0]["upstream"]
        assert_rate_limited(r, target, recs[3])
        r = snmpget(tmp_path, target, SYS_DESCR, 5, guest)
        assert "authorizationError" in r.stderr, r.stdout + r.stderr  # not allowed yet
        # every request's record is in before the reload (the supervisor's reload record may
        # otherwise overtake a worker's record still in flight)
        assert wait_snmp_records(pv, 5)[4]["rule"] == "default"
        (tmp_path / "rules.yaml").write_text(RULES_AFTER_RELOAD)
        last = max(x["seq"] for x in pv.audit_records())
        pv.reload()
        rel = pv.wait_audit(lambda x: x.get("request", {}).get("event") == "reload" and x["seq"] > last, 20)
        assert rel["protocol"] == "proxyvm" and rel["services"] == {"snmp": True}, rel

        r = snmpget(tmp_path, target, SYS_LOCATION, 2, guest)
        (rec,) = wait_snmp_records(pv, 1, after=rel["seq"])
        assert_rate_limited(r, target, rec)
        # the reload did take effect: the new rule lets sysDescr through
        r = snmpget(tmp_path, target, SYS_DESCR, 5, guest)
        assert r.returncode == 0 and r.stdout.strip() == f".{SYS_DESCR} = STRING: \"proxyvm lab agent\"", r.stdout + r.stderr


def test_ipv6_guest_is_audited_with_brackets(agent: SnmpAgent, tmp_path: Path) -> None:
    port, admin = free_port("::1", "udp"), free_port(ADMIN_IP)
    (tmp_path / "rules.yaml").write_text(RULES_AFTER_RELOAD)
    with ProxyVM.from_text(tmp_path, write_config(tmp_path, agent, f"[::1]:{port}", admin, '["::1"]')) as pv:
        r = snmpget(tmp_path, f"udp6:[::1]:{port}", SYS_LOCATION, 5)
        assert r.returncode == 0 and r.stdout.strip() == f".{SYS_LOCATION} = STRING: \"lab\"", r.stdout + r.stderr + pv.tail()
        r = snmpget(tmp_path, f"udp6:[::1]:{port}", "1.3.6.1.2.1.1.4.0", 5)  # sysContact: no rule allows it
        assert "authorizationError" in r.stderr, r.stdout + r.stderr
        ok, denied = wait_snmp_records(pv, 2)
        for rec in (ok, denied):
            assert rec["guest"] == "mon1", rec
            assert re.fullmatch(r"\[::1\]:\d+", rec["src"]), rec["src"]
        assert ok["verdict"] == "allow" and ok["rule"] == "location-rate" and ok["status"] == "noError"
        assert denied["verdict"] == "deny" and denied["rule"] == "default" and denied["status"] == "authorizationError"
        # the agent (IPv4 here) keeps the plain a.b.c.d:port form
        assert ok["upstream"]["address"] == agent.address and re.fullmatch(r"127(\.\d+){3}:\d+", agent.address)
