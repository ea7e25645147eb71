"""The audit log's hash chain: every kind of tampering is caught and named; rotation keeps the chain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxyvm.audit import GENESIS, AuditLog, line_hash, verify


def _write(path: Path, n: int, **kw) -> AuditLog:
    log = AuditLog(path, **kw)
    for i in range(n):
        log.append({"guest": "web1", "src": f"198.18.0.10:{40000 + i}", "protocol": "dns", "verdict": "allow",
                    "rule": "r1", "at": "rules.yaml:3", "reason": "test", "request": {"qname": f"n{i}.example"},
                    "upstream": None})
    log.close()
    return log


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyvm", "audit", "verify", *args], capture_output=True, text=True)


def test_record_shape_and_chain(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 3)
    lines = _lines(p)
    recs = [json.loads(x) for x in lines]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert list(recs[0])[:11] == ["seq", "ts", "guest", "src", "protocol", "verdict", "rule", "at", "reason",
                                  "request", "upstream"]
    assert list(recs[0])[-1] == "prev"
    assert recs[0]["prev"] == GENESIS
    assert recs[1]["prev"] == line_hash(lines[0].encode())
    assert recs[2]["prev"] == line_hash(lines[1].encode())
    assert recs[0]["ts"].endswith("Z") and "T" in recs[0]["ts"]
    res = verify([p])
    assert res.ok and res.records == 3
    r = _cli(str(p))
    assert r.returncode == 0 and "3 records" in r.stdout


def test_resume_continues_chain(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 2)
    _write(p, 2)  # a restart appends and links to the last line
    recs = [json.loads(x) for x in _lines(p)]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]
    assert verify([p]).ok


def _tamper(p: Path, fn) -> None:
    lines = _lines(p)
    lines = fn(lines)
    p.write_text("\n".join(lines) + "\n")


def test_edited_line_is_named(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 6)
    _tamper(p, lambda ls: ls[:2] + [ls[2].replace('"allow"', '"deny"')] + ls[3:])
    res = verify([p])
    assert not res.ok and res.line == 3 and "edited" in res.message
    r = _cli(str(p))
    assert r.returncode == 1 and f"{p}:3:" in r.stderr


def test_edited_last_line_caught_by_head(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 4)
    _tamper(p, lambda ls: ls[:3] + [ls[3].replace("n3.example", "evil.example")])
    res = verify([p])
    assert not res.ok and res.line == 4 and "edited" in res.message


def test_removed_line(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 6)
    _tamper(p, lambda ls: ls[:2] + ls[3:])
    res = verify([p])
    assert not res.ok and res.line == 3 and "removed" in res.message


def test_removed_tail_caught_by_head(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 6)
    _tamper(p, lambda ls: ls[:4])
    res = verify([p])
    assert not res.ok and res.line == 5 and "removed from the end" in res.message


def test_inserted_line(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 5)
    forged = json.loads(_lines(p)[1])
    _tamper(p, lambda ls: ls[:2] + [json.dumps(forged)] + ls[2:])
    res = verify([p])
    assert not res.ok and res.line == 3


def test_reordered_lines(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 5)
    _tamper(p, lambda ls: ls[:1] + [ls[2], ls[1]] + ls[3:])
    res = verify([p])
    assert not res.ok and res.line == 2 and "seq" in res.message


def test_garbage_line(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 3)
    _tamper(p, lambda ls: ls[:1] + ["not json"] + ls[1:])
    res = verify([p])
    assert not res.ok and res.line == 2 and "not an audit record" in res.message


def test_rotation_keeps_chain(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _write(p, 40, rotate_size=2000, keep=50)
    rotated = sorted(tmp_path.glob("audit.jsonl.*[0-9]"), key=lambda x: -int(x.suffix[1:]))
    assert len(rotated) >= 2
    files = [*rotated, p]
    res = verify(files)
    assert res.ok and res.records == 40
    # the new file's first record links to the last record of the previous file
    first_new = json.loads(_lines(p)[0])
    assert first_new["prev"] == line_hash(_lines(rotated[-1])[-1].encode())
    # and dropping a middle file breaks the chain
    res = verify([rotated[0], p])
    assert not res.ok and res.file == str(p) and res.line == 1


def test_verify_usage_errors() -> None:
    r = subprocess.run([sys.executable, "-m", "proxyvm", "audit", "verify"], capture_output=True, text=True)
    assert r.returncode == 2


@pytest.mark.parametrize("content", [b"", b"\x00\x01binary"])
def test_verify_odd_files(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(content)
    res = verify([p], use_head=False)
    assert res.ok == (content == b"")
