"""The HTTP service through the real `proxyvm run -c` process (supervisor + HTTP worker)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP

pytestmark = pytest.mark.lab

RULES = """\
mode: enforce
default: deny
rules:
  - id: lab-web
    action: allow
    protocol: http
    guests: [web1]
    match: {host: [www.lab.test, untrusted.lab.test], method: [GET, POST]}
  - id: lab-ws
    action: allow
    protocol: ws
    match: {host: [ws.lab.test]}
  - id: lab-tls
    action: allow
    protocol: tls
    match: {sni: [www.lab.test]}
"""


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--interface", GUEST_IP, "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, check=False,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code) if code.isdigit() else 0, body


@pytest.fixture(scope="module")
def proxyvm_http(lab, tmp_path_factory: pytest.TempPathFactory):
    d: Path = tmp_path_factory.mktemp("proxyvm-http")
    (d / "rules.yaml").write_text(RULES)
    ports = {k: free_port(PROXY_IP) for k in ("admin", "listen", "proxy", "pass")}
    hosts = "\n".join(f"    {k}: {v}" for k, v in lab.hosts().items())
    cfg = f"""\
guests:
  web1: {{addresses: [{GUEST_IP}]}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{PROXY_IP}:{ports['admin']}"}}
state_dir: state
http:
  listen: ["{PROXY_IP}:{ports['listen']}"]
  proxy_listen: ["{PROXY_IP}:{ports['proxy']}"]
  passthrough_listen: ["{PROXY_IP}:{ports['pass']}"]
  ca_file: {lab.ca_pem}
  hosts:
{hosts}
"""
    pvm = ProxyVM.from_text(d, cfg)
    pvm.start()
    pvm.ports = ports  # type: ignore[attr-defined]
    yield pvm
    pvm.stop()


def test_process_upgrades_denies_and_audits(proxyvm_http, lab) -> None:
    p = proxyvm_http.ports
    code, body = curl("-x", f"http://{PROXY_IP}:{p['proxy']}", "http://www.lab.test/echo?k=secret")
    assert code == 200 and "ssl=TLSv1.3 sni=www.lab.test" in body
    code, body = curl("--connect-to", f"www.lab.test:80:{PROXY_IP}:{p['listen']}", "-X", "DELETE",
                      "http://www.lab.test/echo")
    assert code == 403 and body == "blocked by proxyvm rule default\n"
    code, body = curl("-x", f"http://{PROXY_IP}:{p['proxy']}", "http://untrusted.lab.test/")
    assert code == 502 and "upstream certificate untrusted" in body
    code, body = curl("-x", f"http://{PROXY_IP}:{p['proxy']}", "--cacert", str(lab.ca_pem),
                      "https://www.lab.test/echo")
    assert code == 200
    rec = proxyvm_http.wait_audit(lambda r: r.get("protocol") == "http" and r.get("status") == 200)
    assert rec["guest"] == "web1" and rec["upstream"]["verified"] is True and rec["upstream"]["tls"] == "TLSv1.3"
    assert "secret" not in str(rec)
    proxyvm_http.wait_audit(lambda r: r.get("status") == 403 and r.get("rule") == "default")
    proxyvm_http.wait_audit(lambda r: r.get("status") == 502 and r.get("cause") == "untrusted")
    proxyvm_http.wait_audit(lambda r: r.get("protocol") == "tls" and r.get("rule") == "lab-tls")
    verify = subprocess.run(
        [sys.executable, "-m", "proxyvm", "audit", "verify", str(proxyvm_http.audit_path)],
        capture_output=True, text=True, check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    health = proxyvm_http.healthz()[1]
    assert "http" in str(health)


def test_process_sighup_reload_changes_decisions(proxyvm_http, lab) -> None:
    p = proxyvm_http.ports
    rules = proxyvm_http.config.parent / "rules.yaml"
    original = rules.read_text()
    try:
        rules.write_text(original.replace("method: [GET, POST]", "method: [POST]"))
        proxyvm_http.reload()
        deadline = time.monotonic() + 10
        code = 0
        while time.monotonic() < deadline:
            code, body = curl("-x", f"http://{PROXY_IP}:{p['proxy']}", "http://www.lab.test/echo")
            if code == 403:
                break
            time.sleep(0.2)
        assert code == 403 and body == "blocked by proxyvm rule default\n"
    finally:
        rules.write_text(original)
        proxyvm_http.reload()
