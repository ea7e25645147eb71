"""The DNS-over-TLS upstream pool (RFC 7858, RFC 8310 strict profile).

Owns: one persistent, pipelined TLS connection per upstream (queries matched out of order by
remapped IDs, so guests' IDs never collide upstream), certificate-name and SPKI-pin checks,
TLS >= 1.2, session resumption, EDNS keepalive and padding (built in `wire.upstream_query`),
reconnect, health tracking, failover and retry of in-flight queries on another upstream.
Must not: ever send a DNS message on a connection that is not verified TLS — there is no
plaintext and no unauthenticated fallback, not even as an option. It does not cache or validate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocols.dns import wire
from protocols.dns.settings import DNSSettings, UpstreamSettings

_U16 = struct.Struct("!H")
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux
MAX_PENDING = 4096  # queries outstanding on one connection
_SWEEP = 0.05  # how often a connection looks for queries past their deadline
_SPREAD = 8  # open another connection when the least busy one has this many queries outstanding


class UpstreamFailure(Exception):
    """An upstream could not answer. `kind`: unreachable | timeout | tls | auth | closed | protocol |
    busy (our own per-connection backlog is full)."""

    def __init__(self, kind: str, message: str, address: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.address = address

    @property
    def security(self) -> bool:
        """A failure of authentication (certificate, name, pin) or of TLS itself: an alarm."""
        return self.kind in ("auth", "tls")


class PoolFailure(Exception):
    """No upstream answered within the guest's patience; `failures` says why for each attempt."""

    def __init__(self, failures: list[UpstreamFailure]) -> None:
        self.failures = failures
        text = "; ".join(f"{f.address}: {f}" for f in failures) or "no upstream available"
        super().__init__(text)

    @property
    def ede(self) -> int:
        # RFC 8914: 23 Network Error when we reached a server but could not trust it, 22 otherwise.
        if any(f.security for f in self.failures):
            return wire.EDE_NETWORK_ERROR
        return wire.EDE_NO_REACHABLE_AUTHORITY

    @property
    def alarm(self) -> str:
        sec = [f for f in self.failures if f.security]
        return "; ".join(f"{f.address}: {f}" for f in sec)


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    wire: bytes
    address: str
    name: str
    tls: str
    resumed: bool

    def key(self) -> tuple[str, str, str, bool]:
        """What a cache entry keeps of it (a tuple: see protocols.dns.cache.E)."""
        return (self.address, self.name, self.tls, self.resumed)

    def audit(self) -> dict[str, Any]:
        return {"address": self.address, "name": self.name, "tls": self.tls, "verified": True,
                "resumed": self.resumed}


class _ResumingContext(ssl.SSLContext):
    """An SSLContext that offers the last session of its upstream on every new connection:
    asyncio's TLS transport has no `session=` parameter, so we inject it where it wraps the BIO."""

    resume_session: ssl.SSLSession | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):  # type: ignore[override]
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.resume_session
        )


def make_tls_context(ca_file: str | None) -> _ResumingContext:
    ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx.load_default_certs()
    ctx.set_alpn_protocols(["dot"])
    return ctx


