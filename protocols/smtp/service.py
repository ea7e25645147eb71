"""The SMTP service: plain SMTP from guests in, verified-TLS delivery out, durable spool between.

Owns: the guest-facing aiosmtpd server (a strict subclass: CRLF-only lines, no NUL, RFC 5321 limits
and timeouts, enhanced status codes on every reply, no AUTH), the policy decision per recipient at
RCPT time, the `250` only after the spool's durable commit, audit records for decisions and accepted
messages, and the `Service` lifecycle (start, reload, drain, health) around the queue runner.
Must not: acknowledge anything not on disk; send mail itself (see delivery/queue); audit bodies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import functools
import inspect
import ipaddress
import logging
import os
import pwd
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope

from protocols import quarantine
from protocols.addr import hostport
from protocols.base import ServiceContext
from protocols.capture import FLOW_MAX, IN, OUT
from protocols.listen import warn_restart_only
from protocols.smtp.delivery import Deliverer
from protocols.smtp.queue import QueueRunner
from protocols.smtp.resolver import MailResolver, make_resolver
from protocols.smtp.settings import SMTPSettings
from protocols.smtp.spool import Envelope, Spool, SpoolError, adopt_orphans, new_id, partition_dir

IDENT = "ESMTP proxyvm"
MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3 path 256 minus the angle brackets
_BAD_LINE = b"XPVMBADLINE\r\n"
_ENH = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\b")
_DEFAULT_ENH = {
    211: "2.0.0", 214: "2.0.0", 221: "2.0.0", 250: "2.0.0", 251: "2.1.5", 252: "2.1.5",
    421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
    550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r\n(?![ \t])", re.IGNORECASE | re.MULTILINE | re.DOTALL)


def unstuff(data: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency, undone (input has CRLF line ends only)."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*$")
_CTRL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTED = re.compile(r'^"([^"\\\r\n]|\\[\x20-\x7e])*"$')


def parse_path(arg: str) -> tuple[str | None, str | None]:
    """`<local@domain> params` → ("local@domain", " params"); `<>` → ("<>", ...). A bare
    `local@domain` (no brackets) is tolerated like most MTAs do. Source routes are dropped
    (RFC 5321 §4.1.2: accepted, ignored)."""
    arg = arg.lstrip()
    if arg.startswith("<"):
        i, quoted = 1, False
        while i < len(arg):
            c = arg[i]
            if quoted and c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                break
            i += 1
        else:
            return None, None
        inner, rest = arg[1:i], arg[i + 1 :]
        if rest and not rest[0].isspace():
            return None, None
        if inner == "":
            return "<>", rest
        if inner.startswith("@"):  # obsolete source route "@a,@b:user@c"
            inner = inner.split(":", 1)[1] if ":" in inner else ""
    else:
        inner, _, rest = arg.partition(" ")
        rest = " " + rest if rest else ""
    local, at, domain = inner.rpartition("@")
    if not at or not local or not domain:
        return None, None
    if not (_ATEXT.match(local) or _QUOTED.match(local)):
        return None, None
    return inner, rest


class _NoAuthInspect:
    """Stands in for `inspect` inside aiosmtpd's constructor (see GuestSMTP.__init__)."""

    signature = staticmethod(functools.lru_cache(maxsize=16)(inspect.signature))

    @staticmethod
    def getmembers(obj: Any) -> list[tuple[str, Any]]:
        return []


def check_address(addr: str, smtputf8: bool) -> str | None:
    """The reply for an unacceptable mailbox, or None when it is fine."""
    if len(addr.encode("utf-8", "surrogateescape")) > MAX_ADDRESS:
        return "553 5.1.3 Error: address too long"
    try:
        addr.encode("utf-8")
    except UnicodeEncodeError:
        return "553 5.6.7 Error: address is not valid UTF-8"
    if not addr.isascii() and not smtputf8:
        return "553 5.6.7 Error: non-ASCII address needs MAIL FROM ... SMTPUTF8"
    if _CTRL.search(addr):
        return "553 5.1.3 Error: control characters in address"
    local, at, domain = addr.rpartition("@")
    if " " in domain or (" " in local and not local.startswith('"')):
        return "553 5.1.3 Error: space in address"
    if not at or not local or not domain:
        return "553 5.1.3 Error: address must be local-part@domain"
    if len(local.encode("utf-8")) > 64:
        return "553 5.1.3 Error: local part longer than 64 octets"
    if domain.startswith("["):
        lit = domain[1:-1] if domain.endswith("]") else ""
        lit = lit[5:] if lit.lower().startswith("ipv6:") else lit
        try:
            ipaddress.ip_address(lit)
        except ValueError:
            return "553 5.1.3 Error: bad address literal"
        return None
    if len(domain) > 253:
        return "553 5.1.3 Error: domain too long"
    for label in domain.rstrip(".").split("."):
        if label.isascii():
            if not _LABEL.match(label):
                return "553 5.1.3 Error: bad domain in address"
        elif not label or len(label.encode()) > 63 or label.startswith("-") or label.endswith("-"):
            return "553 5.1.3 Error: bad domain in address"
    return None


