"""Delivery through the in-process service to a real Postfix (STARTTLS, lab CA, Maildir).

Covers: ESMTPS(A) in Received with CA verification and AUTH; a STARTTLS-stripping relay (mail stays
queued, nothing in clear) and the byte-identical delivery once it is gone; untrusted certificate and
name mismatch (deferred, alarm); per-recipient outcomes; DSN after retry.max_age (injected clock);
MX routing; the `mailq --flush` trigger.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import replace

import pytest

from policy.source import Secret
from protocols.smtp import mailq
from protocols.smtp.resolver import Answer, StaticResolver
from protocols.smtp.settings import RelayAuth, RetrySettings
from tests.protocols.smtp.conftest import (
    MX_IP,
    RELAY_PASSWORD,
    UNTRUSTED_IP,
    StripRelay,
    chat,
    raw_session,
    read_reply,
    relay_settings,
    swaks,
)

pytestmark = pytest.mark.lab


async def send_raw(server: str, mail_from: str, rcpts: list[str], message: bytes) -> str:
    """One transaction with exact bytes (message given with CRLF line ends, not dot-stuffed)."""
    r, w = await raw_session(server)
    await read_reply(r)
    await chat(r, w, b"EHLO guest.lab.test\r\n")
    assert (await chat(r, w, f"MAIL FROM:<{mail_from}>\r\n".encode())).startswith("250")
    for rc in rcpts:
        await chat(r, w, f"RCPT TO:<{rc}>\r\n".encode())
    assert (await chat(r, w, b"DATA\r\n")).startswith("354")
    stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in message.split(b"\r\n"))
    reply = await chat(r, w, stuffed + b".\r\n")
    w.close()
    return reply


async def test_relay_delivery_is_esmtpsa_and_verified(postfix_mx, lab_ca, tmp_path, start_service):
    run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem))
    tag = secrets.token_hex(6)
    rc, out = await swaks(run.server, "--from", "alice@example.com", "--to", "bob@example.org",
                          "--header", f"Subject: hello {tag}", "--body", f"body {tag}\n")
    assert rc == 0, out
    assert "250 2.0.0 Ok: queued as" in out
    msg = await asyncio.to_thread(postfix_mx.find, tag.encode())
    assert b"with ESMTPSA" in msg, msg[:800]  # S: STARTTLS, A: authenticated with the relay secret
    assert b"(using TLSv1.3" in msg or b"(using TLSv1.2" in msg
    recs = await run.wait_records(event="final", outcome="delivered")
    att = run.records(event="attempt", outcome="delivered")
    up = att[0]["upstream"]
    assert up["verified"] is True and up["verified_by"] == "ca" and up["peer"] == "relay.lab.test"
    assert up["tls"] in ("TLSv1.3", "TLSv1.2") and up["cipher"]
    assert up["address"] == f"{MX_IP}:25"
    assert recs[0]["request"]["rcpt_to"] == ["bob@example.org"]
    await run.wait_spool_empty()
    dump = json.dumps(run.audit.records)
    assert RELAY_PASSWORD not in dump and tag not in dump.replace(f"hello {tag}", "")


async def test_stripped_starttls_stays_queued_then_delivered_byte_identical(
        postfix_mx, lab_ca, tmp_path, start_service):
    strip = await StripRelay("127.0.5.20", (MX_IP, 25)).start()
    try:
        s = relay_settings(tmp_path / "spool", lab_ca.ca_pem, ip="127.0.5.20", port=strip.port)
        run = await start_service(s)
        tag = secrets.token_hex(6)
        body = (f"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: strip {tag}\r\n"
                "Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
                f"Message-Id: <{tag}@guest>\r\n\r\n"
                f".leading dot line\r\n..two dots\r\nsecret-body-{tag}\r\n\xe9t\xe9 8bit\r\n").encode("latin-1")
        reply = await send_raw(run.server, "alice@example.com", ["bob@example.org"], body)
        assert reply.startswith("250 2.0.0")
        att = await run.wait_records(event="attempt", outcome="deferred")
        assert "STARTTLS not offered" in att[0]["alarm"] and "relay.lab.test" in att[0]["alarm"]
        assert len(run.spool_ids()) == 1
        sent = bytes(strip.from_client)
        assert b"EHLO" in sent
        for secret in (b"MAIL FROM", b"RCPT TO", b"AUTH", tag.encode(), b"secret-body"):
            assert secret not in sent, secret
        # the attacker goes away (the relay now forwards untouched); retry now
        strip.strip = False
        run.service.runner.flush()
        msg = await asyncio.to_thread(postfix_mx.find, f"strip {tag}".encode())
        # exactly as sent: the guest's headers and body are the tail of what Postfix stored
        # (Maildir keeps LF line ends; Postfix only prepended its Received/Return-Path lines)
        assert msg.endswith(body.replace(b"\r\n", b"\n")), msg[-300:]
        await run.wait_records(event="final", outcome="delivered")
        await run.wait_spool_empty()
    finally:
        await strip.stop()


async def test_untrusted_certificate_deferred(postfix_untrusted, lab_ca, tmp_path, start_service):
    run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem, ip=UNTRUSTED_IP, auth=False))
    tag = secrets.token_hex(6)
    rc, out = await swaks(run.server, "--from", "a@example.com", "--to", "b@example.org",
                          "--header", f"Subject: untrusted {tag}")
    assert rc == 0, out
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "certificate" in att[0]["reply"] and att[0]["alarm"]
    assert att[0]["upstream"]["verified"] is False
    assert len(run.spool_ids()) == 1
    await asyncio.sleep(0.5)
    assert not any(tag.encode() in m for m in postfix_untrusted.messages())


async def test_certificate_name_mismatch_deferred(postfix_mx, lab_ca, tmp_path, start_service):
    s = relay_settings(tmp_path / "spool", lab_ca.ca_pem)
    s = replace(s, relay=replace(s.relay, host="wrong.lab.test"))
    run = await start_service(s)
    rc, out = await swaks(run.server, "--from", "a@example.com", "--to", "b@example.org")
    assert rc == 0, out
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "wrong.lab.test" in att[0]["alarm"] and "certificate" in att[0]["reply"].lower()
    assert len(run.spool_ids()) == 1


async def test_wrong_relay_password_deferred_never_logged(postfix_mx, lab_ca, tmp_path, start_service):
    s = relay_settings(tmp_path / "spool", lab_ca.ca_pem)
    s = replace(s, relay=replace(s.relay, auth=RelayAuth("relayuser", Secret("Wrong-Pw-123", "t"))))
    run = await start_service(s)
    rc, out = await swaks(run.server, "--from", "a@example.com", "--to", "b@example.org")
    assert rc == 0, out
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "rejected our credentials" in att[0]["reply"]
    assert "Wrong-Pw-123" not in json.dumps(run.audit.records)
    assert len(run.spool_ids()) == 1


async def test_per_recipient_outcomes_and_dsn(postfix_mx, lab_ca, tmp_path, start_service):
    """One recipient's 5xx does not fail the others; the sender gets a DSN for that one."""
    run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem))
    tag = secrets.token_hex(6)
    rc, out = await swaks(run.server, "--from", "sender@example.org",
                          "--to", "ok@example.org,nosuchuser@example.org", "--header", f"Subject: per {tag}")
    assert rc == 0, out
    fin = await run.wait_records(event="final")
    assert fin[0]["outcome"] == "partial" and fin[0]["failed"] == ["nosuchuser@example.org"]
    dsn = await asyncio.to_thread(postfix_mx.find, b"Undelivered Mail Returned to Sender")
    assert b"Final-Recipient: rfc822; nosuchuser@example.org" in dsn and b"Status: 5.1.1" in dsn
    assert f"Subject: per {tag}".encode() in dsn  # the original headers come back, not the body
    assert b"Return-Path: <>" in dsn


