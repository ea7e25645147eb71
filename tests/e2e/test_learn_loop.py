"""The loop closes: real guests (dig, swaks, snmpget/snmpwalk, curl) through `proxyvm run` in
`mode: learn`; `proxyvm learn` makes a rules file; `proxyvm check` accepts it; `proxyvm replay` of
the learned traffic changes nothing; in enforce mode the same traffic passes again and a request
never seen before is denied; and a log holding that request as allowed replays as allow->deny.

Peers (real daemons, on 127.0.13.x so they never meet another test area's labs): Unbound as the
DoT upstream, Postfix as the STARTTLS relay with AUTH, a v3-only snmpd, nginx for HTTPS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.labs import nginx_lab
from tests.labs import postfix as pflab
from tests.labs.pki import LabCA
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.labs.snmp_lab import SnmpAgent, client_env, have_netsnmp
from tests.protocols.dns.dnsfront_lab import pick_ip, start_unbound
from tests.protocols.snmp.snmp_helpers import MONITOR, creds_yaml

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PROXY = "127.0.13.1"
WEB1, MAIL1, MON1 = "127.0.13.2", "127.0.13.3", "127.0.13.4"
MX_IP, AGENT_IP = "127.0.13.30", "127.0.13.40"
NGINX_IPS = {"main_ip": "127.0.13.50", "untrusted_ip": "127.0.13.51", "plain_ip": "127.0.13.52", "legacy_ip": None}
RELAY_USER, RELAY_PASSWORD = "relayuser", "learn-loop-relay-pw"


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root (postfix, nginx on 443)"
    for tool in ("unbound", "dig", "swaks", "curl"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not have_netsnmp():
        return "net-snmp is not installed"
    if not nginx_lab.available():
        return "nginx is not installed"
    return pflab.available()


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, Any]]:
    why = _missing()
    if why:
        pytest.skip(why)
    d = Path(tempfile.mkdtemp(prefix="pvm-learn-loop-"))  # postfix labs live outside pytest's basetemp
    d.chmod(0o755)
    ca = LabCA(d / "ca", "learn loop CA")
    started: list[Any] = []
    try:
        unbound = start_unbound(d, ca, pick_ip(), name="dot1.lab.test")
        started.append(unbound)
        mx_cert, mx_key = ca.issue(["relay.lab.test", MX_IP], stem="mx")
        mx = pflab.PostfixLab(d / "postfix", MX_IP, 25, cert=mx_cert, key=mx_key, domains=("example.org",),
                              sasl_users={RELAY_USER: RELAY_PASSWORD})
        mx.start()
        started.append(mx)
        agent = SnmpAgent(d, AGENT_IP, free_port(AGENT_IP, "udp"), [MONITOR]).start()
        started.append(agent)
        web = nginx_lab.NginxLab(d / "nginx", **NGINX_IPS)
        web.start()
        started.append(web)
        yield {"dir": d, "ca": ca, "unbound": unbound, "mx": mx, "agent": agent, "web": web}
    finally:
        for p in reversed(started):
            p.stop()
        shutil.rmtree(d, ignore_errors=True)


def _config(d: Path, peers: dict[str, Any]) -> tuple[Path, dict[str, int]]:
    ports = {"admin": free_port(PROXY), "dns": free_port(PROXY), "smtp": free_port(PROXY),
             "snmp": free_port(PROXY, "udp"), "http": free_port(PROXY), "proxy": free_port(PROXY)}
    (d / "relay.pass").write_text(RELAY_PASSWORD + "\n")
    (d / "relay.pass").chmod(0o600)
    ca = peers["ca"].ca_pem
    hosts = "\n".join(f"    {k}: {v}" for k, v in peers["web"].hosts().items())
    up = peers["unbound"]
    text = f"""\
