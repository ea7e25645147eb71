"""Forensic capture (`forensics:`, protocols.capture) through the real `proxyvm run -c CONFIG`, read back
with the real `tshark`:

* DNS: dig's denied queries (UDP and TCP, from a fixed source port) and every query of a
  quarantined guest are in that guest's pcap ring with the qname, the guest's address and port,
  the proxy's address and port and timestamps within the test's window; an allowed query of a
  guest that is not quarantined is not; the counters reach /metrics; `forensics export` puts the
  ring under `pcap/` and `forensics verify` finds an edited pcap;
* the bounds: `per_guest` holds under a flood of denials (never more than one chunk over), files
  older than `keep` go (also while no flow comes);
* a full disk (a 64k tmpfs as the forensics dir): the proxy keeps answering, the disk-error counter
  rises, one log line says capture stopped, and the pcap files left are still readable;
* `forensics: false`: nothing is written.

SMTP (swaks), HTTP (curl) and SNMP (snmpget) denials are in tests/protocols/{smtp,http,snmp}/test_*_capture.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import dns.message
import pytest

from tests.labs.pcap import all_packets, needs_tshark, ring, tshark, wait_for
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.dns.conftest import PROXY_IP, lab_ca, lab_dir, needs_peers, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig
from tests.proxyvm.test_quarantine import GUEST_IP, OTHER_IP, write_config

DENY_RULES = """mode: enforce
default: allow
rules:
  - id: no-bad
    action: deny
    protocol: dns
    match: {qname: ["*.bad.test"]}
"""
FIELDS = ("frame.time_epoch", "ip.src", "udp.srcport", "tcp.srcport", "ip.dst", "udp.dstport", "tcp.dstport",
          "dns.qry.name", "dns.flags.response", "dns.flags.rcode")


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return 0.0


def setup(tmp_path: Path, ca: Path, up: Any, extra: str = "", rules: str = DENY_RULES) -> tuple[ProxyVM, int, Path]:
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    cfg = write_config(tmp_path, ca, up, port, admin, extra)
    (tmp_path / "rules.yaml").write_text(rules)
    return ProxyVM(cfg), port, tmp_path / "state"


def flood(port: int, n: int, first: int = 0, qname: str = "x{}.bad.test", src: str = GUEST_IP) -> int:
    """n queries from one UDP socket, a few in flight at a time; returns how many were answered."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.settimeout(2)
    answered = 0
    try:
        for i in range(first, first + n):
            q = dns.message.make_query(qname.format(i), "A")
            s.sendto(q.to_wire(), (PROXY_IP, port))
            try:
                s.recvfrom(4096)
                answered += 1
            except TimeoutError:
                pass
    finally:
        s.close()
    return answered


