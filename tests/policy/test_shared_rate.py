"""The shared rate table (policy.shared_rate) with real processes: engines in separate processes
share one bucket per (rule, guest), a reload keeps it, a changed rate starts afresh, a process
killed while holding a slot lock leaves no stuck lock, and a full table falls back per process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from policy import load_policy
from policy.shared_rate import SharedRates, bucket_key, create

RULES = """\
mode: enforce
default: deny
rules:
  - {{id: limited, action: allow, protocol: dns, match: {{qname: ["*.rate.test"]}}, rate: {rate}}}
"""


def _engine(d: Path, table: Path, rate: str = "100/hour"):
    p = d / "rules.yaml"
    p.write_text(RULES.format(rate=rate))
    e = load_policy(p, guests={"web1"})
    e.shared_rates = SharedRates(table)
    return e


def _worker(d: str, table: str, n: int, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    e = _engine(Path(d), Path(table))
    q.put(sum(e.decide("dns", "web1", {"qname": "a.rate.test", "qtype": "A"}).verdict.value == "allow"
              for _ in range(n)))


def test_two_processes_share_one_bucket(tmp_path: Path) -> None:
    table = create(tmp_path / "rate-dns.table")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), str(table), 400, q)) for _ in range(2)]
    for p in procs:
        p.start()
    allowed = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sum(allowed) == 100, allowed  # not 100 per process


def test_reload_keeps_the_bucket_and_a_new_rate_starts_afresh(tmp_path: Path) -> None:
    table = create(tmp_path / "rate-dns.table")
    req = {"qname": "a.rate.test", "qtype": "A"}
    old = _engine(tmp_path, table, "3/hour")
    assert [old.decide("dns", "web1", req).verdict.value for _ in range(4)] == ["allow"] * 3 + ["deny"]
    # the reloaded policy has a rule in front (index and line move), same id and rate: still empty
    p = tmp_path / "rules.yaml"
    p.write_text(RULES.format(rate="3/hour").replace(
        "rules:\n", "rules:\n  - {id: other, action: deny, protocol: dns, match: {qname: [x.test]}}\n"))
    new = load_policy(p, guests={"web1"})
    new.inherit_rate_state(old)  # what protocols.base.reload_service does
    assert new.shared_rates is old.shared_rates
    assert new.decide("dns", "web1", req).verdict.value == "deny"
    changed = _engine(tmp_path, table, "5/hour")
    assert [changed.decide("dns", "web1", req).verdict.value for _ in range(6)] == ["allow"] * 5 + ["deny"]


def _hold_lock(table: str, ready: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    import fcntl

    r = SharedRates(table)
    fcntl.lockf(r.fd, fcntl.LOCK_EX, 0, 0)  # the whole table
    ready.set()
    time.sleep(60)


def test_a_killed_process_leaves_no_stuck_lock(tmp_path: Path) -> None:
    table = create(tmp_path / "rate-dns.table")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(table), ready))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    r = SharedRates(table)
    t0 = time.monotonic()
    assert r.take(bucket_key("limited", "1/hour", "web1"), 1, 3600, time.monotonic()) is True
    assert time.monotonic() - t0 < 1


def test_full_table_falls_back_to_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import policy.shared_rate as sr

    table = create(tmp_path / "rate-dns.table")
    r = SharedRates(table)
    monkeypatch.setattr(sr, "PROBES", 2)
    key = bucket_key("limited", "1/hour", "web1")
    start = key % sr.SLOTS
    for i in range(2):  # two other buckets in the slots this key would probe
        sr._HEAD.pack_into(r.map, ((start + i) % sr.SLOTS) * sr.SLOT, 12345 + i)
    assert r.take(key, 1, 3600, time.monotonic()) is None and r.full == 1
    e = _engine(tmp_path, table, "1/hour")
    e.shared_rates = r
    req = {"qname": "a.rate.test", "qtype": "A"}
    e._keys[(0, "web1")] = key
    assert [e.decide("dns", "web1", req).verdict.value for _ in range(2)] == ["allow", "deny"]  # own bucket


def test_not_a_table(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"0" * 10)
    with pytest.raises(ValueError, match="not a rate table"):
        SharedRates(tmp_path / "x")
