"""Signed policy distribution and fleet quarantine through a real NATS JetStream cluster, with two
real `proxyvm run` nodes answering real dig queries:

* `proxyvm fleet push rules.yaml --sign KEY` -> both nodes verify, validate, swap (a denied name
  is REFUSED at once), report the revision (/healthz, metric, a `kind: reload` record);
* refused everywhere, old policy kept, each with a record: an unsigned bundle, one signed by
  another key, an older revision put back, a bundle the nodes cannot validate, a value that is
  not a bundle; `fleet push` of an invalid file pushes nothing;
* a node restarted while NATS is down runs its last applied bundle from state_dir;
* `proxyvm fleet quarantine web1@hv-2` is in force on hv-2 within a second (not on hv-1), and
  `fleet release` lifts it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.fleetlab import (
    GUEST_IP,
    HAVE_NATS,
    PROXY_IP,
    RULES,
    Node,
    admin_config,
    fleet_cli,
    needs_nats,
)
from tests.labs.nats_lab import NatsCluster
from tests.protocols.dns.conftest import lab_ca, lab_dir, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.skipif(not HAVE_NATS, reason=needs_nats)]

DENY_WWW = RULES + """  - id: fleet-deny-www
    action: deny
    protocol: dns
    match: {qname: ["www.lab.test"]}
"""
NAMES_GUEST_WEB9 = RULES + """  - id: only-web9
    action: allow
    protocol: dns
    guests: [web9]
    match: {qname: ["web9.lab.test"]}
