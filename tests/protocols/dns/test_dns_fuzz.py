"""Fuzzed packets never crash a listener: hypothesis-generated datagrams and TCP frames (random
bytes, mutated real queries, valid headers with garbage bodies) against a running DNSService;
after every packet a real query must still be answered, and no internal error may be counted."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from pathlib import Path

import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import load_policy
from protocols.base import MemoryAudit, ServiceContext, StaticGuests
from protocols.dns.service import DNSService
from tests.labs.proc import free_port
from tests.protocols.dns.conftest import DEFAULT_RULES, PROXY_IP, needs_peers, settings_from_yaml

pytestmark = [needs_peers, pytest.mark.lab]

BASES = [
    dns.message.make_query(n, t, use_edns=e, want_dnssec=d).to_wire()
    for n, t, e, d in (
        ("www.lab.test", "A", False, False), ("www.lab.test", "AAAA", 0, True), ("nx.lab.test", "MX", 0, False),
        ("big.lab.test", "TXT", False, False),
    )
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    b = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "count"]))
        if op == "flip" and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del b[draw(st.integers(0, len(b))):]
        elif op == "insert":
            i = draw(st.integers(0, len(b)))
            b[i:i] = draw(st.binary(min_size=1, max_size=20))
        elif op == "count" and len(b) >= 12:
            i = draw(st.sampled_from([4, 6, 8, 10]))
            b[i : i + 2] = struct.pack("!H", draw(st.integers(0, 65535)))
    return bytes(b)


@st.composite
def header_then_garbage(draw: st.DrawFn) -> bytes:
    flags = draw(st.integers(0, 0xFFFF)) & 0x7FFF  # QR=0 so it is treated as a query
    counts = [draw(st.integers(0, 3)) for _ in range(4)]
    return struct.pack("!HHHHHH", draw(st.integers(0, 0xFFFF)), flags, *counts) + draw(st.binary(max_size=300))


PACKETS = st.one_of(st.binary(max_size=700), mutated(), header_then_garbage())


class ThreadedProxy:
    """The service in its own thread and loop, so a synchronous hypothesis test can drive it."""

    def __init__(self, settings, engine) -> None:
        self.audit = MemoryAudit()
        self.ctx = ServiceContext(settings=settings, engine=engine, audit=self.audit, guests=StaticGuests({}),
                                  log=logging.getLogger("test.dns.fuzz"))
        self.svc = DNSService(self.ctx)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop_ev: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_ev = asyncio.Event()
            await self.svc.start()
            self.ready.set()
            await self.stop_ev.wait()
            await self.svc.drain(1)

        self.loop.run_until_complete(main())

    def start(self) -> ThreadedProxy:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        assert self.stop_ev is not None
        self.loop.call_soon_threadsafe(self.stop_ev.set)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fuzz_proxy(upstream1, lab_ca, tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    port = free_port(PROXY_IP)
    s = settings_from_yaml(f"""
    dns:
      listen: ["{PROXY_IP}:{port}"]
      ca_file: {lab_ca.ca_pem}
      dnssec: off
      upstreams:
        - {{address: "{upstream1.address}:853", name: {upstream1.name}}}
    """, tmp)
    (tmp / "rules.yaml").write_text(DEFAULT_RULES)
    tp = ThreadedProxy(s, load_policy(tmp / "rules.yaml")).start()
    tp.port = port
    yield tp
    tp.stop()


def _probe_udp(sock: socket.socket, port: int, qid: int) -> None:
    q = dns.message.make_query("www.lab.test", "A")
    q.id = qid
    sock.sendto(q.to_wire(), (PROXY_IP, port))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = sock.recv(65535)
        if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == qid and data[2] & 0x80:
            m = dns.message.from_wire(data)
            if m.question and m.question[0].name.to_text() == "www.lab.test.":
                assert m.rcode() == 0 and m.answer
                return
    pytest.fail("the listener stopped answering")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=PACKETS)
def test_udp_fuzz_never_kills_the_listener(fuzz_proxy, packet: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(packet, (PROXY_IP, fuzz_proxy.port))
        # any answer to the fuzz packet must be a well-formed response carrying its ID
        _probe_udp(s, fuzz_proxy.port, 0xBEEF if packet[:2] != b"\xbe\xef" else 0xCAFE)
    assert fuzz_proxy.svc.stats["internal_errors"] == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=PACKETS)
def test_tcp_fuzz_never_kills_the_listener(fuzz_proxy, packet: bytes) -> None:
    with socket.create_connection((PROXY_IP, fuzz_proxy.port), timeout=5) as c:
        c.sendall(struct.pack("!H", len(packet)) + packet)
        q = dns.message.make_query("www.lab.test", "A")
        q.id = 0xBEEF
        c.sendall(struct.pack("!H", len(q.to_wire())) + q.to_wire())
        buf = b""
        got = False
        while not got:
            chunk = c.recv(65535)
            if not chunk:
                break  # the connection may be closed after garbage; the listener must live on
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                ln = struct.unpack("!H", buf[:2])[0]
                frame, buf = buf[2 : 2 + ln], buf[2 + ln :]
                assert len(frame) >= 12 and frame[2] & 0x80  # every answer is a DNS response
                if frame[:2] == b"\xbe\xef" and dns.message.from_wire(frame).answer:
                    got = True
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        _probe_udp(s, fuzz_proxy.port, 0xBEEF)
    assert fuzz_proxy.svc.stats["internal_errors"] == 0