@needs_peers
@needs_tshark
@pytest.mark.lab
async def test_dns_denials_and_quarantine_in_pcap(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    pvm, port, state = setup(tmp_path, lab_ca.ca_pem, upstream1)
    gport, tport = free_port(GUEST_IP), free_port(GUEST_IP)
    t_start = time.time()
    await asyncio.to_thread(pvm.start)
    try:
        r = await dig(PROXY_IP, port, "evil.bad.test", "A", "-b", f"{GUEST_IP}#{gport}")
        assert r.status == "REFUSED"
        r = await dig(PROXY_IP, port, "tcp.bad.test", "AAAA", "+tcp", "-b", f"{GUEST_IP}#{tport}")
        assert r.status == "REFUSED"
        assert (await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP)).status == "NOERROR"
        assert (await dig(PROXY_IP, port, "www.lab.test", "A", "-b", OTHER_IP)).status == "NOERROR"
        # web2 quarantined: every query of it is captured, allowed names too
        q = await asyncio.to_thread(pvm.cli, "quarantine", "web2", "--reason", "capture test")
        assert q.returncode == 0, q.stderr
        r = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", OTHER_IP)
        assert r.status == "REFUSED"

        files1 = await asyncio.to_thread(wait_for, lambda: ring(state, "web1"), 15, "web1's pcap")
        pk = await asyncio.to_thread(
            wait_for, lambda: len(p := all_packets(ring(state, "web1"), *FIELDS, decode=(f"tcp.port=={port},dns",))) >= 2 + 8 and p, 15, "web1's packets")
        files1 = ring(state, "web1")
        assert all(re.fullmatch(r"\d{6}-dns-\d+\.pcap", f.name) for f in files1), files1
        t_end = time.time()
        # UDP: the query from dig's port to the proxy's, the answer back
        udp = [p for p in pk if p["udp.srcport"] or p["udp.dstport"]]
        assert [(p["ip.src"], p["udp.srcport"], p["ip.dst"], p["udp.dstport"], p["dns.qry.name"],
                 p["dns.flags.response"]) for p in udp] == [
            (GUEST_IP, str(gport), PROXY_IP, str(port), "evil.bad.test", "0"),
            (PROXY_IP, str(port), GUEST_IP, str(gport), "evil.bad.test", "1")]
        assert udp[1]["dns.flags.rcode"] == "5"  # REFUSED, as the guest got it
        # TCP: a handshake, the length-prefixed query and answer, FIN
        tcp = [p for p in pk if p["tcp.srcport"]]
        assert {(p["ip.src"], p["tcp.srcport"]) for p in tcp} == {(GUEST_IP, str(tport)), (PROXY_IP, str(port))}
        named = [p for p in tcp if p["dns.qry.name"]]
        assert [(p["dns.qry.name"], p["dns.flags.response"]) for p in named] == [
            ("tcp.bad.test", "0"), ("tcp.bad.test", "1")]
        for p in pk:
            assert t_start - 1 <= float(p["frame.time_epoch"]) <= t_end + 1, p
        # an allowed query of a guest not quarantined is not captured
        assert "www.lab.test" not in {p["dns.qry.name"] for p in pk}
        # the quarantined guest: its allowed-by-policy name is there
        pk2 = await asyncio.to_thread(
            wait_for, lambda: (p := all_packets(ring(state, "web2"), *FIELDS)) and len(p) >= 2 and p, 15, "web2's packets")
        assert [(p["ip.src"], p["dns.qry.name"]) for p in pk2] == [(OTHER_IP, "www.lab.test"), (PROXY_IP, "www.lab.test")]
        # tshark finds no malformed packet and no TCP sequence problem
        for f in files1:
            assert tshark(f, "frame.number", display="_ws.malformed || tcp.analysis.flags") == [], f
        m = await asyncio.to_thread(wait_for, lambda: (t := pvm.metrics()) and metric(
            t, "proxyvm_forensics_flows_total", service="dns") >= 3 and t, 10, "the flows counted")  # health: 2 s
        assert metric(m, "proxyvm_forensics_packets_total", service="dns") >= 12
        assert metric(m, "proxyvm_forensics_disk_errors_total", service="dns") == 0
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()

    # export: the ring under pcap/, in the manifest; verify passes, and fails on an edited pcap
    cfg = pvm.config
    bundle = tmp_path / "web1.tar"
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxyvm", "forensics", "export", "web1",
                                                 "-c", str(cfg), "-o", str(bundle)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with tarfile.open(bundle) as t:
        files = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]
    manifest = json.loads(files["manifest.json"])
    names = [f"pcap/{f.name}" for f in ring(state, "web1")]
    assert manifest["pcap"] == names and names
    for n in names:
        assert files[n] == (state / "forensics" / "web1" / n.split("/")[1]).read_bytes()
        assert n in manifest["files"]
    assert not any(n.startswith("pcap/") and "web2" in n for n in files)
    ok = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxyvm", "forensics", "verify",
                                                  str(bundle)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    edited = tmp_path / "edited.tar"
    with tarfile.open(bundle) as src, tarfile.open(edited, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name == names[0]:
                data = data.replace(b"evil", b"good")  # type: ignore[union-attr]
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    bad = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxyvm", "forensics", "verify",
                                                   str(edited)], capture_output=True, text=True)
    assert bad.returncode == 1 and f"{names[0]}: sha256 differs from the manifest (edited)" in bad.stderr, bad


