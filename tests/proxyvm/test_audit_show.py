"""`proxyvm audit show`: filters, rotation order, per-service chains merged by time, exact lines
with --json, and bad files reported as FILE:LINE without a traceback."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from proxyvm.auditlog_read import AuditReadError, chains_of, log_set, parse_time, read_chains, ts_key
from tests.proxyvm.auditlogs import config, dns, http, run, smtp, supervisor, ts, write_log


def _records() -> list[dict]:
    return [
        supervisor("start", t=0),
        dns("web1", "www.example.com", t=1),
        dns("web1", "evil.test", verdict="deny", rule="default", at="rules.yaml:2", t=2),
        http("web1", "api.example.com", "/v1/items/1", t=3),
        smtp("mail1", "app@example.com", "ops@example.org", t=4),
        {"ts": ts(5), "kind": "alert", "guest": "web1", "detector": "dns_tunnel", "severity": "high",
         "evidence": {}, "records": [2]},
        dns("mail1", "mx.example.org", qtype="MX", verdict="would_deny", rule="default", at="rules.yaml:2", t=6),
    ]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write_log(tmp_path / "audit.jsonl", _records())


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


def _seqs(out: str) -> list[int]:
    return [json.loads(line)["seq"] for line in out.splitlines()]


def test_json_prints_the_stored_lines_exactly(log: Path) -> None:
    r = run("audit", "show", "--json", str(log))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == _lines(log)


@pytest.mark.parametrize(("args", "seqs"), [
    (["--guest", "web1"], [2, 3, 4, 6]),
    (["--guest", "web1", "--guest", "mail1"], [2, 3, 4, 5, 6, 7]),
    (["--protocol", "dns"], [2, 3, 7]),
    (["--verdict", "deny"], [3]),
    (["--verdict", "would_deny", "--verdict", "deny"], [3, 7]),
    (["--rule", "default"], [3, 7]),
    (["--kind", "alert"], [6]),
    (["--kind", "service"], [1]),
    (["--kind", "decision", "--guest", "mail1"], [5, 7]),
    (["--since", ts(3)], [4, 5, 6, 7]),
    (["--until", ts(3)], [1, 2, 3]),
    (["--since", ts(2), "--until", ts(5), "--protocol", "http"], [4]),
])
def test_filters(log: Path, args: list[str], seqs: list[int]) -> None:
    r = run("audit", "show", "--json", *args, str(log))
    assert r.returncode == 0, r.stderr
    assert _seqs(r.stdout) == seqs


def test_since_a_duration_ago(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC).timestamp()
    recs = [dns("web1", "old.example.com"), dns("web1", "new.example.com")]
    recs[0]["ts"] = dt.datetime.fromtimestamp(now - 7200, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    recs[1]["ts"] = dt.datetime.fromtimestamp(now - 60, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    p = write_log(tmp_path / "audit.jsonl", recs)
    r = run("audit", "show", "--since", "1h", str(p))
    assert r.returncode == 0, r.stderr
    assert "new.example.com" in r.stdout and "old.example.com" not in r.stdout
    r = run("audit", "show", "--since", "3h", "--until", "30m", str(p))
    assert "new.example.com" not in r.stdout and "old.example.com" in r.stdout


def test_parse_time_forms() -> None:
    now = dt.datetime(2026, 11, 27, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_time("1h", now) == "2026-11-27T11:00:00.000Z"
    assert parse_time("30m", now) == "2026-11-27T11:30:00.000Z"
    assert parse_time("2d", now) == "2026-11-25T12:00:00.000Z"
    assert parse_time("2026-11-27", now) == "2026-11-27T00:00:00.000Z"
    assert parse_time("2026-11-27T10:00:00Z", now) == "2026-11-27T10:00:00.000Z"
    assert parse_time("2026-11-27T10:00:00+01:00", now) == "2026-11-27T09:00:00.000Z"
    with pytest.raises(ValueError, match="bad time 'yesterday'"):
        parse_time("yesterday", now)
    assert ts_key("2026-11-27T10:00:00+00:00") == "2026-11-27T10:00:00.000Z"
    assert ts_key(None) == "" and ts_key("not a time") == ""


def test_bad_time_is_a_usage_error(log: Path) -> None:
    r = run("audit", "show", "--since", "last tuesday", str(log))
    assert r.returncode == 2
    assert "bad time 'last tuesday'" in r.stderr and "Traceback" not in r.stderr


def test_table_is_one_line_per_record_and_escapes_control_characters(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "a\x1b[31mred\n.example.com"), supervisor("start")])
    r = run("audit", "show", str(p))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert "\x1b" not in r.stdout and "\\x1b[31mred\\n.example.com A" in lines[0]
    assert lines[0].split()[1:5] == ["1", "web1", "dns", "allow"]
    assert lines[1].split()[1:4] == ["2", "-", "service"]


def test_rotated_files_read_oldest_first_from_the_config(tmp_path: Path) -> None:
    recs = [dns("web1", f"n{i}.example.com", t=i) for i in range(60)]
    write_log(tmp_path / "audit.jsonl", recs, rotate_size=1024)
    rotated = sorted(tmp_path.glob("audit.jsonl.*[0-9]"))
    assert len(rotated) >= 3  # the test is about ordering across several rotated files
    cfg = config(tmp_path, ["web1"])
    r = run("audit", "show", "--json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert _seqs(r.stdout) == list(range(1, 61))
    # the same set named on the command line, in any order
    files = [str(p) for p in sorted(tmp_path.glob("audit.jsonl*")) if not p.name.endswith(".head")]
    r2 = run("audit", "show", "--json", *reversed(files))
    assert r2.stdout == r.stdout


def test_per_service_chains_are_merged_by_time(tmp_path: Path) -> None:
    write_log(tmp_path / "audit.jsonl", [supervisor("start", t=0), supervisor("stop", t=10)])
    write_log(tmp_path / "audit.dns.jsonl", [dns("web1", "a.example.com", t=1), dns("web1", "c.example.com", t=5)])
    write_log(tmp_path / "audit.http.jsonl", [http("web1", "b.example.com", "/", t=3),
                                              http("web1", "d.example.com", "/", t=7)])
    chains = log_set(tmp_path / "audit.jsonl")
    assert [Path(c.name).name for c in chains] == ["audit.jsonl", "audit.dns.jsonl", "audit.http.jsonl"]
    cfg = config(tmp_path, ["web1"])
    r = run("audit", "show", "-c", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["ts"] for g in got] == sorted(g["ts"] for g in got)
    assert [(g.get("request") or {}).get("qname") or (g.get("request") or {}).get("host") or g["reason"]
            for g in got] == ["start", "a.example.com", "b.example.com", "c.example.com", "d.example.com", "stop"]


def test_chains_of_groups_rotations() -> None:
    chains = chains_of(["/l/audit.jsonl", "/l/audit.jsonl.1", "/l/audit.jsonl.10", "/l/audit.jsonl.2",
                        "/l/audit.dns.jsonl"])
    assert [[str(f) for f in c.files] for c in chains] == [
        ["/l/audit.jsonl.10", "/l/audit.jsonl.2", "/l/audit.jsonl.1", "/l/audit.jsonl"],
        ["/l/audit.dns.jsonl"],
    ]


# -- bad input --------------------------------------------------------------------------------
def _no_traceback(r) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


def test_not_json_line_is_named_and_the_rest_shown(log: Path) -> None:
    lines = log.read_bytes().splitlines(keepends=True)
    lines.insert(2, b"this is not json\n")
    log.write_bytes(b"".join(lines))
    r = run("audit", "show", "--json", str(log))
    _no_traceback(r)
    assert r.returncode == 1
    assert f"{log}:3: not JSON" in r.stderr
    assert _seqs(r.stdout) == [1, 2, 3, 4, 5, 6, 7]


def test_truncated_last_line(log: Path) -> None:
    data = log.read_bytes()
    log.write_bytes(data[:-40])
    r = run("audit", "show", "--json", str(log))
    _no_traceback(r)
    assert r.returncode == 1
    assert f"{log}:7: truncated line" in r.stderr
    assert _seqs(r.stdout) == [1, 2, 3, 4, 5, 6]


def test_huge_line(log: Path) -> None:
    with open(log, "ab") as f:
        f.write(b'{"seq": 8, "ts": "x", "junk": "' + b"A" * (3 * 1024 * 1024) + b'"}\n')
        f.write(b'{"seq": 9, "ts": "2026-09-21T14:13:30.000Z", "prev": "0"}\n')
    r = run("audit", "show", "--json", str(log))
    _no_traceback(r)
    assert r.returncode == 1
    assert f"{log}:8: line longer than" in r.stderr
    assert _seqs(r.stdout) == [1, 2, 3, 4, 5, 6, 7, 9]


def test_json_that_is_not_a_record(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    p.write_text('[1, 2, 3]\n{"hello": "world"}\n')
    r = run("audit", "show", str(p))
    _no_traceback(r)
    assert r.returncode == 1
    assert f"{p}:1: not an audit record" in r.stderr and f"{p}:2: not an audit record" in r.stderr


def test_binary_file(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00garbage\n")
    r = run("audit", "show", str(p))
    _no_traceback(r)
    assert r.returncode == 1
    assert f"{p}:1: not JSON" in r.stderr


def test_empty_file_shows_nothing(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    p.write_bytes(b"")
    r = run("audit", "show", str(p))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_missing_file(tmp_path: Path) -> None:
    r = run("audit", "show", str(tmp_path / "nope.jsonl"))
    _no_traceback(r)
    assert r.returncode == 1
    assert f"{tmp_path / 'nope.jsonl'}: cannot read: No such file or directory" in r.stderr


def test_no_log_at_the_config_path(tmp_path: Path) -> None:
    cfg = config(tmp_path, ["web1"])
    r = run("audit", "show", "-c", str(cfg))
    _no_traceback(r)
    assert r.returncode == 1 and "no audit log at" in r.stderr


def test_reader_raises_in_strict_mode(log: Path) -> None:
    log.write_bytes(log.read_bytes() + b"{oops\n")
    with pytest.raises(AuditReadError, match=r":8: not JSON"):
        list(read_chains(chains_of([log])))
