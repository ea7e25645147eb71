"""Quarantine of an HTTP guest in the real `proxyvm run -c CONFIG` (two SO_REUSEPORT processes, so
every worker gets the table) in front of the real nginx lab; curl is the guest through the
explicit proxy listener and the CLI quarantines and releases it:

* block: every request is refused 403 with the quarantine named (plain HTTP and CONNECT), nothing
  reaches nginx;
* honeypot: requests are answered 200 by the local recorder (never by nginx) and recorded in full
  (URL with its query string, headers, body) (HTTPS: test_honeypot_tls_process.py);
* after release the origin answers again."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP
from tests.protocols.http.test_reload_rate import curl

pytestmark = pytest.mark.lab

RULES = """\
mode: enforce
default: deny
rules:
  - {id: lab, action: allow, protocol: http, match: {host: [www.lab.test]}}
  - {id: lab-tls, action: allow, protocol: tls, match: {sni: [www.lab.test]}}
"""  # naming the lab host lets it through the SSRF guard (it resolves to loopback)
PAGE = "<!doctype html>\n<html><head><title>Welcome</title></head><body><h1>It works!</h1></body></html>\n"


def write_config(lab: Any, port: int, admin: int) -> str:
    hosts = "\n".join(f"    {k}: {v}" for k, v in lab.hosts().items())
    return f"""\
guests:
  web1: {{addresses: [{GUEST_IP}]}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{PROXY_IP}:{admin}"}}
state_dir: state
http:
  proxy_listen: ["{PROXY_IP}:{port}"]
  workers: 2
  ca_file: {lab.ca_pem}
  hosts:
{hosts}
"""


def wait_records(pvm: ProxyVM, pred: Any, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in pvm.audit_records() if pred(r)]
        if len(recs) >= n or time.monotonic() > deadline:
            assert len(recs) == n, recs
            return recs
        time.sleep(0.1)


def test_block_honeypot_release(lab, tmp_path: Path) -> None:
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    proxy = f"http://{PROXY_IP}:{port}"
    tag = secrets.token_hex(4)
    (tmp_path / "rules.yaml").write_text(RULES)
    with ProxyVM.from_text(tmp_path, write_config(lab, port, admin)) as pvm:
        code, body = curl(proxy, f"http://www.lab.test/echo?before={tag}")
        assert code == 200 and "sni=www.lab.test" in body, body + pvm.tail()

        r = pvm.cli("quarantine", "web1", "--reason", "scanning the LAN")
        assert r.returncode == 0, r.stderr
        for i in range(6):  # several connections: both processes refuse
            code, body = curl(proxy, f"http://www.lab.test/echo?blocked={tag}-{i}")
            assert (code, body) == (403, "403 blocked by proxyvm: guest web1 quarantined: scanning the LAN\n"), body
        code, _ = curl(proxy, "https://www.lab.test/echo", "-w", "%{http_connect}")
        assert code in (0, 403)  # curl reports a failed CONNECT as an error
        recs = wait_records(pvm, lambda x: x.get("rule") == "quarantine", 7)
        assert {(x["protocol"], x["status"], x["verdict"], x["at"]) for x in recs} == {
            ("http", 403, "deny", "http.quarantine"), ("tls", 403, "deny", "http.quarantine")}
        assert {x["reason"] for x in recs} == {"guest web1 is quarantined (block, by cli): scanning the LAN"}
        assert [x["request"]["sni"] for x in recs if x["protocol"] == "tls"] == ["www.lab.test"]

        assert pvm.cli("release", "web1").returncode == 0
        r = pvm.cli("quarantine", "web1", "--profile", "honeypot", "--reason", "watch it")
        assert r.returncode == 0, r.stderr
        for i in range(4):
            code, body = curl(proxy, "-X", "POST", "-H", "X-Exfil: yes", "--data-binary", f"secret-{tag}-{i}",
                              f"http://www.lab.test/upload?hp={tag}-{i}")
            assert (code, body) == (200, PAGE), (code, body)
        hp = wait_records(pvm, lambda x: x.get("quarantine") == "honeypot" and x.get("protocol") == "http", 4)
        assert {(x["status"], x["verdict"], x["rule"]) for x in hp} == {(200, "deny", "quarantine")}
        assert all(x["upstream"] is None and x["bytes_in"] == len(f"secret-{tag}-0") for x in hp), hp
        assert "answered by the local recorder" in hp[0]["reason"]
        lines = [json.loads(x) for x in (tmp_path / "state" / "quarantine" / "web1" / "requests.jsonl")
                 .read_text().splitlines()]
        posts = sorted((x for x in lines if x["protocol"] == "http"), key=lambda x: x["url"])
        assert [x["url"] for x in posts] == [f"http://www.lab.test/upload?hp={tag}-{i}" for i in range(4)]
        assert ["X-Exfil", "yes"] in posts[0]["headers"] and posts[0]["method"] == "POST"
        assert posts[0]["body"] == {"base64": __import__("base64").b64encode(f"secret-{tag}-0".encode()).decode()}

        assert pvm.cli("release", "web1").returncode == 0
        code, body = curl(proxy, f"http://www.lab.test/echo?after={tag}")
        assert code == 200 and "sni=www.lab.test" in body, body
    served = lab.log("main")
    assert f"before={tag} " in served and f"after={tag} " in served
    assert f"blocked={tag}" not in served and f"hp={tag}" not in served, served[-2000:]
