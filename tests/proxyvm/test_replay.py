"""`proxyvm replay --policy NEW.yaml`: recorded decisions decided again, the report and its exit
code (0 no change, 3 changes), what is skipped, and bad logs / bad policies reported cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.proxyvm.auditlogs import config, dns, http, run, smtp, snmp, supervisor, tls, write_log

NEW = """\
mode: {mode}
default: deny
rules:
  - id: dns-ex
    action: allow
    protocol: dns
    guests: [web1]
    match: {{qname: ["*.example.com"], qtype: [A, AAAA]}}
  - id: web
    action: allow
    protocol: http
    match: {{host: [api.example.com], path: ["/v1/*"]}}
  - id: mail
    action: allow
    protocol: smtp
    match: {{rcpt_to: ["*@example.org"]}}
  - id: snmp-sys
    action: allow
    protocol: snmp
    match: {{op: [get], oid: ["1.3.6.1.2.1.1"]}}
  - id: tls-ex
    action: allow
    protocol: tls
    match: {{sni: ["*.example.com"]}}
"""


def _policy(d: Path, mode: str = "enforce", text: str | None = None) -> Path:
    p = d / "new.yaml"
    p.write_text(text if text is not None else NEW.format(mode=mode))
    return p


def _report(r) -> dict:
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def _records() -> list[dict]:
    return [
        supervisor("start"),
        dns("web1", "www.example.com", t=1),                                     # allow -> allow
        dns("web1", "www.example.com", t=1.5),                                   # the same request again
        dns("web1", "evil.test", t=2),                                           # allow -> deny
        dns("db1", "www.example.com", verdict="deny", rule="default", at="rules.yaml:2", t=3),  # deny -> deny
        http("web1", "api.example.com", "/v1/items/1", verdict="deny", rule="default", at="r.yaml:2", t=4),
        http("web1", "api.example.com", "/v2/x", t=5),                           # allow -> deny
        smtp("mail1", "a@example.com", "ops@example.org", t=6),                  # allow -> allow
        smtp("mail1", "a@example.com", "x@elsewhere.net", verdict="deny", rule="default", at="r.yaml:2", t=7),  # d->d
        snmp("web1", "get", ["1.3.6.1.2.1.1.1.0", "1.3.6.1.2.1.1.5.0"], t=8),     # allow -> allow
        snmp("web1", "get", ["1.3.6.1.2.1.1.1.0", "1.3.6.1.4.1.9.1"], t=9),       # second OID denied -> deny
        tls("web1", "secure.example.com", t=10),                                 # allow -> allow
        # not decisions of a rules file: skipped
        {**smtp("mail1", "a@example.com", "ops@example.org", t=11), "event": "accepted"},
        {**http("web1", "api.example.com", "/v1/x", protocol="ws", t=12), "event": "closed"},
        dns("web1", "rebind.example.com", verdict="deny", rule="rebinding-protection", at="dns", t=13),
        {"ts": "2026-09-21T14:13:40.000Z", "kind": "alert", "guest": "web1", "detector": "dns_tunnel"},
    ]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write_log(tmp_path / "audit.jsonl", _records())


def test_changes_are_counted_grouped_and_exit_3(tmp_path: Path, log: Path) -> None:
    r = run("replay", "--json", "--policy", str(_policy(tmp_path)), str(log))
    assert r.returncode == 3, r.stderr
    rep = _report(r)
    assert (rep["replayed"], rep["unchanged"], rep["allow_to_deny"], rep["deny_to_allow"]) == (11, 7, 3, 1)
    assert rep["skipped"] == {"builtin": 1, "follow_up": 2, "non_decision": 2}
    assert rep["by_guest"] == {
        "db1": {"unchanged": 1, "allow->deny": 0, "deny->allow": 0},
        "mail1": {"unchanged": 2, "allow->deny": 0, "deny->allow": 0},
        "web1": {"unchanged": 4, "allow->deny": 3, "deny->allow": 1},
    }
    changes = {(g["change"], g["guest"], g["protocol"], g["old_rule"], g["new_rule"]): g
               for g in rep["groups"] if g["change"] != "unchanged"}
    assert set(changes) == {
        ("allow->deny", "web1", "dns", "learn", "default"),
        ("allow->deny", "web1", "http", "learn", "default"),
        ("allow->deny", "web1", "snmp", "learn", "default"),
        ("deny->allow", "web1", "http", "default", "web"),
    }
    ex = changes[("allow->deny", "web1", "dns", "learn", "default")]["examples"]
    assert ex == [{"file": str(log), "line": 4, "seq": 4, "ts": ex[0]["ts"],
                   "request": {"qname": "evil.test", "qtype": "A"}, "summary": "evil.test A",
                   "new_reason": "no rule matched; default deny"}]
    assert changes[("deny->allow", "web1", "http", "default", "web")]["new_at"] == "new.yaml:9"


def test_text_report(tmp_path: Path, log: Path) -> None:
    r = run("replay", "--policy", str(_policy(tmp_path)), str(log))
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"replayed 11 decisions under {tmp_path / 'new.yaml'}: 7 unchanged, 3 allow->deny, 1 deny->allow"
    assert "  allow->deny        1  web1 dns: learn -> default (new.yaml:2)" in lines
    assert any(line.startswith(f"      e.g. {log}:4 seq 4 ") and line.endswith("evil.test A") for line in lines)
    assert any(line.split() == ["web1", "4", "3", "1"] for line in lines)


def test_nothing_changes_exit_0(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "www.example.com"), tls("web1", "a.example.com"),
                                             dns("db1", "x.test", verdict="deny", rule="default", at="r.yaml:2")])
    r = run("replay", "--json", "--policy", str(_policy(tmp_path)), str(p))
    assert r.returncode == 0, r.stderr
    rep = _report(r)
    assert (rep["unchanged"], rep["allow_to_deny"], rep["deny_to_allow"]) == (3, 0, 0)


def test_would_deny_passes_but_is_reported_apart(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "www.example.com"), dns("web1", "evil.test"),
                                             dns("web1", "evil.test", verdict="would_deny", rule="default",
                                                 at="r.yaml:2")])
    r = run("replay", "--json", "--policy", str(_policy(tmp_path, mode="monitor")), str(p))
    assert r.returncode == 0, r.stderr
    rep = _report(r)
    assert (rep["unchanged"], rep["allow_to_deny"], rep["deny_to_allow"]) == (3, 0, 0)
    assert rep["verdicts"] == {"allow->allow": 1, "allow->would_deny": 1, "would_deny->would_deny": 1}
    text = run("replay", "--policy", str(_policy(tmp_path, mode="monitor")), str(p)).stdout
    assert "would_deny (passes, reported apart): allow->would_deny 1" in text


def test_rate_rules_follow_the_recorded_pace(tmp_path: Path) -> None:
    pol = _policy(tmp_path, text="""\
