"""Forensic capture of SMTP (protocols.capture) in the real `proxyvm run -c CONFIG` relaying to the
real Postfix MX, swaks as the guest, tshark reading the pcap back:

* a session with a recipient denied by policy is in the guest's pcap ring: the guest's commands
  (EHLO, MAIL, RCPT) from its address to the proxy's port and our replies (550 5.7.1), in one TCP
  connection with a handshake and FIN;
* a session whose recipients were all allowed is not captured;
* nothing of the outside side is in the pcap (the relay password the proxy uses upstream)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.labs.pcap import all_packets, needs_tshark, ring, wait_for
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.smtp.test_smtp_reload_rate import (
    ADMIN_IP,
    GUEST_IP,
    PROXY_IP,
    RELAY_PASSWORD,
    swaks,
    write_config,
)

pytestmark = [pytest.mark.lab, needs_tshark]

RULES = """mode: enforce
default: deny
rules:
  - {id: no-mallory, action: deny, protocol: smtp, match: {rcpt_to: [mallory@example.org]}}
  - {id: out, action: allow, protocol: smtp}
"""


def test_denied_session_captured(postfix_mx, lab_ca, tmp_path: Path) -> None:
    smtp_port, admin_port = free_port(PROXY_IP), free_port(ADMIN_IP)
    (tmp_path / "rules.yaml").write_text(RULES)
    text = write_config(tmp_path, lab_ca.ca_pem, f"{PROXY_IP}:{smtp_port}", admin_port, f"[{GUEST_IP}]")
    tag = secrets.token_hex(6)
    state = tmp_path / "state"
    fields = ("ip.src", "tcp.srcport", "ip.dst", "tcp.dstport", "tcp.flags.syn", "tcp.flags.fin",
              "smtp.req.command", "smtp.req.parameter", "smtp.response.code")
    with ProxyVM.from_text(tmp_path, text) as pvm:
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org", "--header", f"Subject: a {tag}")
        assert "250 2.0.0 Ok: queued as" in r.stdout, r.stdout + pvm.tail()
        postfix_mx.find(f"a {tag}".encode(), 30)  # delivered upstream (with the relay password)
        r = swaks(smtp_port, "--from", "alice@example.com", "--to", "mallory@example.org",
                  "--header", f"Subject: b {tag}")
        assert "550 5.7.1 <mallory@example.org>: recipient rejected by policy rule no-mallory" in r.stdout, r.stdout
        decode = (f"tcp.port=={smtp_port},smtp",)
        pk = wait_for(lambda: (p := all_packets(ring(state, "mail1"), *fields, decode=decode)) and p, 15, "the pcap")
    files = ring(state, "mail1")
    assert len(files) == 1 and files[0].name.endswith(".pcap") and "-smtp-" in files[0].name
    syns = [p for p in pk if p["tcp.flags.syn"] in ("1", "True") and p["ip.src"] == GUEST_IP]
    assert len(syns) == 1, pk  # one session: the allowed one is not captured
    guest_port = syns[0]["tcp.srcport"]
    assert {(p["ip.src"], p["tcp.srcport"], p["ip.dst"], p["tcp.dstport"]) for p in pk} == {
        (GUEST_IP, guest_port, PROXY_IP, str(smtp_port)), (PROXY_IP, str(smtp_port), GUEST_IP, guest_port)}
    cmds = [(p["smtp.req.command"], p["smtp.req.parameter"]) for p in pk if p["smtp.req.command"]]
    assert ("EHLO", "guest.lab.test") in cmds and ("RCPT", "TO:<mallory@example.org>") in cmds, cmds
    assert ("MAIL", "FROM:<alice@example.com>") in cmds and cmds[-1][0] == "QUIT", cmds
    codes = [p["smtp.response.code"] for p in pk if p["smtp.response.code"] and p["ip.src"] == PROXY_IP]
    assert codes[0] == "220" and "550" in codes and codes[-1] == "221", codes
    assert any(p["tcp.flags.fin"] in ("1", "True") for p in pk)
    raw = b"".join(f.read_bytes() for f in files)
    assert b"bob@example.org" not in raw and f"a {tag}".encode() not in raw
    assert RELAY_PASSWORD.encode() not in raw
