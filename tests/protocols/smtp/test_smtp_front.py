"""Guest side: extensions, policy replies at MAIL/RCPT, and every bad input of issue 5.

The relay here points at a closed port on 127.0.5.99, so accepted mail simply stays queued
(delivery is tested in test_smtp_delivery.py). Each bad-input test ends by proving the listener
still serves a fresh session.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest

from tests.protocols.smtp.conftest import (
    chat,
    raw_session,
    read_reply,
    relay_settings,
    swaks,
)

RULES = """\
mode: enforce
default: deny
rules:
  - id: no-evil
    action: deny
    protocol: smtp
    match: {rcpt_to: ["*@evil.example"]}
  - id: small-only
    action: allow
    protocol: smtp
    match: {rcpt_to: ["*@small.example"], max_size: 2KB}
  - id: limited
    action: allow
    protocol: smtp
    match: {rcpt_to: ["*@rate.example"]}
    rate: 2/hour
  - id: mail-out
    action: allow
    protocol: smtp
    match: {mail_from: ["*@example.com", "*@xn--bcher-kva.example"]}
"""
MONITOR = RULES.replace("mode: enforce", "mode: monitor")


def settings(tmp_path, **kw):
    return relay_settings(tmp_path / "spool", None, ip="127.0.5.99", port=25, auth=False, **kw)


async def session(run):
    r, w = await raw_session(run.server)
    greeting = await read_reply(r)
    assert greeting.startswith("220 ") and "ESMTP" in greeting
    return r, w


async def ehlo(run):
    r, w = await session(run)
    reply = await chat(r, w, b"EHLO guest.lab.test\r\n")
    assert reply.startswith("250-"), reply
    return r, w, reply


async def assert_alive(run):
    r, w, reply = await ehlo(run)
    assert (await chat(r, w, b"NOOP\r\n")).startswith("250 2.0.0")
    w.close()


async def test_ehlo_extensions_and_no_auth(tmp_path, start_service):
    run = await start_service(settings(tmp_path, max_message_size=1_000_000))
    r, w, reply = await ehlo(run)
    lines = [ln[4:] for ln in reply.splitlines()]
    for ext in ("SIZE 1000000", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"):
        assert ext in lines, reply
    assert not any(ln.startswith(("AUTH", "STARTTLS")) for ln in lines)
    assert (await chat(r, w, b"AUTH PLAIN AGZvbwBiYXI=\r\n")).startswith("502 5.5.1")
    assert (await chat(r, w, b"HELO x\r\n")).startswith("250 ")
    w.close()


async def test_accepts_with_swaks_and_spools_before_250(tmp_path, start_service):
    run = await start_service(settings(tmp_path))
    rc, out = await swaks(run.server, "--from", "alice@example.com", "--to", "bob@example.org,carol@example.org", "--header", "Message-Id: <m1@guest>", "--pipeline")
    assert rc == 0, out
    qid = out.split("queued as ")[1].split()[0]
    assert qid in run.spool_ids()
    data = (run.settings.spool / "queue" / f"{qid}.msg").read_bytes()
    assert b"Message-Id: <m1@guest>" in data and b"Received: from guest.lab.test (127.0.5.2)" in data
    acc = run.records(event="accepted")
    assert acc[0]["guest"] == "mail1" and acc[0]["request"]["message_id"] == "<m1@guest>"
    assert acc[0]["request"]["rcpt_to"] == ["bob@example.org", "carol@example.org"]
    assert acc[0]["rule"] == "mail-out" and acc[0]["at"].endswith("rules.yaml:4")
    assert len(run.records(event="rcpt", verdict="allow")) == 2  # one decision per recipient


async def test_null_sender_accepted(tmp_path, start_service):
    run = await start_service(settings(tmp_path), rules="mode: enforce\ndefault: allow\nrules: []\n")
    rc, out = await swaks(run.server, "--from", "", "--to", "bob@example.org")
    assert rc == 0, out
    assert "queued as" in out


async def test_policy_deny_is_550_571_naming_rule(tmp_path, start_service):
    run = await start_service(settings(tmp_path), rules=RULES)
    r, w, _ = await ehlo(run)
    assert (await chat(r, w, b"MAIL FROM:<alice@example.com>\r\n")).startswith("250 2.1.0")
    reply = await chat(r, w, b"RCPT TO:<x@evil.example>\r\n")
    assert reply.startswith("550 5.7.1") and "rule no-evil" in reply
    assert (await chat(r, w, b"RCPT TO:<ok@example.org>\r\n")).startswith("250 2.1.5")
    w.close()
    deny = run.records(event="rcpt", verdict="deny")
    assert deny and deny[0]["rule"] == "no-evil" and deny[0]["request"]["rcpt_to"] == "x@evil.example"
    # default deny: unknown sender domain
    r, w, _ = await ehlo(run)
    await chat(r, w, b"MAIL FROM:<x@other.example>\r\n")
    reply = await chat(r, w, b"RCPT TO:<ok@example.org>\r\n")
    assert reply.startswith("550 5.7.1") and "rule default" in reply
    w.close()


async def test_size_limits_552_534(tmp_path, start_service):
    run = await start_service(settings(tmp_path, max_message_size=100_000), rules=RULES)
    r, w, _ = await ehlo(run)
    assert (await chat(r, w, b"MAIL FROM:<a@example.com> SIZE=200000\r\n")).startswith("552 5.3.4")
    assert (await chat(r, w, b"MAIL FROM:<a@example.com> SIZE=5000\r\n")).startswith("250")
    reply = await chat(r, w, b"RCPT TO:<x@small.example>\r\n")
    assert reply.startswith("552 5.3.4") and "small-only" in reply
    assert (await chat(r, w, b"RSET\r\n")).startswith("250 2.0.0")
    # no SIZE declared: the rule's limit is enforced on the data
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    assert (await chat(r, w, b"RCPT TO:<x@small.example>\r\n")).startswith("250")
    assert (await chat(r, w, b"DATA\r\n")).startswith("354")
    reply = await chat(r, w, b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" + (b"y" * 900 + b"\r\n") * 4 + b".\r\n")
    assert reply.startswith("552 5.3.4"), reply
    # over the service maximum without SIZE
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    await chat(r, w, b"RCPT TO:<x@example.org>\r\n")
    await chat(r, w, b"DATA\r\n")
    reply = await chat(r, w, (b"z" * 998 + b"\r\n") * 120 + b".\r\n")
    assert reply.startswith("552 5.3.4"), reply
    w.close()
    assert run.spool_ids() == []
    await assert_alive(run)


async def test_too_many_recipients_452_453(tmp_path, start_service):
    run = await start_service(settings(tmp_path, max_recipients=3))
    r, w, _ = await ehlo(run)
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    for i in range(3):
        assert (await chat(r, w, f"RCPT TO:<r{i}@example.org>\r\n".encode())).startswith("250")
    assert (await chat(r, w, b"RCPT TO:<r9@example.org>\r\n")).startswith("452 4.5.3")
    w.close()


async def test_rate_limit_451_471(tmp_path, start_service):
    run = await start_service(settings(tmp_path), rules=RULES)
    r, w, _ = await ehlo(run)
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    assert (await chat(r, w, b"RCPT TO:<a@rate.example>\r\n")).startswith("250")
    assert (await chat(r, w, b"RCPT TO:<b@rate.example>\r\n")).startswith("250")
    reply = await chat(r, w, b"RCPT TO:<c@rate.example>\r\n")
    assert reply.startswith("451 4.7.1") and "limited" in reply
    w.close()


async def test_monitor_mode_accepts_and_audits_would_deny(tmp_path, start_service):
    run = await start_service(settings(tmp_path), rules=MONITOR)
    rc, out = await swaks(run.server, "--from", "a@example.com", "--to", "x@evil.example")
    assert rc == 0 and "queued as" in out, out
    wd = run.records(event="rcpt", verdict="would_deny")
    assert wd and wd[0]["rule"] == "no-evil"


# -- bad input ----------------------------------------------------------------------------------
async def test_bare_lf_and_cr_in_commands(tmp_path, start_service):
    run = await start_service(settings(tmp_path))
    r, w, _ = await ehlo(run)
    assert (await chat(r, w, b"MAIL FROM:<a@example.com>\n")).startswith("500 5.5.2")
    assert (await chat(r, w, b"NOOP\rMAIL FROM:<a@example.com>\r\n")).startswith("500 5.5.2")
    assert (await chat(r, w, b"NOOP\x00\r\n")).startswith("500 5.5.2")
    # the bare-LF MAIL was not taken: RCPT still needs MAIL
    assert (await chat(r, w, b"RCPT TO:<b@example.org>\r\n")).startswith("503 5.5.1")
    w.close()
    await assert_alive(run)


@pytest.mark.parametrize("body,code", [
    (b"Subject: x\r\n\r\nline one\nline two\r\n", "554 5.6.0"),  # bare LF
    (b"Subject: x\r\n\r\nline one\rline two\r\n", "554 5.6.0"),  # bare CR
    (b"Subject: x\r\n\r\nsmuggle\n.\nMAIL FROM:<evil@x>\r\n", "554 5.6.0"),  # smuggling attempt
    (b"Subject: x\r\n\r\nnul \x00 byte\r\n", "554 5.6.0"),
    (b"Subject: x\r\n\r\n" + b"a" * 1500 + b"\r\n", "500 5.5.2"),  # line over 1000 octets
])
async def test_bad_data_rejected_nothing_spooled(tmp_path, start_service, body, code):
    run = await start_service(settings(tmp_path))
    r, w, _ = await ehlo(run)
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    await chat(r, w, b"RCPT TO:<b@example.org>\r\n")
    assert (await chat(r, w, b"DATA\r\n")).startswith("354")
    reply = await chat(r, w, body + b".\r\n")
    assert reply.startswith(code), reply
    # the session continues: a clean message right after is accepted
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    await chat(r, w, b"RCPT TO:<b@example.org>\r\n")
    await chat(r, w, b"DATA\r\n")
    assert (await chat(r, w, b"Subject: ok\r\n\r\nfine\r\n.\r\n")).startswith("250 2.0.0")
    w.close()
    assert len(run.spool_ids()) == 1
    await assert_alive(run)


async def test_sequence_errors(tmp_path, start_service):
    run = await start_service(settings(tmp_path))
    r, w = await session(run)
    assert (await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")).startswith("503 5.5.1")  # before EHLO
    await chat(r, w, b"EHLO x\r\n")
    assert (await chat(r, w, b"RCPT TO:<b@example.org>\r\n")).startswith("503 5.5.1")  # RCPT before MAIL
    assert (await chat(r, w, b"DATA\r\n")).startswith("503 5.5.1")  # DATA without RCPT
    assert (await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")).startswith("250")
    assert (await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")).startswith("503 5.5.1")  # duplicate MAIL
    assert (await chat(r, w, b"DATA\r\n")).startswith("503 5.5.1")  # DATA without RCPT
    assert (await chat(r, w, b"MAIL\r\n")).startswith("501 5.5.4")
    assert (await chat(r, w, b"BOGUS\r\n")).startswith("500 5.5.2")
    w.close()
    await assert_alive(run)


@pytest.mark.parametrize("cmd,code", [
    (b"MAIL FROM:<no-at-sign>\r\n", "553 5.1.3"),
    (b"MAIL FROM:<a@bad..domain>\r\n", "553 5.1.3"),
    (b"MAIL FROM:<a@-bad.example>\r\n", "553 5.1.3"),
    (b"MAIL FROM:<" + b"a" * 65 + b"@example.com>\r\n", "553 5.1.3"),  # local part over 64
    (b"MAIL FROM:<a@" + b"b" * 60 + b"." + b"c" * 60 + b"." + b"d" * 60 + b"." + b"e" * 60 + b"." + b"f" * 60 + b".example>\r\n",
     "553 5.1.3"),  # address over 254
    ("MAIL FROM:<jörg@example.com>\r\n".encode(), "553 5.6.7"),  # non-ASCII without SMTPUTF8
    (b"MAIL FROM:<a@[300.1.1.1]>\r\n", "553 5.1.3"),
    (b"MAIL FROM:<a@example.com\r\n", "553 5.1.3"),  # unclosed path
    (b"MAIL FROM:<a@example.com>SIZE=1\r\n", "553 5.1.3"),
    (b"MAIL FROM:<a..b@example.com>\r\n", "553 5.1.3"),
    (b'MAIL FROM:<"quoted local"@example.com>\r\n', "250 2.1.0"),  # valid RFC 5321 forms
    (b"MAIL FROM:<@relay.example:a@example.com>\r\n", "250 2.1.0"),
    (b"MAIL FROM:<a@example.com> SIZE=abc\r\n", "501 5.5.4"),
    (b"MAIL FROM:<a@example.com> FOO=BAR\r\n", "555 5.5.4"),
    (b"MAIL FROM:" + b"x" * 1200 + b"\r\n", "500 5.5.2"),  # command line too long
])
async def test_bad_addresses(tmp_path, start_service, cmd, code):
    run = await start_service(settings(tmp_path))
    r, w, _ = await ehlo(run)
    reply = await chat(r, w, cmd)
    assert reply.startswith(code), reply
    w.close()
    await assert_alive(run)


async def test_smtputf8_address_accepted_with_parameter(tmp_path, start_service):
    run = await start_service(settings(tmp_path), rules="mode: enforce\ndefault: allow\nrules: []\n")
    r, w, _ = await ehlo(run)
    assert (await chat(r, w, "MAIL FROM:<jörg@example.com> SMTPUTF8\r\n".encode())).startswith("250")
    assert (await chat(r, w, "RCPT TO:<bücher@example.org>\r\n".encode())).startswith("250")
    await chat(r, w, b"DATA\r\n")
    assert (await chat(r, w, "Subject: ü\r\n\r\nü\r\n.\r\n".encode())).startswith("250 2.0.0")
    w.close()
    (qid,) = run.spool_ids()
    entry = run.service.spool.read_entry(qid)
    assert entry.envelope.smtputf8 and entry.envelope.body_8bit


async def test_pipelined_flood_beyond_limits_closes(tmp_path, start_service):
    run = await start_service(settings(tmp_path))
    r, w, _ = await ehlo(run)
    w.write(b"NOOP\r\n" * 200)
    await w.drain()
    replies = []
    while True:
        line = await asyncio.wait_for(r.readline(), 10)
        if not line:
            break
        replies.append(line.decode())
    assert replies[-1].startswith("421 4.7.0"), replies[-3:]
    assert sum(1 for x in replies if x.startswith("250")) == 50
    w.close()
    await assert_alive(run)


async def test_stall_mid_data_gets_421_nothing_spooled(tmp_path, start_service):
    s = settings(tmp_path)
    from dataclasses import replace

    run = await start_service(replace(s, timeouts=replace(s.timeouts, data=1.0)))
    r, w, _ = await ehlo(run)
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    await chat(r, w, b"RCPT TO:<b@example.org>\r\n")
    await chat(r, w, b"DATA\r\n")
    w.write(b"Subject: stall\r\n\r\nhalf a mess")
    await w.drain()
    reply = await read_reply(r, timeout=10)
    assert reply.startswith("421 4.4.2"), reply
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed
    assert run.spool_ids() == []
    await assert_alive(run)


async def test_disconnect_mid_data_nothing_spooled(tmp_path, start_service):
    run = await start_service(settings(tmp_path))
    r, w, _ = await ehlo(run)
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    await chat(r, w, b"RCPT TO:<b@example.org>\r\n")
    await chat(r, w, b"DATA\r\n")
    w.write(b"Subject: gone\r\n\r\nbody\r\n")  # no final dot
    await w.drain()
    w.close()
    await asyncio.sleep(0.3)
    assert run.spool_ids() == []
    assert not run.records(event="accepted")
    await assert_alive(run)


@pytest.fixture
def tiny_spool(tmp_path):
    """A 256 KiB tmpfs: a real full disk, not a simulated one."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tiny tmpfs (a real full disk)")
    spool = tmp_path / "tiny"
    spool.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(spool)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    yield spool
    subprocess.run(["umount", "-l", str(spool)], check=False)


