"""Fleet bad input against real nats-server processes, each a clear log line, a `kind: service`
record and a fault in /healthz, while the node goes on answering dig:

* the PROXYVM_AUDIT stream exists with other settings (a 5 s duplicate window): `fleet init`
  refuses to touch it, the node does not ship to it (records wait in the spool); after
  `fleet init --update` every record arrives;
* a NATS server whose certificate is not from the node's CA: fail closed;
* wrong credentials (an nkey the servers do not know);
* a server without TLS behind a tls:// URL: refused before anything is sent (no plaintext);
* `fleet audit` filters as `audit show` does, fleet-wide; `fleet verify --node`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.fleetlab import HAVE_NATS, Node, admin_config, dig_burst, fleet_cli, needs_nats
from tests.labs.nats_lab import NatsCluster, make_user
from tests.labs.pki import LabCA
from tests.protocols.dns.conftest import lab_ca, lab_dir, upstream1  # noqa: F401

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.skipif(not HAVE_NATS, reason=needs_nats)]


def _service_records(n: Node, event: str) -> list[dict[str, Any]]:
    return [r for r in n.records(kind="service") if (r.get("request") or {}).get("event") == event]


async def test_bad_input_fails_closed_and_serving_goes_on(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    cluster = await asyncio.to_thread(NatsCluster(tmp_path / "nats", lab_ca, nodes=["hv-1", "hv-2"], size=1).start)
    plain = NatsCluster(tmp_path / "plain", lab_ca, nodes=["hv-4"], size=1, tls=False)
    for i in range(1):  # no JetStream check: our client would refuse this server (that is the point)
        plain.start_server(i)
    nodes: list[Node] = []
    try:
        admin = admin_config(tmp_path / "admin", cluster)
        nc = await cluster.connect("admin")
        await nc.jetstream().add_stream(name="PROXYVM_AUDIT", subjects=["proxyvm.audit.>"], duplicate_window=5.0)
        await nc.close()
        r = fleet_cli(admin, "init", "--replicas", "1")
        assert r.returncode == 1 and "exists with other settings" in r.stderr and "duplicate_window is 5s" in r.stderr

        hv1 = Node(tmp_path, "hv-1", cluster, upstream1, lab_ca.ca_pem)
        other_ca = LabCA(tmp_path / "otherca", "another CA")
        hv2 = Node(tmp_path, "hv-2", cluster, upstream1, lab_ca.ca_pem)
        hv2.set_fleet("ca_file", str(other_ca.ca_pem))
        hv3 = Node(tmp_path, "hv-3", cluster, upstream1, lab_ca.ca_pem, user="hv-1")
        stranger, _ = make_user(tmp_path, "stranger")
        hv3.set_fleet("credentials_file", str(stranger))
        hv4 = Node(tmp_path, "hv-4", plain, upstream1, lab_ca.ca_pem)
        hv4.set_fleet("nats", json.dumps([u.replace("nats://", "tls://") for u in plain.urls]))
        nodes = [hv1, hv2, hv3, hv4]
        for n in nodes:
            await asyncio.to_thread(n.start)
        for n in nodes:
            assert await dig_burst(n, 6) == 6, "serving guests never stops because of the fleet"
        expect = {hv1: ("stream", "exists with other settings"), hv2: ("tls", "certificate"),
                  hv3: ("auth", "refused our credentials"), hv4: ("plaintext", "does not require TLS")}
        for n, (key, text) in expect.items():
            f = await asyncio.to_thread(n.wait_fleet, lambda f, key=key: key in (f.get("faults") or {}), 20, key)
            assert text in f["faults"][key], f
            assert _service_records(n, f"fleet_{key}"), f"{n.name}: no record of the {key} fault"
            assert f"fleet: {f['faults'][key]}" in n.pvm.tail(20000)
        assert hv1.fleet()["audit"]["lag_records"] > 0 and hv1.fleet()["connected"]
        assert not hv2.fleet()["connected"] and not hv4.fleet()["connected"]
        # nothing from hv-4 reached the plaintext server as a client: it saw no CONNECT
        assert "Authorization Violation" not in (tmp_path / "plain" / "nats0.log").read_text()

        r = fleet_cli(admin, "init", "--replicas", "1", "--update")
        assert r.returncode == 0 and "stream PROXYVM_AUDIT: updated" in r.stdout, r.stderr
        await asyncio.to_thread(hv1.wait_shipped, 30)
        assert await dig_burst(hv1, 10, ("blocked.lab.test",)) == 10
        await asyncio.to_thread(hv1.wait_shipped, 30)

        r = fleet_cli(admin, "audit", "--node", "hv-1", "--verdict", "deny", "--json")
        assert r.returncode == 0, r.stderr
        recs = [json.loads(x) for x in r.stdout.splitlines()]
        assert len(recs) >= 10 and all(x["node"] == "hv-1" and x["verdict"] == "deny" for x in recs)
        r = fleet_cli(admin, "audit", "--kind", "service", "--since", "1h")
        assert r.returncode == 0 and "hv-1" in r.stdout and "stream PROXYVM_AUDIT exists" in r.stdout, r.stdout
        v = fleet_cli(admin, "verify", "--node", "hv-1")
        assert v.returncode == 0 and "hv-1 audit: ok" in v.stdout, v.stdout + v.stderr
        v = fleet_cli(admin, "verify", "--node", "hv-2")
        assert v.returncode == 1 and "hv-2: no records in the stream" in v.stderr
    finally:
        for n in nodes:
            await asyncio.to_thread(n.stop)
        cluster.stop()
        plain.stop()