class Transaction(AioEnvelope):
    """aiosmtpd's per-transaction envelope plus what policy decided for it."""

    def __init__(self) -> None:
        super().__init__()
        self.declared_size = 0
        self.size_limit: int | None = None
        self.rules: list[tuple[str, str]] = []
        self.decisions: list[Any] = []
        self.honeypot = False  # a recipient was taken for a honeypot guest: never delivered


class _DataSink:
    """Collects DATA bytes up to CRLF.CRLF (or a leading ".CRLF": an empty message). Past `cap`
    it keeps only the last 4 bytes (enough to see the terminator) and remembers it was too big."""

    __slots__ = ("buf", "cap", "done", "head_checked", "leftover", "too_big")

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int):
        self.buf = bytearray()
        self.cap = cap
        self.done: asyncio.Future[None] = loop.create_future()
        self.head_checked = False
        self.too_big = False
        self.leftover = b""

    def feed(self, data: bytes) -> None:
        if self.done.done():
            self.leftover += data
            return
        prev = len(self.buf)
        self.buf += data
        end = term = -1
        if not self.head_checked and len(self.buf) >= 3:
            self.head_checked = True
            if self.buf[:3] == b".\r\n":
                end, term = 0, 3
        if end < 0:
            idx = self.buf.find(b"\r\n.\r\n", max(0, prev - 4))
            if idx >= 0:
                end, term = idx + 2, idx + 5
        if end >= 0:
            self.leftover = bytes(self.buf[term:])
            del self.buf[end:]
            self.done.set_result(None)
        elif self.cap and len(self.buf) > self.cap:
            self.too_big = True
            self.head_checked = True
            del self.buf[:-4]


