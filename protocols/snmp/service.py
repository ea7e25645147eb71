"""The SNMP service: guests' SNMPv1/v2c in, SNMPv3 authPriv out; traps and informs upgraded to v3.

Owns: the guest-facing UDP listeners (`listen`, `traps_listen`), choosing the agent (by community in
explicit mode, by original destination in transparent mode), policy per (guest, agent, op, OID),
RFC 3584 translation, the per-request audit record, flood limits, and trap/inform forwarding.

The transparent-mode seam for the gateway: `await service.handle_datagram(data, src, orig_dst)`
returns the reply bytes to send back to `src` from `orig_dst` (or None: send nothing), and
`await service.handle_trap(data, src, orig_dst)` likewise for port 162. A TPROXY socket owner calls
them with the datagram, the guest's (ip, port) and the original destination (ip, port).

Must not: answer a guest with anything but v1/v2c, speak anything but v3 authPriv to the outside,
let a guest's community or request-id reach an agent, or put keys, passwords or communities in
audit records and logs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from policy.decision import Decision, ReasonCode, Verdict, builtin
from protocols import quarantine
from protocols.addr import addr_text
from protocols.base import ServiceContext
from protocols.capture import IN, OUT
from protocols.listen import warn_restart_only
from protocols.snmp import ber, translate, usm
from protocols.snmp.peer import AgentError, AgentTimeout, V3Peer
from protocols.snmp.settings import Agent, Credentials, SNMPSettings, TrapReceiver
from protocols.snmp.udp import UDPEndpoint
from protocols.transparent import TransparentUDP

OIDS_IN_AUDIT = 4
MAX_PEERS = 512  # transparent mode creates one (one socket) per original destination; LRU-evicted
SNMP_TRAP_OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)
SYS_UPTIME = (1, 3, 6, 1, 2, 1, 1, 3, 0)
SNMP_TRAP_ADDRESS = (1, 3, 6, 1, 6, 3, 18, 1, 3, 0)
SNMP_TRAP_ENTERPRISE = (1, 3, 6, 1, 6, 3, 1, 1, 4, 3, 0)
SNMP_TRAPS = (1, 3, 6, 1, 6, 3, 1, 1, 5)
V1_SKIP_LIMIT = 32  # GETNEXT re-asks to step over Counter64 for a v1 guest


def _guard(rule: str, detail: str) -> Decision:
    """A decision taken by the service itself (malformed input, limits), not by a policy rule."""
    return builtin("snmp", rule, detail)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    inflight: int = 0
    dropped: int = 0
    last_audit: float = 0.0


@dataclass(slots=True)
class _Job:
    """A guest request on its way to the agent (between _prepare and _complete)."""

    msg: ber.CommunityMessage
    pdu: ber.PDU
    agent: Agent
    guest: str
    srcs: str
    request: dict[str, Any]
    extra: dict[str, Any]
    decision: Decision
    upstream: dict[str, Any]
    t0: float
    peer: V3Peer
    non_rep: int
    max_rep: int
    bucket: _Bucket
    engine: Any
    raw: bytes = b""  # the guest's datagram, kept only when the flow goes to forensic capture
    local: tuple[str, int] | None = None


class _Listener:
    """A guest-facing UDP socket: each datagram becomes a task running `handler`."""

    def __init__(self, service: SNMPService, handler: Any, host: str, port: int):
        self.service, self.handler = service, handler
        self.endpoint = UDPEndpoint.bind(host, port, self._datagram, service.ctx.reuse_port)

    def _datagram(self, data: bytes, addr: Any) -> None:
        if self.handler == self.service.handle_datagram:
            self.service._local = self.endpoint.getsockname()[:2]  # the address the guest sent to (capture)
            try:
                self.service._fast_datagram(data, addr, lambda reply: self._send(reply, addr))
            except Exception:  # one bad datagram must never take the listener down
                self.service.ctx.log.exception("snmp: unexpected error handling a datagram from %s", addr[0])
                self.service.counters["internal_errors"] += 1
            return
        task = asyncio.ensure_future(self._serve(data, addr))
        self.service._tasks.add(task)
        task.add_done_callback(self.service._tasks.discard)

    def _send(self, reply: bytes, addr: Any) -> None:
        if not self.endpoint.closed:
            self.endpoint.sendto(reply, addr)

    async def _serve(self, data: bytes, addr: Any) -> None:
        try:
            reply = await self.handler(data, (addr[0], addr[1]), None)
        except Exception:  # one bad datagram must never take the listener down
            self.service.ctx.log.exception("snmp: unexpected error handling a datagram from %s", addr[0])
            self.service.counters["internal_errors"] += 1
            return
        if reply is not None and not self.endpoint.closed:
            self.endpoint.sendto(reply, addr)

    def close(self) -> None:
        self.endpoint.close()


class _TransparentListener:
    """Gateway mode: datagrams arrive by TPROXY for any agent address; replies leave from the
    address the guest asked (protocols.transparent), so its client accepts them."""

    def __init__(self, handler: Any, host: str, port: int, reuse_port: bool = False):
        self.udp = TransparentUDP(host, port, handler, reuse_port)
        self.udp.start()
        self.endpoint = self
        self.closed = False

    def getsockname(self) -> Any:
        return self.udp.sock.getsockname()

    def stop_reading(self) -> None:
        if not self.closed:
            asyncio.get_running_loop().remove_reader(self.udp.sock.fileno())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.udp.close()


class SNMPService:
    name: ClassVar[str] = "snmp"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings: SNMPSettings = ctx.settings
        self.engine = ctx.engine
        self._listeners: list[_Listener] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._peers: OrderedDict[tuple[Any, ...], V3Peer] = OrderedDict()
        self._guests: dict[str, _Bucket] = {}
        self._trap_inflight = 0
        self._informs_seen: dict[tuple[str, int, int], float] = {}
        self._trap_socks: dict[int, socket.socket] = {}  # per address family, for v3 TRAPs
        self._boots = 1
        self._started = time.monotonic()
        self._salt = usm.SaltCounter()
        self._trap_keys: dict[tuple[Any, ...], usm.LocalKeys] = {}
        self._trap_ids = 1
        self._draining = False
        self._inflight_jobs = 0
        self.counters: dict[str, int] = {
            "requests": 0, "denied": 0, "agent_timeouts": 0, "agent_errors": 0, "malformed": 0,
            "unknown_community": 0, "v3_from_guest": 0, "flood_dropped": 0, "internal_errors": 0,
            "traps_in": 0, "traps_forwarded": 0, "informs_acked": 0, "traps_dropped": 0, "quarantined": 0,
        }
        self.recorder = quarantine.Recorder(ctx.state_dir)
        self.by_op: dict[str, int] = {}  # "op/outcome" -> audited requests (for /metrics)
        self._local: tuple[str, int] | None = None  # the listener of the datagram being prepared

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> list[str]:
        # `workers: N`: traps and informs are worker 0's alone. It is the proxy's one authoritative
        # engine for the v3 TRAPs it sends (boots and time per engine ID must not go backwards at
        # a receiver), and trap volume is small; requests are spread over every worker.
        first = self.ctx.worker == 0
        self._boots = self._bump_boots() if first else 0
        out = []
        for handler, addrs in ((self.handle_datagram, self.settings.listen),
                               (self.handle_trap, self.settings.traps_listen if first else ())):
            for host, port in addrs:
                listener: Any = (_TransparentListener(handler, host, port, self.ctx.reuse_port) if self._transparent()
                                 else _Listener(self, handler, host, port))
                self._listeners.append(listener)
                out.append(f"udp {addr_text(listener.endpoint.getsockname())}")
        return out

    def _transparent(self) -> bool:
        """With a `gateway:` section, guests' packets arrive by TPROXY (`proxyvm gateway up`)."""
        return getattr(self.ctx.config, "gateway", None) is not None

    def bound_addresses(self) -> list[tuple[str, int]]:
        return [tuple(lst.endpoint.getsockname()[:2]) for lst in self._listeners]  # type: ignore[misc]

    async def reload(self, settings: Any, engine: Any) -> None:
        warn_restart_only(self.ctx.log, "snmp", self.settings, settings, ("listen", "traps_listen"))
        self.settings = settings
        self.engine = engine
        self.ctx.settings = settings
        self.ctx.engine = engine
        # Peers are keyed by (address, credentials, timeout, retries): changed agents get new peers;
        # the old ones finish their in-flight requests and are evicted as idle.

    async def drain(self, timeout: float) -> None:
        self._draining = True
        for lst in self._listeners:
            lst.endpoint.stop_reading()  # in-flight requests still get their replies
        deadline = time.monotonic() + timeout
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for _ in range(int(max(deadline - time.monotonic(), 0) / 0.02) + 1):  # callback-driven requests
            if self._inflight_jobs <= 0:
                break
            await asyncio.sleep(0.02)
        for lst in self._listeners:
            lst.close()
        self._listeners.clear()
        for p in self._peers.values():
            p.close()
        self._peers.clear()
        for sock in self._trap_socks.values():
            sock.close()
        self._trap_socks.clear()

    def health(self) -> dict[str, Any]:
        return {"state": "ok" if self._listeners or not (self.settings.listen or self.settings.traps_listen)
                else "degraded",
                "listeners": len(self._listeners), "agents_known": len(self._peers), **self.counters,
                "by_op": dict(self.by_op)}

    def _bump_boots(self) -> int:
        """snmpEngineBoots for the proxy's own engine (v3 TRAPs): persisted, +1 per start."""
        path = Path(self.ctx.state_dir) / "snmp-engine-boots"
        try:
            boots = int(path.read_text().strip()) + 1
        except (OSError, ValueError):
            boots = 1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{boots}\n")
            os.replace(tmp, path)
        except OSError as e:
            self.ctx.log.warning("snmp: cannot persist engine boots in %s (%s); v3 trap receivers may "
                                 "reject traps after a restart", path, e.strerror)
        return min(boots, 0x7FFFFFFE)

    # -- helpers -----------------------------------------------------------------------------
    def _peer(self, address: tuple[str, int], creds: Credentials, timeout: float, retries: int) -> V3Peer:
        key = (address, creds.user, creds.auth_protocol, creds.auth_password, creds.priv_protocol,
               creds.priv_password, timeout, retries)
        p = self._peers.get(key)
        if p is None:
            if len(self._peers) >= MAX_PEERS:
                old_key, old = next(iter(self._peers.items()))
                if not old._pending:
                    old.close()
                    del self._peers[old_key]
            p = V3Peer(address, creds, timeout=timeout, retries=retries)
            self._peers[key] = p
        else:
            self._peers.move_to_end(key)
        return p

    def _select_agent(self, community: str, orig_dst: tuple[str, int] | None) -> Agent | None:
        s = self.settings
        if orig_dst is not None and (orig_dst[0], orig_dst[1]) not in self._local_addresses():
            host, port = orig_dst[0], orig_dst[1]
            known = s.agent_by_address(host, port)
            if known is not None:
                return known if (community in s.communities or community == known.community) else None
            if s.default_agent_credentials is None or community not in s.communities:
                return None
            return Agent(name=addr_text((host, port)), address=(host, port), credentials=s.default_agent_credentials,
                         timeout=s.default_timeout, retries=s.default_retries)
        return s.agent_by_community(community)

    def _local_addresses(self) -> set[tuple[str, int]]:
        return set(self.settings.listen) | {tuple(a) for a in self.bound_addresses()}  # type: ignore[misc]

    def _admit(self, guest: str, now: float) -> _Bucket | None:
        """Per-guest flood guard: a token bucket (`limits.guest_rate`) and an in-flight cap."""
        lim = self.settings.limits
        b = self._guests.get(guest)
        if b is None:
            if len(self._guests) > 65536:
                self._guests.clear()
            b = self._guests[guest] = _Bucket(float(lim.guest_rate), now)
        if lim.guest_rate:
            b.tokens = min(float(lim.guest_rate), b.tokens + (now - b.at) * lim.guest_rate)
            b.at = now
            if b.tokens < 1:
                return None
            b.tokens -= 1
        if b.inflight >= lim.guest_inflight:
            return None
        return b

    def _drop(self, guest: str, src: str, reason: str, rule: str, *, request: dict[str, Any] | None = None,
              counter: str = "malformed", alarm: str | None = None, orig_dst: tuple[str, int] | None = None) -> None:
        self.counters[counter] += 1
        self.ctx.record(_guard(rule, reason), guest=guest, src=src, protocol="snmp", request=request or {},
                        orig_dst=orig_dst, status="dropped", **({"alarm": alarm} if alarm else {}))

    def _flood(self, guest: str, src: str, now: float, what: str) -> None:
        """Count a flood drop; audit at most one record per guest per second (with the count)."""
        self.counters["flood_dropped"] += 1
        b = self._guests[guest]
        b.dropped += 1
        if now - b.last_audit >= 1.0:
            b.last_audit = now
            self.ctx.record(_guard("snmp.limits", f"{what}: {b.dropped} requests dropped from this guest so far"),
                            guest=guest, src=src, protocol="snmp", request={}, status="dropped")

    # -- guest requests ----------------------------------------------------------------------
    async def handle_datagram(self, data: bytes, src: tuple[str, int], orig_dst: tuple[str, int] | None = None
                              ) -> bytes | None:
        """One guest datagram on the SNMP port -> the reply to send back (None: no reply).
        This is the transparent-mode seam: `orig_dst` is the guest's original destination."""
        job = self._prepare(data, src, orig_dst)
        if not isinstance(job, _Job):
            return job
        try:
            resp: ber.PDU | Exception = await job.peer.request(job.pdu.tag, job.pdu.varbinds, job.non_rep,
                                                               job.max_rep)
            if job.msg.version == ber.V1 and job.pdu.tag == ber.GETNEXT:
                assert isinstance(resp, ber.PDU)
                resp = await self._skip_counter64(job.peer, job.pdu, resp)
        except (AgentTimeout, AgentError) as e:
            resp = e
        return self._complete(job, resp)

    def _fast_datagram(self, data: bytes, addr: Any, reply: Callable[[bytes], None]) -> None:
        """The listener's path: like handle_datagram, but without a task or future per request
        (callbacks from the agent's socket finish it). v1 GETNEXT needs several agent round trips
        (Counter64 skipping) and takes the coroutine path."""
        job = self._prepare(data, (addr[0], addr[1]), None)
        if not isinstance(job, _Job):
            if job is not None:
                reply(job)
            return
        if job.msg.version == ber.V1 and job.pdu.tag == ber.GETNEXT:
            task = asyncio.ensure_future(self._finish_async(job, reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return

        def done(resp: ber.PDU | Exception) -> None:
            try:
                reply(self._complete(job, resp))
            except Exception:  # a bug here must not break the agent socket's reader
                self.counters["internal_errors"] += 1
                self.ctx.log.exception("snmp: unexpected error completing a request")

        job.peer.start(job.pdu.tag, job.pdu.varbinds, job.non_rep, job.max_rep, done)

    async def _finish_async(self, job: _Job, reply: Callable[[bytes], None]) -> None:
        try:
            resp: ber.PDU | Exception = await job.peer.request(job.pdu.tag, job.pdu.varbinds, job.non_rep,
                                                               job.max_rep)
            assert isinstance(resp, ber.PDU)
            resp = await self._skip_counter64(job.peer, job.pdu, resp)
        except (AgentTimeout, AgentError) as e:
            resp = e
        reply(self._complete(job, resp))

    def _prepare(self, data: bytes, src: tuple[str, int], orig_dst: tuple[str, int] | None) -> _Job | bytes | None:
        """Everything before the agent: decode, choose the agent, flood limits, policy. Returns the
        reply (denials, errors), None (a silent drop), or a _Job to send to the agent."""
        t0 = time.perf_counter()
        guest = self.ctx.guests.lookup(src[0])
        srcs = addr_text(src)
        if self._draining:
            return None
        if len(data) > self.settings.limits.max_request_size:
            self._drop(guest, srcs, f"request of {len(data)} octets exceeds max_request_size", "snmp.malformed",
                       orig_dst=orig_dst)
            return None
        try:
            version = ber.decode_version(data)
        except ber.BERError as e:
            self._drop(guest, srcs, f"malformed SNMP message: {e}", "snmp.malformed", orig_dst=orig_dst)
            return None
        if version == ber.V3:
            self._drop(guest, srcs, "SNMPv3 from a guest is not proxied; allow the agent directly in a rule",
                       "snmp.v3-from-guest", counter="v3_from_guest", alarm="snmpv3 from guest", orig_dst=orig_dst)
            return None
        try:
            msg = ber.decode_community(data)
        except ber.BERError as e:
            self._drop(guest, srcs, f"malformed SNMP message: {e}", "snmp.malformed", orig_dst=orig_dst)
            return None
        pdu = msg.pdu
        if not isinstance(pdu, ber.PDU) or pdu.tag not in (ber.GET, ber.GETNEXT, ber.GETBULK, ber.SET):
            self._drop(guest, srcs, f"unexpected {ber.OP_NAMES.get(pdu.tag, 'unknown')} PDU on the agent port",
                       "snmp.malformed", orig_dst=orig_dst)
            return None
        community = msg.community.decode("latin-1")
        agent = self._select_agent(community, orig_dst)
        if agent is None:
            # Agents stay silent on a wrong community; so do we. The community is not recorded.
            self._drop(guest, srcs, "unknown community", "snmp.community", counter="unknown_community",
                       request={"op": ber.OP_NAMES[pdu.tag], "version": _ver(msg.version)}, orig_dst=orig_dst)
            return None
        now = time.monotonic()
        bucket = self._admit(guest, now)
        if bucket is None:
            self._flood(guest, srcs, now, "request flood")
            return None
        self.counters["requests"] += 1

        s = self.settings
        op = ber.OP_NAMES[pdu.tag]
        vbs = pdu.varbinds
        request = {"agent": agent.name, "op": op, "version": _ver(version), "oid_count": len(vbs),
                   "oids": [ber.oid_str(vb.oid) for vb in vbs[:OIDS_IN_AUDIT]]}
        extra: dict[str, Any] = {}
        if orig_dst is not None:
            extra["orig_dst"] = orig_dst  # formatted by ServiceContext.record (see _audit)
        non_rep = max_rep = 0
        if pdu.tag == ber.GETBULK:
            non_rep = min(max(pdu.error_status, 0), len(vbs))
            max_rep = min(max(pdu.error_index, 0), s.max_repetitions)
            request["non_repeaters"] = non_rep
            request["max_repetitions"] = max_rep
            if max_rep != pdu.error_index:
                extra["clamped_from"] = pdu.error_index

        qt = self.ctx.quarantine
        if qt and guest in qt:  # quarantined: refused whatever the rules say (docs/cli.md#quarantine-and-release)
            return self._captured(guest, src, orig_dst, data, msg, self._quarantined(msg, pdu, qt[guest], guest, srcs,
                                                                                     request, extra, t0))

        if len(vbs) > s.limits.max_varbinds:
            d = _guard("snmp.limits", f"{len(vbs)} varbinds exceed max_varbinds {s.limits.max_varbinds}")
            self.counters["denied"] += 1
            self._audit(d, guest, srcs, request, None, "tooBig", t0, extra)
            return self._encode(msg, pdu, translate.error_response(version, pdu, ber.TOO_BIG, 0))

        # Policy per requested OID; the first denial decides the whole request.
        engine = self.engine
        decision: Decision | None = None
        bad_index = 0
        for i, vb in enumerate(vbs):
            d = engine.decide("snmp", guest, {"agent": agent.name, "op": op, "oid": ber.oid_str(vb.oid)})
            if d.verdict is Verdict.DENY:
                decision, bad_index = d, i + 1
                break
            if decision is None or (d.verdict is Verdict.WOULD_DENY and decision.verdict is not Verdict.WOULD_DENY):
                decision = d
        if decision is None:  # an empty varbind list: decide the operation itself
            decision = engine.decide("snmp", guest, {"agent": agent.name, "op": op, "oid": "0"})
        if decision.verdict is Verdict.DENY and decision.code is ReasonCode.RATE_LIMITED:
            # Over a rule's rate: a temporary condition. SNMP has no "try later" status, so answer
            # nothing and let the guest's retry come back (like an overloaded agent).
            self.counters["denied"] += 1
            self._audit(decision, guest, srcs, request, None, "dropped (rate limited)", t0, extra)
            return self._captured(guest, src, orig_dst, data, msg, None)
        if decision.verdict is Verdict.DENY:
            self.counters["denied"] += 1
            status = ber.NO_ACCESS if pdu.tag == ber.SET else ber.AUTHORIZATION_ERROR
            out = translate.error_response(version, pdu, status, bad_index)
            self._audit(decision, guest, srcs, request, None, ber.error_name(out.error_status), t0, extra)
            return self._captured(guest, src, orig_dst, data, msg, self._encode(msg, pdu, out))
        if not vbs:
            self._audit(decision, guest, srcs, request, None, "noError", t0, extra)
            return self._encode(msg, pdu, ber.PDU(ber.RESPONSE, pdu.request_id, 0, 0, []))
        upstream = {"address": addr_text(agent.address), "security": "authPriv",
                    "auth": agent.credentials.auth_protocol, "priv": agent.credentials.priv_protocol}
        peer = self._peer(agent.address, agent.credentials, agent.timeout, agent.retries)
        bucket.inflight += 1
        self._inflight_jobs += 1
        job = _Job(msg, pdu, agent, guest, srcs, request, extra, decision, upstream, t0, peer, non_rep, max_rep,
                   bucket, engine)
        if decision.verdict is Verdict.WOULD_DENY and self.ctx.capture is not None:  # captured with its reply
            job.raw, job.local = data, orig_dst or self._local
        return job

    def _captured(self, guest: str, src: tuple[str, int], local: tuple[str, int] | None, data: bytes,
                  msg: ber.CommunityMessage, reply: bytes | None) -> bytes | None:
        """Hand a denied or quarantined request and our reply to forensic capture (protocols.capture),
        the community string masked (same length: the BER stays valid); returns `reply`."""
        cap = self.ctx.capture
        if cap is not None and cap.enabled:
            c = msg.community

            def hide(b: bytes) -> bytes:
                return b.replace(c, b"*" * len(c), 1) if c else b

            now = time.time()
            chunks = [(now, IN, hide(data))] + ([(now, OUT, hide(reply))] if reply else [])
            cap.flow(guest, "snmp", "udp", src, local or self._local, chunks)
        return reply

    def _quarantined(self, msg: ber.CommunityMessage, pdu: ber.PDU, qe: dict[str, Any], guest: str, srcs: str,
                     request: dict[str, Any], extra: dict[str, Any], t0: float) -> bytes:
        """Both profiles refuse (authorizationError, noAccess for a SET; v1 gets its translation);
        a honeypot guest's request is recorded in full (every varbind, SET values included)."""
        self.counters["quarantined"] += 1
        honeypot = qe.get("profile") == "honeypot"
        status = ber.NO_ACCESS if pdu.tag == ber.SET else ber.AUTHORIZATION_ERROR
        out = translate.error_response(msg.version, pdu, status, 1 if pdu.varbinds else 0)
        if honeypot:
            self.recorder.record(guest, qe, "snmp", {
                "src": srcs, **request, "request_id": pdu.request_id,
                "varbinds": [{"oid": ber.oid_str(vb.oid), "tag": vb.tag, "value": vb.value} for vb in pdu.varbinds],
            })
            extra = {**extra, "quarantine": "honeypot"}
        d = quarantine.decision("snmp", guest, qe, "refused, request recorded" if honeypot else "")
        self._audit(d, guest, srcs, request, None, ber.error_name(out.error_status), t0, extra)
        return self._encode(msg, pdu, out)

    def _encode(self, msg: ber.CommunityMessage, request: ber.PDU, out: ber.PDU) -> bytes:
        return translate.encode_bounded(msg.version, msg.community, out, self.settings.limits.max_response_size,
                                        request)

    def _complete(self, job: _Job, resp: ber.PDU | Exception) -> bytes:
        """The agent's answer (or failure) -> the guest's reply, audited."""
        job.bucket.inflight -= 1
        self._inflight_jobs -= 1
        version, pdu = job.msg.version, job.pdu
        if isinstance(resp, AgentTimeout):
            self.counters["agent_timeouts"] += 1
            self._audit(job.decision, job.guest, job.srcs, job.request, job.upstream, "agent timeout", job.t0,
                        job.extra)
            return self._encode(job.msg, pdu, translate.error_response(version, pdu, ber.GEN_ERR, 0))
        if isinstance(resp, Exception):
            self.counters["agent_errors"] += 1
            self._audit(job.decision, job.guest, job.srcs, job.request, job.upstream, str(resp), job.t0, job.extra)
            return self._encode(job.msg, pdu, translate.error_response(version, pdu, ber.GEN_ERR, 0))
        status = ber.error_name(resp.error_status)
        if pdu.tag in (ber.GETNEXT, ber.GETBULK) and resp.error_status == ber.NO_ERROR:
            filtered, cut = translate.filter_view(pdu, resp, job.non_rep,
                                                  self._view(job.engine, job.guest, job.agent.name,
                                                             job.request["op"]))
            if cut:
                job.extra["past_view"] = cut
            resp = ber.PDU(ber.RESPONSE, pdu.request_id, 0, 0, filtered)
        if version == ber.V1:
            out = translate.to_v1(pdu, resp)
        else:
            out = ber.PDU(ber.RESPONSE, pdu.request_id, resp.error_status, resp.error_index, resp.varbinds)
        if out.error_status and not resp.error_status:
            status = f"{ber.error_name(out.error_status)} (translated for v1)"
        data = self._encode(job.msg, pdu, out)
        self._audit(job.decision, job.guest, job.srcs, job.request, job.upstream, status, job.t0, job.extra)
        if job.raw:  # would_deny (monitor mode): the request and the answer the guest got
            host, _, port = job.srcs.rpartition(":")
            self._captured(job.guest, (host.strip("[]"), int(port)), job.local, job.raw, job.msg, data)
        return data

    def _view(self, engine: Any, guest: str, agent: str, op: str) -> Any:
        def allowed(oid: tuple[int, ...]) -> bool:
            # would_deny (monitor mode) lets results through, like the request itself
            return engine.decide("snmp", guest, {"agent": agent, "op": op, "oid": ber.oid_str(oid)}).allowed
        return allowed

    async def _skip_counter64(self, peer: V3Peer, req: ber.PDU, resp: ber.PDU) -> ber.PDU:
        """RFC 3584 §4.2.2.1.4: a v1 GETNEXT must step over Counter64 objects: ask again from them."""
        vbs = list(resp.varbinds)
        for _ in range(V1_SKIP_LIMIT):
            if resp.error_status or len(vbs) != len(req.varbinds):
                return resp
            again = [i for i, vb in enumerate(vbs) if vb.tag == ber.COUNTER64]
            if not again:
                return ber.PDU(ber.RESPONSE, resp.request_id, 0, 0, vbs)
            sub = await peer.request(ber.GETNEXT, [ber.VarBind(vbs[i].oid, vbs[i].oid_raw, ber.NULL, b"")
                                                   for i in again])
            if sub.error_status or len(sub.varbinds) != len(again):
                return ber.PDU(ber.RESPONSE, resp.request_id, sub.error_status or ber.GEN_ERR,
                               again[sub.error_index - 1] + 1 if 0 < sub.error_index <= len(again) else 0, vbs)
            for j, i in enumerate(again):
                vbs[i] = sub.varbinds[j]
        return ber.PDU(ber.RESPONSE, resp.request_id, ber.GEN_ERR, 0, vbs)

    def _audit(self, decision: Decision, guest: str, src: str, request: dict[str, Any],
               upstream: dict[str, Any] | None, status: str, t0: float, extra: dict[str, Any]) -> None:
        orig_dst = extra.get("orig_dst")
        if orig_dst is not None:
            extra = {k: v for k, v in extra.items() if k != "orig_dst"}
        self.ctx.record(decision, guest=guest, src=src, protocol="snmp", request=request, upstream=upstream,
                        orig_dst=orig_dst, elapsed=time.perf_counter() - t0, status=status, fields=extra)
        key = f"{request.get('op') or 'unknown'}/{_outcome(str(decision.verdict), status)}"
        if key in self.by_op or len(self.by_op) < 256:
            self.by_op[key] = self.by_op.get(key, 0) + 1

    # -- traps and informs -------------------------------------------------------------------
    async def handle_trap(self, data: bytes, src: tuple[str, int], orig_dst: tuple[str, int] | None = None
                          ) -> bytes | None:
        """One guest datagram on the trap port -> the reply (an INFORM's acknowledgement, sent only
        after every v3 INFORM receiver acknowledged), or None."""
        t0 = time.perf_counter()
        guest = self.ctx.guests.lookup(src[0])
        srcs = addr_text(src)
        if self._draining:
            return None
        try:
            version = ber.decode_version(data)
            if version == ber.V3:
                self._drop(guest, srcs, "SNMPv3 from a guest is not proxied", "snmp.v3-from-guest",
                           counter="v3_from_guest", alarm="snmpv3 from guest", orig_dst=orig_dst)
                return None
            msg = ber.decode_community(data, limit=self.settings.limits.max_varbinds + 8)
        except ber.BERError as e:
            self._drop(guest, srcs, f"malformed SNMP message: {e}", "snmp.malformed", orig_dst=orig_dst)
            return None
        pdu = msg.pdu
        if pdu.tag not in (ber.TRAP_V1, ber.TRAP_V2, ber.INFORM):
            self._drop(guest, srcs, f"unexpected {ber.OP_NAMES.get(pdu.tag, 'unknown')} PDU on the trap port",
                       "snmp.malformed", orig_dst=orig_dst)
            return None
        community = msg.community.decode("latin-1")
        s = self.settings
        if community not in s.communities and s.agent_by_community(community) is None:
            self._drop(guest, srcs, "unknown community", "snmp.community", counter="unknown_community",
                       request={"op": ber.OP_NAMES[pdu.tag], "version": _ver(msg.version)}, orig_dst=orig_dst)
            return None
        self.counters["traps_in"] += 1
        now = time.monotonic()
        if self._admit(guest, now) is None:
            self._flood(guest, srcs, now, "trap flood")
            return None
        try:
            vbs = _v2_trap_varbinds(pdu, src[0])
        except (ber.BERError, ValueError) as e:
            self._drop(guest, srcs, f"malformed trap: {e}", "snmp.malformed", orig_dst=orig_dst)
            return None
        trap_oid = next((ber.dec_oid(vb.value) for vb in vbs if vb.oid == SNMP_TRAP_OID and vb.tag == ber.OID), None)
        op = "inform" if pdu.tag == ber.INFORM else "trap"
        is_inform = pdu.tag == ber.INFORM
        if is_inform:
            key = (src[0], src[1], pdu.request_id)
            seen = self._informs_seen.get(key)
            if seen is not None and now - seen < 60:
                return None  # a retransmission while we wait for the receivers: answered by the first
            self._informs_seen[key] = now
            if len(self._informs_seen) > 10000:
                self._informs_seen = {k: v for k, v in self._informs_seen.items() if now - v < 60}
        request = {"op": op, "version": _ver(msg.version), "trap_oid": ber.oid_str(trap_oid) if trap_oid else None,
                   "oid_count": len(vbs)}
        jobs = []
        any_allowed = False
        first_deny: Decision | None = None
        for r in s.trap_receivers:
            d = self.engine.decide("snmp", guest, {"agent": r.name, "op": op,
                                                   "oid": ber.oid_str(trap_oid) if trap_oid else "0"})
            if not d.allowed:
                first_deny = first_deny or d
                self._audit(d, guest, srcs, {**request, "agent": r.name}, None, "denied", t0, {})
                continue
            any_allowed = True
            if self._trap_inflight >= s.limits.trap_queue:
                self.counters["traps_dropped"] += 1
                self._audit(_guard("snmp.limits", "trap queue full; dropped"), guest, srcs,
                            {**request, "agent": r.name}, None, "dropped", t0, {})
                continue
            self._trap_inflight += 1
            jobs.append(asyncio.ensure_future(self._forward(r, d, vbs, guest, srcs, request, t0)))
        if is_inform:
            if not any_allowed:
                if first_deny is None:  # no receivers configured: nobody will ever acknowledge it
                    self._audit(_guard("snmp.config", "no trap_receivers configured"), guest, srcs, request,
                                None, "dropped", t0, {})
                    return None
                self._informs_seen.pop((src[0], src[1], pdu.request_id), None)
                return translate.encode_bounded(msg.version, msg.community, translate.error_response(
                    msg.version, pdu, ber.AUTHORIZATION_ERROR, 0), s.limits.max_response_size, pdu)
            results = await asyncio.gather(*jobs)
            self._informs_seen.pop((src[0], src[1], pdu.request_id), None)
            if not jobs or not all(results):
                return None  # not acknowledged upstream: the guest retries
            self.counters["informs_acked"] += 1
            return ber.CommunityMessage(msg.version, msg.community,
                                        ber.PDU(ber.RESPONSE, pdu.request_id, 0, 0, pdu.varbinds)).encode()
        if not s.trap_receivers:
            self._audit(_guard("snmp.config", "no trap_receivers configured"), guest, srcs, request, None,
                        "dropped", t0, {})
        for j in jobs:
            self._tasks.add(j)
            j.add_done_callback(self._tasks.discard)
        return None

    async def _forward(self, r: TrapReceiver, d: Decision, vbs: list[ber.VarBind], guest: str, srcs: str,
                       request: dict[str, Any], t0: float) -> bool:
        upstream = {"address": r.name, "security": "authPriv", "auth": r.credentials.auth_protocol,
                    "priv": r.credentials.priv_protocol, "pdu": "inform" if r.inform else "trap"}
        req = {**request, "agent": r.name}
        try:
            if r.inform:
                peer = self._peer(r.address, r.credentials, r.timeout, r.retries)
                resp = await peer.request(ber.INFORM, vbs)
                ok = resp.error_status == 0
                status = "acknowledged" if ok else ber.error_name(resp.error_status)
            else:
                self._send_v3_trap(r, vbs)
                ok, status = True, "sent"
        except AgentTimeout:
            ok, status = False, "receiver timeout; dropped"
        except (AgentError, OSError) as e:
            ok, status = False, f"{e}; dropped"
        finally:
            self._trap_inflight -= 1
        self.counters["traps_forwarded" if ok else "traps_dropped"] += 1
        self._audit(d, guest, srcs, req, upstream, status, t0, {})
        return ok

    def _send_v3_trap(self, r: TrapReceiver, vbs: list[ber.VarBind]) -> None:
        """A v3 TRAP: the proxy is the authoritative engine (its engine_id, boots, time)."""
        c = r.credentials
        eid = self.settings.engine_id
        key = (eid, c.user, c.auth_protocol, c.auth_password, c.priv_protocol, c.priv_password)
        keys = self._trap_keys.get(key)
        if keys is None:
            keys = usm.localize(c.auth_protocol, c.auth_password.reveal(), c.priv_protocol,
                                c.priv_password.reveal(), eid)
            self._trap_keys[key] = keys
        self._trap_ids = (self._trap_ids + 1) & 0x7FFFFFFF
        etime = min(int(time.monotonic() - self._started), 0x7FFFFFFF)
        pdu = ber.PDU(ber.TRAP_V2, self._trap_ids, 0, 0, vbs).encode()
        data = usm.build_authpriv(keys, c.user.encode(), msg_id=self._trap_ids, boots=self._boots, etime=etime,
                                  salt=self._salt.next(), pdu_bytes=pdu, reportable=False)
        fam = socket.AF_INET6 if ":" in r.address[0] else socket.AF_INET
        sock = self._trap_socks.get(fam)
        if sock is None:
            sock = self._trap_socks[fam] = socket.socket(fam, socket.SOCK_DGRAM)
            sock.setblocking(False)
        try:
            sock.sendto(data, r.address)
        except BlockingIOError:
            raise OSError("trap socket buffer full") from None


def _v2_trap_varbinds(pdu: ber.PDU | ber.TrapV1, src_ip: str) -> list[ber.VarBind]:
    """SNMPv2 trap varbinds (RFC 3584 §3.1) with snmpTrapAddress.0 = the guest's address."""
    try:
        addr = ipaddress.ip_address(src_ip)
        ip4 = addr.packed if addr.version == 4 else (addr.ipv4_mapped.packed if addr.ipv4_mapped else None)
    except ValueError:
        ip4 = None
    if isinstance(pdu, ber.TrapV1):
        if pdu.generic == 6:
            trap_oid = (*pdu.enterprise, 0, pdu.specific)
        elif 0 <= pdu.generic <= 5:
            trap_oid = (*SNMP_TRAPS, pdu.generic + 1)
        else:
            raise ValueError(f"generic-trap {pdu.generic} out of range")
        vbs = [ber.varbind(SYS_UPTIME, ber.TIMETICKS, ber.uint_content(pdu.timestamp & 0xFFFFFFFF)),
               ber.varbind(SNMP_TRAP_OID, ber.OID, ber.oid_content(trap_oid)),
               *[vb for vb in pdu.varbinds if vb.oid not in (SNMP_TRAP_ADDRESS, SNMP_TRAP_ENTERPRISE)]]
        if ip4 is not None:
            vbs.append(ber.varbind(SNMP_TRAP_ADDRESS, ber.IPADDRESS, ip4))
        vbs.append(ber.varbind(SNMP_TRAP_ENTERPRISE, ber.OID, ber.oid_content(pdu.enterprise)))
        return vbs
    vbs = list(pdu.varbinds)
    if len(vbs) < 2 or vbs[0].oid != SYS_UPTIME or vbs[1].oid != SNMP_TRAP_OID or vbs[1].tag != ber.OID:
        raise ValueError("a v2 trap must start with sysUpTime.0 and snmpTrapOID.0")
    vbs = [vb for vb in vbs if vb.oid != SNMP_TRAP_ADDRESS]  # the guest does not get to choose it
    if ip4 is not None:
        vbs.append(ber.varbind(SNMP_TRAP_ADDRESS, ber.IPADDRESS, ip4))
    return vbs


def _outcome(verdict: str, status: str) -> str:
    """A bounded outcome label for /metrics: ok, denied, timeout, an SNMP error name, or error."""
    if verdict == "deny":
        return "denied"
    if status == "noError":
        return "ok"
    if status == "agent timeout":
        return "timeout"
    return status if status.isalpha() and len(status) <= 24 else "error"


def _ver(version: int) -> str:
    return "v1" if version == ber.V1 else "v2c"


_log = logging.getLogger(__name__)