async def test_dsn_after_max_age_injected_clock(postfix_mx, lab_ca, tmp_path, start_service):
    strip = await StripRelay("127.0.5.21", (MX_IP, 25)).start()
    try:
        s = relay_settings(tmp_path / "spool", lab_ca.ca_pem, ip="127.0.5.21", port=strip.port,
                           retry=RetrySettings(first=60, max_age=3600, max_interval=600))
        run = await start_service(s)
        tag = secrets.token_hex(6)
        rc, out = await swaks(run.server, "--from", "owner@example.org", "--to", "far@example.org",
                              "--header", f"Subject: expire {tag}")
        assert rc == 0, out
        await run.wait_records(event="attempt", outcome="deferred")
        (qid,) = run.spool_ids()
        for _ in range(100):  # the state file is written just after the attempt's audit record
            entry = run.service.spool.read_entry(qid)
            if entry.state.attempts:
                break
            await asyncio.sleep(0.05)
        assert entry.state.attempts == 1 and entry.state.next_attempt - run.clock() > 50  # backoff: retry.first
        for _ in range(200):  # let the attempt finish rescheduling before the clock jumps
            if not run.service.runner._inflight:
                break
            await asyncio.sleep(0.05)
        run.clock.advance(3601)  # past retry.max_age
        run.service.runner.wake()
        await run.wait_records(event="dsn")
        fin = await run.wait_records(event="final")
        assert fin[0]["outcome"] == "expired"
        for _ in range(100):  # finished entries are removed from disk in batches, just after
            ids = run.spool_ids()
            if qid not in ids:
                break
            await asyncio.sleep(0.05)
        assert qid not in ids and len(ids) == 1  # the original is gone, the bounce is queued
        strip.strip = False
        run.service.runner.flush()
        dsn = await asyncio.to_thread(postfix_mx.find, f"Subject: expire {tag}".encode())
        assert b"Status: 4.4.7" in dsn and b"Action: failed" in dsn
        assert b"multipart/report; report-type=delivery-status" in dsn
        assert b"To: <owner@example.org>" in dsn
    finally:
        await strip.stop()


