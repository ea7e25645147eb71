"""The guest-facing DNS service: plain DNS over UDP and TCP in, DNS-over-TLS out.

Owns: the listeners (UDP; TCP per RFC 7766 with pipelining, out-of-order answers and an idle
timeout), the per-query pipeline (parse from bytes → policy decision → cache or Forwarder →
answer checks: rebinding protection and `answer_ip` rules → patch ID/case/flags/TTLs → truncate for
UDP), protocol-correct errors with Extended DNS Errors, per-guest bounds, and one audit record per
query.
Must not: parse hot-path packets with dnspython (cache hits are answered from bytes), talk to
upstreams except through the Forwarder's DoT pool, or let one bad packet stop a listener.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import dns.rcode
import dns.rdatatype

from policy.decision import Decision, ReasonCode, Verdict, builtin
from protocols import quarantine
from protocols.addr import hostport
from protocols.base import ServiceContext
from protocols.capture import IN, OUT
from protocols.dns import wire
from protocols.dns.cache import CacheEntry, E, stale_wire, upstream_audit, wire_at
from protocols.dns.forwarder import Forwarder, Resolution
from protocols.dns.settings import DNSSettings
from protocols.listen import warn_restart_only
from protocols.transparent import (
    OrigSrc,
    ReplyFrom,
    open_transparent_udp,
    recv_with_orig_dst,
    send_from,
    tcp_original_dst,
)

Send = Callable[[bytes | None], None]

_AXFR, _IXFR, _ANY, _MAILB, _MAILA = 252, 251, 255, 253, 254
_UDP_RCVBUF = 4 * 1024 * 1024
_TCP_MAX_WRITE_BUFFER = 256 * 1024
_PARSED_MAX = 4096  # memo of parsed queries by their bytes after the ID  # a guest that reads slower than this is disconnected


def _builtin(verdict: Verdict, rule: str, detail: str) -> Decision:
    """A decision the DNS service makes itself (protocol limits, rebinding protection)."""
    return builtin("dns", rule, detail, verdict)


_qtype_text: dict[int, str] = {}
_rcode_text: dict[int, str] = {}


def qtype_text(t: int) -> str:
    s = _qtype_text.get(t)
    if s is None:
        s = dns.rdatatype.to_text(t)  # type: ignore[arg-type]
        if len(_qtype_text) < 1024:
            _qtype_text[t] = s
    return s


def rcode_text(r: int) -> str:
    s = _rcode_text.get(r)
    if s is None:
        s = _rcode_text[r] = dns.rcode.to_text(dns.rcode.Rcode.make(r))
    return s


def _engine_uses_answer_ip(engine: Any) -> bool:
    """Whether any dns rule matches on answer_ip (so hits need a per-address decision)."""
    try:
        for rule in engine.rules:
            if rule.protocol == "dns" and "answer_ip" in rule.constrained_keys():
                return True
        return False
    except (AttributeError, TypeError):
        return True  # unknown engine: ask, to be safe


class _UDPListener:
    """One UDP socket read in batches: on each readiness event, drain up to BATCH datagrams.
    asyncio's datagram transport reads one datagram per event-loop iteration, which costs a full
    epoll round per query; this is the difference between ~20k and ~50k cache hits/s here."""

    BATCH = 64

    def __init__(self, svc: DNSService, sock: socket.socket) -> None:
        self.svc = svc
        self.sock = sock
        self.closed = False
        sock.setblocking(False)
        self._recvfrom = sock.recvfrom
        self._sendto = sock.sendto
        self.local = sock.getsockname()[:2]  # where guests sent their queries (forensic capture)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._ready)

    def _ready(self) -> None:
        recvfrom, handle, svc = self._recvfrom, self.svc.handle, self.svc
        for _ in range(self.BATCH):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                svc.stats["udp_errors"] += 1
                return

            def send(resp: bytes | None, addr: tuple[Any, ...] = addr) -> None:
                if resp is not None and not self.closed:
                    try:
                        self._sendto(resp, addr)
                    except (BlockingIOError, InterruptedError):
                        svc.stats["udp_send_dropped"] += 1  # socket buffer full: the guest retries
                    except OSError:
                        svc.stats["udp_errors"] += 1

            svc.local = self.local
            try:
                handle(data, addr, send, False)
            except Exception:  # one bad packet never stops a listener
                svc.stats["internal_errors"] += 1
                svc.log.exception("dns: unexpected error on a UDP query from %s", addr[0])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()


class _TransparentUDPListener(_UDPListener):
    """Gateway mode: queries arrive by TPROXY for any resolver address the guest asked; each answer
    leaves from that address (protocols.transparent), and the audit names it (`orig_dst`)."""

    def __init__(self, svc: DNSService, sock: socket.socket) -> None:
        super().__init__(svc, sock)
        self.reply = ReplyFrom()

    def _ready(self) -> None:
        handle, svc = self.svc.handle, self.svc
        for _ in range(self.BATCH):
            try:
                data, addr, orig = recv_with_orig_dst(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                svc.stats["udp_errors"] += 1
                return

            def send(resp: bytes | None, addr: tuple[Any, ...] = addr, orig: Any = orig) -> None:
                if resp is not None and not self.closed:
                    try:
                        send_from(self.sock, self.reply, resp, addr, orig)
                    except (BlockingIOError, InterruptedError):
                        svc.stats["udp_send_dropped"] += 1
                    except OSError:
                        svc.stats["udp_errors"] += 1

            try:
                handle(data, OrigSrc.of(addr, orig), send, False)
            except Exception:  # one bad packet never stops a listener
                svc.stats["internal_errors"] += 1
                svc.log.exception("dns: unexpected error on a UDP query from %s", addr[0])

    def close(self) -> None:
        super().close()
        self.reply.close()


class _TCP(asyncio.Protocol):
    """One guest TCP connection: length-prefixed queries, answered as each completes."""

    def __init__(self, svc: DNSService) -> None:
        self.svc = svc
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.outstanding = 0
        self.paused = False
        self.guest = "unknown"
        self.peer: tuple[Any, ...] = ("", 0)
        self.idle: asyncio.TimerHandle | None = None
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("socket")
        if self.svc.transparent and sock is not None:  # REDIRECTed: remember what the guest asked
            self.peer = OrigSrc.of(self.peer, tcp_original_dst(sock))
        self.guest = self.svc.guest_of(self.peer[0])
        self.local = (transport.get_extra_info("sockname") or ("", 0))[:2]
        svc = self.svc
        if svc.tcp_per_guest[self.guest] >= svc.settings.limits.tcp_connections:
            svc.stats["tcp_refused_limit"] += 1
            transport.abort()
            return
        svc.tcp_per_guest[self.guest] += 1
        svc.tcp_conns.add(self)
        self.counted = True
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(self.svc.settings.timeouts.tcp_idle, self._idle_close)

    def _idle_close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.svc.stats["tcp_idle_closed"] += 1
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if len(buf) > 2 + 65535 + 65535:
            self.transport.abort()  # type: ignore[union-attr]
            return
        while len(buf) >= 2 and not self.paused:
            ln = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + ln:
                break
            frame = bytes(buf[2 : 2 + ln])
            del buf[: 2 + ln]
            self._arm_idle()  # only whole queries keep a connection alive (slow-drip guests time out)
            self.outstanding += 1
            self.svc.local = self.local
            try:
                self.svc.handle(frame, self.peer, self.send, True)
            except Exception:
                self.svc.stats["internal_errors"] += 1
                self.svc.log.exception("dns: unexpected error on a TCP query from %s", self.peer[0])
                self.send(None)
            if self.outstanding >= self.svc.settings.limits.tcp_pipeline and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def send(self, resp: bytes | None) -> None:
        self.outstanding -= 1
        t = self.transport
        if t is None or t.is_closing():
            return
        if resp is not None:
            t.write(struct.pack("!H", len(resp)) + resp)
            if t.get_write_buffer_size() > _TCP_MAX_WRITE_BUFFER:
                self.svc.stats["tcp_slow_reader_closed"] += 1
                t.abort()
                return
            self._arm_idle()
        if self.paused and self.outstanding < self.svc.settings.limits.tcp_pipeline:
            self.paused = False
            t.resume_reading()
            if self.buf:
                self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.counted:
            self.counted = False
            self.svc.tcp_per_guest[self.guest] -= 1
            self.svc.tcp_conns.discard(self)


class DNSService:
    """Plain DNS from guests → policy → cache → DNSSEC-validated DoT upstreams."""

    name: ClassVar[str] = "dns"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings: DNSSettings = ctx.settings if ctx.settings is not None else DNSSettings()
        self.engine = ctx.engine
        self.log = ctx.log
        self.fw: Forwarder | None = None
        # transparent gateway mode (`gateway:` in the config): TPROXY'd UDP, REDIRECTed TCP
        self.transparent = getattr(ctx.config, "gateway", None) is not None
        self.transports: list[_UDPListener] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.tcp_conns: set[_TCP] = set()
        self.tcp_per_guest: defaultdict[str, int] = defaultdict(int)
        self.inflight_per_guest: defaultdict[str, int] = defaultdict(int)
        self.tasks: set[asyncio.Task[None]] = set()
        self._guests: dict[str, str] = {}
        self._parsed: dict[bytes, wire.Query] = {}
        self._buckets: dict[str, list[float]] = {}
        self._qps = self.settings.limits.qps
        self._answer_ip = _engine_uses_answer_ip(ctx.engine)
        self.stats: defaultdict[str, int] = defaultdict(int)
        # audited answers by rcode, by EDE code, by DNSSEC outcome (for /metrics)
        self.rcodes: defaultdict[int, int] = defaultdict(int)
        self.edes: defaultdict[int, int] = defaultdict(int)
        self.dnssec_outcomes: defaultdict[str, int] = defaultdict(int)
        self.clock = time.monotonic
        self.listening: list[str] = []
        self.recorder = quarantine.Recorder(ctx.state_dir)
        cap = ctx.capture
        self.capture = cap if cap is not None and cap.enabled else None  # protocols.capture
        self.local: tuple[Any, ...] = ("", 0)  # the address the query being handled came to

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> list[str]:
        loop = asyncio.get_running_loop()
        self.fw = Forwarder(self.settings, self.log, clock=self.clock)
        if self.settings.dnssec == "off":
            self.log.warning("dns: DNSSEC validation is off (dnssec: off); answers are not validated")
        out: list[str] = []
        try:
            for host, port in self.settings.listen:
                if self.transparent:
                    # `gateway:` configured: guests' queries to any address arrive by TPROXY
                    sock = open_transparent_udp(host, port, self.ctx.reuse_port)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
                else:
                    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sock = socket.socket(fam, socket.SOCK_DGRAM)
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
                        if self.ctx.reuse_port:  # `workers: N`: each process its own socket
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                        sock.bind((host, port))
                    except OSError:
                        sock.close()
                        raise
                port = sock.getsockname()[1]
                listener = (_TransparentUDPListener if self.transparent else _UDPListener)(self, sock)
                listener.start(loop)
                self.transports.append(listener)
                srv = await loop.create_server(lambda: _TCP(self), host, port, reuse_address=True, backlog=512,
                                               reuse_port=self.ctx.reuse_port or None)
                self.servers.append(srv)
                shown = hostport(host, port)
                out += [f"udp {shown}", f"tcp {shown}"]
        except OSError:
            await self.drain(0)
            raise
        self.listening = out
        self.log.info("dns: listening on %s; upstreams %s", ", ".join(out),
                      ", ".join(f"{u.address} ({u.name})" for u in self.settings.upstreams))
        return out

    async def reload(self, settings: Any, engine: Any) -> None:
        """Swap policy (always) and settings. Listeners stay; upstream/DNSSEC changes get a new
        Forwarder while in-flight queries finish on the old one."""
        self.engine = engine  # rate buckets were carried over by protocols.base.reload_service
        self._answer_ip = _engine_uses_answer_ip(engine)
        self._guests.clear()
        if settings is None or settings == self.settings:
            return
        warn_restart_only(self.log, "dns", self.settings, settings, ("listen",))
        old = self.fw
        keep_cache = old is not None and settings.cache == self.settings.cache
        self.settings = settings
        self._qps = settings.limits.qps
        if old is not None:
            fw = Forwarder(settings, self.log, clock=self.clock)
            if keep_cache and (settings.dnssec, settings.trust_anchors) == (old.settings.dnssec, old.settings.trust_anchors):
                fw.cache = old.cache
            self.fw = fw
            asyncio.get_running_loop().call_later(settings.timeouts.query + 1, lambda: asyncio.ensure_future(old.close()))

    async def drain(self, timeout: float) -> None:
        for t in self.transports:
            t.close()
        for s in self.servers:
            s.close()
        if self.tasks and timeout > 0:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        for c in list(self.tcp_conns):
            if c.transport is not None:
                c.transport.close()
        left = list(self.tasks)
        for t in left:
            t.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        self.transports.clear()
        self.servers.clear()
        if self.fw is not None:
            await self.fw.close()

    def health(self) -> dict[str, Any]:
        h: dict[str, Any] = {"state": "ok", "listening": self.listening, **self.stats}
        if self.fw is not None:
            h.update(self.fw.health())
            if not any(u["state"] == "up" for u in h["upstreams"]) or h["dnssec"] == "unavailable":
                h["state"] = "degraded"
        h["tcp_connections"] = len(self.tcp_conns)
        h["rcodes"] = {rcode_text(k): v for k, v in self.rcodes.items()}
        h["ede"] = {str(k): v for k, v in self.edes.items()}
        h["dnssec_outcomes"] = dict(self.dnssec_outcomes)
        return h

    # -- helpers -------------------------------------------------------------------------------
    def _captured(self, send: Send, data: bytes, src: tuple[Any, ...], tcp: bool, guest: str) -> Send:
        """`send` that also hands the query and the answer the guest got to forensic capture
        (protocols.capture; only called for denied, would-deny and quarantined queries)."""
        cap = self.capture
        if cap is None or getattr(send, "captured", False):
            return send
        orig = getattr(src, "orig", None)
        if orig:  # transparent mode: the resolver address the guest asked
            host, _, port = orig.rpartition(":")
            local: tuple[Any, ...] = (host.strip("[]"), int(port))
        else:
            local = self.local
        t_in = time.time()

        def wrapped(resp: bytes | None) -> None:
            send(resp)
            q = struct.pack("!H", len(data)) + data if tcp else data
            chunks = [(t_in, IN, q)]
            if resp is not None:
                chunks.append((time.time(), OUT, struct.pack("!H", len(resp)) + resp if tcp else resp))
            cap.flow(guest, "dns", "tcp" if tcp else "udp", src, local, chunks)

        wrapped.captured = True  # type: ignore[attr-defined]
        return wrapped

    def _take_token(self, guest: str, now: float) -> bool:
        qps = self._qps
        b = self._buckets.get(guest)
        if b is None:
            if len(self._buckets) > 65536:
                self._buckets.clear()
            b = self._buckets[guest] = [float(qps), now]
        else:
            b[0] = min(float(qps), b[0] + (now - b[1]) * qps)
            b[1] = now
        if b[0] < 1.0:
            return False
        b[0] -= 1.0
        return True

    def guest_of(self, ip: str) -> str:
        g = self._guests.get(ip)
        if g is None:
            g = self.ctx.guests.lookup(ip)
            if len(self._guests) > 65536:
                self._guests.clear()
            self._guests[ip] = g
        return g

    def _audit(
        self, d: Decision, guest: str, src: tuple[Any, ...], qname: str, qtype: str, t0: float, *,
        rcode: int, upstream: dict[str, Any] | None = None, **extra: Any,
    ) -> None:
        """Audit the query (ServiceContext.record) and count it for /metrics."""
        self.rcodes[rcode] += 1
        if extra:
            if extra.get("ede") is not None:
                self.edes[extra["ede"]] += 1
            if extra.get("dnssec"):
                self.dnssec_outcomes[extra["dnssec"]] += 1
        self.ctx.record(d, guest=guest, src=src, protocol="dns", request={"qname": qname, "qtype": qtype},
                        upstream=upstream, orig_dst=getattr(src, "orig", None), elapsed=self.clock() - t0,
                        rcode=rcode_text(rcode), fields=extra)

    def _audit_error(self, src: tuple[Any, ...], t0: float, rcode: int, why: str, q: wire.Query | None = None) -> None:
        """A query refused for its form (FORMERR, NOTIMP, BADVERS) is a decision too: audited."""
        qname = wire.qname_text(q.qname) if q is not None and q.qname else ""
        qtype = qtype_text(q.qtype) if q is not None and q.qname else ""
        d = _builtin(Verdict.DENY, "dns-builtin", why)
        self._audit(d, self.guest_of(src[0]), src, qname, qtype, t0, rcode=rcode)

    # -- the query pipeline --------------------------------------------------------------------
    def handle(self, data: bytes, src: tuple[Any, ...], send: Send, tcp: bool) -> None:
        """Answer one guest query (synchronously for cache hits and errors)."""
        t0 = self.clock()
        st = self.stats
        st["queries"] += 1
        # Packets that differ only in ID (a guest asking the same thing again) share one parse.
        tail = data[2:]
        q = self._parsed.get(tail)
        if q is None:
            try:
                q = wire.parse_query(data)
            except wire.Malformed:
                st["dropped_malformed"] += 1
                send(None)
                return
            except wire.FormErr as e:
                st["formerr"] += 1
                send(wire.error_response(data, None, wire.FORMERR))
                self._audit_error(src, t0, wire.FORMERR, f"malformed query: {e}")
                return
            if len(self._parsed) >= _PARSED_MAX:
                self._parsed.clear()
            self._parsed[tail] = q
        if q.badvers:
            st["badvers"] += 1
            send(wire.badvers_response(data, q, self.settings.edns_udp_size))
            self._audit_error(src, t0, 16, "EDNS version other than 0", q)
            return
        if q.opcode != 0:
            st["notimp"] += 1
            send(wire.error_response(data, q, wire.NOTIMP, udp_size=self.settings.edns_udp_size))
            self._audit_error(src, t0, wire.NOTIMP, f"opcode {q.opcode} is not implemented", q)
            return
        guest = self.guest_of(src[0])
        if self._qps and not tcp and not self._take_token(guest, t0):
            # A flood: drop, but answer every second dropped query with TC=1 (like BIND's RRL
            # "slip") so a real client behind a spoofed flood can still get through over TCP.
            st["flood_dropped"] += 1
            send(wire.truncated(data, q, self.settings.edns_udp_size) if st["flood_dropped"] % 2 == 0 else None)
            return
        qt = self.ctx.quarantine
        if qt and guest in qt:  # a quarantined guest: nothing below applies (docs/cli.md#quarantine)
            send = self._captured(send, data, src, tcp, guest)
            self._quarantined(data, q, qt[guest], guest, src, t0, send)
            return
        fw = self.fw
        assert fw is not None
        entry = fw.cache.get(q.key, t0)
        if entry is not None:
            qname, qtype = entry[E.QNAME], entry[E.QTYPE]
        else:
            qname, qtype = wire.qname_text(q.qname), qtype_text(q.qtype)
        if q.qclass != 1 or q.qtype in (_AXFR, _IXFR, _MAILA, _MAILB):
            what = "zone transfers" if q.qtype in (_AXFR, _IXFR) else "this query class/type"
            d = _builtin(Verdict.DENY, "dns-builtin", f"{what} are not served by this proxy")
            send = self._captured(send, data, src, tcp, guest)
            self._refuse(data, q, d, guest, src, qname, qtype, t0, send, wire.EDE_NOT_SUPPORTED, f"{qtype} not supported")
            return
        try:
            d = self.engine.decide("dns", guest, {"qname": qname, "qtype": qtype})
        except Exception:
            self.log.exception("dns: policy engine failed for %s %s; failing closed", qname, qtype)
            st["policy_errors"] += 1
            send(wire.error_response(data, q, wire.SERVFAIL, wire.EDE_OTHER, "policy error",
                                     self.settings.edns_udp_size))
            d = _builtin(Verdict.DENY, "dns-builtin", "the policy engine failed on this query; failing closed")
            self._audit(d, guest, src, qname, qtype, t0, rcode=wire.SERVFAIL, ede=wire.EDE_OTHER)
            return
        if d.verdict is not Verdict.ALLOW:  # deny or would_deny: the query and its answer go to capture
            send = self._captured(send, data, src, tcp, guest)
        if not d.allowed:
            if d.code == ReasonCode.RATE_LIMITED:
                st["rate_limited"] += 1
                self._refuse(data, q, d, guest, src, qname, qtype, t0, send, wire.EDE_PROHIBITED,
                             f"rate limit, rule {d.rule}")
            else:
                st["denied"] += 1
                self._refuse(data, q, d, guest, src, qname, qtype, t0, send, wire.EDE_BLOCKED, d.rule)
            return
        if q.qtype == _ANY:
            self._any(data, q, d, guest, src, qname, qtype, t0, send)
            return
        if entry is not None:
            self._answer(data, q, entry, d, guest, src, t0, send, tcp, "hit")
            return
        if self.inflight_per_guest[guest] >= self.settings.limits.inflight:
            st["inflight_limited"] += 1
            lim = _builtin(Verdict.DENY, "dns-builtin", f"guest {guest} has {self.settings.limits.inflight} queries in flight")
            self._refuse(data, q, lim, guest, src, qname, qtype, t0, send, wire.EDE_PROHIBITED, "per-guest in-flight limit")
            return
        self.inflight_per_guest[guest] += 1
        task = asyncio.get_running_loop().create_task(
            self._miss(fw, data, q, d, guest, src, qname, qtype, t0, send, tcp)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _refuse(
        self, data: bytes, q: wire.Query, d: Decision, guest: str, src: tuple[Any, ...], qname: str, qtype: str,
        t0: float, send: Send, ede: int, text: str,
    ) -> None:
        send(wire.error_response(data, q, wire.REFUSED, ede, text, self.settings.edns_udp_size))
        self._audit(d, guest, src, qname, qtype, t0, rcode=wire.REFUSED, ede=ede)

    def _quarantined(self, data: bytes, q: wire.Query, qe: dict[str, Any], guest: str, src: tuple[Any, ...],
                     t0: float, send: Send) -> None:
        """block: REFUSED with EDE 15 (Blocked) naming the quarantine. honeypot: the sinkhole
        addresses for A/AAAA (an empty NOERROR answer for other types), TTL 60, and the query
        recorded in full."""
        qname, qtype = wire.qname_text(q.qname), qtype_text(q.qtype)
        self.stats["quarantined"] += 1
        if qe.get("profile") != "honeypot":
            d = quarantine.decision("dns", guest, qe)
            self._refuse(data, q, d, guest, src, qname, qtype, t0, send, wire.EDE_BLOCKED,
                         quarantine.refusal_text(guest, qe))
            return
        sink = qe.get("sinkhole") or {}
        family, addrs = (socket.AF_INET, sink.get("a") or []) if q.qtype == 1 else \
            (socket.AF_INET6, sink.get("aaaa") or []) if q.qtype == 28 else (0, [])
        rrs = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", q.qtype, 1, 60, 4 if family == socket.AF_INET else 16)
                       + socket.inet_pton(family, a) for a in addrs)
        head = data[:2] + struct.pack("!BBHHHH", wire.QR | (q.b2 & wire.RD), wire.RA | (q.b3 & wire.CD),
                                      1, len(addrs), 0, 1 if q.edns else 0)
        out = head + data[12 : q.qend] + rrs
        if q.edns:
            out += wire.opt_rr(self.settings.edns_udp_size, q.do)
        send(out)
        answer = f"honeypot answer {', '.join(addrs)}" if addrs else "honeypot answer: no data"
        self.recorder.record(guest, qe, "dns", {
            "src": hostport(src[0], src[1]), "qname": qname, "qtype": qtype, "qclass": q.qclass,
            "rd": bool(q.b2 & wire.RD), "cd": bool(q.b3 & wire.CD), "do": bool(q.do), "edns": bool(q.edns),
            "query": data, "answer": addrs,
        })
        self._audit(quarantine.decision("dns", guest, qe, answer), guest, src, qname, qtype, t0,
                    rcode=wire.NOERROR, quarantine="honeypot", answer=addrs)

    def _any(
        self, data: bytes, q: wire.Query, d: Decision, guest: str, src: tuple[Any, ...], qname: str, qtype: str,
        t0: float, send: Send,
    ) -> None:
        """RFC 8482 §4.2: a minimal synthesized HINFO answer to ANY."""
        head = data[:2] + struct.pack("!BBHHHH", wire.QR | (q.b2 & wire.RD), wire.RA | (q.b3 & wire.CD), 1, 1, 0,
                                      1 if q.edns else 0)
        rdata = b"\x07RFC8482\x00"
        rr = b"\xc0\x0c" + struct.pack("!HHIH", 13, 1, 3600, len(rdata)) + rdata
        out = head + data[12 : q.qend] + rr
        if q.edns:
            out += wire.opt_rr(self.settings.edns_udp_size, q.do)
        send(out)
        self._audit(d, guest, src, qname, qtype, t0, rcode=wire.NOERROR, cache="synthesized")

    def _check_answer(self, entry: CacheEntry, guest: str, qname: str, qtype: str) -> tuple[Decision, str] | None:
        """answer_ip rules and rebinding protection: the decision that blocks this answer."""
        if entry[E.IPS] and self._answer_ip:
            for ip in entry[E.IPS]:
                d = self.engine.decide("dns", guest, {"qname": qname, "qtype": qtype, "answer_ip": ip})
                if d.verdict is not Verdict.ALLOW:
                    return d, d.rule
        if entry[E.PRIVATE] and self.settings.rebinding_protection:
            if not self.engine.named_by_rule("dns", guest, "qname", qname):
                monitor = str(getattr(self.engine, "mode", "enforce")) == "monitor"
                ips = ", ".join(entry[E.PRIVATE][:4])
                d = _builtin(
                    Verdict.WOULD_DENY if monitor else Verdict.DENY, "rebinding-protection",
                    f"answer for {qname} points into an internal range ({ips}) and no rule names {qname}",
                )
                return d, "rebinding protection"
        return None

    def _answer(
        self, data: bytes, q: wire.Query, entry: CacheEntry, d: Decision, guest: str, src: tuple[Any, ...],
        t0: float, send: Send, tcp: bool, how: str, stale: bool = False,
    ) -> None:
        if entry[E.PRIVATE] or (self._answer_ip and entry[E.IPS]):
            blocked = self._check_answer(entry, guest, entry[E.QNAME], entry[E.QTYPE])
            if blocked is not None:
                bd, text = blocked
                send = self._captured(send, data, src, tcp, guest)
                if bd.verdict is Verdict.DENY:
                    self.stats["answers_blocked"] += 1
                    send(wire.error_response(data, q, wire.REFUSED, wire.EDE_BLOCKED, text, self.settings.edns_udp_size))
                    self._audit(bd, guest, src, entry[E.QNAME], entry[E.QTYPE], t0, rcode=wire.REFUSED,
                                upstream=upstream_audit(entry[E.UPSTREAM]), cache=how, ede=wire.EDE_BLOCKED)
                    return
                d = bd  # monitor mode: audited as would_deny, answered normally
        if stale:
            buf = bytearray(wire.add_ede(stale_wire(entry, self.settings.cache.stale_answer_ttl), wire.EDE_STALE_ANSWER))
        else:
            buf = wire_at(entry, t0)  # a fresh copy, patched in place below
        buf[0:2] = data[:2]
        buf[2] = wire.QR | (q.b2 & wire.RD)
        ad = wire.AD if entry[E.STATUS] == "secure" and (q.do or q.b3 & wire.AD) and not q.b3 & wire.CD else 0
        buf[3] = (buf[3] & 0x8F) | ad | (q.b3 & wire.CD)
        ql = len(q.qname)
        buf[12 : 12 + ql] = q.qname
        if not tcp:
            limit = min(q.udp_size, self.settings.edns_udp_size) if q.edns else 512
            if len(buf) > limit:
                self.stats["truncated"] += 1
                send(wire.truncated(data, q, self.settings.edns_udp_size))
                self._audit(d, guest, src, entry[E.QNAME], entry[E.QTYPE], t0, rcode=entry[E.RCODE],
                            upstream=upstream_audit(entry[E.UPSTREAM]), cache=how, truncated=True)
                return
        send(bytes(buf))
        if entry[E.REASON]:
            self._audit(d, guest, src, entry[E.QNAME], entry[E.QTYPE], t0, rcode=entry[E.RCODE],
                        upstream=upstream_audit(entry[E.UPSTREAM]), cache=how, dnssec=entry[E.STATUS], ede=entry[E.EDE],
                        error=entry[E.REASON])
        elif entry[E.STATUS] is not None:
            self._audit(d, guest, src, entry[E.QNAME], entry[E.QTYPE], t0, rcode=entry[E.RCODE],
                        upstream=upstream_audit(entry[E.UPSTREAM]), cache=how, dnssec=entry[E.STATUS])
        else:
            self._audit(d, guest, src, entry[E.QNAME], entry[E.QTYPE], t0, rcode=entry[E.RCODE],
                        upstream=upstream_audit(entry[E.UPSTREAM]), cache=how)

    async def _miss(
        self, fw: Forwarder, data: bytes, q: wire.Query, d: Decision, guest: str, src: tuple[Any, ...],
        qname: str, qtype: str, t0: float, send: Send, tcp: bool,
    ) -> None:
        try:
            try:
                entry = await fw.resolve(q.key, qname, qtype)
            except Resolution as r:
                stale = fw.stale(q.key)
                if stale is not None:
                    self.stats["served_stale"] += 1
                    self._answer(data, q, stale, d, guest, src, t0, send, tcp, "stale", stale=True)
                    return
                self.stats["servfail"] += 1
                send(wire.error_response(data, q, wire.SERVFAIL, r.ede, r.text[:200], self.settings.edns_udp_size))
                extra: dict[str, Any] = {"ede": r.ede, "error": r.text}
                if r.alarm:
                    extra["alarm"] = f"upstream authentication failed: {r.alarm}"
                self._audit(d, guest, src, qname, qtype, t0, rcode=wire.SERVFAIL, upstream=r.upstream, **extra)
                return
            self._answer(data, q, entry, d, guest, src, t0, send, tcp, "miss")
        except asyncio.CancelledError:
            send(None)
            raise
        except Exception:
            self.stats["internal_errors"] += 1
            self.log.exception("dns: unexpected error resolving %s %s", qname, qtype)
            send(wire.error_response(data, q, wire.SERVFAIL, wire.EDE_OTHER, "internal error",
                                     self.settings.edns_udp_size))
        finally:
            self.inflight_per_guest[guest] -= 1
