"""`smtp: workers: 2` in the real `proxyvm run -c CONFIG`, relaying to the real Postfix MX, swaks as
the guest (every run a fresh source port):

* both worker processes accept mail (their own counters in /healthz);
* every message answered 250 is delivered exactly once (each worker delivers what it spooled,
  from its own part of the spool: protocols/smtp/spool.py), and the spool ends empty;
* one audit record per recipient decision, in the one chain, which verifies."""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from protocols.smtp.mailq import list_spool
from proxyvm.audit import verify
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.smtp.test_smtp_reload_rate import (
    ADMIN_IP,
    GUEST_IP,
    PROXY_IP,
    swaks,
    wait_rcpt_records,
    write_config,
)

pytestmark = pytest.mark.lab

RULES = """\
mode: enforce
default: deny
rules:
  - {id: mail, action: allow, protocol: smtp, guests: [mail1], match: {mail_from: ['*@example.com']}}
"""
N = 20


def test_every_message_delivered_exactly_once(postfix_mx, lab_ca, tmp_path: Path) -> None:
    smtp_port, admin_port = free_port(PROXY_IP), free_port(ADMIN_IP)
    (tmp_path / "rules.yaml").write_text(RULES)
    text = write_config(tmp_path, lab_ca.ca_pem, f"{PROXY_IP}:{smtp_port}", admin_port, f"[{GUEST_IP}]")
    text = text.replace("smtp:\n", "smtp:\n  workers: 2\n")
    tag = secrets.token_hex(6)
    subjects = [f"workers {tag} {i:02d}" for i in range(N)]
    with ProxyVM.from_text(tmp_path, text) as pvm:
        ws = pvm.workers("smtp")
        assert len(ws) == 2 and len({w["pid"] for w in ws}) == 2, ws
        with ThreadPoolExecutor(4) as pool:
            res = list(pool.map(lambda s: swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org",
                                                "--header", f"Subject: {s}"), subjects))
        bad = [r.stdout[-500:] for r in res if r.returncode != 0 or "250 2.0.0 Ok: queued as" not in r.stdout]
        assert not bad, bad[:1] + [pvm.tail()]
        ws = pvm.wait_workers("smtp", lambda ws: sum(w["detail"].get("accepted", 0) for w in ws) == N)
        accepted = [w["detail"].get("accepted", 0) for w in ws]
        assert sum(accepted) == N and min(accepted) > 0, accepted  # both workers took mail

        def count(msgs: list[bytes]) -> dict[str, int]:
            return {s: sum(f"Subject: {s}".encode() in m for m in msgs) for s in subjects}

        postfix_mx.wait_for(lambda ms: all(count(ms).values()), timeout=60)
        ws = pvm.wait_workers("smtp", lambda ws: sum(w["detail"].get("delivered", 0) for w in ws) == N)
        delivered = [w["detail"].get("delivered", 0) for w in ws]
        assert delivered == accepted, (delivered, accepted)  # each delivered what it accepted
        time.sleep(3)  # a second delivery of anything would arrive by now (retry.first is 2 s)
        assert set(count(postfix_mx.messages()).values()) == {1}
        assert list_spool(tmp_path / "spool") == []
        assert len(wait_rcpt_records(pvm, N)) == N
        finals = [r for r in pvm.audit_records() if r.get("kind") == "delivery" and r.get("event") == "final"]
        assert len(finals) == N and {r["outcome"] for r in finals} == {"delivered"}, finals[:2]
        assert len({r["request"]["message"] for r in finals}) == N
    assert verify([pvm.audit_path]).ok


def test_queued_mail_survives_a_restart_and_goes_out_once(postfix_mx, lab_ca, tmp_path: Path) -> None:
    """Mail that could not go out (the relay port is closed) waits in both workers' parts of the
    spool across a stop and start of `proxyvm run`; after it, each message is delivered once (a
    worker that took up another's queued mail as well would deliver it twice)."""
    smtp_port, admin_port = free_port(PROXY_IP), free_port(ADMIN_IP)
    (tmp_path / "rules.yaml").write_text(RULES)
    good = write_config(tmp_path, lab_ca.ca_pem, f"{PROXY_IP}:{smtp_port}", admin_port, f"[{GUEST_IP}]")
    good = good.replace("smtp:\n", "smtp:\n  workers: 2\n")
    assert "port: 25," in good
    closed = good.replace("port: 25,", f"port: {free_port('127.0.0.1')}, ")
    tag = secrets.token_hex(6)
    subjects = [f"restart {tag} {i:02d}" for i in range(10)]
    with ProxyVM.from_text(tmp_path, closed) as pvm:
        with ThreadPoolExecutor(4) as pool:
            res = list(pool.map(lambda s: swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org",
                                                "--header", f"Subject: {s}"), subjects))
        assert all("250 2.0.0 Ok: queued as" in r.stdout for r in res), pvm.tail()
        ws = pvm.wait_workers("smtp", lambda ws: sum(w["detail"].get("queued", 0) for w in ws) == 10)
        assert min(w["detail"].get("queued", 0) for w in ws) > 0, ws  # both hold some
    assert len(list_spool(tmp_path / "spool")) == 10
    assert not any(f"restart {tag}".encode() in m for m in postfix_mx.messages())
    with ProxyVM.from_text(tmp_path, good):
        postfix_mx.wait_for(lambda ms: sum(f"restart {tag}".encode() in m for m in ms) >= 10, timeout=60)
        time.sleep(3)
        msgs = postfix_mx.messages()
        assert {s: sum(f"Subject: {s}".encode() in m for m in msgs) for s in subjects} == dict.fromkeys(subjects, 1)
        deadline = time.monotonic() + 10
        while list_spool(tmp_path / "spool") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list_spool(tmp_path / "spool") == []