async def test_mx_routing_with_resolver(postfix_mx, lab_ca, tmp_path, start_service):
    resolver = StaticResolver({
        ("mx", "example.org"): Answer(((10, "mx.lab.test"),)),
        ("address", "mx.lab.test"): Answer((MX_IP,)),
        ("mx", "nullmx.example"): Answer(((0, "."),)),
    })
    s = replace(relay_settings(tmp_path / "spool", lab_ca.ca_pem), relay=None)
    run = await start_service(s, resolver=resolver,
                              rules="mode: enforce\ndefault: allow\nrules: []\n")
    tag = secrets.token_hex(6)
    rc, out = await swaks(run.server, "--from", "a@example.org", "--to", "mxuser@example.org,x@nullmx.example,"
                          "y@nxdomain.example", "--header", f"Subject: mx {tag}")
    assert rc == 0, out
    msg = await asyncio.to_thread(postfix_mx.find, f"mx {tag}".encode())
    assert b"with ESMTPS " in msg  # STARTTLS, no AUTH toward an MX
    fin = await run.wait_records(event="final")
    assert sorted(fin[0]["failed"]) == ["x@nullmx.example", "y@nxdomain.example"]
    att = run.records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["peer"] == "mx.lab.test" and att[0]["upstream"]["verified_by"] == "ca"


async def test_mailq_lists_and_flush_trigger(postfix_mx, lab_ca, tmp_path, start_service):
    strip = await StripRelay("127.0.5.22", (MX_IP, 25)).start()
    try:
        run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem, ip="127.0.5.22", port=strip.port))
        tag = secrets.token_hex(6)
        rc, out = await swaks(run.server, "--from", "q@example.org", "--to", "r@example.org",
                              "--header", f"Subject: q {tag}")
        assert rc == 0
        await run.wait_records(event="attempt", outcome="deferred")
        for _ in range(100):  # the state file is written right after the attempt's audit record
            rows = mailq.list_spool(run.settings.spool)
            if rows and rows[0].attempts:
                break
            await asyncio.sleep(0.05)
        assert len(rows) == 1 and rows[0].guest == "mail1" and rows[0].mail_from == "q@example.org"
        assert rows[0].rcpts == (("r@example.org", "pending"),) and "STARTTLS" in rows[0].last_error
        text = mailq.format_rows(rows)
        assert rows[0].id in text and "r@example.org" in text and tag not in text
        strip.strip = False
        mailq.flush(run.settings.spool)  # what `proxyvm mailq --flush` does
        await asyncio.to_thread(postfix_mx.find, f"q {tag}".encode(), 10)
        await run.wait_records(event="final", outcome="delivered")
        await run.wait_spool_empty()
        assert mailq.list_spool(run.settings.spool) == []
        assert mailq.format_rows([]) == "Mail queue is empty\n"
    finally:
        await strip.stop()


