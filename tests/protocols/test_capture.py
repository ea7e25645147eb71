"""protocols.capture without a proxy: the `forensics:` section, the packets scapy builds (IPv4 and IPv6,
UDP, TCP seq/ack), the pcap ring (rotation, per_guest, total, keep, a torn record cut off) and the
writer thread (bounded queue, a disk error stops capture and is counted)."""

from __future__ import annotations

import errno
import os
import struct
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from policy.source import SourceError, parse_yaml
from protocols import capture
from protocols.capture import IN, OUT, Capture, CaptureSettings, Ring, pcap_header, pcap_records, synthesise


def section(tmp_path: Path, text: str) -> CaptureSettings:
    node = parse_yaml(text, str(tmp_path / "proxyvm.yaml"), tmp_path)
    return capture.parse(node.get_map()["forensics"], tmp_path)


def test_parse(tmp_path: Path) -> None:
    s = section(tmp_path, "forensics: {dir: pcaps, per_guest: 1MB, total: 10MB, keep: 2d}\n")
    assert (s.enabled, s.dir, s.per_guest, s.total, s.keep) == (True, tmp_path / "pcaps", 10**6, 10**7, 172800.0)
    assert s.chunk == 125000
    assert section(tmp_path, "forensics: false\n").enabled is False
    assert section(tmp_path, "forensics: true\n") == CaptureSettings()
    assert CaptureSettings().directory(tmp_path) == tmp_path / "forensics"
    for bad, want in (("{per_guest: 1MB, totl: 2MB}", "unknown key 'totl'"), ("{per_guest: 1KB}", "at least 10KB"),
                      ("{per_guest: 2MB, total: 1MB}", "smaller than per_guest"), ("{keep: 0s}", "positive")):
        with pytest.raises(SourceError) as e:
            section(tmp_path, f"forensics: {bad}\n")
        assert want in str(e.value), str(e.value)


def test_udp_ipv4_and_ipv6() -> None:
    t = 1_700_000_000.25
    pk = synthesise("udp", ("fd00::10", 5353), ("fd00::1", 53), [(t, IN, b"q"), (t + 0.5, OUT, b"answer")])
    a, b = IPv6(pk[0][1]), IPv6(pk[1][1])
    assert (a.src, a.dst, a[UDP].sport, a[UDP].dport, bytes(a[UDP].payload)) == ("fd00::10", "fd00::1", 5353, 53, b"q")
    assert (b.src, b.dst, b[UDP].sport, b[UDP].dport, bytes(b[UDP].payload)) == ("fd00::1", "fd00::10", 53, 5353,
                                                                                 b"answer")
    assert [p[0] for p in pk] == [t, t + 0.5]
    v4 = synthesise("udp", ("::ffff:10.0.0.5", 1000), ("10.0.0.1", 53), [(t, IN, b"x")])
    assert IP(v4[0][1]).src == "10.0.0.5"  # a v4-mapped guest is IPv4 in the pcap


def test_tcp_seq_ack_consistent() -> None:
    t = 1_700_000_000.0
    big = bytes(range(256)) * 20  # 5120 bytes: several segments
    pk = synthesise("tcp", ("198.18.0.10", 40000), ("198.18.0.1", 25),
                    [(t, OUT, b"220 hi\r\n"), (t + 1, IN, b"EHLO x\r\n"), (t + 2, IN, big), (t + 3, OUT, b"250 ok\r\n")],
                    isn=(1000, 5000))
    segs = [IP(raw)[TCP] for _, raw in pk]
    assert [str(s.flags) for s in segs[:3]] == ["S", "SA", "A"]
    assert (segs[0].seq, segs[1].seq, segs[1].ack, segs[2].seq, segs[2].ack) == (1000, 5000, 1001, 1001, 5001)
    sent = {True: b"", False: b""}
    for s, (_, raw) in zip(segs, pk, strict=True):
        ip = IP(raw)
        g = ip.src == "198.18.0.10"
        data = bytes(s.payload)
        if data:  # each data segment starts where that side's bytes so far end
            assert s.seq == (1001 if g else 5001) + len(sent[g])
            assert s.ack == (5001 if g else 1001) + len(sent[not g])
            assert len(data) <= capture.SEGMENT
            sent[g] += data
        assert ip.len == len(raw)
    assert sent[True] == b"EHLO x\r\n" + big and sent[False] == b"220 hi\r\n250 ok\r\n"
    fin = [s for s in segs if "F" in str(s.flags)]
    assert len(fin) == 2 and str(segs[-1].flags) == "A" and segs[-1].ack == fin[1].seq + 1
    assert pk[-1][0] == t + 3 and all(pk[i][0] <= pk[i + 1][0] for i in range(len(pk) - 1))


