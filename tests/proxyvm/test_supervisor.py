"""The real `proxyvm run` process: compartments, restart after a crash, SIGHUP reload (valid and
invalid), SIGTERM drain, privilege drop, admin endpoint, audit chain.

The DNS service is the worker under test; its DoT upstream deliberately points at a loopback
address where nothing listens, so these tests need no peer and send nothing off the machine."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from proxyvm.audit import verify
from tests.labs.proxy import ProxyVM

ADDR = "127.0.2.1"

RULES_V1 = """\
mode: enforce
default: allow
rules:
  - id: block-bad
    action: deny
    protocol: dns
    match: {qname: ["*.bad.test"]}
"""

RULES_V2 = RULES_V1 + """\
  - id: block-other
    action: deny
    protocol: dns
    match: {qname: ["*.other.test"]}
"""

RULES_BROKEN = RULES_V1 + """\
  - id: block-broken
    action: deny
    protocol: dns
    match: {qnme: ["x.test"]}
"""


def _config(tmp: Path, port: int, admin: int, extra: str = "") -> Path:
    (tmp / "rules.yaml").write_text(RULES_V1)
    p = tmp / "proxyvm.yaml"
    p.write_text(
        f"""\
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{ADDR}:{admin}"}}
state_dir: state
{extra}dns:
  listen: ["{ADDR}:{port}"]
  upstreams:
    - {{address: "127.0.2.53:853", name: dot.lab.test}}
  dnssec: off