async def test_relay_implicit_tls_465(postfix_mx, lab_ca, tmp_path, start_service):
    run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem, port=465))
    tag = secrets.token_hex(6)
    rc, out = await swaks(run.server, "--from", "a@example.com", "--to", "bob@example.org",
                          "--header", f"Subject: smtps {tag}")
    assert rc == 0, out
    msg = await asyncio.to_thread(postfix_mx.find, f"smtps {tag}".encode())
    assert b"with ESMTPSA" in msg
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["address"] == f"{MX_IP}:465" and att[0]["upstream"]["verified_by"] == "ca"


async def test_implicit_mx_fallback_to_address(postfix_mx, lab_ca, tmp_path, start_service):
    """RFC 5321 5.1: no MX records (NODATA) means the domain itself is the mail host."""
    resolver = StaticResolver({("mx", "lab.test"): Answer(()), ("address", "lab.test"): Answer((MX_IP,))})
    s = replace(relay_settings(tmp_path / "spool", lab_ca.ca_pem), relay=None)
    run = await start_service(s, resolver=resolver, rules="mode: enforce\ndefault: allow\nrules: []\n")
    # the certificate does not name lab.test itself: CA verification must refuse it (deferred)
    rc, out = await swaks(run.server, "--from", "a@example.org", "--to", "x@lab.test")
    assert rc == 0, out
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert att[0]["upstream"]["address"] == f"{MX_IP}:25" and "lab.test" in att[0]["alarm"]
    assert ("address", "lab.test") in resolver.queries


async def test_reload_swaps_policy_without_dropping_sessions(tmp_path, start_service, postfix_mx, lab_ca):
    from tests.protocols.smtp.conftest import make_engine

    run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem))
    r, w = await raw_session(run.server)
    await read_reply(r)
    await chat(r, w, b"EHLO g\r\n")
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    assert (await chat(r, w, b"RCPT TO:<b@example.org>\r\n")).startswith("250")
    deny_all = make_engine(tmp_path, "mode: enforce\ndefault: deny\nrules: []\n")
    await run.service.reload(run.settings, deny_all)
    reply = await chat(r, w, b"RCPT TO:<c@example.org>\r\n")  # same session, new policy
    assert reply.startswith("550 5.7.1") and "rule default" in reply
    await chat(r, w, b"DATA\r\n")
    assert (await chat(r, w, b"Subject: kept\r\n\r\nx\r\n.\r\n")).startswith("250 2.0.0")
    w.close()
    assert run.service.health()["state"] == "ok"


@pytest.fixture(scope="module")
def postfix_login_only(lab_dir, mx_cert):
    from tests.labs.postfix import PostfixLab
    from tests.protocols.smtp.conftest import RELAY_USER, need_postfix

    need_postfix()
    lab = PostfixLab(lab_dir / "postfix-login", "127.0.5.13", 25, cert=mx_cert[0], key=mx_cert[1],
                     hostname="login.lab.test", sasl_users={RELAY_USER: RELAY_PASSWORD}, sasl_mechs="LOGIN",
                     extra={"mynetworks": "127.0.0.255/32"})  # nobody relays without AUTH here
    lab.start()
    yield lab
    lab.stop()


async def test_relay_auth_login(postfix_login_only, lab_ca, tmp_path, start_service):
    run = await start_service(relay_settings(tmp_path / "spool", lab_ca.ca_pem, ip="127.0.5.13"))
    tag = secrets.token_hex(6)
    rc, out = await swaks(run.server, "--from", "a@example.com", "--to", "bob@example.org",
                          "--header", f"Subject: login {tag}")
    assert rc == 0, out
    msg = await asyncio.to_thread(postfix_login_only.find, f"login {tag}".encode())
    assert b"with ESMTPSA" in msg
    assert "sasl_method=LOGIN" in postfix_login_only.tail(100_000)
