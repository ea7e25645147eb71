"""Small asyncio SNMPv2c GET load generator for bench/snmp.sh (not a test).

Keeps N requests outstanding against one target for D seconds and prints gets/s, errors and
timeouts as JSON. Every answer is checked: right request-id, no error-status, no exception value.

    python bench/snmp_loadgen.py --target 127.0.6.1:16161 --community labcomm -n 32 -d 5 1.3.6.1.2.1.1.5.0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from protocols.snmp import ber  # noqa: E402


class Load(asyncio.DatagramProtocol):
    def __init__(self, community: bytes, oids: list[tuple[int, ...]], outstanding: int, timeout: float):
        self.community, self.oids, self.n, self.timeout = community, oids, outstanding, timeout
        self.next_id = 1
        self.sent: dict[int, float] = {}
        self.ok = self.errors = self.timeouts = 0
        self.lat: list[float] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.running = True

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def send_one(self) -> None:
        rid = self.next_id
        self.next_id = (self.next_id + 1) & 0x7FFFFFFF or 1
        vbs = [ber.varbind(o) for o in self.oids]
        msg = ber.CommunityMessage(ber.V2C, self.community, ber.PDU(ber.GET, rid, 0, 0, vbs)).encode()
        self.sent[rid] = time.perf_counter()
        assert self.transport is not None
        self.transport.sendto(msg)

    def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
        try:
            m = ber.decode_community(data)
        except ber.BERError:
            self.errors += 1
            return
        t = self.sent.pop(m.pdu.request_id, None)
        if t is None:
            return
        pdu = m.pdu
        if isinstance(pdu, ber.PDU) and pdu.error_status == 0 and all(vb.tag not in ber.EXCEPTIONS for vb in pdu.varbinds):
            self.ok += 1
            self.lat.append(time.perf_counter() - t)
        else:
            self.errors += 1
        if self.running:
            self.send_one()

    def reap(self) -> None:
        now = time.perf_counter()
        for rid, t in list(self.sent.items()):
            if now - t > self.timeout:
                del self.sent[rid]
                self.timeouts += 1
                if self.running:
                    self.send_one()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--community", default="public")
    ap.add_argument("-n", type=int, default=32, help="outstanding requests")
    ap.add_argument("-d", type=float, default=5.0, help="seconds")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("oids", nargs="*", default=["1.3.6.1.2.1.1.5.0"])
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    loop = asyncio.get_running_loop()
    proto = Load(a.community.encode(), [ber.oid_parse(o) for o in a.oids], a.n, 1.0)
    tr, _ = await loop.create_datagram_endpoint(lambda: proto, remote_addr=(host, int(port)))
    for _ in range(a.n):
        proto.send_one()
    end_warm = time.perf_counter() + a.warmup
    while time.perf_counter() < end_warm:
        await asyncio.sleep(0.1)
        proto.reap()
    proto.ok = proto.errors = proto.timeouts = 0
    proto.lat.clear()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < a.d:
        await asyncio.sleep(0.1)
        proto.reap()
    elapsed = time.perf_counter() - t0
    ok = proto.ok
    proto.running = False
    tr.close()
    lat = sorted(proto.lat) or [0.0]
    print(json.dumps({"gets_per_s": round(ok / elapsed, 1), "ok": ok, "errors": proto.errors,
                      "timeouts": proto.timeouts, "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
                      "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2)}))


if __name__ == "__main__":
    asyncio.run(main())