class GuestSMTP(AioSMTP):
    """aiosmtpd with the strictness a relay in front of the Internet needs."""

    local_part_limit = 64
    line_length_limit = 1001

    def __init__(self, handler: GuestHandler, settings: SMTPSettings, **kw: Any):
        # aiosmtpd keeps command_size_limits on the class and grows it on every EHLO: keep ours.
        self.command_size_limits = collections.defaultdict(lambda: 512)
        # aiosmtpd's constructor runs inspect.getmembers() over itself and the handler on every
        # connection, only to find AUTH mechanisms — which we never offer. Skip that (~0.6 ms each).
        saved, aiosmtpd_smtp.inspect = aiosmtpd_smtp.inspect, _NoAuthInspect
        try:
            self._construct(handler, settings, **kw)
        finally:
            aiosmtpd_smtp.inspect = saved
        self.settings = settings
        self._plain_reply = False  # True while answering HELO/EHLO
        self._greeted = False
        self._continued: list[str] = []
        self._in_data = False
        self._last_rx = 0.0
        self._data_sink: _DataSink | None = None
        # forensic capture (protocols.capture): what the guest sent and what we answered, bounded;
        # written at close when a recipient was denied (or would be) or the guest is quarantined
        cap = handler.service.ctx.capture
        self._transcript: list[tuple[float, str, bytes]] | None = [] if cap is not None and cap.enabled else None
        self._transcript_size = 0
        self.capture_flow = False
        self._local: Any = None

    def _construct(self, handler: GuestHandler, settings: SMTPSettings, **kw: Any) -> None:
        super().__init__(
            handler,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident=IDENT,
            timeout=settings.timeouts.command,
            auth_require_tls=True,  # no TLS on the guest side: AUTH is never offered
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            command_call_limit={"*": 2000, "NOOP": 50, "RSET": 200, "HELP": 10, "VRFY": 10, "EHLO": 10,
                                "HELO": 10, "XPVMBADLINE": 5},
            **kw,
        )

    _smtp_names: ClassVar[list[str] | None] = None

    def __dir__(self) -> list[str]:
        # aiosmtpd's constructor scans dir(self) for smtp_* verbs on every connection: give it
        # just those, computed once per class (0.16 ms per connection otherwise).
        cls = type(self)
        if cls._smtp_names is None:
            cls._smtp_names = [n for n in object.__dir__(self) if n.startswith("smtp_")]
        return cls._smtp_names

    def _create_envelope(self) -> Transaction:
        return Transaction()

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        orig = reader.readuntil

        async def readuntil(separator: bytes = b"\n") -> bytes:
            line = await orig(separator)
            if separator == b"\n" and (not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\x00" in line):
                return _BAD_LINE  # bare LF / bare CR / NUL in a command line (SMTP smuggling)
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign]
        if self._transcript is not None:
            self._local = writer.get_extra_info("sockname")
            write = writer.write

            def noted_write(data: bytes) -> None:
                self._note(OUT, data)
                write(data)

            writer.write = noted_write  # type: ignore[method-assign]
        handler: GuestHandler = self.event_handler
        handler.sessions.add(self)

    def _note(self, direction: str, data: bytes) -> None:
        room = FLOW_MAX - self._transcript_size
        if self._transcript is not None and room > 0 and data:
            chunk = bytes(data[:room])
            self._transcript.append((time.time(), direction, chunk))
            self._transcript_size += len(chunk)

    def _capture(self) -> None:
        svc = self.event_handler.service
        peer = getattr(self.session, "peer", None) if self.session is not None else None
        if not self._transcript or not peer:
            return
        guest = svc.ctx.guests.lookup(peer[0])
        if self.capture_flow or guest in svc.ctx.quarantine:
            svc.ctx.capture.flow(guest, "smtp", "tcp", peer, self._local, self._transcript, end=time.time())
        self._transcript = None

    def connection_lost(self, error: Exception | None) -> None:
        self._capture()
        self.event_handler.sessions.discard(self)
        runner = self.event_handler.service.runner
        if runner is not None:
            runner.wake()  # one guest fewer: delivery may widen (QueueRunner.concurrency)
        super().connection_lost(error)

    async def smtp_XPVMBADLINE(self, arg: str | None) -> None:
        await self.push("500 5.5.2 Error: command lines must end in CRLF and contain no bare CR, LF or NUL")

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 Error: AUTH not available; guests are identified by their address")

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_reply = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_reply = False

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_reply = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_reply = False

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and len(status) > 3 and status[3] == "-":
            self._continued.append(status)  # send a multi-line reply in one write
            return
        if self._continued:
            status, self._continued = "\r\n".join([*self._continued, status]), []
        if not self._greeted:  # RFC 2034 §3: the greeting and HELO/EHLO replies carry no enhanced codes
            self._greeted = True
        elif isinstance(status, str) and not self._plain_reply and len(status) >= 4 and status[:3].isdigit():
            code = int(status[:3])
            rest = status[4:]
            if code // 100 in (2, 4, 5) and not _ENH.match(rest):
                enh = _DEFAULT_ENH.get(code, f"{code // 100}.0.0")
                status = f"{status[:4]}{enh} {rest}"
        await super().push(status)

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        if self._transcript is not None:
            self._note(IN, data)
        if self._data_sink is not None:
            self._data_sink.feed(data)  # message bytes bypass the line reader (see smtp_DATA)
        else:
            super().data_received(data)

    def _timeout_cb(self) -> None:
        if self._in_data:
            idle = self.loop.time() - self._last_rx
            if idle < self.settings.timeouts.data:  # data still flowing: the data-block timer restarts
                self._reset_timeout(self.settings.timeouts.data - idle)
                return
        with contextlib.suppress(Exception):
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"421 4.4.2 " + self.hostname.encode() + b" Error: timeout exceeded\r\n")
        AioSMTP._timeout_cb(self)

    async def smtp_DATA(self, arg: str | None) -> None:
        """RFC 5321 §4.1.1.4 DATA: read to CRLF.CRLF with the data-block timeout, then refuse bare
        CR/LF and NUL (SMTP smuggling), over-long lines and oversize messages before anything is
        stored."""
        if await self.check_helo_needed():
            return
        env = self.envelope
        assert env is not None
        if not env.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        self._last_rx = self.loop.time()
        self._reset_timeout(self.settings.timeouts.data)
        # The message goes straight from data_received into a buffer that looks for CRLF.CRLF:
        # no coroutine wake-up per TCP segment (guests often write line by line).
        reader = self._reader
        limit = self.data_size_limit or 0
        sink = _DataSink(self.loop, limit + 4096 if limit else 0)
        already = bytes(reader._buffer)  # noqa: SLF001 - bytes that arrived with or before the 354
        reader._buffer.clear()  # noqa: SLF001
        reader._maybe_resume_transport()  # noqa: SLF001
        self._data_sink = sink
        try:
            if already:
                sink.feed(already)
            await sink.done
        finally:
            self._data_sink = None
            self._in_data = False
        if sink.leftover:  # pipelined commands after the final dot go back to the command reader
            reader.feed_data(sink.leftover)
        got = (bytes(sink.buf), sink.too_big)
        self._reset_timeout()
        stuffed, too_big = got
        problem = ""
        if too_big or (limit and len(stuffed) > limit + stuffed.count(b"\r\n.") + 1):
            problem = f"552 5.3.4 Error: message exceeds the size limit of {limit} bytes"
        elif len(stuffed) > 1000 and max(map(len, stuffed.split(b"\r\n"))) > 999:
            problem = "500 5.5.2 Error: line too long (RFC 5321 4.5.3.1.6: 1000 octets)"
        elif stuffed.count(b"\r") != stuffed.count(b"\r\n") or stuffed.count(b"\n") != stuffed.count(b"\r\n"):
            problem = "554 5.6.0 Error: bare CR or LF in message (RFC 5321 2.3.8)"
        elif b"\x00" in stuffed:
            problem = "554 5.6.0 Error: NUL byte in message"
        body = b""
        if not problem:
            body = unstuff(stuffed)  # CRLF-only here, so a plain replace is exact
            if limit and len(body) > limit:
                problem = f"552 5.3.4 Error: message exceeds the size limit of {limit} bytes"
        if problem:
            self._set_post_data_state()
            await self.push(problem)
            return
        env.original_content = env.content = body
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """RFC 5321 §4.1.2 Path, parsed directly (aiosmtpd's RFC 5322 parser costs ~0.3 ms per
        address and refuses the null path). Returns (address, rest) or (None, None)."""
        return parse_path(arg)


