"""The SMTP service inside the real `proxyvm run -c CONFIG` process, relaying to the real Postfix MX:

* a rule's `rate:` bucket (checked at RCPT) survives a SIGHUP that leaves the rule's id and rate
  unchanged while the rules file around it changes (a new rule goes in before it);
* an IPv6 guest (a real client over ::1 to a listener on [::1]:PORT) is audited as `[::1]:PORT`.

swaks is the IPv4 guest. For IPv6 the client is curl's SMTP: swaks needs the Perl module
IO::Socket::INET6 for IPv6, which the lab machines do not have."""

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
from tests.protocols.smtp.conftest import MX_IP, RELAY_PASSWORD, RELAY_USER

pytestmark = pytest.mark.lab
PROXY_IP, ADMIN_IP, GUEST_IP = "127.0.5.44", "127.0.5.43", "127.0.5.2"

RATE_RULE = """\
  - id: mail-rate
    action: allow
    protocol: smtp
    guests: [mail1]
    match: {mail_from: ['*@example.com']}
    rate: 3/hour
"""
RULES = "mode: enforce\ndefault: deny\nrules:\n" + RATE_RULE
# The reload: an unrelated rule goes in *before* the limited one; the limited rule's id and rate
# are unchanged (its index and line number are not).
RULES_AFTER_RELOAD = "mode: enforce\ndefault: deny\nrules:\n" + """\
  - id: no-blocked
    action: deny
    protocol: smtp
    match: {rcpt_to: ['*@blocked.example']}
""" + RATE_RULE


def write_config(d: Path, ca: Path, listen: str, admin_port: int, addresses: str) -> str:
    (d / "relay.pass").write_text(RELAY_PASSWORD + "\n")
    (d / "relay.pass").chmod(0o600)
    return f"""\
guests:
  mail1: {{addresses: {addresses}}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{ADMIN_IP}:{admin_port}"}}
state_dir: state
smtp:
  listen: ["{listen}"]
  spool: spool
  relay: {{host: relay.lab.test, port: 25, address: "{MX_IP}",
          auth: {{username: {RELAY_USER}, password_file: relay.pass}}}}
  tls: verify
  ca_file: {ca}
  hostname: proxyvm.lab.test
  retry: {{first: 2s, max_age: 1h}}
  timeouts: {{connect: 3s, reply: 10s}}
"""


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--server", PROXY_IP, "--port", str(port), "--local-interface", GUEST_IP,
                           "--helo", "guest.lab.test", "--timeout", "20", *args],
                          capture_output=True, text=True, timeout=60)


def rcpt_records(pvm: ProxyVM, after: int = -1) -> list[dict[str, Any]]:
    return [r for r in pvm.audit_records()
            if r.get("protocol") == "smtp" and r.get("event") == "rcpt" and r["seq"] > after]