"""
    )
    return p


def _free(proto: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, proto) as s:
        s.bind((ADDR, 0))
        return s.getsockname()[1]


def _udp_query(port: int, name: str) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(q.to_wire(), (ADDR, port))
        return dns.message.from_wire(s.recv(4096))


def _tcp_query(sock: socket.socket, name: str) -> dns.message.Message:
    wire = dns.message.make_query(name, "A").to_wire()
    sock.sendall(struct.pack("!H", len(wire)) + wire)
    n = struct.unpack("!H", sock.recv(2))[0]
    buf = b""
    while len(buf) < n:
        buf += sock.recv(n - len(buf))
    return dns.message.from_wire(buf)


@pytest.fixture
def proxy(tmp_path: Path):
    port = _free()
    cfg = _config(tmp_path, port, _free())
    p = ProxyVM(cfg)
    p.port = port  # type: ignore[attr-defined]
    p.start()
    yield p
    p.stop()


def test_runs_services_in_their_own_process_and_audits(proxy: ProxyVM) -> None:
    code, health = proxy.healthz()
    assert code == 200 and health["services"]["dns"]["state"] == "ok"
    pid = proxy.worker_pids()["dns"]
    assert pid != proxy.proc.pid
    assert f"dns listening on udp {ADDR}:{proxy.port}" in proxy.tail()
    r = _udp_query(proxy.port, "www.bad.test")
    assert r.rcode() == dns.rcode.REFUSED
    rec = proxy.wait_audit(lambda r: r.get("request", {}).get("qname") == "www.bad.test")
    assert rec["verdict"] == "deny" and rec["rule"] == "block-bad" and rec["at"] == "rules.yaml:4"
    assert rec["guest"] == "unknown" and rec["src"].startswith("127.0.0.1:")
    metrics = proxy.metrics()
    assert re.search(r'proxyvm_decisions_total\{guest="unknown",protocol="dns",rule="block-bad",verdict="deny"\} 1\.0',
                     metrics), metrics
    assert "proxyvm_request_seconds_bucket" in metrics
    assert verify([proxy.audit_path]).ok


def test_crashed_service_is_restarted_and_audited(proxy: ProxyVM) -> None:
    old = proxy.worker_pids()["dns"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        code, h = proxy.healthz()
        svc = h["services"]["dns"]
        if code == 200 and svc["pid"] not in (None, old) and svc["restarts"] == 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"not restarted: {h}")
    rec = proxy.wait_audit(lambda r: r.get("request", {}).get("event") == "service_crash")
    assert "killed by signal 9" in rec["reason"]
    assert 'proxyvm_service_restarts_total{service="dns"} 1.0' in proxy.metrics()
    assert _udp_query(proxy.port, "a.bad.test").rcode() == dns.rcode.REFUSED


def test_sighup_rejects_invalid_policy_then_applies_valid_one_without_dropping(proxy: ProxyVM) -> None:
    rules = proxy.config.parent / "rules.yaml"
    conn = socket.create_connection((ADDR, proxy.port), timeout=5)
    try:
        assert _tcp_query(conn, "x.bad.test").rcode() == dns.rcode.REFUSED
        v1 = "sha256:" + hashlib.sha256(RULES_V1.encode()).hexdigest()
        # provenance: the decision names the exact rules file that made it; supervisor records a kind
        dec = proxy.wait_audit(lambda r: r.get("request", {}).get("qname") == "x.bad.test")
        assert dec["policy"] == v1 and "kind" not in dec
        start = proxy.wait_audit(lambda r: r.get("request", {}).get("event") == "start")
        assert start["kind"] == "service" and start["policy"] == v1
        rules.write_text(RULES_BROKEN)
        proxy.reload()
        rec = proxy.wait_audit(lambda r: r.get("request", {}).get("event") == "reload_rejected")
        assert "rules.yaml:11:13: unknown key 'qnme'" in rec["errors"] and "unknown key 'qnme'" in rec["errors"]
        assert rec["kind"] == "reload" and rec["policy"] == v1  # the policy that stays in force
        assert "reload rejected" in proxy.tail()
        # old policy still in force, same connection still open
        assert _tcp_query(conn, "y.bad.test").rcode() == dns.rcode.REFUSED
        assert _tcp_query(conn, "y.other.test").rcode() != dns.rcode.REFUSED
        rules.write_text(RULES_V2)
        proxy.reload()
        rec = proxy.wait_audit(lambda r: r.get("request", {}).get("event") == "reload")
        assert rec["services"] == {"dns": True}
        v2 = "sha256:" + hashlib.sha256(RULES_V2.encode()).hexdigest()
        assert (rec["kind"], rec["old_policy"], rec["policy"]) == ("reload", v1, v2)
        assert _tcp_query(conn, "z.other.test").rcode() == dns.rcode.REFUSED
        dec = proxy.wait_audit(lambda r: r.get("request", {}).get("qname") == "z.other.test")
        assert dec["policy"] == v2 and dec["rule"] == "block-other"
        assert _tcp_query(conn, "z.bad.test").rcode() == dns.rcode.REFUSED
    finally:
        conn.close()
    assert proxy.worker_pids()["dns"]  # same service, never restarted for a reload
    _, h = proxy.healthz()
    assert h["services"]["dns"]["restarts"] == 0


def test_sigterm_drains_and_exits_zero(proxy: ProxyVM) -> None:
    _udp_query(proxy.port, "q.bad.test")
    assert proxy.stop() == 0
    recs = proxy.audit_records()
    assert recs[-1]["request"] == {"event": "stop"}
    assert any(r.get("request", {}).get("qname") == "q.bad.test" for r in recs)
    assert verify([proxy.audit_path]).ok


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_drops_privileges_after_binding_and_still_reloads() -> None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    # pytest's tmp dirs are 0700 root; an operator's /etc/proxyvm is world-readable (secrets aside)
    d = Path(tempfile.mkdtemp(prefix="pvm-priv-"))
    try:
        d.chmod(0o755)
        port = _free()
        cfg = _config(d, port, _free(), extra="user: nobody\n")
        with ProxyVM(cfg) as p:
            pid = p.worker_pids()["dns"]
            uid_line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
            assert int(uid_line.split()[1]) == pwd.getpwnam("nobody").pw_uid
            assert _udp_query(port, "a.bad.test").rcode() == dns.rcode.REFUSED
            assert "dropped privileges to nobody" in p.tail()
            # the dropped worker gets the parsed config from the supervisor and compiles the policy
            (d / "rules.yaml").write_text(RULES_V2)
            p.reload()
            rec = p.wait_audit(lambda r: r.get("request", {}).get("event") == "reload")
            assert rec["services"] == {"dns": True}
            assert _udp_query(port, "a.other.test").rcode() == dns.rcode.REFUSED
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bad_config_exits_1_with_location(tmp_path: Path) -> None:
    port = _free()
    cfg = _config(tmp_path, port, _free())
    (tmp_path / "rules.yaml").write_text(RULES_BROKEN)
    r = subprocess.run([sys.executable, "-m", "proxyvm", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert re.search(r"rules\.yaml:11:13: unknown key 'qnme'", r.stderr), r.stderr
    assert "Traceback" not in r.stderr


def test_healthz_degraded_while_a_service_cannot_start(tmp_path: Path) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    blocker.bind((ADDR, 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    cfg = _config(tmp_path, port, _free())
    p = ProxyVM(cfg).start(expect_ready=False)
    try:
        deadline = time.monotonic() + 20
        code, body = 0, {}
        while time.monotonic() < deadline:
            try:
                code, body = p.healthz()
                if code == 503 and body["services"]["dns"]["restarts"] >= 1:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert code == 503 and body["status"] == "degraded", body
        assert "in use" in body["services"]["dns"]["last_error"].lower(), body
    finally:
        p.stop()
        blocker.close()


def _udp_query_from(port: int, name: str, src: str) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind((src, 0))
        s.sendto(q.to_wire(), (ADDR, port))
        return dns.message.from_wire(s.recv(4096))


def test_sighup_swaps_guest_addresses_in_without_a_restart(proxy: ProxyVM) -> None:
    """A guest added (or re-addressed) in the config is known from the next request on."""
    pid = proxy.worker_pids()["dns"]
    assert _udp_query_from(proxy.port, "a.bad.test", "127.0.2.77").rcode() == dns.rcode.REFUSED
    rec = proxy.wait_audit(lambda r: r.get("request", {}).get("qname") == "a.bad.test")
    assert rec["guest"] == "unknown"
    text = proxy.config.read_text()
    proxy.config.write_text("guests:\n  web7: {addresses: [127.0.2.77]}\n" + text)
    proxy.reload()
    proxy.wait_audit(lambda r: r.get("request", {}).get("event") == "reload")
    assert _udp_query_from(proxy.port, "b.bad.test", "127.0.2.77").rcode() == dns.rcode.REFUSED
    rec = proxy.wait_audit(lambda r: r.get("request", {}).get("qname") == "b.bad.test")
    assert rec["guest"] == "web7" and rec["src"].startswith("127.0.2.77:")
    assert proxy.worker_pids()["dns"] == pid  # same worker: a reload, not a restart
