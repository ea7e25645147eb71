"""The shipper's disk spool on its own (no NATS): order, bounds, crash leftovers, reading back
from the local log's tail."""

from __future__ import annotations

from pathlib import Path

from proxyvm.audit import AuditLog
from proxyvm.fleet.shipper import Spool, SpoolReader, line_protocol, line_seq, log_lines_after


def _line(seq: int) -> bytes:
    return b'{"seq":%d,"ts":"2026-01-01T00:00:00.000Z","protocol":"dns","pad":"%s","prev":"x"}' % (seq, b"p" * 100)


def test_spool_keeps_order_across_segments_and_frees_acknowledged_ones(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=2000)
    for s in range(1, 101):
        assert sp.append(s, _line(s))
    sp.flush()
    assert len(sp.segments) > 5
    rd = SpoolReader(sp)
    rd.seek_after(0)
    got = [s for s, _, _ in rd.read(1000)]
    assert got == list(range(1, 101))
    total = sp.total
    sp.release_through(50)
    assert sp.total < total and sp.segments[0] <= 51
    rd.seek_after(50)
    assert [s for s, _, _ in rd.read(1000)] == list(range(51, 101))


def test_spool_bound_refuses_then_accepts_after_release(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=3000, segment_bytes=1000)
    n = 0
    while sp.append(n + 1, _line(n + 1)):
        n += 1
    assert 10 < n < 30 and sp.total <= 3000
    sp.flush()
    sp.release_through(n)
    assert sp.append(n + 1, _line(n + 1))


def test_torn_tail_is_cut_and_lines_past_the_log_are_dropped(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20)
    for s in range(1, 11):
        sp.append(s, _line(s))
    sp.close()
    seg = sorted(tmp_path.glob("*.spool"))[-1]
    with open(seg, "ab") as f:
        f.write(b"11\t{\"seq\":11,\"ts\"")  # kill -9 mid-write
    sp2 = Spool(tmp_path, max_bytes=1 << 20)
    assert sp2.last_seq == 10
    assert sp2.cut_after(7) == 3 and sp2.last_seq == 7
    rd = SpoolReader(sp2)
    rd.seek_after(0)
    assert [s for s, _, _ in rd.read(100)] == list(range(1, 8))


def test_local_log_tail_and_line_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(20):
        log.append({"protocol": "proxyvm", "reason": f"r{i}"})
    log.append_encoded(b'{"ts":"2026-01-01T00:00:00.000Z","protocol":"dns"}')
    log.flush()
    got = list(log_lines_after(tmp_path / "audit.jsonl", 15, 21))
    assert [s for s, _ in got] == [16, 17, 18, 19, 20, 21]
    assert got[-1][1] == log.last_line
    assert line_seq(got[0][1]) == 16 and line_protocol(got[0][1]) == "proxyvm" and line_protocol(got[-1][1]) == "dns"
