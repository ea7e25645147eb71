"""Quarantine of an SMTP guest in the real `proxyvm run -c CONFIG`, relaying to the real Postfix MX;
swaks is the guest and the CLI quarantines and releases it:

* block: `550 5.7.1` at RCPT naming the quarantine; nothing reaches Postfix;
* honeypot: the message is accepted (`250 ... queued as`) into state_dir/quarantine/<guest>/mail/
  (exactly the bytes the guest sent) and never delivered — not even after the release;
* after release, mail goes out again."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.smtp.test_smtp_reload_rate import ADMIN_IP, GUEST_IP, PROXY_IP, swaks, write_config

pytestmark = pytest.mark.lab

RULES = "mode: enforce\ndefault: deny\nrules:\n  - {id: out, action: allow, protocol: smtp}\n"


def smtp_records(pvm: ProxyVM, n: int, **match: Any) -> list[dict[str, Any]]:
    """The `n` smtp records matching (waiting for them: records are flushed every ~0.2 s)."""
    deadline = time.monotonic() + 10
    while True:
        recs = [r for r in pvm.audit_records() if r.get("protocol") == "smtp"
                and all(r.get(k) == v for k, v in match.items())]
        if len(recs) >= n or time.monotonic() > deadline:
            assert len(recs) == n, recs
            return recs
        time.sleep(0.1)


def test_block_honeypot_release(postfix_mx, lab_ca, tmp_path: Path) -> None:
    smtp_port, admin_port = free_port(PROXY_IP), free_port(ADMIN_IP)
    (tmp_path / "rules.yaml").write_text(RULES)
    text = write_config(tmp_path, lab_ca.ca_pem, f"{PROXY_IP}:{smtp_port}", admin_port, f"[{GUEST_IP}]")
    tag = secrets.token_hex(6)
    with ProxyVM.from_text(tmp_path, text) as pvm:
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org", "--header", f"Subject: a {tag}")
        assert "250 2.0.0 Ok: queued as" in r.stdout, r.stdout + pvm.tail()
        postfix_mx.find(f"a {tag}".encode(), 30)

        r = pvm.cli("quarantine", "mail1", "--reason", "spam run")
        assert r.returncode == 0, r.stderr
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org", "--header", f"Subject: b {tag}")
        assert "550 5.7.1 <bob@example.org>: guest mail1 quarantined: spam run" in r.stdout, r.stdout
        (rec,) = smtp_records(pvm, 1, rule="quarantine")
        assert rec["verdict"] == "deny" and rec["event"] == "rcpt" and rec["at"] == "smtp.quarantine", rec
        assert rec["reason"] == "guest mail1 is quarantined (block, by cli): spam run"

        assert pvm.cli("release", "mail1").returncode == 0
        assert pvm.cli("quarantine", "mail1", "--profile", "honeypot", "--reason", "watch").returncode == 0
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org,carol@example.net",
                  "--header", f"Subject: c {tag}", "--body", f"exfil {tag}")
        assert "250 2.0.0 Ok: queued as" in r.stdout, r.stdout
        ident = r.stdout.split("queued as ")[1].split()[0]
        (acc,) = smtp_records(pvm, 1, event="accepted", quarantine="honeypot")
        assert acc["request"]["message"] == ident and acc["request"]["rcpt_to"] == ["bob@example.org",
                                                                                  "carol@example.net"]
        assert acc["rule"] == "quarantine" and "never delivered" in acc["reason"], acc
        rcpts = smtp_records(pvm, 2, event="rcpt", quarantine="honeypot")
        assert [x["request"]["rcpt_to"] for x in rcpts] == ["bob@example.org", "carol@example.net"]
        mail = tmp_path / "state" / "quarantine" / "mail1" / "mail"
        eml = (mail / f"{ident}.eml").read_bytes()
        assert f"Subject: c {tag}".encode() in eml and f"exfil {tag}".encode() in eml
        meta = json.loads((mail / f"{ident}.json").read_text())
        assert meta["rcpt_to"] == ["bob@example.org", "carol@example.net"] and meta["mail_from"] == "alice@example.com"
        assert oct((mail / f"{ident}.eml").stat().st_mode & 0o777) == "0o600"
        assert not list((tmp_path / "spool").rglob(f"*{ident}*")), "a honeypot message is in the delivery spool"

        assert pvm.cli("release", "mail1").returncode == 0
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org", "--header", f"Subject: d {tag}")
        assert "250 2.0.0 Ok: queued as" in r.stdout, r.stdout
        postfix_mx.find(f"d {tag}".encode(), 30)
    # what was refused or kept in quarantine never reached the MX
    assert not any(f"b {tag}".encode() in m or f"c {tag}".encode() in m for m in postfix_mx.messages())
