"""The HTTPS honeypot in the real `proxyvm run -c CONFIG` (two SO_REUSEPORT processes) in front of the
real nginx lab; curl is the guest, the CLI quarantines and releases it:

* honeypot: `curl -k` through the explicit proxy (CONNECT) and through the passthrough listener
  (`--resolve`) is answered by the local recorder over TLS with a certificate from the honeypot CA;
  each request is recorded in full with its TLS facts and audited (deny, rule quarantine); nothing
  reaches nginx, and a sentinel TCP listener standing in for `api.example.test:443` is never even
  connected to;
* curl without -k fails on the certificate and is still recorded (ClientHello facts) and audited;
  curl trusting `state_dir/honeypot/ca.pem` succeeds (the investigator's path); the key is 0600;
* non-TLS bytes after a CONNECT are recorded and the connection closed;
* a WebSocket upgrade over plain HTTP is answered 200 by the recorder (no 101) and recorded as ws;
* block: passthrough TLS is closed; after release the same curls reach nginx again."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP
from tests.protocols.http.test_quarantine_process import PAGE, wait_records

pytestmark = pytest.mark.lab

SENTINEL_IP = "127.0.7.31"  # stands in for api.example.test:443; must never see a connection
RULES = """\
mode: enforce
default: deny
rules:
  - {id: lab, action: allow, protocol: http, match: {host: [www.lab.test]}}
  - {id: lab-tls, action: allow, protocol: tls, match: {sni: [www.lab.test, api.example.test]}}
"""


def write_config(lab: Any, proxy: int, passthrough: int, admin: int) -> str:
    hosts = "\n".join(f"    {k}: {v}" for k, v in {**lab.hosts(), "api.example.test": SENTINEL_IP}.items())
    return f"""\
