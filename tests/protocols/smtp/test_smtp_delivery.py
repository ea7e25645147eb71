"""End-to-end delivery through the in-process service to a real Postfix (STARTTLS, lab CA, Maildir)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from tests.protocols.smtp.conftest import (
    MX_IP,
    relay_settings,
    swaks,
)

pytestmark = pytest.mark.lab


async def test_relay_delivery_is_esmtps_and_verified(postfix_mx, lab_ca, tmp_path, start_service):
    run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem))
    tag = secrets.token_hex(6)
    rc, out = await swaks(run.server, "--from", "alice@example.com", "--to", "bob@example.org",
                          "--header", f"Subject: hello {tag}", "--body", f"body {tag}\n")
    assert rc == 0, out
    assert "250 2.0.0 Ok: queued as" in out
    msg = await asyncio.to_thread(postfix_mx.find, tag.encode())
    assert b"with ESMTPSA" in msg or b"with ESMTPS" in msg, msg[:800]
    assert b"(using TLSv1.3" in msg or b"(using TLSv1.2" in msg
    recs = await run.wait_records(event="final", outcome="delivered")
    att = run.records(event="attempt", outcome="delivered")
    assert att and att[0]["upstream"]["verified"] is True and att[0]["upstream"]["verified_by"] == "ca"
    assert att[0]["upstream"]["tls"] in ("TLSv1.3", "TLSv1.2")
    assert att[0]["upstream"]["address"] == f"{MX_IP}:25"
    assert recs[0]["request"]["rcpt_to"] == ["bob@example.org"]
    assert run.spool_ids() == []
