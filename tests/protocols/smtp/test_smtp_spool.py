"""The durable spool: atomic commit, recovery after a crash, per-recipient state, backoff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocols.smtp.settings import RetrySettings
from protocols.smtp.spool import (
    Envelope,
    RcptState,
    Spool,
    SpoolError,
    backoff,
    new_id,
    with_state,
)


def env(ident="A1", rcpts=("a@x.example", "b@x.example")):
    return Envelope(id=ident, guest="mail1", src="198.18.0.11:4000", helo="h", mail_from="s@x.example",
                    rcpts=tuple(rcpts), received=1000.0, size=5, message_id="<m@x>", rules=(("r", "f:1"),) * 2)


def test_store_and_read_back_survives_reopen(tmp_path):
    sp = Spool(tmp_path, lambda: 1000.0)
    sp.open()
    e = sp.store(env(), b"Subject: x\r\n\r\nbody\r\n")
    assert sp.message("A1") == b"Subject: x\r\n\r\nbody\r\n"
    e = with_state(e, attempts=1, rcpts={"a@x.example": RcptState("delivered", "250 ok", 1)})
    sp.save_state(e)
    entries, problems = Spool(tmp_path, lambda: 0).open()
    assert problems == [] and len(entries) == 1
    back = entries[0]
    assert back.envelope == env() and back.pending() == ["b@x.example"] and back.state.attempts == 1
    sp.remove("A1")
    assert Spool(tmp_path, lambda: 0).open() == ([], [])


def test_recovery_removes_crash_garbage_and_quarantines_corrupt(tmp_path):
    sp = Spool(tmp_path, lambda: 0)
    sp.open()
    (sp.tmp / "half-written.msg.1234").write_bytes(b"partial")  # crash before rename: never acknowledged
    (sp.queue / "ORPHAN.st").write_text("{}")  # crash between the two unlinks of a finished entry
    (sp.queue / "BAD.msg").write_bytes(b"not json\nbody")
    sp.store(env("GOOD"), b"m\r\n")
    entries, problems = Spool(tmp_path, lambda: 0).open()
    assert [e.id for e in entries] == ["GOOD"]
    assert len(problems) == 1 and problems[0].startswith("BAD:")
    assert (sp.bad / "BAD.msg").exists() and not (sp.queue / "ORPHAN.st").exists()
    assert list(sp.tmp.iterdir()) == []


def test_unwritable_spool_raises_and_leaves_nothing(tmp_path):
    sp = Spool(tmp_path, lambda: 0)
    sp.open()
    sp.queue.rename(tmp_path / "moved")  # the rename target is gone: the commit fails after the write
    with pytest.raises(SpoolError):
        sp.store(env(), b"x")
    assert list(sp.tmp.iterdir()) == []


def test_envelope_json_has_no_body_and_is_one_line(tmp_path):
    sp = Spool(tmp_path, lambda: 0)
    sp.open()
    sp.store(env(), b"Subject: secret\r\n\r\nBODY-SECRET\r\n")
    head = (sp.queue / "A1.msg").read_bytes().split(b"\n", 1)[0]
    d = json.loads(head)
    assert d["rcpts"] == ["a@x.example", "b@x.example"] and b"BODY-SECRET" not in head


def test_backoff_doubles_from_first_and_caps():
    r = RetrySettings(first=60, max_age=86400, max_interval=600)
    assert [backoff(n, r) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]
    assert backoff(1, RetrySettings(first=900, max_age=86400, max_interval=60)) == 900


def test_ids_sort_by_time_and_are_unique():
    ids = [new_id(1000.0) for _ in range(1000)]
    assert len(set(ids)) == 1000 and new_id(999.0) < min(ids) < new_id(1001.0)


def test_worker_partitions_adoption_and_mailq(tmp_path: Path) -> None:
    """`workers: N`: worker I>=1 owns spool/workers/I; worker 0 adopts the parts of workers that no
    longer run (committed entries with their state), and mailq lists every part."""
    import time as _time

    from protocols.smtp.mailq import list_spool
    from protocols.smtp.spool import Envelope, Spool, adopt_orphans, new_id, partition_dir, partitions

    top = tmp_path / "spool"
    assert partition_dir(top, 0) == top and partition_dir(top, 2) == top / "workers" / "2"
    ids = {}
    for w in (0, 1, 2):
        sp = Spool(partition_dir(top, w), _time.time)
        sp.open()
        ident = new_id(_time.time())
        sp.store(Envelope(ident, "g", "1.2.3.4:5", "h", "a@example.com", ("b@example.org",), _time.time(), 3), b"x\r\n")
        ids[w] = ident
    assert partitions(top) == [top, top / "workers" / "1", top / "workers" / "2"]
    assert sorted(r.id for r in list_spool(top)) == sorted(ids.values())
    assert adopt_orphans(top, 2) == 1  # worker 2 no longer runs: its message moves to worker 0
    entries, problems = Spool(top, _time.time).open()
    assert not problems and sorted(e.id for e in entries) == sorted([ids[0], ids[2]])
    assert [e.id for e in Spool(partition_dir(top, 1), _time.time).open()[0]] == [ids[1]]
    assert adopt_orphans(top, 2) == 0
