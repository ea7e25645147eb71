"""Audit shipping through a real NATS JetStream cluster (three nats-server processes, R3, TLS,
per-node nkey users) from three real `proxyvm run` nodes serving real dig queries:

* every record of every node reaches stream PROXYVM_AUDIT byte for byte, once, and
  `proxyvm fleet verify` re-checks each chain from the stream alone;
* one NATS server killed (SIGKILL) with traffic flowing: nothing lost;
* all NATS servers stopped for a while with traffic flowing: the records wait in the spool
  (lag grows, /healthz says disconnected, guests are still answered), then all are delivered,
  none duplicated;
* a proxyvm node killed with SIGKILL mid-shipping: after its restart nothing is lost or
  duplicated in the stream (the re-sends are absorbed by the message ids).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.fleetlab import (
    HAVE_NATS,
    Node,
    admin_config,
    assert_stream_matches_local,
    dig_burst,
    fleet_cli,
    needs_nats,
)
from tests.labs.nats_lab import NatsCluster
from tests.protocols.dns.conftest import lab_ca, lab_dir, upstream1  # noqa: F401

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.skipif(not HAVE_NATS, reason=needs_nats)]


@pytest.fixture
def cluster(tmp_path: Path, lab_ca: Any) -> Any:  # noqa: F811
    c = NatsCluster(tmp_path / "nats", lab_ca, nodes=["hv-1", "hv-2", "hv-3"]).start()
    yield c
    c.stop()


async def test_shipping_survives_nats_faults_and_a_killed_node(tmp_path: Path, cluster: NatsCluster, upstream1,  # noqa: F811
                                                               lab_ca) -> None:  # noqa: F811
    admin = admin_config(tmp_path / "admin", cluster)
    r = fleet_cli(admin, "init", "--replicas", "3")
    assert r.returncode == 0, r.stderr
    assert "stream PROXYVM_AUDIT: created (R3" in r.stdout
    nodes = [Node(tmp_path, f"hv-{i}", cluster, upstream1, lab_ca.ca_pem) for i in (1, 2, 3)]
    try:
        for n in nodes:
            await asyncio.to_thread(n.start)
        for n in nodes:
            assert await dig_burst(n, 20) == 20
        for n in nodes:
            f = await asyncio.to_thread(n.wait_shipped)
            assert f["node"] == n.name and f["connected"]

        # 1. one NATS server killed while every node sends: nothing is lost
        traffic = [asyncio.create_task(dig_burst(n, 60)) for n in nodes]
        await asyncio.sleep(0.3)
        cluster.kill_server(0)
        assert all(x == 60 for x in await asyncio.gather(*traffic))
        for n in nodes:
            await asyncio.to_thread(n.wait_shipped, 60)
        cluster.start_server(0)

        # 2. all NATS down for a while, guests still served; the spool holds the records
        for i in range(3):
            cluster.stop_server(i)
        t0 = time.monotonic()
        served = await asyncio.gather(*(dig_burst(n, 40) for n in nodes))
        assert served == [40, 40, 40], "serving guests must not stop because NATS is down"
        for n in nodes:
            f = await asyncio.to_thread(n.wait_fleet, lambda f: not f["connected"] and f["audit"]["lag_records"] >= 40,
                                        20, "disconnected with records spooled")
            assert f["audit"]["spool_bytes"] > 0 and "disconnected" in f.get("faults", {}), f
        m = await asyncio.to_thread(nodes[0].pvm.metrics)
        assert "proxyvm_fleet_connected 0.0" in m and "proxyvm_fleet_shipping_lag_records" in m
        await asyncio.sleep(max(0.0, 3 - (time.monotonic() - t0)))
        for i in range(3):
            cluster.start_server(i)
        await asyncio.to_thread(cluster.wait_jetstream, 30)
        for n in nodes:
            await asyncio.to_thread(n.wait_shipped, 60)
        for n in nodes:
            assert n.records(kind="service", request={"event": "fleet_disconnected"}), "no record of the outage"

        # 3. a proxyvm node killed mid-shipping, then restarted
        victim = nodes[1]
        burst = asyncio.create_task(dig_burst(victim, 80))
        await asyncio.sleep(1.0)
        victim.pvm.proc.send_signal(signal.SIGKILL)  # the supervisor: the worker follows (EOF on its channel)
        victim.pvm.proc.wait()
        await asyncio.gather(burst, return_exceptions=True)
        await asyncio.sleep(0.5)  # its DNS worker notices the closed channel and exits
        victim.pvm._logf.close()
        victim.pvm = type(victim.pvm)(victim.config)
        await asyncio.to_thread(victim.start)
        assert await dig_burst(victim, 10) == 10
        await asyncio.to_thread(victim.wait_shipped, 60)
    finally:
        for n in nodes:
            await asyncio.to_thread(n.stop)

    # after a clean stop too: the stream holds each node's whole chain, once, byte for byte
    for n in nodes:
        assert (await asyncio.to_thread(assert_stream_matches_local, cluster, n)) >= 120
    v = fleet_cli(admin, "verify")
    assert v.returncode == 0, v.stdout + v.stderr
    for n in nodes:
        assert f"{n.name} audit: ok: " in v.stdout and "chain intact" in v.stdout
    st = fleet_cli(admin, "status", "--stale", "3600")
    assert st.returncode == 0, st.stderr
    assert all(n.name in st.stdout for n in nodes)
