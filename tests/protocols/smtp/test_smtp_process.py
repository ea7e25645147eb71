"""The SMTP service inside the real `proxyvm run -c CONFIG` process (supervisor + worker).

swaks → proxyvm → Postfix over verified STARTTLS with AUTH; and `kill -9` of the whole proxy right
after the `250`, restart, delivered exactly once.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.smtp.conftest import MX_IP, RELAY_PASSWORD, RELAY_USER

pytestmark = pytest.mark.lab
PROXY_IP, ADMIN_IP, TARPIT_IP = "127.0.5.4", "127.0.5.3", "127.0.5.24"


def write_config(d, ca, relay_ip, relay_port, smtp_port, admin_port) -> str:
    (d / "relay.pass").write_text(RELAY_PASSWORD + "\n")
    (d / "relay.pass").chmod(0o600)
    (d / "rules.yaml").write_text(
        "mode: enforce\ndefault: deny\nrules:\n"
        "  - id: mail-out\n    action: allow\n    protocol: smtp\n    guests: [mail1]\n"
        "    match: {mail_from: ['*@example.com']}\n")
    return f"""\
guests:
  mail1: {{addresses: [127.0.5.2]}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{ADMIN_IP}:{admin_port}"}}
state_dir: state
smtp:
  listen: ["{PROXY_IP}:{smtp_port}"]
  spool: spool
  relay: {{host: relay.lab.test, port: {relay_port}, address: "{relay_ip}",
          auth: {{username: {RELAY_USER}, password_file: relay.pass}}}}
  tls: verify
  ca_file: {ca}
  hostname: proxyvm.lab.test
  retry: {{first: 2s, max_age: 1h}}
  timeouts: {{connect: 3s, reply: 10s}}
"""


def swaks_sync(port: int, *args: str) -> str:
    r = subprocess.run(["swaks", "--server", PROXY_IP, "--port", str(port), "--local-interface", "127.0.5.2",
                        "--helo", "guest.lab.test", "--timeout", "20", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_swaks_through_proxyvm_run_arrives_over_verified_tls(postfix_mx, lab_ca, tmp_path):
    smtp_port, admin_port = free_port(PROXY_IP), free_port(ADMIN_IP)
    text = write_config(tmp_path, lab_ca.ca_pem, MX_IP, 25, smtp_port, admin_port)
    with ProxyVM.from_text(tmp_path, text) as pvm:
        tag = secrets.token_hex(6)
        out = swaks_sync(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org",
                         "--header", f"Subject: run {tag}")
        assert "queued as" in out
        msg = postfix_mx.find(f"run {tag}".encode())
        assert b"with ESMTPSA" in msg
        rec = pvm.wait_audit(lambda r: r.get("event") == "attempt" and r.get("outcome") == "delivered")
        assert rec["upstream"]["verified"] is True and rec["guest"] == "mail1" and rec["prev"]
        assert RELAY_PASSWORD not in pvm.audit_path.read_text()
        # policy in the real engine: an unknown sender domain is refused at RCPT
        r = subprocess.run(["swaks", "--server", PROXY_IP, "--port", str(smtp_port), "--local-interface",
                            "127.0.5.2", "--from", "x@other.example", "--to", "bob@example.org"],
                           capture_output=True, text=True, timeout=60)
        assert "550 5.7.1" in r.stdout and "rule default" in r.stdout
        # SIGHUP: a new rules file applies to the next RCPT, queued mail is untouched
        (tmp_path / "rules.yaml").write_text(
            "mode: enforce\ndefault: deny\nrules:\n  - id: lockdown\n    action: deny\n    protocol: smtp\n")
        pvm.reload()
        deadline = time.monotonic() + 15
        while True:
            r = subprocess.run(["swaks", "--server", PROXY_IP, "--port", str(smtp_port), "--local-interface",
                                "127.0.5.2", "--from", "alice@example.com", "--to", "bob@example.org"],
                               capture_output=True, text=True, timeout=60)
            if "rule lockdown" in r.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "550 5.7.1" in r.stdout and "rule lockdown" in r.stdout, r.stdout


def test_kill9_right_after_250_then_restart_delivers_once(postfix_mx, lab_ca, tmp_path):
    tarpit = socket.socket()
    tarpit.bind((TARPIT_IP, 0))
    tarpit.listen(64)  # accepts TCP in the kernel, never greets: delivery cannot finish
    try:
        smtp_port, admin_port = free_port(PROXY_IP), free_port(ADMIN_IP)
        text = write_config(tmp_path, lab_ca.ca_pem, TARPIT_IP, tarpit.getsockname()[1], smtp_port, admin_port)
        pvm = ProxyVM.from_text(tmp_path, text).start()
        tag = secrets.token_hex(6)
        try:
            out = swaks_sync(smtp_port, "--from", "alice@example.com", "--to", "bob@example.org",
                             "--header", f"Subject: kill9 {tag}")
            assert "250 2.0.0 Ok: queued as" in out
        finally:
            os.killpg(pvm.proc.pid, signal.SIGKILL)  # the whole process group, no chance to clean up
            pvm.proc.wait(10)
            pvm._logf.close()
        assert len(list((tmp_path / "spool" / "queue").glob("*.msg"))) == 1
        assert not any(f"kill9 {tag}".encode() in m for m in postfix_mx.messages())
        # `proxyvm mailq` reads the spool of a dead proxy
        q = subprocess.run([sys.executable, "-m", "proxyvm", "mailq", "-c", str(tmp_path / "proxyvm.yaml")],
                           capture_output=True, text=True, timeout=60)
        assert q.returncode == 0, q.stderr
        assert "alice@example.com" in q.stdout and "bob@example.org" in q.stdout and "mail1" in q.stdout
        assert tag not in q.stdout  # no subjects or bodies
        # restart with the real relay: the spooled message is recovered and delivered exactly once
        text = write_config(tmp_path, lab_ca.ca_pem, MX_IP, 25, smtp_port, admin_port)
        with ProxyVM.from_text(tmp_path, text, name="proxyvm2.yaml"):
            postfix_mx.find(f"kill9 {tag}".encode(), 30)
            assert sum(f"kill9 {tag}".encode() in m for m in postfix_mx.messages()) == 1
    finally:
        tarpit.close()