class GuestHandler:
    """aiosmtpd handler: decisions at MAIL/RCPT, durable acceptance at DATA."""

    def __init__(self, service: SMTPService):
        self.service = service
        self.sessions: set[GuestSMTP] = set()
        # aiosmtpd finds hooks by name (dir() on every connection): list them once, explicitly,
        # and check at start-up that each exists (a typo must not silently disable a hook).
        self._hooks = ["handle_EHLO", "handle_MAIL", "handle_RCPT", "handle_DATA", "handle_exception"]
        for h in self._hooks:
            if not callable(getattr(self, h, None)):
                raise TypeError(f"GuestHandler lacks {h}")

    def __dir__(self) -> list[str]:
        return self._hooks

    @property
    def settings(self) -> SMTPSettings:
        return self.service.settings

    def _guest(self, session: Any) -> tuple[str, str]:
        ip, port = session.peer[0], session.peer[1]
        src = hostport(ip, port)
        return self.service.ctx.guests.lookup(ip), src

    async def handle_exception(self, error: Exception) -> str:
        """A bug or an unexpected failure: temporary refusal (the guest retries), no internals shown."""
        self.service.ctx.log.error("smtp: error handling a guest command: %s: %s", type(error).__name__, error,
                                   exc_info=error)
        return "451 4.3.0 Error: local problem; try again later"

    async def handle_EHLO(self, server: GuestSMTP, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses if not r.startswith("250 HELP")]
        out += ["250-PIPELINING", "250 ENHANCEDSTATUSCODES"]
        return out

    async def handle_MAIL(self, server: GuestSMTP, session: Any, envelope: Transaction, address: str,
                          mail_options: list[str]) -> str:
        if address != "<>":
            bad = check_address(address, envelope.smtp_utf8)
            if bad:
                return bad
        size = 0
        for opt in mail_options:
            if opt.upper().startswith("SIZE="):
                size = int(opt[5:])  # aiosmtpd checked it is digits and within max_message_size
        if self.service.spool_low(size):
            return "452 4.3.1 Error: insufficient system storage; try again later"
        envelope.declared_size = size
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: GuestSMTP, session: Any, envelope: Transaction, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        bad = check_address(address, envelope.smtp_utf8)
        if bad:
            return bad
        guest, src = self._guest(session)
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from
        request = {"mail_from": mail_from, "rcpt_to": address, "size": envelope.declared_size}
        qt = self.service.ctx.quarantine
        if qt and guest in qt:  # quarantined: no rule applies (docs/cli.md#quarantine-and-release)
            return self._quarantined_rcpt(envelope, qt[guest], guest, src, address, rcpt_options, request)
        d = self.service.engine.decide("smtp", guest=guest, request=request)
        self.service.ctx.record(d, guest=guest, src=src, protocol="smtp", request=request, event="rcpt")
        server.capture_flow = server.capture_flow or str(d.verdict) != "allow"  # forensic capture at close
        if not d.allowed:
            if str(d.code) == "rate_limited":
                return f"451 4.7.1 <{address}>: rate limit of rule {d.rule} exceeded; try again later"
            return f"550 5.7.1 <{address}>: recipient rejected by policy rule {d.rule}"
        if str(d.verdict) == "allow":
            max_size = (d.limits or {}).get("max_size")
            if max_size:
                if envelope.declared_size and envelope.declared_size > max_size:
                    return f"552 5.3.4 Error: message size exceeds {max_size} bytes allowed by rule {d.rule}"
                envelope.size_limit = min(envelope.size_limit or max_size, max_size)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.rules.append((d.rule, d.at))
        envelope.decisions.append(d)
        return "250 2.1.5 Ok"

    def _quarantined_rcpt(self, envelope: Transaction, qe: dict[str, Any], guest: str, src: str, address: str,
                          rcpt_options: list[str], request: dict[str, Any]) -> str:
        """block: 550 5.7.1. honeypot: 250, and the message goes to the quarantine spool at DATA."""
        honeypot = qe.get("profile") == "honeypot"
        d = quarantine.decision("smtp", guest, qe, "accepted into the quarantine spool" if honeypot else "")
        extra = {"quarantine": "honeypot"} if honeypot else {}
        self.service.ctx.record(d, guest=guest, src=src, protocol="smtp", request=request, event="rcpt", **extra)
        if not honeypot:
            return f"550 5.7.1 <{address}>: {quarantine.refusal_text(guest, qe)}"
        envelope.honeypot = True
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.rules.append((d.rule, d.at))
        envelope.decisions.append(d)
        return "250 2.1.5 Ok"

    async def _quarantined_data(self, session: Any, envelope: Transaction, qe: dict[str, Any] | None, guest: str,
                                src: str, content: bytes) -> str:
        """DATA of a quarantined guest (or of a transaction a honeypot recipient began): block
        refuses; honeypot keeps the message durably in the guest's quarantine spool (never
        delivered) before the 250."""
        svc = self.service
        qe = qe or {"profile": "honeypot"}
        rcpts = list(envelope.rcpt_tos)
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from
        request: dict[str, Any] = {"mail_from": mail_from, "rcpt_to": rcpts, "size": len(content)}
        if qe.get("profile") != "honeypot":
            d = quarantine.decision("smtp", guest, qe)
            svc.ctx.record(d, guest=guest, src=src, protocol="smtp", request=request, event="data")
            return f"550 5.7.1 {quarantine.refusal_text(guest, qe)}"
        now = svc.ctx.clock()
        ident = new_id(now)
        d = quarantine.decision("smtp", guest, qe, "accepted into the quarantine spool, never delivered")
        meta = {"id": ident, "guest": guest, "src": src, "helo": str(session.host_name)[:255], "mail_from": mail_from,
                "rcpt_to": rcpts, "size": len(content), "received": now, "quarantine": qe.get("since")}
        try:
            path = await asyncio.to_thread(quarantine.store_message, svc.ctx.state_dir, guest, ident, content, meta)
        except OSError as e:
            svc.ctx.log.error("smtp: cannot keep a quarantined message of %s: %s", guest, e)
            return "452 4.3.1 Error: insufficient system storage; message not accepted, try again later"
        request["message"] = ident
        svc.honeypot_recorder.record(guest, qe, "smtp", {"src": src, "message": ident, "file": str(path),
                                                         "helo": meta["helo"], "mail_from": mail_from,
                                                         "rcpt_to": rcpts, "size": len(content)})
        svc.ctx.record(d, guest=guest, src=src, protocol="smtp", request=request, event="accepted",
                       quarantine="honeypot")
        return f"250 2.0.0 Ok: queued as {ident}"

    async def handle_DATA(self, server: GuestSMTP, session: Any, envelope: Transaction) -> str:
        svc = self.service
        content: bytes = envelope.original_content or b""
        if envelope.size_limit and len(content) > envelope.size_limit:
            return f"552 5.3.4 Error: message exceeds {envelope.size_limit} bytes allowed by policy"
        guest, src = self._guest(session)
        qt = svc.ctx.quarantine
        if envelope.honeypot or (qt and guest in qt):
            return await self._quarantined_data(session, envelope, qt.get(guest), guest, src, content)
        now = svc.ctx.clock()
        ident = new_id(now)
        rcpts = list(envelope.rcpt_tos)
        received = (
            f"Received: from {session.host_name} ({src.rsplit(':', 1)[0].strip('[]')})\r\n"
            f"\tby {self.settings.hostname} (proxyvm) with {'UTF8' if envelope.smtp_utf8 else ''}ESMTP id {ident}\r\n"
            f"\tfor <{rcpts[0]}>; {email.utils.formatdate(now)}\r\n"
        ).encode("utf-8", "surrogateescape")
        message = received + content
        head = content[: content.find(b"\r\n\r\n") + 2] if b"\r\n\r\n" in content else content[:65536]
        m = _MESSAGE_ID.search(head)
        message_id = m.group(1).decode("utf-8", "replace").strip()[:200] if m else ""
        body_8bit = "BODY=8BITMIME" in (o.upper() for o in envelope.mail_options) or not content.isascii()
        env = Envelope(
            id=ident, guest=guest, src=src, helo=str(session.host_name)[:255],
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
            rcpts=tuple(rcpts), received=now, size=len(content), message_id=message_id,
            body_8bit=body_8bit, smtputf8=bool(envelope.smtp_utf8), rules=tuple(envelope.rules),
        )
        first = envelope.decisions[0]
        request = {"message": ident, "mail_from": env.mail_from, "rcpt_to": rcpts, "size": env.size,
                   "message_id": message_id}
        try:
            entry = await asyncio.to_thread(svc.spool.store, env, message)
        except SpoolError as e:
            svc.ctx.log.error("smtp: cannot spool message from %s: %s", guest, e)
            svc.ctx.record(first, guest=guest, src=src, protocol="smtp", request=request, event="spool_failed",
                           error=str(e))
            return "452 4.3.1 Error: insufficient system storage; message not accepted, try again later"
        svc.ctx.record(first, guest=guest, src=src, protocol="smtp", request=request, event="accepted")
        svc.accepted += 1
        svc.runner.submit(entry, message)
        return f"250 2.0.0 Ok: queued as {ident}"