async def test_spool_full_is_452_431_nothing_acknowledged(tmp_path, start_service, tiny_spool):
    from dataclasses import replace

    spool = tiny_spool
    run = await start_service(replace(settings(tmp_path), spool=spool))
    (spool / "filler").write_bytes(b"\0" * 100_000)  # ~150KB left: MAIL passes the headroom check
    rd, w, _ = await ehlo(run)
    assert (await chat(rd, w, b"MAIL FROM:<a@example.com>\r\n")).startswith("250")
    await chat(rd, w, b"RCPT TO:<b@example.org>\r\n")
    await chat(rd, w, b"DATA\r\n")
    reply = await chat(rd, w, (b"q" * 998 + b"\r\n") * 200 + b".\r\n")  # 200KB: ENOSPC mid-write
    assert reply.startswith("452 4.3.1"), reply
    assert run.records(event="spool_failed")
    (spool / "filler2").write_bytes(b"\0" * 60_000)  # now under the headroom: refused at MAIL
    await asyncio.sleep(0.3)  # free space is sampled at most 4 times a second
    reply = await chat(rd, w, b"MAIL FROM:<a@example.com>\r\n")
    assert reply.startswith("452 4.3.1"), reply
    (spool / "filler2").unlink()
    w.close()
    assert run.spool_ids() == [] and list((spool / "tmp").iterdir()) == []
    (spool / "filler").unlink()
    await asyncio.sleep(0.3)
    rc, out = await swaks(run.server, "--from", "a@example.com", "--to", "b@example.org")
    assert rc == 0 and "queued as" in out, out
    await run.service.drain(1.0)