default: deny
rules:
  - id: dns-slow
    action: allow
    protocol: dns
    match: {qname: [www.example.com]}
    rate: 2/minute
""")
    # 3 queries within a second: the third is over the rate; one a minute later passes again
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "www.example.com", t=x) for x in (0, 0.1, 0.2, 61)])
    rep = _report(run("replay", "--json", "--policy", str(pol), str(p)))
    assert rep["verdicts"] == {"allow->allow": 3, "allow->deny": 1}
    assert [g["examples"][0]["line"] for g in rep["groups"] if g["change"] == "allow->deny"] == [3]


def test_guests_from_the_records_or_the_config(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "www.example.com")])
    pol = _policy(tmp_path, text="default: deny\nrules:\n  - id: a\n    action: allow\n    protocol: dns\n"
                                 "    guests: [web1, mail9]\n")
    r = run("replay", "--policy", str(pol), str(p))
    assert r.returncode == 1
    assert f"{pol}:6:20: unknown guest 'mail9'" in r.stderr
    assert "guests known from the records: web1" in r.stderr
    cfg = config(tmp_path, ["web1", "mail9"])
    r = run("replay", "--json", "-c", str(cfg), "--policy", str(pol), str(p))
    assert r.returncode == 0, r.stderr
    assert _report(r)["unchanged"] == 1


def test_reads_the_configs_log_when_no_file_is_given(tmp_path: Path, log: Path) -> None:
    cfg = config(tmp_path, ["web1", "db1", "mail1"])
    r = run("replay", "--json", "-c", str(cfg), "--policy", str(_policy(tmp_path)))
    assert r.returncode == 3, r.stderr
    assert _report(r)["replayed"] == 11


def test_output_is_deterministic(tmp_path: Path, log: Path) -> None:
    pol = str(_policy(tmp_path))
    a = run("replay", "--json", "--policy", pol, str(log)).stdout
    b = run("replay", "--json", "--policy", pol, str(log)).stdout
    assert a == b and a


# -- bad input --------------------------------------------------------------------------------
def test_policy_with_errors_prints_file_line_col(tmp_path: Path, log: Path) -> None:
    pol = _policy(tmp_path, text="default: deny\nrules:\n  - id: a\n    acton: allow\n    protocol: dns\n")
    r = run("replay", "--policy", str(pol), str(log))
    assert r.returncode == 1 and r.stdout == ""
    assert f"{pol}:4:5: unknown key 'acton'" in r.stderr
    assert "hint: did you mean 'action'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_policy_file(tmp_path: Path, log: Path) -> None:
    r = run("replay", "--policy", str(tmp_path / "nope.yaml"), str(log))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nope.yaml" in r.stderr


def test_broken_chain_is_refused_unless_no_verify(tmp_path: Path, log: Path) -> None:
    data = log.read_text().replace('"qname": "evil.test"', '"qname": "good.example.com"')
    log.write_text(data)
    r = run("replay", "--policy", str(_policy(tmp_path)), str(log))
    assert r.returncode == 1 and r.stdout == ""
    assert f"{log}:4: line was edited" in r.stderr
    assert "refusing to replay" in r.stderr and "--no-verify" in r.stderr
    r = run("replay", "--json", "--no-verify", "--policy", str(_policy(tmp_path)), str(log))
    assert r.returncode == 3
    assert "the chain is broken, reading it anyway (--no-verify)" in r.stderr
    assert _report(r)["allow_to_deny"] == 2  # the edited record now passes


def test_truncated_log(tmp_path: Path, log: Path) -> None:
    log.write_bytes(log.read_bytes()[:-30])
    r = run("replay", "--policy", str(_policy(tmp_path)), str(log))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{log}:16: truncated line (no newline)" in r.stderr and "refusing" in r.stderr
    r = run("replay", "--json", "--no-verify", "--policy", str(_policy(tmp_path)), str(log))
    assert r.returncode == 3
    assert f"{log}:16: truncated line (no newline): the file was cut mid-write; skipped" in r.stderr
    assert _report(r)["skipped"]["bad_line"] == 1


def test_not_json(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    p.write_text("hello\nworld\n")
    r = run("replay", "--policy", str(_policy(tmp_path)), str(p))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{p}:1: not an audit record (bad JSON or no seq/prev)" in r.stderr
    r = run("replay", "--no-verify", "--policy", str(_policy(tmp_path)), str(p))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{p}:1: not JSON" in r.stderr and f"{p}:2: not JSON" in r.stderr
    assert "no audit records in" in r.stderr


def test_empty_log(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    p.write_bytes(b"")
    r = run("replay", "--policy", str(_policy(tmp_path)), str(p))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"no audit records in {p}" in r.stderr


def test_record_from_another_version(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "www.example.com"),
                                             {**dns("web1", "x.example.com"), "protocol": "gopher"},
                                             {**dns("web1", "y.example.com"), "request": "qname=y"}])
    r = run("replay", "--policy", str(_policy(tmp_path)), str(p))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{p}:2: unknown protocol 'gopher': a record from another version of proxyvm?" in r.stderr
    r = run("replay", "--json", "--no-verify", "--policy", str(_policy(tmp_path)), str(p))
    assert r.returncode == 0
    assert f"{p}:3: request is not an object" in r.stderr
    assert _report(r)["replayed"] == 1


def test_huge_line(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "www.example.com"), dns("web1", "x" * 3_000_000)])
    r = run("replay", "--json", "--policy", str(_policy(tmp_path)), str(p))
    assert "Traceback" not in r.stderr
    assert r.returncode == 1
    assert f"{p}:2: line longer than 1048576 bytes" in r.stderr
    r = run("replay", "--json", "--no-verify", "--policy", str(_policy(tmp_path)), str(p))
    assert r.returncode == 0 and _report(r)["replayed"] == 1