class SMTPService:
    name: ClassVar[str] = "smtp"

    def __init__(self, ctx: ServiceContext, *, resolver: MailResolver | None = None, mx_port: int = 25,
                 sts_port: int = 443):
        self.ctx = ctx
        self.settings: SMTPSettings = ctx.settings
        self.engine = ctx.engine
        self.honeypot_recorder = quarantine.Recorder(ctx.state_dir)
        self._resolver = resolver
        self._mx_port = mx_port
        self._sts_port = sts_port
        self.handler = GuestHandler(self)
        self._servers: list[asyncio.AbstractServer] = []
        # `workers: N`: each worker owns and delivers its own partition (see protocols.smtp.spool)
        self.spool: Spool = Spool(partition_dir(self.settings.spool, ctx.worker), ctx.clock)
        self.runner: QueueRunner | None = None  # type: ignore[assignment]
        self.accepted = 0
        self._free = 0
        self._free_at = -1.0
        self.recovered = 0
        self.problems: list[str] = []

    def spool_low(self, size: int) -> bool:
        """Too little room for this message (twice its declared size, at least 128 KiB)? The
        free space is sampled at most 4 times a second; the write itself still fails cleanly."""
        now = time.monotonic()
        if now - self._free_at > 0.25:
            try:
                st = os.statvfs(self.spool.dir)
                self._free = st.f_bavail * st.f_frsize
            except OSError:
                self._free = 0
            self._free_at = now
        return self._free < max(size, 64 * 1024) * 2

    async def start(self) -> list[str]:
        s = self.settings
        # aiosmtpd logs every command with the guest's addresses at INFO: too costly per message,
        # and our audit records already say what matters.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        if self.ctx.worker == 0:
            await asyncio.to_thread(adopt_orphans, s.spool, self.ctx.workers)
        entries, self.problems = await asyncio.to_thread(self.spool.open)
        await asyncio.to_thread(self._hand_over)
        for p in self.problems:
            self.ctx.log.error("smtp: unreadable spool entry moved to %s: %s", self.spool.bad, p)
        self.recovered = len(entries)
        if entries:
            self.ctx.log.info("smtp: recovered %d queued messages from %s", len(entries), s.spool)
        resolver = self._resolver or make_resolver(self.ctx.config)
        deliverer = Deliverer(s, resolver, log=self.ctx.log, clock=self.ctx.clock, state_dir=self.ctx.state_dir,
                              mx_port=self._mx_port, sts_port=self._sts_port)
        self.runner = QueueRunner(self.spool, deliverer, s, self.ctx, self.ctx.log, self.ctx.clock)
        self.runner.load(entries)
        self.runner.busy_guests = lambda: len(self.handler.sessions)
        loop = asyncio.get_running_loop()
        listening = []
        try:
            for host, port in s.listen:
                server = await loop.create_server(lambda: GuestSMTP(self.handler, self.settings), host, port,
                                                  reuse_port=self.ctx.reuse_port or None)
                self._servers.append(server)
                listening.append(f"tcp {hostport(host, port)}")
        except OSError:
            for srv in self._servers:
                srv.close()
            raise
        self.runner.start()
        return listening

    def _hand_over(self) -> None:
        """The worker drops root after start(): the spool and our state must stay writable by the
        account it becomes (`user:` in the config)."""
        user = getattr(self.ctx.config, "user", None) if self.ctx.config is not None else None
        if os.geteuid() != 0 or not user:
            return
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return
        mts = Path(self.ctx.state_dir) / "mta-sts"
        mts.mkdir(parents=True, exist_ok=True)
        for top in (self.spool.dir, mts):
            for root, dirs, files in os.walk(top):
                for name in [root, *(os.path.join(root, x) for x in dirs + files)]:
                    os.lchown(name, pw.pw_uid, pw.pw_gid)

    async def reload(self, settings: Any, engine: Any) -> None:
        """New policy applies to the next RCPT; limits to the next connection. Listeners, spool
        directory and relay stay as started (changing them needs a restart)."""
        self.engine = engine
        if settings is not None:
            warn_restart_only(self.ctx.log, "smtp", self.settings, settings, ("listen", "spool"))
            self.settings = settings
            if self.runner is not None:
                self.runner.settings = settings

    async def drain(self, timeout: float) -> None:
        for srv in self._servers:
            srv.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self.handler.sessions and loop.time() < deadline:  # noqa: ASYNC110 - sessions end on their own
            await asyncio.sleep(0.05)
        for sess in list(self.handler.sessions):
            if sess.transport is not None:
                with contextlib.suppress(Exception):
                    sess.transport.write(b"421 4.3.2 Service shutting down\r\n")
                sess.transport.close()
        if self.runner is not None:
            await self.runner.drain(max(0.0, deadline - loop.time()))
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)

    def health(self) -> dict[str, Any]:
        stats = self.runner.stats() if self.runner is not None else {}
        state = "ok" if self._servers and not self.problems else "degraded"
        return {"state": state, "accepted": self.accepted, "recovered": self.recovered,
                "bad_entries": len(self.problems), **stats}
