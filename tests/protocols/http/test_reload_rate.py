"""The HTTP service inside the real `proxyvm run -c CONFIG` process, in front of the real nginx lab
(curl is the guest, through the explicit proxy listener):

* a rule's `rate:` bucket survives a SIGHUP that leaves the rule's id and rate unchanged while the
  rules file around it changes (a new rule goes in before it);
* an IPv6 guest (curl -x http://[::1]:PORT to a listener on [::1]:PORT) is audited as `[::1]:PORT`."""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP

pytestmark = pytest.mark.lab

RATE_RULE = """\
  - id: web-rate
    action: allow
    protocol: http
    guests: [web1]
    match: {host: [www.lab.test], method: [GET]}
    rate: 3/hour
"""
RULES = "mode: enforce\ndefault: deny\nrules:\n" + RATE_RULE
# The reload: an unrelated rule goes in *before* the limited one; the limited rule's id and rate
# are unchanged (its index and line number are not).
RULES_AFTER_RELOAD = "mode: enforce\ndefault: deny\nrules:\n" + """\
  - id: no-delete
    action: deny
    protocol: http
    match: {method: [DELETE]}
""" + RATE_RULE
LIMITED = "rate limit of proxyvm rule web-rate exceeded\n"


def write_config(d: Path, lab: Any, listen: str, admin: int, addresses: str) -> str:
    hosts = "\n".join(f"    {k}: {v}" for k, v in lab.hosts().items())
    return f"""\
guests:
  web1: {{addresses: {addresses}}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{PROXY_IP}:{admin}"}}
state_dir: state
http:
  proxy_listen: ["{listen}"]
  ca_file: {lab.ca_pem}
  hosts:
{hosts}
"""


def curl(proxy: str, *args: str, interface: str = GUEST_IP) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--interface", interface, "-x", proxy, "-o", "-",
         "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, check=False, timeout=60,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code) if code.isdigit() else 0, body


def http_records(pvm: ProxyVM, after: int = -1) -> list[dict[str, Any]]:
    return [r for r in pvm.audit_records() if r.get("protocol") == "http" and r["seq"] > after]


def wait_http_records(pvm: ProxyVM, n: int, after: int = -1, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = http_records(pvm, after)
        if len(recs) >= n or time.monotonic() > deadline:
            assert len(recs) == n, f"want {n} http records after seq {after}, have {recs}"
            return recs
        time.sleep(0.1)


def assert_rate_limited(code: int, body: str, rec: dict[str, Any]) -> None:
    assert (code, body) == (429, LIMITED), (code, body)
    assert rec["status"] == 429 and rec["verdict"] == "deny" and rec["rule"] == "web-rate", rec
    assert rec["guest"] == "web1" and "over rate 3/hour for guest web1" in rec["reason"], rec
    assert rec["request"]["method"] == "GET" and rec["request"]["host"] == "www.lab.test"


def test_rate_bucket_survives_sighup(lab, tmp_path: Path) -> None:
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    proxy = f"http://{PROXY_IP}:{port}"
    tag = secrets.token_hex(4)
    (tmp_path / "rules.yaml").write_text(RULES)
    with ProxyVM.from_text(tmp_path, write_config(tmp_path, lab, f"{PROXY_IP}:{port}", admin, f"[{GUEST_IP}]")) as pvm:
        for i in range(3):
            code, body = curl(proxy, f"http://www.lab.test/echo?rate={tag}-{i}")
            assert code == 200 and "ssl=TLSv1.3 sni=www.lab.test" in body, f"request {i + 1}: {code} {body}{pvm.tail()}"
        code, body = curl(proxy, f"http://www.lab.test/echo?rate={tag}-3")
        recs = wait_http_records(pvm, 4)
        assert [(x["status"], x["verdict"], x["rule"]) for x in recs[:3]] == [(200, "allow", "web-rate")] * 3
        assert recs[0]["upstream"]["verified"] is True
        assert_rate_limited(code, body, recs[3])
        code, body = curl(proxy, "-X", "DELETE", "http://www.lab.test/echo")
        assert (code, body) == (403, "blocked by proxyvm rule default\n")
        wait_http_records(pvm, 5)  # in before the reload record

        (tmp_path / "rules.yaml").write_text(RULES_AFTER_RELOAD)
        last = max(x["seq"] for x in pvm.audit_records())
        pvm.reload()
        rel = pvm.wait_audit(lambda x: x.get("request", {}).get("event") == "reload" and x["seq"] > last, 20)
        assert rel["protocol"] == "proxyvm" and rel["services"] == {"http": True}, rel

        code, body = curl(proxy, f"http://www.lab.test/echo?rate={tag}-4")
        (rec,) = wait_http_records(pvm, 1, after=rel["seq"])
        assert_rate_limited(code, body, rec)
        # the reload did take effect: the new rule decides DELETE
        code, body = curl(proxy, "-X", "DELETE", "http://www.lab.test/echo")
        assert (code, body) == (403, "blocked by proxyvm rule no-delete\n")
    served = lab.log("main")
    assert all(f"rate={tag}-{i} " in served for i in range(3)), served[-2000:]
    assert f"rate={tag}-3 " not in served and f"rate={tag}-4 " not in served


def test_ipv6_guest_is_audited_with_brackets(lab, tmp_path: Path) -> None:
    port, admin = free_port("::1"), free_port(PROXY_IP)
    proxy = f"http://[::1]:{port}"
    (tmp_path / "rules.yaml").write_text(RULES_AFTER_RELOAD)
    with ProxyVM.from_text(tmp_path, write_config(tmp_path, lab, f"[::1]:{port}", admin, '["::1"]')) as pvm:
        code, body = curl(proxy, "http://www.lab.test/echo", interface="::1")
        assert code == 200 and "ssl=TLSv1.3 sni=www.lab.test" in body, f"{code} {body}{pvm.tail()}"
        code, body = curl(proxy, "-X", "DELETE", "http://www.lab.test/echo", interface="::1")
        assert (code, body) == (403, "blocked by proxyvm rule no-delete\n")
        ok, denied = wait_http_records(pvm, 2)
        for rec in (ok, denied):
            assert rec["guest"] == "web1", rec
            assert re.fullmatch(r"\[::1\]:\d+", rec["src"]), rec["src"]
        assert ok["verdict"] == "allow" and ok["rule"] == "web-rate" and ok["status"] == 200
        assert denied["verdict"] == "deny" and denied["rule"] == "no-delete" and denied["status"] == 403
        # the upstream (IPv4 here) keeps the plain a.b.c.d:port form
        assert re.fullmatch(r"127(\.\d+){3}:443", ok["upstream"]["address"]), ok["upstream"]
