"""The proxy as an SNMPv3 requester: one authoritative engine (an agent, or an INFORM receiver)
reached over one UDP socket, always at authPriv.

Owns: engine-ID discovery (cached per peer, redone on unknownEngineID), engine boots/time tracking
and notInTimeWindow resync, the USM time-window check on responses, msgID/request-id allocation
(guests' request-ids never leave the proxy), per-attempt timeout and retries.
Must not: know about guests, communities or policy; log or raise with key material.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocols.addr import addr_text
from protocols.snmp import ber, usm
from protocols.snmp.settings import Credentials
from protocols.snmp.udp import UDPEndpoint

log = logging.getLogger(__name__)


class AgentTimeout(Exception):
    """No valid answer after every attempt."""


class AgentError(Exception):
    """The peer answered with a USM report we cannot recover from (e.g. unknownUserNames)."""


@dataclass(slots=True)
class _Engine:
    engine_id: bytes
    boots: int
    time: int
    local_at: float  # monotonic time when `time` was learned
    keys: usm.LocalKeys | None

    def now(self) -> tuple[int, int]:
        return self.boots, min(self.time + int(time.monotonic() - self.local_at), 0x7FFFFFFF)


@dataclass(slots=True)
class _Report:
    name: str
    authenticated: bool


_DISCOVERY = object()


@dataclass(slots=True)
class _Call:
    """One request in flight: re-sent on timeout or resync, `done` called exactly once with the
    response PDU or an AgentTimeout/AgentError."""

    tag: int
    varbinds: list[ber.VarBind]
    non_repeaters: int
    max_repetitions: int
    done: Callable[[ber.PDU | Exception], None]
    attempts_left: int
    resyncs: int = 0
    msg_id: int = 0
    msg_ids: list[int] | None = None  # every attempt's msgID: a late answer to any of them is fine
    timer: asyncio.TimerHandle | None = None
    finished: bool = False


class V3Peer:
    """`await peer.request(ber.GET, varbinds)` -> response PDU; raises AgentTimeout / AgentError."""

    _ids = itertools.count(int.from_bytes(os.urandom(3), "big"))

    def __init__(self, address: tuple[str, int], credentials: Credentials, *, timeout: float, retries: int,
                 max_size: int = 65507):
        self.address = address
        self.credentials = credentials
        self.timeout = timeout
        self.retries = retries
        self.max_size = max_size
        self.user = credentials.user.encode()
        self.transport: UDPEndpoint | None = None
        self._engine: _Engine | None = None
        self._discovering: asyncio.Future[_Engine] | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], object]] = {}
        self._salt = usm.SaltCounter()
        self._tasks: set[asyncio.Future[Any]] = set()
        self.counters = {"requests": 0, "timeouts": 0, "bad_digest": 0, "late": 0, "malformed": 0,
                         "resyncs": 0, "discoveries": 0, "icmp_errors": 0, "outside_window": 0}
        self.last_used = time.monotonic()

    # -- I/O ---------------------------------------------------------------------------------
    def _open(self) -> UDPEndpoint:
        if self.transport is None:
            try:
                self.transport = UDPEndpoint.connect(self.address, lambda data, _addr: self._received(data),
                                                     self._icmp_error)
            except OSError as e:
                raise AgentError(f"cannot open a socket to {addr_text(self.address)}: "
                                 f"{e.strerror or e}") from None
        return self.transport

    def _icmp_error(self, exc: OSError) -> None:
        # ICMP port unreachable and friends: the attempt's timer decides; nothing else to do.
        self.counters["icmp_errors"] += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        pending = list(self._pending.values())
        self._pending.clear()
        for obj, _kind in pending:
            if isinstance(obj, _Call):
                self._finish(obj, AgentError("peer closed"))
            elif not obj.done():
                obj.set_exception(AgentError("peer closed"))

    def _received(self, data: bytes) -> None:
        try:
            msg = ber.decode_v3(data)
        except ber.BERError:
            self.counters["malformed"] += 1
            return
        entry = self._pending.get(msg.msg_id)
        if entry is None:
            self.counters["late"] += 1
            return
        obj, kind = entry
        try:
            result = self._open_reply(msg, data, kind)
        except (ber.BERError, usm.USMError):
            self.counters["malformed"] += 1
            return
        if result is None:
            return  # not acceptable (bad digest, outside the window): keep waiting
        if isinstance(obj, _Call):
            self._on_result(obj, result, msg.msg_id)
        elif not obj.done():
            obj.set_result(result)

    def _open_reply(self, msg: ber.V3Message, data: bytes, kind: object) -> Any:
        if kind is _DISCOVERY:
            _, _, pdu = usm.open_message(None, msg, data)
            if pdu.tag != ber.REPORT or not msg.engine_id:
                raise usm.USMError("discovery answer is not a report with an engine ID")
            return _Engine(msg.engine_id, msg.boots, msg.time, time.monotonic(), None)
        eng = self._engine
        if not msg.flags & usm.FLAG_AUTH:
            # Unauthenticated reports can only make us rediscover or give up this request.
            _, _, pdu = usm.open_message(None, msg, data)
            if pdu.tag != ber.REPORT:
                raise usm.USMError("unauthenticated non-report")
            return _Report(self._report_name(pdu), False)
        if eng is None or eng.keys is None or msg.engine_id != eng.engine_id:
            raise usm.USMError("message from an unexpected engine")
        try:
            _, _, pdu = usm.open_message(eng.keys, msg, data)
        except usm.USMError:
            self.counters["bad_digest"] += 1
            return None
        if pdu.tag == ber.REPORT:
            name = self._report_name(pdu)
            if name == "notInTimeWindows":
                # RFC 3414 §3.2.7: an authentic notInTimeWindow report carries the current clock.
                self._engine = _Engine(eng.engine_id, msg.boots, msg.time, time.monotonic(), eng.keys)
            return _Report(name, True)
        if not self._in_window(eng, msg):
            self.counters["outside_window"] += 1
            return None
        if not msg.flags & usm.FLAG_PRIV:
            raise usm.USMError("response without privacy")
        return pdu

    def _in_window(self, eng: _Engine, msg: ber.V3Message) -> bool:
        boots, now = eng.now()
        if msg.boots < boots or msg.boots == 0x7FFFFFFF:
            return False
        if msg.boots > boots or msg.time > now:
            self._engine = _Engine(eng.engine_id, msg.boots, msg.time, time.monotonic(), eng.keys)
            return True
        return msg.time >= now - usm.TIME_WINDOW

    @staticmethod
    def _report_name(pdu: ber.PDU) -> str:
        if pdu.varbinds:
            return usm.REPORT_NAMES.get(pdu.varbinds[0].oid, ber.oid_str(pdu.varbinds[0].oid))
        return "empty report"

    async def _exchange(self, msg_id: int, data: bytes, kind: object, timeout: float) -> Any:
        tr = self._open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[msg_id] = (fut, kind)
        timer = loop.call_later(timeout, _expire, fut)
        try:
            tr.sendto(data)
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(msg_id, None)

    # -- engine ------------------------------------------------------------------------------
    async def _get_engine(self) -> _Engine:
        if self._engine is not None:
            return self._engine
        if self._discovering is None:
            self._discovering = asyncio.get_running_loop().create_future()
            disc = self._discovering
            try:
                eng = await self._discover()
                disc.set_result(eng)
            except BaseException as e:
                disc.set_exception(e)
                disc.exception()  # mark retrieved for waiters that are gone
                raise
            finally:
                self._discovering = None
            return eng
        return await asyncio.shield(self._discovering)

    async def _discover(self) -> _Engine:
        self.counters["discoveries"] += 1
        for _ in range(self.retries + 1):
            msg_id = next(self._ids) & 0x7FFFFFFF
            got = await self._exchange(msg_id, usm.build_discovery(msg_id, msg_id, self.max_size), _DISCOVERY,
                                       self.timeout)
            if isinstance(got, _Engine):
                c = self.credentials
                got.keys = usm.localize(c.auth_protocol, c.auth_password.reveal(), c.priv_protocol,
                                        c.priv_password.reveal(), got.engine_id)
                self._engine = got
                return got
        raise AgentTimeout("engine discovery timed out")

    @property
    def engine_id(self) -> bytes | None:
        return self._engine.engine_id if self._engine else None

    # -- requests ----------------------------------------------------------------------------
    def start(self, tag: int, varbinds: list[ber.VarBind], non_repeaters: int, max_repetitions: int,
              done: Callable[[ber.PDU | Exception], None]) -> None:
        """Send a request now (no task, no future: the hot path) and call `done` exactly once
        with the response PDU or an AgentTimeout/AgentError. Discovery, when needed, runs first."""
        self.counters["requests"] += 1
        self.last_used = time.monotonic()
        call = _Call(tag, varbinds, non_repeaters, max_repetitions, done, self.retries + 1)
        self._send(call)

    async def request(self, tag: int, varbinds: list[ber.VarBind], non_repeaters: int = 0,
                      max_repetitions: int = 0) -> ber.PDU:
        fut: asyncio.Future[ber.PDU | Exception] = asyncio.get_running_loop().create_future()
        self.start(tag, varbinds, non_repeaters, max_repetitions,
                   lambda r: fut.done() or fut.set_result(r))
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    def _send(self, call: _Call) -> None:
        eng = self._engine
        if eng is None or eng.keys is None:
            task = asyncio.ensure_future(self._discover_then_send(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            tr = self._open()
        except AgentError as e:
            self._finish(call, e)
            return
        msg_id = next(self._ids) & 0x7FFFFFFF
        pdu = ber.PDU(call.tag, msg_id, call.non_repeaters, call.max_repetitions, call.varbinds).encode()
        boots, etime = eng.now()
        data = usm.build_authpriv(eng.keys, self.user, msg_id=msg_id, boots=boots, etime=etime,
                                  salt=self._salt.next(), pdu_bytes=pdu, reportable=True, max_size=self.max_size)
        call.msg_id = msg_id
        if call.msg_ids is None:
            call.msg_ids = [msg_id]
        else:
            call.msg_ids.append(msg_id)
        call.attempts_left -= 1
        self._pending[msg_id] = (call, None)
        call.timer = asyncio.get_running_loop().call_later(self.timeout, self._expired, call, msg_id)
        tr.sendto(data)

    async def _discover_then_send(self, call: _Call) -> None:
        try:
            await self._get_engine()
        except (AgentTimeout, AgentError) as e:
            self._finish(call, e)
            return
        self._send(call)

    def _expired(self, call: _Call, msg_id: int) -> None:
        if call.finished or call.msg_id != msg_id:
            return
        self.counters["timeouts"] += 1
        if call.attempts_left > 0:
            self._send(call)
        else:
            self._finish(call, AgentTimeout("agent timeout"))

    def _on_result(self, call: _Call, result: Any, msg_id: int) -> None:
        if call.finished:
            return
        if call.timer is not None:
            call.timer.cancel()
        if isinstance(result, ber.PDU):
            if result.request_id != msg_id:
                self._retry_or_fail(call, AgentError("response with a wrong request-id"))
                return
            self._finish(call, result)
            return
        assert isinstance(result, _Report)
        if result.name == "notInTimeWindows" and result.authenticated and call.resyncs < 2:
            self.counters["resyncs"] += 1
            call.resyncs += 1
            call.attempts_left += 1  # the clock is fixed now; does not use up an attempt
            self._send(call)
            return
        if result.name == "unknownEngineIDs" and call.resyncs < 2:
            self._engine = None  # agent re-keyed or rebooted with a new ID: rediscover
            call.resyncs += 1
            call.attempts_left += 1
            self._send(call)
            return
        self._finish(call, AgentError(f"agent reported {result.name}"))

    def _retry_or_fail(self, call: _Call, exc: Exception) -> None:
        if call.attempts_left > 0:
            self._send(call)
        else:
            self._finish(call, exc)

    def _finish(self, call: _Call, result: ber.PDU | Exception) -> None:
        if call.finished:
            return
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()
        for mid in call.msg_ids or ():
            self._pending.pop(mid, None)
        call.done(result)

    def send_unconfirmed(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.sendto(data)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)
