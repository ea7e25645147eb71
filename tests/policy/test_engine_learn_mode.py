"""`mode: learn`: every request allowed and recorded as rule `learn` at the `mode:` line; rules,
rates, plaintext and exemptions are not consulted; the file is still checked in full."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from policy import Mode, ReasonCode, Verdict, load_policy
from policy.source import SourceError

RULES = """\
# a learn-mode file may keep its rules for later; they are checked but not used
default: deny
mode: learn
rules:
  - id: dns-block
    action: deny
    protocol: dns
    match: {qname: ["*.evil.test"]}
  - id: web-plain
    action: allow
    protocol: http
    match: {host: [old.example.net]}
    plaintext: true
  - id: slow
    action: allow
    protocol: smtp
    rate: 1/hour
"""


@pytest.fixture
def engine(tmp_path: Path):
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return load_policy(p, {"web1"})


@pytest.mark.parametrize(("protocol", "guest", "request_"), [
    ("dns", "web1", {"qname": "x.evil.test", "qtype": "A"}),       # a deny rule would match
    ("dns", "nobody", {"qname": "anything.example", "qtype": "TXT"}),  # unknown guest, default deny
    ("http", "web1", {"host": "old.example.net", "method": "GET", "path": "/"}),
    ("smtp", "web1", {"mail_from": "a@b.c", "rcpt_to": "d@e.f", "size": 1}),
    ("snmp", "unknown", {"agent": "r1", "op": "set", "oid": "1.3.6.1.2.1.1.5.0"}),
    ("ws", "web1", {}),
    ("tls", "web1", {"sni": "", "dst": "203.0.113.9"}),
])
def test_everything_is_allowed_as_rule_learn(engine, protocol: str, guest: str, request_: dict) -> None:
    d = engine.decide(protocol, guest, request_)
    assert d.verdict is Verdict.ALLOW and d.allowed
    assert d.code is ReasonCode.LEARN
    assert (d.rule, d.at) == ("learn", "rules.yaml:3")
    assert d.detail == "learn mode: allowed and recorded without consulting the rules (mode: learn)"
    assert d.audit_fields() == {"verdict": "allow", "rule": "learn", "at": "rules.yaml:3", "reason": d.detail}


def test_no_plaintext_no_limits_no_rate(engine) -> None:
    d = engine.decide("http", "web1", {"host": "old.example.net", "method": "GET", "path": "/"})
    assert d.plaintext is False  # learn mode never lets a request leave unencrypted
    assert dict(d.limits) == {}
    for _ in range(5):  # the smtp rule's 1/hour does not apply
        assert engine.decide("smtp", "web1", {"mail_from": "a@b.c", "rcpt_to": "d@e.f"}).verdict is Verdict.ALLOW


def test_exemptions_are_not_granted(engine) -> None:
    # rebinding protection / SSRF guards stay on: no rule "names" anything in learn mode
    assert engine.named_by_rule("http", "web1", "host", "old.example.net") is False


def test_mode_is_reported(engine) -> None:
    assert engine.mode is Mode.LEARN and str(engine.mode) == "learn"


def test_unknown_protocol_still_raises(engine) -> None:
    with pytest.raises(ValueError, match="unknown protocol 'ftp'"):
        engine.decide("ftp", "web1", {})


def test_a_learn_file_is_still_checked(tmp_path: Path) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text(textwrap.dedent("""\
        mode: learn
        rules:
          - id: a
            action: alow
            protocol: dns
    """))
    with pytest.raises(SourceError) as e:
        load_policy(p, set())
    assert [str(x).splitlines()[0] for x in e.value.problems] == [
        f"{p}:4:13: unknown action 'alow'"]


def test_misspelt_mode_suggests_learn(tmp_path: Path) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text("mode: lern\n")
    with pytest.raises(SourceError) as e:
        load_policy(p, set())
    text = str(e.value.problems[0])
    assert text.startswith(f"{p}:1:7: unknown mode 'lern'") and "learn" in text


def test_mode_line_without_a_mode_key(tmp_path: Path) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text("default: allow\n")
    d = load_policy(p, set()).decide("dns", "x", {"qname": "a.b", "qtype": "A"})
    assert (d.rule, d.code) == ("default", ReasonCode.DEFAULT)  # enforce: unchanged behaviour