def test_pcap_round_trip(tmp_path: Path) -> None:
    pk = synthesise("udp", ("10.0.0.2", 1), ("10.0.0.1", 2), [(1_700_000_000.123456, IN, b"x")])
    f = tmp_path / "a.pcap"
    f.write_bytes(pcap_header() + pcap_records(pk))
    (p,) = rdpcap(str(f))
    assert float(p.time) == pytest.approx(1_700_000_000.123456, abs=1e-6) and bytes(p) == pk[0][1]


def records(n: int, size: int = 200) -> bytes:
    return pcap_records(synthesise("udp", ("10.0.0.2", 1), ("10.0.0.1", 2), [(time.time(), IN, b"x" * size)]) * n)


def test_ring_rotation_and_per_guest(tmp_path: Path) -> None:
    r = Ring(tmp_path, "dns-1", per_guest=10_000, total=10**6, chunk=2_500)
    for _ in range(60):
        r.append("web1", records(1))  # 244 bytes a record
        files = sorted((tmp_path / "web1").iterdir())
        assert sum(f.stat().st_size for f in files) <= 10_000 + 2_500
    names = [f.name for f in sorted((tmp_path / "web1").iterdir())]
    assert all(n.endswith("-dns-1.pcap") for n in names) and len(names) >= 4
    assert names[0] != "000001-dns-1.pcap"  # the oldest went
    for f in (tmp_path / "web1").iterdir():  # every file is a whole pcap
        assert f.read_bytes()[:4] == struct.pack("<I", 0xA1B2C3D4) and rdpcap(str(f))


def test_ring_total_and_keep(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    r = Ring(tmp_path, "t", per_guest=10**6, total=6_000, keep=100, chunk=1_000, clock=lambda: now[0])
    for g in ("a", "b", "c"):
        for _ in range(10):
            r.append(g, records(1))
    r.sweep()
    sizes = [f.stat().st_size for f in tmp_path.rglob("*.pcap")]
    assert sum(sizes) <= 6_000 + 3 * 1_000
    old = tmp_path / "a" / "000099-x.pcap"
    old.write_bytes(pcap_header())
    os.utime(old, (now[0] - 200, now[0] - 200))
    now[0] += 1
    r.sweep()
    assert not old.exists()


def test_torn_record_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = Ring(tmp_path, "t", chunk=10**6)
    path = r.append("g", records(1))
    size = path.stat().st_size
    real = capture.os.write
    calls = []

    def short_then_full(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(capture.os, "write", short_then_full)
    with pytest.raises(OSError):
        r.append("g", records(1))
    monkeypatch.undo()
    assert path.stat().st_size == size and len(rdpcap(str(path))) == 1


def test_capture_stops_on_disk_error_and_counts(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # mkdir under a file fails: an OSError like a full disk
    cap = Capture(CaptureSettings(), blocker, tag="dns-1")
    assert cap.flow("web1", "dns", "udp", ("10.0.0.2", 1), ("10.0.0.1", 53), [(time.time(), IN, b"q")])
    deadline = time.monotonic() + 5
    while cap.disk_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cap.disk_errors == 1 and cap.health()["stopped"]
    assert not cap.flow("web1", "dns", "udp", ("10.0.0.2", 1), ("10.0.0.1", 53), [(time.time(), IN, b"q")])
    assert cap.dropped == 2
    cap.close(1)


def test_capture_writes_and_off(tmp_path: Path) -> None:
    cap = Capture(CaptureSettings(), tmp_path, tag="smtp-1")
    assert cap.flow("web1", "smtp", "tcp", ("fd00::2", 4000), ("fd00::1", 25),
                    [(time.time(), IN, b"EHLO x\r\n"), (time.time(), OUT, b"250 ok\r\n")])
    cap.close(5)
    assert cap.flows == 1 and cap.packets == 10 and cap.dropped == 0
    (f,) = (tmp_path / "web1").iterdir()
    assert len(rdpcap(str(f))) == 10
    off = capture.make(CaptureSettings(enabled=False), tmp_path, "x")
    assert not off.enabled and not off.flow("g", "dns", "udp", ("10.0.0.2", 1), None, [(0.0, IN, b"q")])
    assert Capture.wanted("deny") and Capture.wanted("would_deny") and not Capture.wanted("allow")
    assert Capture.wanted("allow", quarantined=True)
