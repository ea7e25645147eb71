"""Fleet lab: a real 3-server NATS JetStream cluster (tests.labs.nats_lab), real `proxyvm run`
nodes (supervisor + DNS worker in front of the lab's Unbound DoT upstream) and the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tests.labs.nats_lab import NATS_SERVER, NatsCluster
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.dns.dnsfront_lab import DIG, dig

PROXY_IP = "127.0.3.1"
GUEST_IP = "127.0.0.1"
RULES = textwrap.dedent("""\
    mode: enforce
    default: allow
    rules:
      - id: no-blocked
        action: deny
        protocol: dns
        match: {qname: ["blocked.lab.test"]}
    """)

needs_nats = "nats-server (Debian package nats-server) is not installed: `apt-get install nats-server`"
HAVE_NATS = bool(NATS_SERVER) and bool(DIG)


def fleet_yaml(cluster: NatsCluster, user: str, node: str | None = None, key: Path | None = None,
               extra: str = "") -> str:
    urls = ", ".join(f'"{u}"' for u in cluster.urls)
    return (f"fleet:\n  node: {node or user}\n  nats: [{urls}]\n  credentials_file: {cluster.users[user]}\n"
            f"  ca_file: {cluster.ca.ca_pem}\n  status_every: 1s\n"
            + (f"  policy_key: {key}\n" if key else "") + extra)


def admin_config(d: Path, cluster: NatsCluster, guests: str = "web1: {addresses: [127.0.0.1]}") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "admin.yaml"
    cfg.write_text(f"guests:\n  {guests}\n" + fleet_yaml(cluster, "admin"))
    return cfg


class Node:
    """One appliance: its own dir, DNS port, admin port, state and audit log."""

    def __init__(self, root: Path, name: str, cluster: NatsCluster, upstream: Any, ca: Path,
                 key: Path | None = None, extra_fleet: str = "", rules: str = RULES, user: str | None = None):
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.port, self.admin = free_port(PROXY_IP), free_port(PROXY_IP)
        (self.dir / "rules.yaml").write_text(rules)
        self.config = self.dir / "proxyvm.yaml"
        self.config.write_text(textwrap.dedent(f"""\
            guests:
              web1: {{addresses: [{GUEST_IP}]}}
              web2: {{addresses: [127.0.0.2]}}
            policy: rules.yaml
            audit: {{path: audit.jsonl}}
            admin: {{listen: "{PROXY_IP}:{self.admin}"}}
            state_dir: state
            dns:
              listen: ["{PROXY_IP}:{self.port}"]
              ca_file: {ca}
              dnssec: off
              upstreams:
                - {{address: "{upstream.address}:853", name: {upstream.name}}}
            """) + fleet_yaml(cluster, user or name, name, key, extra_fleet))
        self.pvm = ProxyVM(self.config)

    def set_fleet(self, key: str, value: str) -> None:
        """Change one key of the node's fleet: section (a fault: another CA, other credentials...)."""
        head, fleet = self.config.read_text().split("fleet:\n", 1)
        lines = [f"  {key}: {value}" if ln.startswith(f"  {key}:") else ln for ln in fleet.splitlines()]
        self.config.write_text(head + "fleet:\n" + "\n".join(lines) + "\n")

    def start(self, timeout: float = 30) -> Node:
        self.pvm.start(timeout)
        return self

    def fleet(self) -> dict[str, Any]:
        return self.pvm.healthz()[1].get("fleet") or {}

    def wait_fleet(self, pred: Any, timeout: float = 30.0, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.fleet()
                if pred(last):
                    return last
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: {what or 'fleet state'} not reached in {timeout}s: {last}\n"
                             f"{self.pvm.tail(3000)}")

    def wait_shipped(self, timeout: float = 60.0) -> dict[str, Any]:
        """Until the stream acknowledged every record written so far."""
        return self.wait_fleet(lambda f: f.get("connected") and f["audit"]["acked"] == f["audit"]["seq"]
                               and f["audit"]["seq"] > 0, timeout, "all records acknowledged")

    def local_lines(self) -> list[bytes]:
        return [ln for ln in (self.dir / "audit.jsonl").read_bytes().split(b"\n") if ln]

    def records(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.pvm.audit_records() if all(r.get(k) == v for k, v in match.items())]

    def stop(self) -> int | None:
        return self.pvm.stop()


def fleet_cli(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyvm", "fleet", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=timeout)


async def dig_burst(node: Node, n: int, names: tuple[str, ...] = ("blocked.lab.test", "www.lab.test")) -> int:
    """n real dig queries as guest web1, a few at a time; returns how many got an answer."""
    ok = 0
    sem = asyncio.Semaphore(4)

    async def one(i: int) -> None:
        nonlocal ok
        async with sem:
            r = await dig(PROXY_IP, node.port, names[i % len(names)], "A", "-b", GUEST_IP)
            ok += r.status in ("NOERROR", "REFUSED", "NXDOMAIN")

    await asyncio.gather(*(one(i) for i in range(n)))
    return ok


async def stream_lines(cluster: NatsCluster, node: str) -> list[tuple[int, bytes]]:
    """(seq from the message id, data) of every message of `node` in the stream, in stream order."""
    from proxyvm.fleet.cli import read_stream

    nc = await cluster.connect("admin")
    out = []
    try:
        async for m in read_stream(nc.jetstream(), f"proxyvm.audit.{node}.*"):
            out.append((int(m.headers["Nats-Msg-Id"].rsplit(":", 1)[1]), bytes(m.data)))
    finally:
        await nc.close()
    return out


def assert_stream_matches_local(cluster: NatsCluster, node: Node) -> int:
    """The stream holds every line of the node's local chain exactly once, byte for byte."""
    got = asyncio.run(stream_lines(cluster, node.name))
    seqs = [s for s, _ in got]
    assert len(seqs) == len(set(seqs)), f"{node.name}: duplicates in the stream: {len(seqs) - len(set(seqs))}"
    local = node.local_lines()
    by_seq = dict(got)
    missing = [json.loads(ln)["seq"] for ln in local if json.loads(ln)["seq"] not in by_seq]
    assert not missing, f"{node.name}: {len(missing)} records not in the stream, e.g. {missing[:5]}"
    for ln in local:
        assert by_seq[json.loads(ln)["seq"]] == ln, f"{node.name}: stream bytes differ from the local line"
    return len(local)
