#!/usr/bin/env python3
"""Fleet benchmark: N simulated nodes publishing real-format audit records into a real 3-server
NATS JetStream cluster (R3, TLS, file storage) on this machine.

Each simulated node is a lightweight publisher with its own hash chain (lines built exactly as the
supervisor's writer splices them: `{"seq":N,...,"prev":"<sha256 of the previous line>"}`), the
fleet's subjects and message ids, and a window of publishes in flight (proxyvm.fleet.shipper's
way). It also watches the policy key and verifies each bundle's Ed25519 signature, as a node does.

Per node count it measures:
  * records/s sustained: every node publishing as fast as its window allows (saturation);
  * end-to-end lag p50/p99 at a fixed offered rate: record created -> stored (R3) -> delivered to a
    JetStream consumer of the whole stream;
  * policy push -> verified on all nodes p99 (a signed bundle put into KV, each node's watch sees
    it and checks the signature).
Everything runs on this machine (publishers, consumer and three servers share its cores): the
figures are a floor for a real deployment.

    .venv/bin/python bench/fleet.py [--nodes 10,50,100,200] [--rate 20] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import orjson  # noqa: E402

from proxyvm.audit import MilliClock  # noqa: E402
from proxyvm.fleet import msg_id, subject  # noqa: E402
from proxyvm.fleet.bundle import check_bundle, keygen, load_private_key, load_public_key, make_bundle  # noqa: E402
from tests.labs.nats_lab import NatsCluster  # noqa: E402
from tests.labs.pki import LabCA  # noqa: E402

WINDOW = 256


class SimNode:
    def __init__(self, name: str, cluster: NatsCluster, pub: object):
        self.name, self.cluster, self.pub = name, cluster, pub
        self.seq, self.prev = 0, b"0" * 64
        self.clock = MilliClock()
        self.acked = 0
        self.policy_seen: dict[int, float] = {}

    def line(self) -> bytes:
        self.seq += 1
        body = orjson.dumps({
            "ts": self.clock(), "guest": "web1", "src": "198.18.0.10:40312", "protocol": "dns",
            "verdict": "allow", "rule": "dns-corp", "at": "rules.yaml:5",
            "reason": "qname www.example.com matches *.example.com",
            "request": {"qname": f"host{self.seq % 997}.example.com", "qtype": "A"},
            "upstream": {"address": "9.9.9.9:853", "tls": "TLSv1.3", "verified": True},
            "rcode": "NOERROR", "duration_ms": 3.2, "cache": "miss", "policy": "sha256:" + "ab" * 32})
        line = b'{"seq":%d,%s,"prev":"%s"}' % (self.seq, body[1:-1], self.prev)
        self.prev = hashlib.sha256(line).hexdigest().encode()
        return line

    async def connect(self) -> None:
        self.nc = await self.cluster.connect("admin")
        self.js = self.nc.jetstream(timeout=10)
        self.subj = subject(self.name, "dns")

    async def publish(self, until: float, rate: float | None) -> None:
        inflight: list[asyncio.Future] = []
        interval = 1.0 / rate if rate else 0.0
        nxt = time.monotonic()
        while time.monotonic() < until:
            if rate:
                delay = nxt - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                nxt += interval
            line = self.line()
            fut = await self.js.publish_async(self.subj, line, stream="PROXYVM_AUDIT", headers={
                "Nats-Msg-Id": msg_id(self.name, "audit", self.seq), "Bench-T": repr(time.time())})
            inflight.append(fut)
            if len(inflight) >= WINDOW:
                await asyncio.wait_for(inflight[0], 10)
                inflight = [f for f in inflight if not f.done()]
        for f in inflight:
            await asyncio.wait_for(f, 10)

    async def watch_policy(self) -> None:
        kv = await self.js.key_value("PROXYVM_POLICY")
        w = await kv.watch("current")
        async for e in w:
            if e is None or e.value is None:
                continue
            b = check_bundle(e.value, self.pub)  # the node's own check: signature and digest
            self.policy_seen[b.revision] = time.time()

    async def close(self) -> None:
        await self.nc.close()


async def consumer(cluster: NatsCluster, lags: list[float], stop: asyncio.Event) -> None:
    nc = await cluster.connect("admin")
    js = nc.jetstream()
    from nats.js.api import DeliverPolicy

    async def cb(msg: object) -> None:
        t = msg.headers.get("Bench-T") if msg.headers else None  # type: ignore[attr-defined]
        if t:
            lags.append(time.time() - float(t))

    sub = await js.subscribe("proxyvm.audit.>", cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
    await stop.wait()
    await sub.unsubscribe()
    await nc.close()


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def run_size(cluster: NatsCluster, n: int, rate: float, seconds: float, key_dir: Path, pub: object,
                   offset: int) -> dict[str, float]:
    nodes = [SimNode(f"sim-{offset + i}", cluster, pub) for i in range(n)]
    for i in range(0, n, 20):
        await asyncio.gather(*(x.connect() for x in nodes[i:i + 20]))
    watchers = [asyncio.create_task(x.watch_policy()) for x in nodes]
    # saturation
    t0 = time.monotonic()
    await asyncio.gather(*(x.publish(t0 + seconds / 2, None) for x in nodes))
    sat = sum(x.seq for x in nodes) / (time.monotonic() - t0)
    # fixed rate, lag through a consumer
    lags: list[float] = []
    stop = asyncio.Event()
    ct = asyncio.create_task(consumer(cluster, lags, stop))
    await asyncio.sleep(0.5)
    before = sum(x.seq for x in nodes)
    t1 = time.monotonic()
    pushes = []
    pub_task = asyncio.gather(*(x.publish(t1 + seconds, rate) for x in nodes))
    # policy pushes during the fixed-rate phase
    key = load_private_key(key_dir / "signing.key")
    nc = await cluster.connect("admin")
    kv = await nc.jetstream().key_value("PROXYVM_POLICY")
    cur = await kv.get("current") if (await kv.status()).values else None
    rev = json.loads(cur.value)["revision"] if cur else 0
    for _ in range(3):
        await asyncio.sleep(seconds / 4)
        rev += 1
        bundle, _ = make_bundle(key_dir / "rules.yaml", rev, "2026-01-01T00:00:00.000Z", key, {"web1"})
        t = time.time()
        await kv.put("current", json.dumps(bundle).encode())
        pushes.append((rev, t))
    await pub_task
    fixed = (sum(x.seq for x in nodes) - before) / (time.monotonic() - t1)
    await asyncio.sleep(1.0)
    stop.set()
    await ct
    push_lat = []
    for r, t in pushes:
        for x in nodes:
            if r in x.policy_seen:
                push_lat.append(x.policy_seen[r] - t)
    missing = len(pushes) * n - len(push_lat)
    await nc.close()
    for w in watchers:
        w.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    for x in nodes:
        await x.close()
    return {"nodes": n, "saturation_rps": sat, "offered_rps": rate * n, "fixed_rps": fixed,
            "lag_p50_ms": pct(lags, 0.5) * 1000, "lag_p99_ms": pct(lags, 0.99) * 1000, "lag_samples": len(lags),
            "push_p99_ms": pct(push_lat, 0.99) * 1000, "push_missing": missing,
            "bytes_per_record": len(nodes[0].line())}


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="proxyvm-fleet-bench-"))
    ca = LabCA(work / "ca")
    cluster = NatsCluster(work / "nats", ca, nodes=[])
    await asyncio.to_thread(cluster.start)
    try:
        from nats.js.api import StorageType

        nc = await cluster.connect("admin")
        js = nc.jetstream()
        await js.add_stream(name="PROXYVM_AUDIT", subjects=["proxyvm.audit.>"], num_replicas=3,
                            duplicate_window=600.0, storage=StorageType.FILE)
        await js.create_key_value(bucket="PROXYVM_POLICY", history=16, replicas=3)
        await nc.close()
        keygen(work / "signing.key", work / "signing.pub")
        (work / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules:\n  - id: a\n    action: deny\n"
                                         "    protocol: dns\n    match: {qname: [\"*.bad.example\"]}\n")
        pub = load_public_key(work / "signing.pub")
        rows = []
        offset = 0
        for n in args.nodes:
            r = await run_size(cluster, n, args.rate, args.seconds, work, pub, offset)
            offset += n
            rows.append(r)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
        nc = await cluster.connect("admin")
        info = await nc.jetstream().stream_info("PROXYVM_AUDIT")
        await nc.close()
        per_msg = info.state.bytes / max(1, info.state.messages)
        print(f"\nstream: {info.state.messages} messages, {info.state.bytes} bytes ({per_msg:.0f} B/message as "
              "stored, one replica)")
        print("\n| nodes | records/s sustained (saturation) | offered records/s | e2e lag p50 | e2e lag p99 "
              "| policy push -> verified on all, p99 |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['nodes']} | {r['saturation_rps']:.0f} | {r['offered_rps']:.0f} ({r['fixed_rps']:.0f} achieved) "
                  f"| {r['lag_p50_ms']:.0f} ms | {r['lag_p99_ms']:.0f} ms | {r['push_p99_ms']:.0f} ms"
                  + (f" ({r['push_missing']} not seen)" if r["push_missing"] else "") + " |")
    finally:
        cluster.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="10,50,100,200", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--rate", type=float, default=20.0, help="records/s per node in the fixed-rate phase")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