async def test_pipelined_commands_after_final_dot_and_empty_message(tmp_path, start_service):
    run = await start_service(settings(tmp_path))
    r, w, _ = await ehlo(run)
    w.write(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    await w.drain()
    assert (await read_reply(r)).startswith("250")
    assert (await read_reply(r)).startswith("250")
    assert (await read_reply(r)).startswith("354")
    # the message, the final dot and the next transaction in one segment (RFC 2920)
    w.write(b"Subject: one\r\n\r\n..dot\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.org>\r\n"
            b"DATA\r\n")
    await w.drain()
    assert (await read_reply(r)).startswith("250 2.0.0 Ok: queued")
    assert (await read_reply(r)).startswith("250")
    assert (await read_reply(r)).startswith("250")
    assert (await read_reply(r)).startswith("354")
    assert (await chat(r, w, b".\r\n")).startswith("250 2.0.0 Ok: queued")  # an empty message
    assert (await chat(r, w, b"QUIT\r\n")).startswith("221")
    w.close()
    bodies = sorted(run.service.spool.message(i).split(b"\r\n\r\n", 1)[-1] for i in run.spool_ids())
    assert len(bodies) == 2 and b".dot\r\n" in bodies and not any(b"..dot" in x for x in bodies)


async def test_internal_error_is_451_without_details(tmp_path, start_service):
    run = await start_service(settings(tmp_path))

    class Exploding:
        def decide(self, *a, **k):
            raise RuntimeError("secret internal detail")

    run.service.engine = Exploding()  # a fault real engines do not produce on demand
    r, w, _ = await ehlo(run)
    await chat(r, w, b"MAIL FROM:<a@example.com>\r\n")
    reply = await chat(r, w, b"RCPT TO:<b@example.org>\r\n")
    assert reply.startswith("451 4.3.0") and "secret" not in reply
    w.close()
    await assert_alive(run)