@needs_peers
@needs_tshark
@pytest.mark.lab
async def test_size_and_age_bounds(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    per_guest, chunk = 16_000, 4096
    old = tmp_path / "state" / "forensics" / "web1" / "000001-dns-1.pcap"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"\xd4\xc3\xb2\xa1" + b"\0" * 20)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    keep_other = old.parent.parent / "web2" / "000001-dns-1.pcap"  # another guest's recent file stays
    keep_other.parent.mkdir()
    keep_other.write_bytes(old.read_bytes())
    pvm, port, state = setup(tmp_path, lab_ca.ca_pem, upstream1,
                             extra="forensics: {per_guest: 16KB, total: 1MB, keep: 20s}\n")
    await asyncio.to_thread(pvm.start)
    try:
        # the sweep at start-up takes the hour-old file (no flow needed)
        await asyncio.to_thread(wait_for, lambda: not old.exists(), 10, "the old pcap to go")
        assert keep_other.exists()
        sizes: list[int] = []

        def size() -> int:
            return sum(f.stat().st_size for f in ring(state, "web1") if f.exists())

        for i in range(4):
            assert await asyncio.to_thread(flood, port, 150, 150 * i) >= 140  # the proxy answers throughout
            sizes.append(size())
        m = await asyncio.to_thread(wait_for, lambda: (t := pvm.metrics()) and metric(
            t, "proxyvm_forensics_flows_total", service="dns") >= 600 and t, 20, "all flows written")
        assert metric(m, "proxyvm_forensics_bytes_total", service="dns") > 3 * per_guest  # everything captured ...
        sizes.append(size())
        assert max(sizes) <= per_guest + chunk, sizes  # ... and the ring never held more than per_guest + a chunk
        files = ring(state, "web1")
        assert len(files) >= 3
        names = [p["dns.qry.name"] for p in all_packets(files, "dns.qry.name")]
        assert "x599.bad.test" in names and "x0.bad.test" not in names  # the newest kept, the oldest gone
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()


@needs_peers
@needs_tshark
@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_full_disk(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    fdir = tmp_path / "state" / "forensics"
    fdir.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "pvm-capture-test", str(fdir)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    pvm = None
    try:
        pvm, port, state = setup(tmp_path, lab_ca.ca_pem, upstream1)
        await asyncio.to_thread(pvm.start)
        answered = await asyncio.to_thread(flood, port, 800)
        assert answered >= 790
        m = await asyncio.to_thread(wait_for, lambda: (t := pvm.metrics()) and metric(
            t, "proxyvm_forensics_disk_errors_total", service="dns") >= 1 and t, 15, "a disk error")
        assert metric(m, "proxyvm_forensics_stopped", service="dns") == 1
        # still answering, while capture is stopped
        assert (await dig(PROXY_IP, port, "after.bad.test", "A", "-b", GUEST_IP)).status == "REFUSED"
        assert (await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP)).status == "NOERROR"
        m = await asyncio.to_thread(pvm.metrics)
        assert metric(m, "proxyvm_forensics_dropped_total", service="dns") >= 1
        log = pvm.tail(200_000)
        assert log.count("forensics: capture stopped") == 1, log[-3000:]
        assert "No space left on device" in log
        files = ring(state, "web1", fdir)
        assert files and sum(f.stat().st_size for f in files) <= 64 * 1024
        for f in files:  # the torn record was cut off: tshark reads every file to its end
            assert len(tshark(f, "dns.qry.name")) > 10
    finally:
        if pvm is not None:
            assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()
        await asyncio.to_thread(subprocess.run, ["umount", str(fdir)], check=False)


@needs_peers
@pytest.mark.lab
async def test_capture_off(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    pvm, port, state = setup(tmp_path, lab_ca.ca_pem, upstream1, extra="forensics: false\n")
    await asyncio.to_thread(pvm.start)
    try:
        assert (await dig(PROXY_IP, port, "evil.bad.test", "A", "-b", GUEST_IP)).status == "REFUSED"
        await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("request", {}).get("qname") == "evil.bad.test")
        await asyncio.sleep(1)
        assert not (state / "forensics").exists()
        assert metric(await asyncio.to_thread(pvm.metrics), "proxyvm_forensics_flows_total", service="dns") == 0
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()