"""


@pytest.fixture
def cluster(tmp_path: Path, lab_ca: Any) -> Any:  # noqa: F811
    c = NatsCluster(tmp_path / "nats", lab_ca, nodes=["hv-1", "hv-2"]).start()
    yield c
    c.stop()


async def _put(cluster: NatsCluster, value: bytes) -> None:
    nc = await cluster.connect("admin")
    try:
        kv = await nc.jetstream().key_value("PROXYVM_POLICY")
        await kv.put("current", value)
    finally:
        await nc.close()


def _refusals(n: Node) -> list[str]:
    return [(r.get("fleet") or {}).get("reason_code") for r in n.records(kind="reload")
            if (r.get("request") or {}).get("event") == "fleet_policy_refused"]


async def test_signed_push_refusals_restart_offline_and_fleet_quarantine(tmp_path: Path, cluster: NatsCluster,
                                                                        upstream1, lab_ca) -> None:  # noqa: F811
    admin = admin_config(tmp_path / "admin", cluster, guests="web1: {addresses: [127.0.0.1]}\n  web9: {addresses: [127.0.0.9]}")
    assert fleet_cli(admin, "init", "--replicas", "3").returncode == 0
    keys = tmp_path / "keys"
    keys.mkdir()
    r = fleet_cli(admin, "keygen", "-o", str(keys / "signing.key"))
    assert r.returncode == 0 and (keys / "signing.pub").exists(), r.stderr
    assert oct((keys / "signing.key").stat().st_mode & 0o777) == "0o600"
    assert fleet_cli(admin, "keygen", "-o", str(keys / "other.key")).returncode == 0
    nodes = [Node(tmp_path, f"hv-{i}", cluster, upstream1, lab_ca.ca_pem, key=keys / "signing.pub") for i in (1, 2)]
    try:
        for n in nodes:
            await asyncio.to_thread(n.start)
            assert (await dig(PROXY_IP, n.port, "www.lab.test", "A", "-b", GUEST_IP)).status == "NOERROR"
        for n in nodes:
            await asyncio.to_thread(n.wait_fleet, lambda f: f.get("connected"), 20, "connected")

        # a signed push reaches every node
        (tmp_path / "deny.yaml").write_text(DENY_WWW)
        t0 = time.monotonic()
        r = fleet_cli(admin, "push", str(tmp_path / "deny.yaml"), "--sign", str(keys / "signing.key"))
        assert r.returncode == 0 and r.stdout.startswith("revision 1: sha256:"), r.stdout + r.stderr
        digest = r.stdout.split()[2]
        for n in nodes:
            f = await asyncio.to_thread(n.wait_fleet, lambda f: f.get("policy_revision") == 1, 15, "revision 1")
            assert f["policy_digest"] == digest
        took = time.monotonic() - t0
        assert took < 15
        for n in nodes:
            d = await dig(PROXY_IP, n.port, "www.lab.test", "A", "-b", GUEST_IP)
            assert d.status == "REFUSED", d.text
            rec = n.records(kind="reload", request={"event": "fleet_policy_applied"})
            assert rec and rec[-1]["fleet"]["revision"] == 1 and rec[-1]["fleet"]["policy"] == digest
            dec = await asyncio.to_thread(n.pvm.wait_audit, lambda x: x.get("rule") == "fleet-deny-www")
            assert dec["policy"] == digest and dec["at"] == "deny.yaml:8"
            m = await asyncio.to_thread(n.pvm.metrics)
            assert "proxyvm_fleet_policy_revision 1.0" in m and f'digest="{digest}"' in m
        # a SIGHUP keeps the fleet bundle in force
        nodes[0].pvm.reload()
        await asyncio.to_thread(nodes[0].pvm.wait_audit, lambda x: (x.get("request") or {}).get("event") == "reload"
                                and x.get("policy") == digest)
        assert (await dig(PROXY_IP, nodes[0].port, "www.lab.test", "A", "-b", GUEST_IP)).status == "REFUSED"

        # push of an invalid file: nothing is pushed
        (tmp_path / "broken.yaml").write_text("mode: enforce\nrules: [{id: x, action: maybe}]\n")
        r = fleet_cli(admin, "push", str(tmp_path / "broken.yaml"), "--sign", str(keys / "signing.key"))
        assert r.returncode == 1 and "broken.yaml:" in r.stderr and "nothing pushed" in r.stderr, r.stderr

        # bad bundles straight into the bucket: refused everywhere, revision 1 stays
        bundle1 = json.loads(await _get_current(cluster))
        unsigned = {**bundle1, "revision": 5, "signature": ""}
        await _put(cluster, json.dumps(unsigned).encode())
        tampered = dict(bundle1, revision=6)  # the signature covers the revision
        await _put(cluster, json.dumps(tampered).encode())
        await _put(cluster, b"hello, not a bundle")
        await _put(cluster, json.dumps(bundle1).encode())  # the same revision again: nothing to do
        (tmp_path / "web9.yaml").write_text(NAMES_GUEST_WEB9)  # valid for the admin, not for the nodes
        r = fleet_cli(admin, "push", str(tmp_path / "web9.yaml"), "--sign", str(keys / "signing.key"))
        assert r.returncode == 0 and r.stdout.startswith("revision 2:"), r.stdout + r.stderr
        r = fleet_cli(admin, "push", str(tmp_path / "deny.yaml"), "--sign", str(keys / "other.key"))
        assert r.returncode == 0 and r.stdout.startswith("revision 3:")
        for n in nodes:
            await asyncio.to_thread(n.wait_fleet, lambda f, n=n: len(_refusals(n)) >= 5, 20, "five refusals")
            assert _refusals(n)[:5] == ["unsigned", "bad_signature", "not_a_bundle", "invalid", "bad_signature"]
            assert n.fleet()["policy_revision"] == 1
            assert (await dig(PROXY_IP, n.port, "www.lab.test", "A", "-b", GUEST_IP)).status == "REFUSED"
        # a newer signed revision applies; the older one put back afterwards (a replay) is refused
        r = fleet_cli(admin, "push", str(tmp_path / "deny.yaml"), "--sign", str(keys / "signing.key"))
        assert r.stdout.startswith("revision 4:")  # pushes count on from the value in the bucket
        for n in nodes:
            await asyncio.to_thread(n.wait_fleet, lambda f: f.get("policy_revision") == 4, 15, "revision 4")
        await _put(cluster, json.dumps(bundle1).encode())
        for n in nodes:
            await asyncio.to_thread(n.wait_fleet, lambda f, n=n: "replayed" in _refusals(n), 20, "replay refused")
            assert n.fleet()["policy_revision"] == 4

        # fleet quarantine: hv-2 only, within a second
        hv1, hv2 = nodes
        r = fleet_cli(admin, "quarantine", "web1@hv-2", "--reason", "C2 beacon (ticket 9)", "--wait", "5")
        assert r.returncode == 0 and "quarantined (block) on hv-2: confirmed in" in r.stdout, r.stdout + r.stderr
        assert float(r.stdout.split("confirmed in ")[1].rstrip("s\n")) < 1.5
        blocked = await dig(PROXY_IP, hv2.port, "blocked.lab.test", "A", "-b", GUEST_IP)
        assert blocked.status == "REFUSED" and "quarantine" in blocked.text.lower(), blocked.text
        q = hv2.records(kind="quarantine")
        assert q and q[-1]["by"] == "fleet" and q[-1]["guest"] == "web1" and "C2 beacon" in q[-1]["reason"]
        assert not hv1.records(kind="quarantine")
        r = fleet_cli(admin, "release", "web1@hv-2", "--wait", "5")
        assert r.returncode == 0 and "released on hv-2" in r.stdout, r.stdout + r.stderr
        assert (await dig(PROXY_IP, hv2.port, "web1.lab.test", "A", "-b", GUEST_IP)).status != "REFUSED"
        assert hv2.records(kind="release")[-1]["by"] == "fleet"
        r = fleet_cli(admin, "quarantine", "web7@hv-2", "--wait", "2")
        assert r.returncode == 1 and "has not confirmed" in r.stderr
        await asyncio.to_thread(hv2.wait_fleet, lambda f: bool(hv2.records(request={"event": "fleet_quarantine_refused"})),
                                10, "unknown guest refused")
        # hv-1 restarts while NATS is down: it runs its last applied bundle
        await asyncio.to_thread(nodes[0].stop)
        for i in range(3):
            cluster.stop_server(i)
        nodes[0].pvm = type(nodes[0].pvm)(nodes[0].config)
        await asyncio.to_thread(nodes[0].start)
        f = nodes[0].fleet()
        assert f["policy_revision"] == 4 and not f["connected"], f
        assert (await dig(PROXY_IP, nodes[0].port, "www.lab.test", "A", "-b", GUEST_IP)).status == "REFUSED"
        for i in range(3):
            cluster.start_server(i)
        await asyncio.to_thread(cluster.wait_jetstream, 30)
        for n in nodes:
            await asyncio.to_thread(n.wait_fleet, lambda f: f.get("connected"), 30, "reconnected")

    finally:
        for n in nodes:
            await asyncio.to_thread(n.stop)


async def _get_current(cluster: NatsCluster) -> bytes:
    nc = await cluster.connect("admin")
    try:
        kv = await nc.jetstream().key_value("PROXYVM_POLICY")
        return (await kv.get("current")).value
    finally:
        await nc.close()


def test_bundle_signature_covers_every_byte(tmp_path: Path) -> None:
    """Without NATS: flipping any file byte, the revision or the rules name breaks the signature."""
    from proxyvm.fleet.bundle import (
        BundleError,
        check_bundle,
        keygen,
        load_private_key,
        load_public_key,
        make_bundle,
    )

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "bad.txt").write_text("evil.example\n")
    (tmp_path / "rules.yaml").write_text(RULES + "  - id: l\n    action: deny\n    protocol: dns\n"
                                         "    match: {qname_file: lists/bad.txt}\n")
    keygen(tmp_path / "k", tmp_path / "k.pub")
    b, digest = make_bundle(tmp_path / "rules.yaml", 3, "2026-01-01T00:00:00.000Z", load_private_key(tmp_path / "k"),
                            {"web1"})
    pub = load_public_key(tmp_path / "k.pub")
    ok = check_bundle(json.dumps(b).encode(), pub)
    assert ok.revision == 3 and ok.digest == digest and set(ok.files) == {"rules.yaml", "lists/bad.txt"}
    data = bytearray(base64.b64decode(b["files"][1]["data"]))
    data[0] ^= 1
    bad = json.loads(json.dumps(b))
    bad["files"][1]["data"] = base64.b64encode(bytes(data)).decode()
    for variant in (bad, {**b, "revision": 4}, {**b, "rules": "other.yaml"}):
        with pytest.raises(BundleError):
            check_bundle(json.dumps(variant).encode(), pub)
    evil = json.loads(json.dumps(b))
    evil["files"][1]["name"] = "../../etc/cron.d/x"
    with pytest.raises(BundleError, match="bad or repeated file name"):
        check_bundle(json.dumps(evil).encode(), pub)
