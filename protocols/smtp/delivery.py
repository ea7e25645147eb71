"""Delivery of one spooled message: where to (relay or MX), how it is authenticated, what happened.

Owns: routing (the configured relay, or each recipient domain's MX per RFC 5321 §5 with the A/AAAA
fallback and RFC 7505 null MX), the per-target TLS policy (`verify`: CA chain + relay/MX name;
`dane`: RFC 7672 secure TLSA must match, else verify; `mta-sts`: RFC 8461 MX restriction + verify;
DANE wins when both exist), a pool of verified sessions reused across messages, and the per-recipient
result of an attempt with one `Attempt` record per peer tried (for the audit).
Must not: ever send an envelope over a connection without verified TLS; touch the spool; decide
policy; log bodies or passwords.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocols.addr import hostport
from protocols.smtp import dane
from protocols.smtp.client import DeliveryError, Reply, Session
from protocols.smtp.mtasts import MTASTS, STSPolicy
from protocols.smtp.resolver import MailResolver
from protocols.smtp.settings import RelayAuth, SMTPSettings
from protocols.smtp.spool import Envelope

DELIVERED, DEFERRED, FAILED = "delivered", "deferred", "failed"
MAX_MESSAGES_PER_SESSION = 1000


@dataclass(frozen=True, slots=True)
class Attempt:
    """One peer tried for one message (audit material: no bodies, no secrets)."""

    peer: str  # the name verified (relay host or MX host)
    address: str  # "ip:port" or "" when resolution failed
    tls: str  # "TLSv1.3" or ""
    cipher: str
    verified: str  # "ca" | "dane-ee" | "dane-ta" | "mta-sts" | ""
    reply: str
    outcome: str  # delivered | deferred | failed
    rcpts: tuple[str, ...]
    alarm: str = ""
    reused: bool = False


@dataclass(slots=True)
class Result:
    rcpts: dict[str, tuple[str, str]] = field(default_factory=dict)  # rcpt -> (outcome, reply)
    attempts: list[Attempt] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # verified name
    ip: str
    port: int
    implicit_tls: bool
    mode: str  # "ca" | "dane" | "mta-sts"
    tlsa: tuple = ()  # usable secure TLSA records (mode "dane")
    names: tuple[str, ...] = ()  # DANE-TA reference names
    auth: RelayAuth | None = None

    @property
    def key(self) -> tuple:
        return (self.name, self.ip, self.port, self.mode, self.tlsa)


class _Unroutable(Exception):
    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def ca_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def dane_context() -> ssl.SSLContext:
    """Chain and name are judged after the handshake by `dane.verify_chain` (before any envelope)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Deliverer:
    """Delivers messages; keeps verified sessions for reuse. `mx_port`/`sts_port` exist for labs."""

    def __init__(self, settings: SMTPSettings, resolver: MailResolver, *, log: logging.Logger | None = None,
                 clock: Callable[[], float] = time.time, state_dir: Path | None = None,
                 mx_port: int = 25, sts_port: int = 443):
        self.settings = settings
        self.resolver = resolver
        self.log = log or logging.getLogger("proxyvm.smtp.delivery")
        self.clock = clock
        self.mx_port = mx_port
        self._ca = ca_context(settings.ca_file)
        self._dane = dane_context()
        self.sts = MTASTS(resolver, self._ca, clock, (state_dir / "mta-sts") if state_dir else None,
                          port=sts_port, timeout=settings.timeouts.connect)
        self._idle: dict[tuple, list[tuple[Session, float]]] = {}
        self._closed = False

    # -- pool -----------------------------------------------------------------------------
    def _take(self, target: Target) -> Session | None:
        idle = self._idle.get(target.key)
        now = time.monotonic()
        while idle:
            s, since = idle.pop()
            if s.broken or now - since > self.settings.timeouts.idle or s.reader.at_eof():
                s.abort()
                continue
            return s
        return None

    def _give(self, target: Target, s: Session) -> None:
        if self._closed or s.broken or s.messages >= MAX_MESSAGES_PER_SESSION:
            asyncio.ensure_future(s.quit())
            return
        bucket = self._idle.setdefault(target.key, [])
        bucket.append((s, time.monotonic()))
        if len(bucket) > self.settings.max_connections:
            old, _ = bucket.pop(0)
            asyncio.ensure_future(old.quit())

    def reap(self) -> None:
        """Close sessions idle longer than timeouts.idle (called periodically by the queue runner)."""
        now = time.monotonic()
        for key, bucket in list(self._idle.items()):
            keep = []
            for s, since in bucket:
                if s.broken or now - since > self.settings.timeouts.idle:
                    asyncio.ensure_future(s.quit())
                else:
                    keep.append((s, since))
            self._idle[key] = keep

    async def close(self) -> None:
        self._closed = True
        sessions = [s for bucket in self._idle.values() for s, _ in bucket]
        self._idle.clear()
        await asyncio.gather(*(s.quit() for s in sessions), return_exceptions=True)
        closer = getattr(self.resolver, "close", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()

    # -- routing --------------------------------------------------------------------------
    async def _relay_targets(self) -> list[Target]:
        r = self.settings.relay
        assert r is not None
        if r.address:
            ips: tuple = (r.address,)
        else:
            ans = await self.resolver.address(r.host)
            if ans.failed or not ans.values:
                raise _Unroutable(f"cannot resolve relay {r.host} ({ans.rcode}/{ans.status})", permanent=False)
            ips = ans.values
        mode, tlsa = await self._tls_mode_for(r.host, r.port, secure_path=True)
        return [Target(r.host, ip, r.port, r.implicit_tls, mode, tlsa, (r.host,), r.auth) for ip in ips]

    async def _tls_mode_for(self, host: str, port: int, *, secure_path: bool) -> tuple[str, tuple]:
        """DANE applies when configured and the name's TLSA RRset is proven secure (RFC 7672 §2.2)."""
        if self.settings.tls != "dane" or not secure_path:
            return "ca", ()
        ans = await self.resolver.tlsa(f"_{port}._tcp.{host}")
        if ans.failed:
            raise _Unroutable(f"TLSA lookup for {host} failed ({ans.rcode}/{ans.status}); deferring", permanent=False)
        if ans.secure and ans.values:
            recs = tuple(dane.usable(ans.values))
            if recs:
                return "dane", recs
        return "ca", ()

    async def _mx_targets(self, domain: str) -> list[Target]:
        ans = await self.resolver.mx(domain)
        if ans.rcode == "NXDOMAIN":
            raise _Unroutable(f"5.1.2 domain {domain} does not exist", permanent=True)
        if ans.failed:
            raise _Unroutable(f"MX lookup for {domain} failed ({ans.rcode}/{ans.status})", permanent=False)
        mx_secure = ans.secure
        hosts: list[tuple[int, str]]
        if not ans.values:
            hosts = [(0, domain)]  # RFC 5321 §5.1 implicit MX
        else:
            if any(h in ("", ".") for _, h in ans.values):
                raise _Unroutable(f"5.1.10 domain {domain} accepts no mail (null MX)", permanent=True)
            shuffled = list(ans.values)
            random.shuffle(shuffled)
            hosts = sorted(shuffled, key=lambda x: x[0])
        sts: STSPolicy | None = None
        if self.settings.tls in ("mta-sts", "dane"):
            # `dane` uses MTA-STS too, for MX hosts without secure TLSA: DANE wins when both exist.
            sts = await self.sts.policy(domain)
        targets: list[Target] = []
        problems: list[str] = []
        for _, host in hosts:
            mode, tlsa = await self._tls_mode_for(host, self.mx_port, secure_path=mx_secure)
            if mode != "dane" and sts is not None and sts.mode == "enforce":
                if not sts.mx_allowed(host):
                    problems.append(f"MX {host} not allowed by the MTA-STS policy of {domain}")
                    continue
                mode = "mta-sts"
            addrs = await self.resolver.address(host)
            if addrs.failed or not addrs.values:
                problems.append(f"cannot resolve MX {host} ({addrs.rcode}/{addrs.status})")
                continue
            for ip in addrs.values:
                targets.append(Target(host, ip, self.mx_port, False, mode, tlsa, (host, domain)))
        if not targets:
            raise _Unroutable("; ".join(problems) or f"no usable MX for {domain}", permanent=False)
        return targets

    # -- delivery -------------------------------------------------------------------------
    async def deliver(self, envelope: Envelope, message: bytes, rcpts: list[str]) -> Result:
        """Try to deliver `message` to `rcpts` now. Every recipient gets an outcome."""
        result = Result()
        if self.settings.relay is not None:
            groups = {self.settings.relay.host: list(rcpts)}
        else:
            groups = {}
            for r in rcpts:
                groups.setdefault(r.rpartition("@")[2].lower(), []).append(r)
        for domain, group in groups.items():
            await self._deliver_group(domain, envelope, message, group, result)
        return result

    async def _deliver_group(self, domain: str, env: Envelope, message: bytes, rcpts: list[str],
                             result: Result) -> None:
        try:
            targets = await (self._relay_targets() if self.settings.relay is not None else self._mx_targets(domain))
        except _Unroutable as e:
            outcome = FAILED if e.permanent else DEFERRED
            for r in rcpts:
                result.rcpts[r] = (outcome, str(e))
            result.attempts.append(Attempt(domain, "", "", "", "", str(e), outcome, tuple(rcpts)))
            return
        last = "no target"
        for t in targets:
            try:
                done = await self._try_target(t, env, message, rcpts, result)
            except DeliveryError as e:
                last = str(e)
                result.attempts.append(Attempt(t.name, _addr(t), "", "", "", last, DEFERRED, tuple(rcpts),
                                               alarm=e.alarm))
                continue
            if done:
                return
            last = result.attempts[-1].reply if result.attempts else last
        for r in rcpts:
            if r not in result.rcpts:
                result.rcpts[r] = (DEFERRED, last)

    async def _session(self, t: Target) -> tuple[Session, bool]:
        s = self._take(t)
        if s is not None:
            return s, True
        if t.mode == "dane":
            recs, names = t.tlsa, t.names

            def post(chain: list[bytes]) -> str:
                return dane.verify_chain(chain, recs, names)
            ctx, post_verify = self._dane, post
        else:
            ctx, post_verify = self._ca, None
        s = await Session.open(ip=t.ip, port=t.port, server_name=t.name, context=ctx,
                               implicit_tls=t.implicit_tls, post_verify=post_verify,
                               ehlo_name=self.settings.hostname,
                               connect_timeout=self.settings.timeouts.connect,
                               reply_timeout=self.settings.timeouts.reply, auth=t.auth)
        if t.mode == "mta-sts" and s.tls is not None:
            s.tls = type(s.tls)(s.tls.version, s.tls.cipher, "mta-sts")
        return s, False

    async def _try_target(self, t: Target, env: Envelope, message: bytes, rcpts: list[str],
                          result: Result) -> bool:
        """True when the peer judged the transaction (each recipient has an outcome)."""
        s, reused = await self._session(t)
        try:
            mail, per_rcpt, final = await s.transaction(env.mail_from, rcpts, message,
                                                        body_8bit=env.body_8bit, smtputf8=env.smtputf8)
        except DeliveryError:
            s.abort()
            if not reused:
                raise
            # a pooled session the peer had closed meanwhile: once more on a fresh one
            s, reused = await self._fresh(t), False
            mail, per_rcpt, final = await s.transaction(env.mail_from, rcpts, message,
                                                        body_8bit=env.body_8bit, smtputf8=env.smtputf8)
        tls = s.tls
        assert tls is not None
        outcomes: dict[str, tuple[str, str]] = {}
        if not mail.ok:
            o = FAILED if mail.permanent else DEFERRED
            outcomes = {r: (o, mail.text) for r in rcpts}
            reply = mail.text
        else:
            for r in rcpts:
                rr = per_rcpt[r]
                if not rr.ok:
                    outcomes[r] = (FAILED if rr.permanent else DEFERRED, rr.text)
            accepted = [r for r in rcpts if r not in outcomes]
            reply = final.text if final is not None else "no recipient accepted"
            if final is not None:
                o = DELIVERED if final.code // 100 == 2 else (FAILED if final.permanent else DEFERRED)
                for r in accepted:
                    outcomes[r] = (o, final.text)
        result.rcpts.update(outcomes)
        overall = _overall([o for o, _ in outcomes.values()])
        result.attempts.append(Attempt(t.name, s.address, tls.version, tls.cipher, tls.verified_by, reply,
                                       overall, tuple(rcpts), reused=reused))
        self._give(t, s)
        # A temporary refusal of the whole transaction by one MX: RFC 5321 §5.1 lets us try the next.
        return not (self.settings.relay is None and overall == DEFERRED and not mail.ok)

    async def _fresh(self, t: Target) -> Session:
        while (s := self._take(t)) is not None:
            s.abort()
        s, _ = await self._session(t)
        return s


def _addr(t: Target) -> str:
    return hostport(t.ip, t.port)


def _overall(outcomes: list[str]) -> str:
    if outcomes and all(o == DELIVERED for o in outcomes):
        return DELIVERED
    if any(o == DEFERRED for o in outcomes):
        return DEFERRED
    if any(o == DELIVERED for o in outcomes):
        return "partial"
    return FAILED


def reply_of(r: Reply | None) -> str:
    return r.text if r is not None else ""