def wait_rcpt_records(pvm: ProxyVM, n: int, after: int = -1, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = rcpt_records(pvm, after)
        if len(recs) >= n or time.monotonic() > deadline:
            assert len(recs) == n, f"want {n} rcpt records after seq {after}, have {recs}"
            return recs
        time.sleep(0.1)


def assert_rate_limited(r: subprocess.CompletedProcess[str], rec: dict[str, Any]) -> None:
    want = "451 4.7.1 <bob@example.org>: rate limit of rule mail-rate exceeded; try again later"
    assert want in r.stdout, r.stdout + r.stderr
    assert "queued as" not in r.stdout
    assert rec["verdict"] == "deny" and rec["rule"] == "mail-rate" and rec["guest"] == "mail1", rec
    assert "over rate 3/hour for guest mail1" in rec["reason"], rec
    assert rec["request"]["rcpt_to"] == "bob@example.org"


def test_rate_bucket_survives_sighup(postfix_mx, lab_ca, tmp_path: Path) -> None:
    smtp_port, admin_port = free_port(PROXY_IP), free_port(ADMIN_IP)
    (tmp_path / "rules.yaml").write_text(RULES)
    text = write_config(tmp_path, lab_ca.ca_pem, f"{PROXY_IP}:{smtp_port}", admin_port, f"[{GUEST_IP}]")
    with ProxyVM.from_text(tmp_path, text) as pvm:
        tag = secrets.token_hex(6)
        for i in range(3):
            r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org",
                      "--header", f"Subject: rate {tag} {i}")
            assert r.returncode == 0 and "250 2.0.0 Ok: queued as" in r.stdout, r.stdout + r.stderr + pvm.tail()
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org",
                  "--header", f"Subject: rate {tag} 3")
        recs = wait_rcpt_records(pvm, 4)
        assert [x["verdict"] for x in recs[:3]] == ["allow"] * 3 and {x["rule"] for x in recs[:3]} == {"mail-rate"}
        assert_rate_limited(r, recs[3])
        for i in range(3):  # the allowed ones really went out
            postfix_mx.find(f"rate {tag} {i}".encode(), 30)

        (tmp_path / "rules.yaml").write_text(RULES_AFTER_RELOAD)
        last = max(x["seq"] for x in pvm.audit_records())
        pvm.reload()
        rel = pvm.wait_audit(lambda x: x.get("request", {}).get("event") == "reload" and x["seq"] > last, 20)
        assert rel["protocol"] == "proxyvm" and rel["services"] == {"smtp": True}, rel

        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org",
                  "--header", f"Subject: rate {tag} 4")
        (rec,) = wait_rcpt_records(pvm, 1, after=rel["seq"])
        assert_rate_limited(r, rec)
        # the reload did take effect: the new rule decides its recipients
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "x@blocked.example", "--quit-after", "RCPT")
        assert "550 5.7.1 <x@blocked.example>: recipient rejected by policy rule no-blocked" in r.stdout, r.stdout
    assert not any(f"rate {tag} 3".encode() in m or f"rate {tag} 4".encode() in m for m in postfix_mx.messages())


def test_ipv6_guest_is_audited_with_brackets(postfix_mx, lab_ca, tmp_path: Path) -> None:
    smtp_port, admin_port = free_port("::1"), free_port(ADMIN_IP)
    (tmp_path / "rules.yaml").write_text(RULES_AFTER_RELOAD)
    text = write_config(tmp_path, lab_ca.ca_pem, f"[::1]:{smtp_port}", admin_port, '["::1"]')
    tag = secrets.token_hex(6)
    msg = tmp_path / "msg.txt"
    msg.write_text(f"From: alice@example.com\nTo: bob@example.org\nSubject: v6 {tag}\n\nhello over IPv6\n")
    with ProxyVM.from_text(tmp_path, text) as pvm:
        r = subprocess.run(
            ["curl", "-sS", "-v", "--max-time", "30", "--interface", "::1", "--crlf", f"smtp://[::1]:{smtp_port}",
             "--mail-from", "alice@example.com", "--mail-rcpt", "bob@example.org", "-T", str(msg)],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "< 250 2.0.0 Ok: queued as" in r.stderr, r.stderr + pvm.tail()
        postfix_mx.find(f"v6 {tag}".encode(), 30)
        (rcpt,) = wait_rcpt_records(pvm, 1)
        accepted = pvm.wait_audit(lambda x: x.get("protocol") == "smtp" and x.get("event") == "accepted")
        attempt = pvm.wait_audit(lambda x: x.get("event") == "attempt" and x.get("outcome") == "delivered", 30)
        for rec in (rcpt, accepted, attempt):
            assert rec["guest"] == "mail1", rec
            assert re.fullmatch(r"\[::1\]:\d+", rec["src"]), rec["src"]
        assert rcpt["verdict"] == "allow" and rcpt["rule"] == "mail-rate"
        # the relay (IPv4 here) keeps the plain a.b.c.d:port form
        assert attempt["upstream"]["address"] == f"{MX_IP}:25", attempt["upstream"]
