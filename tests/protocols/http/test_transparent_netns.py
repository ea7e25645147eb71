"""Transparent mode for real: in a network namespace of our own, nftables REDIRECTs the guest's
port-80 and port-443 connections to the proxy (the real `proxyvm run` process), which must connect
to the *original destination* (read with SO_ORIGINAL_DST), not to what the Host resolves to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.labs import nginx_lab
from tests.labs.nginx_lab import NginxLab, in_netns

pytestmark = [pytest.mark.lab, pytest.mark.e2e]

ORIGIN = "198.19.0.10"  # the lab nginx, on the namespace's loopback
DECOY = "198.19.0.99"  # what `hosts` says www.lab.test is: nothing listens there
PORTS = {"listen": 18080, "pass": 18443, "admin": 19700}
GUEST_UID = 65534  # the guest's curl runs as nobody; only its traffic is redirected (not the proxy's)


def guest(netns: str, *argv: str) -> list[str]:
    return in_netns(netns, ["setpriv", f"--reuid={GUEST_UID}", f"--regid={GUEST_UID}", "--clear-groups", *argv])


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope="module")
def netns(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft") or not nginx_lab.available():
        pytest.skip("needs root, iproute2, nftables and nginx")
    name = f"pvm-http-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "addr", "add", f"{ORIGIN}/32", "dev", "lo")
        ruleset = f"""
table ip pvm_http {{
  chain out {{
    type nat hook output priority -100;
    meta skuid {GUEST_UID} ip daddr {ORIGIN} tcp dport 80 redirect to :{PORTS['listen']}
    meta skuid {GUEST_UID} ip daddr {ORIGIN} tcp dport 443 redirect to :{PORTS['pass']}
  }}
}}
"""
        sh("ip", "netns", "exec", name, "nft", "-f", "-", input=ruleset)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture(scope="module")
def running(netns: str, tmp_path_factory: pytest.TempPathFactory):
    d: Path = tmp_path_factory.mktemp("netns-http")
    lab = NginxLab(d / "lab", main_ip=ORIGIN, untrusted_ip="198.19.0.11", plain_ip="198.19.0.12", legacy_ip=None,
                   netns=netns)
    for ip in ("198.19.0.11", "198.19.0.12"):
        sh("ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "lo")
    lab.start()
    (d / "rules.yaml").write_text(
        "default: deny\nrules:\n"
        "  - {id: web, action: allow, protocol: http, match: {host: [www.lab.test]}}\n"
        "  - {id: tls, action: allow, protocol: tls, match: {sni: [www.lab.test]}}\n"
        f"  - {{id: by-addr, action: allow, protocol: tls, match: {{dst: [{ORIGIN}/32]}}}}\n"
    )
    (d / "proxyvm.yaml").write_text(
        f"""\
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "127.0.0.1:{PORTS['admin']}"}}
state_dir: state
http:
  listen: ["0.0.0.0:{PORTS['listen']}"]
  passthrough_listen: ["0.0.0.0:{PORTS['pass']}"]
  ca_file: {lab.ca_pem}
  hosts: {{www.lab.test: {DECOY}}}
"""
    )
    log = open(d / "proxyvm.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        in_netns(netns, [sys.executable, "-m", "proxyvm", "run", "-c", str(d / "proxyvm.yaml")]),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = sh(*in_netns(netns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                     f"http://127.0.0.1:{PORTS['admin']}/healthz"]), check=False)
            if r.stdout == "200":
                break
            assert proc.poll() is None, (d / "proxyvm.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            raise TimeoutError((d / "proxyvm.log").read_text()[-3000:])
        yield netns, lab, d
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        lab.stop()


def audit(d: Path) -> list[dict]:
    p = d / "audit.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def wait_audit(d: Path, pred) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for r in audit(d):
            if pred(r):
                return r
        time.sleep(0.1)
    raise TimeoutError(audit(d)[-3:])


def test_redirected_http_goes_to_original_destination_over_tls(running) -> None:
    netns, lab, d = running
    # The guest resolved www.lab.test to ORIGIN and connected to port 80; nftables redirected it.
    r = sh(*guest(netns, "curl", "-sS", "--max-time", "10", "--resolve", f"www.lab.test:80:{ORIGIN}",
                  "http://www.lab.test/echo?x=1"), check=False)
    assert "ssl=TLSv1.3 sni=www.lab.test" in r.stdout, r
    rec = wait_audit(d, lambda x: x.get("protocol") == "http" and x.get("status") == 200)
    assert rec["orig_dst"] == f"{ORIGIN}:80"
    assert rec["upstream"]["address"] == f"{ORIGIN}:443" and rec["upstream"]["verified"] is True
    line = [x for x in lab.log("main").splitlines() if "/echo?x=1" in x][-1]
    assert "ssl=TLSv1.3 sni=www.lab.test" in line


def test_redirected_tls_passes_through_to_original_destination(running) -> None:
    netns, lab, d = running
    ca = Path(tempfile.mkdtemp(prefix="pvm-http-ca-"))
    ca.chmod(0o755)
    shutil.copy(lab.ca_pem, ca / "ca.pem")
    (ca / "ca.pem").chmod(0o644)
    try:
        r = sh(*guest(netns, "curl", "-sS", "--max-time", "10", "--cacert", str(ca / "ca.pem"),
                      "--resolve", f"www.lab.test:443:{ORIGIN}", "https://www.lab.test/echo"), check=False)
    finally:
        shutil.rmtree(ca)
    assert "sni=www.lab.test" in r.stdout, r
    rec = wait_audit(d, lambda x: x.get("protocol") == "tls" and x.get("verdict") == "allow")
    assert rec["request"] == {"sni": "www.lab.test", "dst": ORIGIN} and rec["orig_dst"] == f"{ORIGIN}:443"


def test_client_hello_without_sni_allowed_only_by_an_address_rule(running) -> None:
    netns, lab, d = running
    r = sh(*guest(netns, "openssl", "s_client", "-noservername", "-connect", f"{ORIGIN}:443", "-brief"),
           check=False, input="", timeout=20)
    assert "CONNECTION ESTABLISHED" in (r.stdout + r.stderr), r
    rec = wait_audit(d, lambda x: x.get("protocol") == "tls" and x.get("request", {}).get("sni") == "")
    assert rec["verdict"] == "allow" and rec["rule"] == "by-addr" and rec["request"]["dst"] == ORIGIN