guests:
  web1: {{addresses: [{WEB1}]}}
  mail1: {{addresses: [{MAIL1}]}}
  mon1: {{addresses: [{MON1}]}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{PROXY}:{ports['admin']}"}}
state_dir: state
dns:
  listen: ["{PROXY}:{ports['dns']}"]
  ca_file: {ca}
  dnssec: off
  rebinding_protection: false
  upstreams:
    - {{address: "{up.address}:853", name: {up.name}}}
smtp:
  listen: ["{PROXY}:{ports['smtp']}"]
  spool: spool
  relay: {{host: relay.lab.test, port: 25, address: "{MX_IP}",
          auth: {{username: {RELAY_USER}, password_file: relay.pass}}}}
  tls: verify
  ca_file: {ca}
  hostname: proxyvm.lab.test
snmp:
  listen: ["{PROXY}:{ports['snmp']}"]
  agents:
    lab: {{address: "{peers['agent'].address}", community: labcomm, {creds_yaml(d, MONITOR)}}}
http:
  listen: ["{PROXY}:{ports['http']}"]
  proxy_listen: ["{PROXY}:{ports['proxy']}"]
  ca_file: {peers['web'].ca_pem}
  ssrf_guard: false
  hosts:
{hosts}
"""
    cfg = d / "proxyvm.yaml"
    cfg.write_text(text)
    return cfg, ports


# -- the guests' real clients --------------------------------------------------------------------
def dig(ports: dict[str, int], name: str, qtype: str = "A") -> str:
    out = subprocess.run(["dig", f"@{PROXY}", "-p", str(ports["dns"]), "-b", WEB1, "+tries=1", "+time=5",
                          name, qtype], capture_output=True, text=True, timeout=30).stdout
    return out.split("status: ", 1)[1].split(",", 1)[0] if "status: " in out else out


def swaks(ports: dict[str, int], sender: str, rcpt: str, subject: str) -> str:
    return subprocess.run(["swaks", "--server", PROXY, "--port", str(ports["smtp"]), "--local-interface", MAIL1,
                           "--helo", "mail1.lab.test", "--from", sender, "--to", rcpt, "--header",
                           f"Subject: {subject}", "--timeout", "20"],
                          capture_output=True, text=True, timeout=60).stdout


def snmp(d: Path, ports: dict[str, int], tool: str, oid: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, f"--clientaddr={MON1}", "-v2c", "-c", "labcomm", "-On", "-t", "3", "-r", "1",
                           f"{PROXY}:{ports['snmp']}", oid], env=client_env(d), capture_output=True, text=True,
                          timeout=60)


def curl(ports: dict[str, int], url: str, ca: Path) -> int:
    out = subprocess.run(["curl", "-sS", "--max-time", "15", "--interface", WEB1, "-x",
                          f"http://{PROXY}:{ports['proxy']}", "--cacert", str(ca), "-o", "/dev/null",
                          "-w", "%{http_code}", url], capture_output=True, text=True, timeout=60).stdout
    return int(out) if out.isdigit() else 0


def same_traffic(d: Path, ports: dict[str, int], peers: dict[str, Any], tag: str) -> None:
    """What the guests do, both while learning and under the learned policy: every step must work."""
    assert dig(ports, "www.lab.test", "A") == "NOERROR"
    assert dig(ports, "www.lab.test", "AAAA") == "NOERROR"
    assert dig(ports, "mx.lab.test", "MX") == "NOERROR"
    assert dig(ports, "alias.lab.test", "A") == "NOERROR"
    out = swaks(ports, "alice@example.com", "bob@example.org", f"loop {tag}")
    assert "250 2.0.0 Ok: queued as" in out, out
    r = snmp(d, ports, "snmpget", "1.3.6.1.2.1.1.1.0")
    assert r.returncode == 0 and "proxyvm lab agent" in r.stdout, r.stdout + r.stderr
    r = snmp(d, ports, "snmpwalk", "1.3.6.1.2.1.1")
    assert r.returncode == 0 and r.stdout.count("\n") > 5, r.stdout + r.stderr
    ca = peers["web"].ca_pem  # nginx's own lab CA
    assert curl(ports, "http://www.lab.test/echo", ca) == 200
    assert curl(ports, "http://www.lab.test/files/1k.bin", ca) == 200
    assert curl(ports, "https://www.lab.test/echo", ca) == 200  # CONNECT: TLS passthrough by SNI


def pvm_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyvm", *args], capture_output=True, text=True, timeout=300)


def _reload(pvm: ProxyVM, n: int) -> None:
    """SIGHUP and wait for the n-th reload record (the new policy is in force in every service)."""
    pvm.reload()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reloads = [r for r in pvm.audit_records() if r.get("kind") == "reload"]
        if len(reloads) >= n:
            assert reloads[n - 1]["request"]["event"] == "reload", reloads[n - 1]
            assert all(reloads[n - 1]["services"].values()), reloads[n - 1]
            return
        time.sleep(0.2)
    raise TimeoutError(pvm.tail())


def test_learn_then_enforce_then_replay(peers: dict[str, Any], tmp_path: Path) -> None:
    d = tmp_path
    d.chmod(0o755)  # workers drop privileges after binding
    cfg, ports = _config(d, peers)
    rules = d / "rules.yaml"
    rules.write_text("mode: learn\ndefault: deny\n")
    pvm = ProxyVM(cfg)
    pvm.start(timeout=90)
    try:
        _, health = pvm.healthz()
        assert health["policy_mode"] == "learn" and health["warnings"], health
        # 1. learn: the guests' ordinary traffic, everything allowed and recorded as rule "learn"
        same_traffic(d, ports, peers, "learn")
        peers["mx"].find(b"loop learn")
        pvm.wait_audit(lambda r: r.get("protocol") == "http" and r.get("request", {}).get("path") == "/files/1k.bin")
        pvm.wait_audit(lambda r: r.get("protocol") == "tls")
        learned_phase = [r for r in pvm.audit_records() if r.get("protocol") in ("dns", "smtp", "snmp", "http", "tls")
                         and "kind" not in r and "event" not in r or r.get("event") == "rcpt"]
        assert {r["protocol"] for r in learned_phase} == {"dns", "smtp", "snmp", "http", "tls"}
        assert {(r["verdict"], r["rule"]) for r in learned_phase} == {("allow", "learn")}

        # 2. learn a policy from the config's log; check accepts it; replaying the log changes nothing
        learned = d / "learned.yaml"
        r = pvm_cli("learn", "-c", str(cfg), "--mode", "enforce", "-o", str(learned))
        assert r.returncode == 0, r.stderr
        text = learned.read_text()
        assert '"*.lab.test"' in text  # www, mx, alias: three names under lab.test
        assert '"1.3.6.1.2.1.1"' in text  # the walk collapsed to the system group
        assert text.rstrip().endswith("default: deny")
        r = pvm_cli("replay", "-c", str(cfg), "--json", "--policy", str(learned))
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        assert rep["allow_to_deny"] == 0 and rep["deny_to_allow"] == 0 and rep["unchanged"] >= len(learned_phase)

        # 3. enforce the learned policy (SIGHUP); the same traffic passes, something new does not
        rules.write_text(text)
        c = pvm_cli("check", "-c", str(cfg))
        assert c.returncode == 0, c.stdout + c.stderr
        _reload(pvm, 1)
        _, health = pvm.healthz()
        assert health["policy_mode"] == "enforce" and "warnings" not in health
        same_traffic(d, ports, peers, "enforce")
        peers["mx"].find(b"loop enforce")
        assert dig(ports, "new.wild.test", "A") == "REFUSED"
        assert curl(ports, "http://www.lab.test/secret", peers["web"].ca_pem) == 403
        denied = pvm.wait_audit(lambda r: r.get("request", {}).get("qname") == "new.wild.test")
        assert (denied["verdict"], denied["rule"]) == ("deny", "default")
        enforced = pvm.wait_audit(lambda r: (r.get("rule") or "").startswith("learn-mon1-snmp"))
        assert enforced["verdict"] == "allow"

        # 4. back to learn mode, the new request is allowed and recorded...
        rules.write_text("mode: learn\ndefault: deny\n")
        _reload(pvm, 2)
        assert dig(ports, "new.wild.test", "A") == "NOERROR"
        pvm.wait_audit(lambda r: r.get("request", {}).get("qname") == "new.wild.test" and r["verdict"] == "allow")
    finally:
        assert pvm.stop() == 0, pvm.tail()
    # ...so replaying the whole log under the learned policy reports exactly that one as allow->deny
    r = pvm_cli("replay", "-c", str(cfg), "--json", "--policy", str(learned))
    assert r.returncode == 3, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert (rep["allow_to_deny"], rep["deny_to_allow"]) == (1, 0), rep
    change = [g for g in rep["groups"] if g["change"] == "allow->deny"]
    assert [(g["guest"], g["protocol"], g["old_rule"], g["new_rule"], g["count"]) for g in change] == [
        ("web1", "dns", "learn", "default", 1)]
    assert change[0]["examples"][0]["request"] == {"qname": "new.wild.test", "qtype": "A"}
    assert pvm_cli("audit", "verify", str(pvm.audit_path)).returncode == 0
    shown = pvm_cli("audit", "show", "-c", str(cfg), "--verdict", "deny", "--guest", "web1")
    assert shown.returncode == 0
    assert [line.split()[5] for line in shown.stdout.splitlines()] == ["default", "default"]
