"""WebSocket through the transparent listener: upgraded to WSS, echoed by the lab, bounded memory."""

from __future__ import annotations

import asyncio
import os

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocols.http.settings import LimitSettings
from tests.protocols.http.conftest import GUEST_IP, eventually

pytestmark = pytest.mark.lab


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def ws(r, **kw):
    host, port = r.addr("transparent")
    return connect(
        "ws://ws.lab.test/ws", host=host, port=port, local_addr=(GUEST_IP, 0),
        compression=None, max_size=None, ping_interval=None, **kw,
    )


async def test_websocket_echo_goes_out_as_wss(svc) -> None:
    async with ws(svc) as conn:
        await conn.send("hello")
        assert await conn.recv() == "hello"
        blob = os.urandom(200_000)
        await conn.send(blob)
        assert await conn.recv() == blob
    # nginx logs a WebSocket request when it ends; our close record lands after the close, too
    lines = await eventually(lambda: [x for x in svc.lab.log("main").splitlines() if "GET /ws" in x])
    assert " 101 " in lines[-1] and "ssl=TLSv1.3 sni=ws.lab.test" in lines[-1]
    closed = await eventually(lambda: svc.records(protocol="ws", event="closed"))
    rec = svc.records(protocol="ws", status=101)[0]
    assert rec["rule"] == "lab-ws" and rec["upstream"]["tls"] == "TLSv1.3" and rec["upstream"]["verified"]
    assert closed[-1]["bytes_in"] > 200_000 and closed[-1]["bytes_out"] > 200_000


async def test_websocket_upgrade_needs_a_ws_rule(make_service) -> None:
    rules = """\
default: deny
rules:
  - id: web-only
    action: allow
    protocol: http
    match: {host: [ws.lab.test]}
"""
    r = await make_service(rules=rules)
    with pytest.raises(InvalidStatus) as e:
        async with ws(r):
            pass
    assert e.value.response.status_code == 403
    assert b"blocked by proxyvm rule default" in e.value.response.body
    assert r.records(protocol="ws", verdict="deny")


async def test_websocket_message_limit_closes_1009(make_service) -> None:
    r = await make_service(limits=LimitSettings(ws_message=64 * 1024))
    async with ws(r) as conn:
        await conn.send(b"x" * 1000)
        assert await conn.recv() == b"x" * 1000
        await conn.send(b"y" * 100_000)
        with pytest.raises(ConnectionClosed) as e:
            await conn.recv()
    assert e.value.rcvd is not None and e.value.rcvd.code == 1009


async def test_websocket_memory_flat_over_long_stream(svc) -> None:
    """200 MB each way through the proxy (the bench runs 1 GB): RSS must not follow the traffic."""
    chunk = os.urandom(64 * 1024)
    total = 200 * 1024 * 1024
    n = total // len(chunk)
    async with ws(svc) as conn:
        for _ in range(20):  # warm up buffers and allocator pools first
            await conn.send(chunk)
            await conn.recv()
        before = rss_kib()

        async def sender() -> None:
            for _ in range(n):
                await conn.send(chunk)

        task = asyncio.create_task(sender())
        got = 0
        peak = before
        for i in range(n):
            got += len(await conn.recv())
            if i % 256 == 0:
                peak = max(peak, rss_kib())
        await task
    assert got == n * len(chunk)
    growth_mib = (max(peak, rss_kib()) - before) / 1024
    assert growth_mib < 50, f"RSS grew {growth_mib:.1f} MiB over a {total >> 20} MiB stream"


async def test_websocket_rule_max_message_limit(make_service) -> None:
    rules = """\
default: deny
rules:
  - id: small-ws
    action: allow
    protocol: ws
    match: {host: [ws.lab.test], max_message: 2000}
"""
    r = await make_service(rules=rules)
    async with ws(r) as conn:
        await conn.send("a" * 1500)
        assert await conn.recv() == "a" * 1500
        await conn.send("b" * 3000)
        with pytest.raises(ConnectionClosed) as e:
            await conn.recv()
    assert e.value.rcvd is not None and e.value.rcvd.code == 1009
    closed = await eventually(lambda: r.records(protocol="ws", event="closed"))
    assert closed[-1]["status"] == 1009