guests:
  web1: {{addresses: [{GUEST_IP}]}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{PROXY_IP}:{admin}"}}
state_dir: state
http:
  proxy_listen: ["{PROXY_IP}:{proxy}"]
  passthrough_listen: ["{PROXY_IP}:{passthrough}"]
  workers: 2
  ca_file: {lab.ca_pem}
  hosts:
{hosts}
"""


def curl(*args: str) -> tuple[int, str, int, str]:
    """(status, body, exit code, stderr) of curl run as the guest."""
    p = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--interface", GUEST_IP, "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, check=False, timeout=60,
    )
    body, _, code = p.stdout.rpartition("\n")
    return int(code) if code.isdigit() else 0, body, p.returncode, p.stderr


def recording(tmp_path: Path) -> list[dict[str, Any]]:
    p = tmp_path / "state" / "quarantine" / "web1" / "requests.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def raw_connect(port: int, target: str, payload: bytes) -> bytes:
    with socket.create_connection((PROXY_IP, port), timeout=10, source_address=(GUEST_IP, 0)) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                return out
            out += chunk
        s.sendall(payload)
        while chunk := s.recv(4096):  # the proxy closes: EOF, not a timeout
            out += chunk
        return out


def test_https_honeypot(lab: Any, tmp_path: Path) -> None:
    proxy_port, pt, admin = free_port(PROXY_IP), free_port(PROXY_IP), free_port(PROXY_IP)
    proxy = f"http://{PROXY_IP}:{proxy_port}"
    tag = f"{time.time_ns():x}"
    (tmp_path / "rules.yaml").write_text(RULES)
    sentinel = socket.socket()
    sentinel.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sentinel.bind((SENTINEL_IP, 443))
    sentinel.listen(16)
    sentinel.setblocking(False)
    key, cert = tmp_path / "state" / "honeypot" / "ca.key", tmp_path / "state" / "honeypot" / "ca.pem"
    try:
        with ProxyVM.from_text(tmp_path, write_config(lab, proxy_port, pt, admin)) as pvm:
            assert key.stat().st_mode & 0o777 == 0o600 and cert.exists()
            assert b"PRIVATE KEY" not in cert.read_bytes()
            assert lab.ca_pem.read_bytes() != cert.read_bytes()
            r = pvm.cli("quarantine", "web1", "--profile", "honeypot", "--reason", "watch it")
            assert r.returncode == 0, r.stderr

            # 1. CONNECT through the explicit proxy, curl -k: the recorder answers over TLS.
            code, body, rc, err = curl("-k", "-x", proxy, "-H", "X-Exfil: yes", "--data-binary", f"secret-{tag}",
                                       f"https://api.example.test/v1/items?token={tag}")
            assert (code, body, rc) == (200, PAGE, 0), (code, body, err, pvm.tail())
            code, body, rc, err = curl("-k", "-x", proxy, f"https://www.lab.test/echo?hp={tag}")
            assert (code, body) == (200, PAGE), (code, body, err)
            # 2. the passthrough listener, decided by SNI: the same.
            code, body, rc, err = curl("-k", "--resolve", f"api.example.test:{pt}:{PROXY_IP}",
                                       f"https://api.example.test:{pt}/pt?x={tag}")
            assert (code, body) == (200, PAGE), (code, body, err)
            # 3. no -k: the certificate is refused, the attempt still recorded; the listener stays up.
            code, body, rc, err = curl("--resolve", f"www.lab.test:{pt}:{PROXY_IP}",
                                       f"https://www.lab.test:{pt}/strict?x={tag}")
            assert rc == 60 and "certificate" in err, (rc, err)
            # 4. an investigator trusting the honeypot CA gets a verified connection.
            code, body, rc, err = curl("--cacert", str(cert), "--resolve", f"www.lab.test:{pt}:{PROXY_IP}",
                                       f"https://www.lab.test:{pt}/trusted?x={tag}")
            assert (code, body, rc) == (200, PAGE, 0), (code, err)
            # 5. not TLS after CONNECT: recorded, closed.
            out = raw_connect(proxy_port, "mail.example.test:25", f"EHLO spam-{tag}\r\n".encode())
            assert out == b"HTTP/1.1 200 Connection established\r\n\r\n", out
            # 6. a WebSocket upgrade over plain HTTP: answered 200 by the recorder, never 101.
            code, body, rc, err = curl("-x", proxy, "-H", "Upgrade: websocket", "-H", "Connection: Upgrade",
                                       "-H", "Sec-WebSocket-Version: 13", "-H",
                                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", f"http://ws.lab.test/ws?w={tag}")
            assert (code, body) == (200, PAGE), (code, body, err)

            hs = wait_records(pvm, lambda x: x.get("event") == "handshake", 5)
            ok = [x for x in hs if "error" not in x]
            assert len(ok) == 4 and all(
                x["tls"]["tls_version"] == "TLSv1.3" and x["tls"]["cipher"] and x["tls"]["alpn"] == "http/1.1"
                and x["tls"]["alpn_offered"] == ["h2", "http/1.1"] for x in ok), ok
            bad = [x for x in hs if "error" in x]
            assert [x["tls"] for x in bad] == [{"sni": "www.lab.test", "alpn_offered": ["h2", "http/1.1"]}], bad
            assert "unknown ca" in bad[0]["error"] and "refused the honeypot certificate" in bad[0]["reason"]
            assert {(x["verdict"], x["rule"], x["at"], x["upstream"]) for x in hs} == {
                ("deny", "quarantine", "http.quarantine", None)}
            assert all("(honeypot, by cli)" in x["reason"] for x in hs)
            reqs = wait_records(pvm, lambda x: x.get("quarantine") == "honeypot" and x["protocol"] in ("http", "ws"), 5)
            by_path = {x["request"]["path"]: x for x in reqs}
            assert set(by_path) == {"/v1/items", "/echo", "/pt", "/trusted", "/ws"}, by_path
            api = by_path["/v1/items"]
            assert (api["status"], api["verdict"], api["rule"], api["upstream"]) == (200, "deny", "quarantine", None)
            assert api["request"]["host"] == "api.example.test" and api["bytes_in"] == len(f"secret-{tag}")
            assert api["tls"]["sni"] == "api.example.test" and api["tls"]["tls_version"] == "TLSv1.3"
            assert "answered by the local recorder" in api["reason"]
            assert by_path["/ws"]["protocol"] == "ws" and "tls" not in by_path["/ws"]
            connects = wait_records(pvm, lambda x: x.get("connect") and x.get("status") == 200, 3)
            assert {x["connect"] for x in connects} == {"api.example.test:443", "www.lab.test:443",
                                                        "mail.example.test:25"}
            not_tls = wait_records(pvm, lambda x: x.get("first_bytes") and x.get("rule") == "quarantine", 1)
            assert not_tls[0]["connect"] == "mail.example.test:25"

            lines = recording(tmp_path)
            posts = [x for x in lines if x.get("method") == "POST"]
            assert len(posts) == 1 and posts[0]["url"] == f"https://api.example.test/v1/items?token={tag}"
            assert ["X-Exfil", "yes"] in posts[0]["headers"]
            assert posts[0]["body"] == {"base64": base64.b64encode(f"secret-{tag}".encode()).decode()}
            assert posts[0]["tls"]["sni"] == "api.example.test" and posts[0]["tls"]["cipher"]
            urls = {x["url"] for x in lines if "url" in x}
            assert f"https://api.example.test:{pt}/pt?x={tag}" in urls
            assert f"http://ws.lab.test/ws?w={tag}" in urls
            failed = [x for x in lines if x.get("event") == "handshake_failed"]
            assert [(x["sni"], x["alpn_offered"]) for x in failed] == [("www.lab.test", ["h2", "http/1.1"])]
            raw = [x for x in lines if x.get("event") == "not_tls"]
            assert [base64.b64decode(x["bytes"]["base64"]) for x in raw] == [f"EHLO spam-{tag}\r\n".encode()]
            ws = [x for x in lines if x.get("protocol") == "ws"]
            assert len(ws) == 1 and ["Upgrade", "websocket"] in ws[0]["headers"]
            assert all(x.get("rule") != "dns" for x in pvm.audit_records() if x.get("guest") == "web1")

            # block: passthrough TLS is closed without an answer, CONNECT refused 403 (as before).
            assert pvm.cli("release", "web1").returncode == 0
            assert pvm.cli("quarantine", "web1", "--profile", "block").returncode == 0
            code, _, rc, _ = curl("-k", "--resolve", f"api.example.test:{pt}:{PROXY_IP}",
                                  f"https://api.example.test:{pt}/blocked?x={tag}")
            assert code == 0 and rc != 0
            code, _, rc, _ = curl("-k", "-x", proxy, f"https://api.example.test/blocked?x={tag}")
            assert code == 0 and rc != 0

            # release: the same curls reach the real nginx again (the lab's own certificate).
            assert pvm.cli("release", "web1").returncode == 0
            code, body, rc, err = curl("--cacert", str(lab.ca_pem), "-x", proxy, f"https://www.lab.test/echo?after={tag}")
            assert code == 200 and "sni=www.lab.test" in body, (code, body, err)
            code, body, rc, err = curl("--cacert", str(lab.ca_pem), "--resolve", f"www.lab.test:{pt}:{PROXY_IP}",
                                       f"https://www.lab.test:{pt}/echo?afterpt={tag}")
            assert code == 200 and "sni=www.lab.test" in body, (code, body, err)
        with pytest.raises(BlockingIOError):
            sentinel.accept()  # nothing ever connected to api.example.test's address
    finally:
        sentinel.close()
    served = lab.log("main")
    assert f"after={tag} " in served and f"afterpt={tag} " in served, served[-2000:]
    assert f"hp={tag}" not in served and f"x={tag}" not in served and f"w={tag}" not in served, served[-2000:]