def spki_sha256(der_cert: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(der_cert)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


class _Connection(asyncio.Protocol):
    """One TLS connection to one upstream, carrying many queries at once."""

    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes, float]] = {}  # id -> (answer, question, deadline)
        self._sweeper: asyncio.TimerHandle | None = None
        self._sock: Any = None
        self.closed = False
        self.tls = ""
        self.resumed = False
        self.session_saved = False
        self.idle_timeout = upstream.idle_timeout
        self.keepalive_seen = False
        self._idle: asyncio.TimerHandle | None = None
        self.answers = 0
        self.created = time.monotonic()
        self._outbox: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    # -- asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self._sock = sock if _QUICKACK is not None and sock is not None else None
        if self._sock is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._sock is not None:
            # Acknowledge at once. Pipelined answers from a server that writes without TCP_NODELAY
            # otherwise wait for our delayed ACK: ~40 ms stalls every few hundred queries.
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._sock = None
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            ln = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + ln:
                break
            frame = bytes(buf[2 : 2 + ln])
            del buf[: 2 + ln]
            self._frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle:
            self._idle.cancel()
        err = UpstreamFailure("closed", f"connection closed{': ' + str(exc) if exc else ''}", self.up.address)
        if self._sweeper:
            self._sweeper.cancel()
        for fut, _, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        self.up.connection_lost(self)

    # -- queries -------------------------------------------------------------------------------
    def _frame(self, frame: bytes) -> None:
        if len(frame) < 12:
            self.abort("answer shorter than a DNS header")
            return
        qid = (frame[0] << 8) | frame[1]
        item = self.pending.pop(qid, None)
        if item is None:
            return  # a late answer to a query we gave up on
        fut, question, _ = item
        if fut.done():
            return
        n = len(question) - 4  # the name, compared without case; then type and class exactly
        if (not frame[2] & wire.QR or frame[12 : 12 + n].lower() != question[:n]
                or frame[12 + n : 16 + n] != question[n:]):
            fut.set_exception(UpstreamFailure("protocol", "answer does not match the question", self.up.address))
        else:
            fut.set_result(frame)
        self.answers += 1
        if not self.keepalive_seen:
            self.keepalive_seen = True
            ka = wire.opt_options(frame).get(wire.OPT_KEEPALIVE)
            if ka is not None and len(ka) == 2:
                # RFC 7828: the server's idle timeout in units of 100 ms; close before it does.
                self.idle_timeout = min(self.idle_timeout, max(0.5, _U16.unpack(ka)[0] / 10 - 0.5))
        if not self.session_saved and self.transport is not None:
            sslobj = self.transport.get_extra_info("ssl_object")
            if sslobj is not None and sslobj.session is not None:
                self.up.ctx.resume_session = sslobj.session
                self.session_saved = True
        if not self.pending:
            self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle:
            self._idle.cancel()
        if self.transport is None or self.closed:
            return
        self._idle = self.loop.call_later(self.idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        if not self.pending and self.transport is not None:
            self.closed = True
            self.transport.close()

    def send(self, query: bytearray, question: bytes, deadline: float) -> tuple[int, asyncio.Future[bytes]]:
        """Send one query; its future fails with TimeoutError once `deadline` (loop time) passes.
        One sweeping timer per connection instead of a timer per query."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamFailure("closed", "connection closed", self.up.address)
        if len(self.pending) >= MAX_PENDING:
            raise UpstreamFailure("busy", "too many queries outstanding on the connection", self.up.address)
        while True:
            qid = random.getrandbits(16)
            if qid not in self.pending:
                break
        struct.pack_into("!H", query, 0, qid)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[qid] = (fut, question, deadline)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_SWEEP, self._sweep)
        if self._idle:
            self._idle.cancel()
            self._idle = None
        # Queries sent in the same event-loop turn leave in one TLS write (fewer records and
        # syscalls under load; no added latency).
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(_U16.pack(len(query)) + bytes(query))
        return qid, fut

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        late = [qid for qid, (_, _, deadline) in self.pending.items() if deadline <= now]
        for qid in late:
            fut = self.pending.pop(qid)[0]
            if not fut.done():
                fut.set_exception(TimeoutError())
        if self.pending and not self.closed:
            self._sweeper = self.loop.call_later(_SWEEP, self._sweep)
        elif not self.pending and not self.closed:
            self._arm_idle()

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def forget(self, qid: int) -> None:
        """Drop a query the caller gave up on (answered ones are already gone)."""
        if self.pending.pop(qid, None) is not None and not self.pending and not self.closed:
            self._arm_idle()

    def abort(self, why: str) -> None:
        self.up.log.warning("dns upstream %s: %s; closing", self.up.address, why)
        if self.transport is not None:
            self.transport.abort()


class Upstream:
    """One configured DoT upstream and its health."""

    def __init__(self, s: UpstreamSettings, settings: DNSSettings, log: logging.Logger) -> None:
        self.s = s
        self.address = s.address
        self.log = log
        self.ctx = make_tls_context(str(settings.ca_file) if settings.ca_file else None)
        self.connect_timeout = settings.timeouts.connect
        self.idle_timeout = settings.timeouts.upstream_idle
        self.conns: list[_Connection] = []
        self.max_conns = settings.limits.upstream_connections
        self._connecting: asyncio.Future[_Connection] | None = None
        self.up = True
        self.down_since = 0.0
        self.srtt = 0.0
        self.last_error = ""
        self.connects = 0
        self.resumptions = 0
        self.answers = 0
        self.latency_sum = 0.0  # seconds over all answers (with `answers`: a mean for /metrics)
        self.failures = 0
        self.tls = ""

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self), self.s.host, self.s.port, ssl=self.ctx,
                    server_hostname=self.s.name, ssl_handshake_timeout=self.connect_timeout,
                ),
                self.connect_timeout,
            )
        except ssl.SSLCertVerificationError as e:
            raise UpstreamFailure(
                "auth", f"certificate not valid for {self.s.name}: {e.verify_message}", self.address
            ) from None
        except ssl.SSLError as e:
            raise UpstreamFailure("tls", f"TLS handshake failed: {e.reason or e}", self.address) from None
        except TimeoutError:
            raise UpstreamFailure("timeout", "connect/TLS handshake timed out", self.address) from None
        except ConnectionResetError:
            # Reset during the handshake: a peer that does not speak TLS here (or refuses us).
            raise UpstreamFailure("tls", "connection reset during the TLS handshake", self.address) from None
        except OSError as e:
            raise UpstreamFailure("unreachable", e.strerror or str(e), self.address) from None
        assert conn.transport is not None
        sslobj = conn.transport.get_extra_info("ssl_object")
        if sslobj is None:  # cannot happen with ssl= set; refuse rather than assume
            conn.transport.abort()
            raise UpstreamFailure("tls", "no TLS on the connection", self.address)
        if self.s.pins:
            der = sslobj.getpeercert(binary_form=True)
            if der is None or spki_sha256(der) not in self.s.pins:
                conn.transport.abort()
                got = base64.b64encode(spki_sha256(der)).decode() if der else "none"
                raise UpstreamFailure("auth", f"SPKI pin mismatch (server key sha256/{got})", self.address)
        conn.tls = sslobj.version() or ""
        conn.resumed = bool(sslobj.session_reused)
        self.tls = conn.tls
        self.connects += 1
        self.resumptions += conn.resumed
        return conn

    @property
    def conn(self) -> _Connection | None:
        """The least busy live connection (None when there is none)."""
        best = None
        for c in self.conns:
            if not c.closed and (best is None or len(c.pending) < len(best.pending)):
                best = c
        return best

    async def connection(self) -> _Connection:
        """A live connection, or a new one. The handshake runs as its own task so that one
        guest giving up does not cancel it for the others waiting on it."""
        c = self.conn
        if c is not None:
            return c
        return await asyncio.shield(self._open())

    def _open(self) -> asyncio.Task[_Connection]:
        task = self._connecting
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect())
            self._connecting = task
            task.add_done_callback(self._connected)
        return task

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self.conns.append(task.result())

    def connection_lost(self, conn: _Connection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    async def query(self, query: bytearray, question: bytes, budget: float) -> UpstreamAnswer:
        """One attempt within `budget` seconds (TimeoutError after). On the common path (a live
        connection) this creates no task and no timer of its own. When every connection is busy,
        another is opened in the background (up to `limits.upstream_connections`): one server may
        work through one connection's queries only a few at a time."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        conn = self.conn
        if conn is None:
            conn = await asyncio.wait_for(self.connection(), budget)
        elif len(conn.pending) >= _SPREAD and len(self.conns) < self.max_conns and self._connecting is None:
            self._open()
        qid, fut = conn.send(query, question, t0 + budget)
        try:
            frame = await fut
        finally:
            conn.forget(qid)
        rtt = loop.time() - t0
        self.srtt = rtt if not self.srtt else 0.8 * self.srtt + 0.2 * rtt
        self.answers += 1
        self.latency_sum += rtt
        return UpstreamAnswer(frame, self.address, self.s.name, conn.tls, conn.resumed)

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()
        self.conns.clear()

    def health(self) -> dict[str, Any]:
        return {
            "address": self.address, "name": self.s.name, "state": "up" if self.up else "down",
            "srtt_ms": round(self.srtt * 1000, 2), "tls": self.tls, "connections": len(self.conns),
            "connects": self.connects,
            "resumptions": self.resumptions, "answers": self.answers, "failures": self.failures,
            "latency_sum": round(self.latency_sum, 6),
            "last_error": self.last_error,
        }


class UpstreamPool:
    """Every configured upstream; `query` finds an answer within a deadline or raises PoolFailure."""

    def __init__(self, settings: DNSSettings, log: logging.Logger) -> None:
        self.settings = settings
        self.log = log
        self.upstreams = [Upstream(u, settings, log) for u in settings.upstreams]
        self._probes: dict[str, asyncio.Task[None]] = {}
        self.closed = False

    def _order(self) -> list[Upstream]:
        # Healthy upstreams in the operator's order (the first is the preferred one; the others
        # are failover), then down ones as a last resort, longest-down last; the prober brings
        # them back.
        up = [u for u in self.upstreams if u.up]
        down = sorted((u for u in self.upstreams if not u.up), key=lambda u: u.down_since)
        return up + down

    def _mark_down(self, u: Upstream, f: UpstreamFailure) -> None:
        u.failures += 1
        u.last_error = f"{f.kind}: {f}"
        if u.up:
            u.up = False
            u.down_since = time.monotonic()
            log = self.log.error if f.security else self.log.warning
            log("dns upstream %s (%s) leaves rotation: %s", u.address, u.s.name, u.last_error)
        if u.address not in self._probes and not self.closed:
            self._probes[u.address] = asyncio.get_running_loop().create_task(self._probe(u))

    async def _probe(self, u: Upstream) -> None:
        """Re-establish a verified connection to a down upstream until it works again."""
        try:
            while not self.closed and not u.up:
                await asyncio.sleep(self.settings.timeouts.probe)
                try:
                    await u.connection()
                except UpstreamFailure as f:
                    u.last_error = f"{f.kind}: {f}"
                    continue
                u.up = True
                self.log.info("dns upstream %s (%s) back in rotation", u.address, u.s.name)
        finally:
            self._probes.pop(u.address, None)

    async def query(self, question: bytes, *, cd: bool, do: bool, deadline: float) -> UpstreamAnswer:
        """Ask upstreams in order of health and speed until one answers or `deadline`
        (loop time) passes. A query lost with a broken connection is retried on the next one."""
        loop = asyncio.get_running_loop()
        failures: list[UpstreamFailure] = []
        per_try = self.settings.timeouts.upstream
        for u in self._order():
            for attempt in range(2):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PoolFailure(failures or [UpstreamFailure("timeout", "no time left", u.address)])
                reused = u.conn is not None
                budget = min(remaining, per_try + (0 if reused else self.connect_budget))
                try:
                    ans = await u.query(wire.upstream_query(question, cd=cd, do=do), question, budget)
                except TimeoutError:
                    f = UpstreamFailure("timeout", f"no answer within {budget:.2f}s", u.address)
                except UpstreamFailure as e:
                    f = e
                else:
                    if not u.up and u.conn is not None and u.conn.created > u.down_since:
                        u.up = True  # a last-resort try on a fresh connection worked
                    return ans
                if f.kind == "closed" and reused and attempt == 0:
                    continue  # the upstream closed an idle connection under us: reconnect once
                failures.append(f)
                if f.kind != "busy":  # our own backlog says nothing about the upstream's health
                    self._mark_down(u, f)
                break
        raise PoolFailure(failures)

    @property
    def connect_budget(self) -> float:
        return self.settings.timeouts.connect

    def health(self) -> list[dict[str, Any]]:
        return [u.health() for u in self.upstreams]

    async def close(self) -> None:
        self.closed = True
        probes = list(self._probes.values())
        for t in probes:
            t.cancel()
        if probes:
            await asyncio.gather(*probes, return_exceptions=True)
        for u in self.upstreams:
            u.close()
