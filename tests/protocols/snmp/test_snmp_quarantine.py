"""Quarantine of an SNMP guest in the real `proxyvm run -c CONFIG` in front of the real v3-only
snmpd; net-snmp's snmpget is the v2c guest and the CLI quarantines and releases it:

* block and honeypot both refuse with error-status authorizationError (nothing reaches snmpd's
  answer path for that guest); the honeypot also records the request in full (every varbind);
* after release the agent answers again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from snmp_helpers import GUEST_IP, PROXY_HOST, needs_netsnmp

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

pytestmark = [needs_netsnmp, pytest.mark.lab]

RULES = "mode: enforce\ndefault: allow\nrules: []\n"


def quarantine_records(pv: ProxyVM, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        recs = [r for r in pv.audit_records() if r.get("protocol") == "snmp" and r.get("rule") == "quarantine"]
        if len(recs) >= n or time.monotonic() > deadline:
            assert len(recs) == n, recs
            return recs
        time.sleep(0.1)


def test_block_honeypot_release(agent: SnmpAgent, tmp_path: Path) -> None:
    port, admin = free_port(PROXY_HOST, "udp"), free_port(ADMIN_IP)
    target = f"{PROXY_HOST}:{port}"
    guest = f"--clientaddr={GUEST_IP}"
    (tmp_path / "rules.yaml").write_text(RULES)
    with ProxyVM.from_text(tmp_path, write_config(tmp_path, agent, target, admin, f"[{GUEST_IP}]")) as pv:
        r = snmpget(tmp_path, target, SYS_LOCATION, 5, guest)
        assert r.returncode == 0 and r.stdout.strip() == f".{SYS_LOCATION} = STRING: \"lab\"", r.stdout + r.stderr

        assert pv.cli("quarantine", "mon1", "--reason", "sweeping the network").returncode == 0
        r = snmpget(tmp_path, target, SYS_LOCATION, 5, guest)
        assert r.returncode != 0 and "authorizationError" in r.stderr and "STRING" not in r.stdout, r.stdout + r.stderr
        (rec,) = quarantine_records(pv, 1)
        assert rec["verdict"] == "deny" and rec["status"] == "authorizationError" and rec["at"] == "snmp.quarantine"
        assert rec["reason"] == "guest mon1 is quarantined (block, by cli): sweeping the network", rec
        assert rec["upstream"] is None and rec["request"]["oids"] == [SYS_LOCATION]

        assert pv.cli("release", "mon1").returncode == 0
        assert pv.cli("quarantine", "mon1", "--profile", "honeypot").returncode == 0
        r = snmpget(tmp_path, target, SYS_DESCR, 5, guest)
        assert r.returncode != 0 and "authorizationError" in r.stderr, r.stdout + r.stderr
        hp = quarantine_records(pv, 2)[1]
        assert hp["quarantine"] == "honeypot" and hp["status"] == "authorizationError", hp
        (line,) = [json.loads(x) for x in (tmp_path / "state" / "quarantine" / "mon1" / "requests.jsonl")
                   .read_text().splitlines()]
        assert line["protocol"] == "snmp" and line["op"] == "get" and line["agent"] == "lab"
        assert [v["oid"] for v in line["varbinds"]] == [SYS_DESCR] and "labcomm" not in json.dumps(line)

        assert pv.cli("release", "mon1").returncode == 0
        r = snmpget(tmp_path, target, SYS_DESCR, 5, guest)
        assert r.returncode == 0 and r.stdout.strip() == f".{SYS_DESCR} = STRING: \"proxyvm lab agent\"", r.stderr
