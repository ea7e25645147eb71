"""Engine semantics, table-driven: first match, every key kind, guests, defaults, monitor mode, rate
limits with an injected clock, limits/plaintext, named_by_rule and name files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from policy import Decision, Engine, ReasonCode, Verdict, load_policy
from policy.decision import make_decision

GUESTS = {"web1", "mail1", "db1"}

RULES = """\
mode: enforce
default: deny
rules:
  - id: dns-block
    action: deny
    protocol: dns
    match:
      qname: ["bad.example.com", "*.evil.test"]
  - id: dns-corp
    action: allow
    protocol: dns
    guests: [web1, mail1]
    match:
      qname: ["example.com", "*.example.com"]
      qtype: [A, AAAA, MX, TXT]
  - id: dns-private-answer
    action: deny
    protocol: dns
    match:
      answer_ip: ["10.0.0.0/8", "fd00::/8"]
  - id: dns-any-for-db
    action: allow
    protocol: dns
    guests: [db1]
  - id: mail-out
    action: allow
    protocol: smtp
    guests: [mail1]
    match:
      mail_from: ["*@example.com", "<>"]
      rcpt_to: ["*@example.org", "ops@partner.net", "*@*.example.net"]
      max_size: 10MB
  - id: snmp-read
    action: allow
    protocol: snmp
    match: {op: [get, getnext, getbulk], oid: ["1.3.6.1.2.1"]}
  - id: snmp-agent
    action: allow
    protocol: snmp
    match: {agent: [router1], op: [set]}
  - id: api
    action: allow
    protocol: http
    guests: [web1]
    match: {host: ["api.example.com"], method: [GET, POST], path: ["/v1/*", "/health"], max_body: 1MB}
  - id: port-8080
    action: allow
    protocol: http
    match: {host: ["*"], port: [8080]}
  - id: legacy
    action: allow
    protocol: http
    match: {host: ["old.example.net"]}
    plaintext: true
  - id: ws-chat
    action: allow
    protocol: ws
    match: {host: ["chat.example.com"], path: ["/socket"], max_message: 64KiB}
  - id: tls-internal
    action: deny
    protocol: tls
    match: {dst: ["192.168.0.0/16"]}
  - id: tls-corp
    action: allow
    protocol: tls
    match: {sni: ["*.example.com"]}
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    d = tmp_path_factory.mktemp("rules")
    (d / "rules.yaml").write_text(RULES)
    return load_policy(d / "rules.yaml", GUESTS)


CASES: list[tuple[str, str, dict[str, Any], str, str]] = [
    # protocol, guest, request, expected rule, expected verdict
    ("dns", "web1", {"qname": "www.example.com", "qtype": "A"}, "dns-corp", "allow"),
    ("dns", "web1", {"qname": "WWW.Example.COM.", "qtype": "a"}, "dns-corp", "allow"),
    ("dns", "web1", {"qname": "example.com", "qtype": "MX"}, "dns-corp", "allow"),
    ("dns", "web1", {"qname": "example.com", "qtype": "SRV"}, "default", "deny"),
    ("dns", "web1", {"qname": "notexample.com", "qtype": "A"}, "default", "deny"),
    ("dns", "web1", {"qname": "bad.example.com", "qtype": "A"}, "dns-block", "deny"),  # first match
    ("dns", "web1", {"qname": "a.bad.example.com", "qtype": "A"}, "dns-corp", "allow"),
    ("dns", "web1", {"qname": "evil.test", "qtype": "A"}, "default", "deny"),  # *.x is not x
    ("dns", "web1", {"qname": "x.y.evil.test", "qtype": "A"}, "dns-block", "deny"),
    ("dns", "web2", {"qname": "www.example.com", "qtype": "A"}, "default", "deny"),  # not a known guest
    ("dns", "unknown", {"qname": "www.example.com", "qtype": "A"}, "default", "deny"),
    ("dns", "db1", {"qname": "anything.org", "qtype": "A"}, "dns-any-for-db", "allow"),
    # answer_ip rules fit only requests that carry answer_ip
    ("dns", "db1", {"qname": "x.org", "qtype": "A", "answer_ip": "10.1.2.3"}, "dns-private-answer", "deny"),
    ("dns", "db1", {"qname": "x.org", "qtype": "A", "answer_ip": "::ffff:10.1.2.3"}, "dns-private-answer", "deny"),
    ("dns", "db1", {"qname": "x.org", "qtype": "A", "answer_ip": "fd00::5"}, "dns-private-answer", "deny"),
    ("dns", "db1", {"qname": "x.org", "qtype": "A", "answer_ip": "11.0.0.1"}, "dns-any-for-db", "allow"),
    ("dns", "db1", {"qname": "x.org", "qtype": "A", "answer_ip": "not-an-ip"}, "dns-any-for-db", "allow"),
    ("smtp", "mail1", {"mail_from": "a@example.com", "rcpt_to": "b@example.org", "size": 0}, "mail-out", "allow"),
    ("smtp", "mail1", {"mail_from": "<A@Example.com>", "rcpt_to": "<B@EXAMPLE.ORG>"}, "mail-out", "allow"),
    ("smtp", "mail1", {"mail_from": "", "rcpt_to": "ops@partner.net"}, "mail-out", "allow"),  # bounce
    ("smtp", "mail1", {"mail_from": "a@example.com", "rcpt_to": "dev@partner.net"}, "default", "deny"),
    ("smtp", "mail1", {"mail_from": "a@example.com", "rcpt_to": "x@mx.example.net"}, "mail-out", "allow"),
    ("smtp", "mail1", {"mail_from": "a@example.com", "rcpt_to": "x@example.net"}, "default", "deny"),
    ("smtp", "mail1", {"mail_from": "a@sub.example.com", "rcpt_to": "b@example.org"}, "default", "deny"),
    ("smtp", "mail1", {"mail_from": "a@example.com"}, "default", "deny"),  # no rcpt_to
    ("smtp", "web1", {"mail_from": "a@example.com", "rcpt_to": "b@example.org"}, "default", "deny"),
    ("snmp", "web1", {"agent": "r", "op": "get", "oid": "1.3.6.1.2.1.1.1.0"}, "snmp-read", "allow"),
    ("snmp", "web1", {"agent": "r", "op": "GETNEXT", "oid": ".1.3.6.1.2.1"}, "snmp-read", "allow"),
    ("snmp", "web1", {"agent": "r", "op": "get", "oid": "1.3.6.1.2.10"}, "default", "deny"),
    ("snmp", "web1", {"agent": "r", "op": "get", "oid": "1.3.6.1.2"}, "default", "deny"),
    ("snmp", "web1", {"agent": "r", "op": "set", "oid": "1.3.6.1.2.1.1.5.0"}, "default", "deny"),
    ("snmp", "web1", {"agent": "router1", "op": "set", "oid": "1.3.6.1.2.1.1.5.0"}, "snmp-agent", "allow"),
    ("http", "web1", {"method": "GET", "host": "api.example.com", "path": "/v1/users/7"}, "api", "allow"),
    ("http", "web1", {"method": "get", "host": "API.example.com", "path": "/health"}, "api", "allow"),
    ("http", "web1", {"method": "GET", "host": "api.example.com", "path": "/V1/users"}, "default", "deny"),
    ("http", "web1", {"method": "GET", "host": "api.example.com", "path": "/healthz"}, "default", "deny"),
    ("http", "web1", {"method": "DELETE", "host": "api.example.com", "path": "/v1/x"}, "default", "deny"),
    ("http", "web2", {"method": "GET", "host": "api.example.com", "path": "/v1/x"}, "default", "deny"),
    ("http", "web2", {"method": "GET", "host": "x.org", "path": "/", "port": 8080}, "port-8080", "allow"),
    ("http", "web2", {"method": "GET", "host": "x.org", "path": "/", "port": "8080"}, "port-8080", "allow"),
    ("http", "web2", {"method": "GET", "host": "x.org", "path": "/"}, "default", "deny"),
    ("http", "web2", {"method": "GET", "host": "old.example.net", "path": "/"}, "legacy", "allow"),
    ("ws", "web2", {"method": "GET", "host": "chat.example.com", "path": "/socket"}, "ws-chat", "allow"),
    ("ws", "web2", {"method": "GET", "host": "old.example.net", "path": "/"}, "default", "deny"),  # http rule
    ("tls", "web1", {"sni": "git.example.com", "dst": "203.0.113.5"}, "tls-corp", "allow"),
    ("tls", "web1", {"sni": "git.example.com", "dst": "192.168.1.5"}, "tls-internal", "deny"),
    ("tls", "web1", {"sni": "", "dst": "203.0.113.5"}, "default", "deny"),
]


@pytest.mark.parametrize(("protocol", "guest", "request_", "rule", "verdict"), CASES)
def test_decide_table(engine: Engine, protocol: str, guest: str, request_: dict[str, Any], rule: str,
                      verdict: str) -> None:
    d = engine.decide(protocol, guest, request_)
    assert (d.rule, d.verdict) == (rule, verdict), d.detail
    assert d.code == (ReasonCode.DEFAULT if rule == "default" else ReasonCode.RULE)
    assert d.detail and d.at.startswith("rules.yaml:")
    assert isinstance(d.verdict, Verdict) and isinstance(d.code, ReasonCode)


@pytest.mark.parametrize(
    ("protocol", "guest", "request_", "detail", "at"),
    [
        ("dns", "web1", {"qname": "www.example.com", "qtype": "A"},
         "qname www.example.com matches *.example.com; qtype A is one of A, AAAA, MX, TXT", "rules.yaml:9"),
        ("dns", "web1", {"qname": "bad.example.com", "qtype": "A"},
         "qname bad.example.com matches bad.example.com", "rules.yaml:4"),
        ("dns", "web1", {"qname": "nope.org", "qtype": "A"}, "no rule matched; default deny", "rules.yaml:2"),
        ("dns", "db1", {"qname": "x.org", "qtype": "A"}, "rule matches any dns request from guest db1",
         "rules.yaml:21"),
        ("dns", "db1", {"qname": "x.org", "answer_ip": "10.9.9.9"}, "answer_ip 10.9.9.9 is in 10.0.0.0/8",
         "rules.yaml:16"),
        ("smtp", "mail1", {"mail_from": "<>", "rcpt_to": "x@mx.example.net"},
         "mail_from <> matches <>; rcpt_to x@mx.example.net matches *@*.example.net", "rules.yaml:25"),
        ("snmp", "x", {"agent": "r", "op": "get", "oid": "1.3.6.1.2.1.1.1.0"},
         "op get is one of get, getnext, getbulk; oid 1.3.6.1.2.1.1.1.0 is in subtree 1.3.6.1.2.1",
         "rules.yaml:33"),
        ("http", "web1", {"method": "POST", "host": "api.example.com", "path": "/v1/a"},
         "host api.example.com matches api.example.com; method POST is one of GET, POST; path /v1/a matches /v1/*",
         "rules.yaml:41"),
        ("http", "web1", {"method": "GET", "host": "x.org", "path": "/", "port": 8080},
         "host x.org matches *; port 8080 is one of 8080", "rules.yaml:46"),
        ("http", "web1", {"method": "GET", "host": "api.example.com", "path": "/v1/\x1b[31m"},
         "host api.example.com matches api.example.com; method GET is one of GET, POST; "
         "path '/v1/\\x1b[31m' matches /v1/*", "rules.yaml:41"),
    ],
)
def test_detail_names_the_pattern(engine: Engine, protocol: str, guest: str, request_: dict[str, Any],
                                  detail: str, at: str) -> None:
    d = engine.decide(protocol, guest, request_)
    assert (d.detail, d.at) == (detail, at)
    assert d.audit_fields() == {"verdict": str(d.verdict), "rule": d.rule, "at": at, "reason": detail}


def test_limits_and_plaintext(engine: Engine) -> None:
    mail = engine.decide("smtp", "mail1", {"mail_from": "a@example.com", "rcpt_to": "b@example.org"})
    assert dict(mail.limits) == {"max_size": 10_000_000} and not mail.plaintext
    api = engine.decide("http", "web1", {"method": "GET", "host": "api.example.com", "path": "/v1/x"})
    assert dict(api.limits) == {"max_body": 1_000_000} and not api.plaintext
    ws = engine.decide("ws", "web1", {"method": "GET", "host": "chat.example.com", "path": "/socket"})
    assert dict(ws.limits) == {"max_message": 65536}
    legacy = engine.decide("http", "web1", {"method": "GET", "host": "old.example.net", "path": "/"})
    assert legacy.plaintext and dict(legacy.limits) == {}
    denied = engine.decide("http", "web1", {"method": "GET", "host": "nope.example.net", "path": "/"})
    assert not denied.plaintext and dict(denied.limits) == {} and not denied.allowed


def test_named_by_rule(engine: Engine) -> None:
    assert engine.named_by_rule("dns", "web1", "qname", "intranet.example.com")  # *.example.com
    assert engine.named_by_rule("dns", "web1", "qname", "example.com")
    assert not engine.named_by_rule("dns", "web2", "qname", "intranet.example.com")  # rule is for web1/mail1
    assert not engine.named_by_rule("dns", "web1", "qname", "x.evil.test")  # only a deny rule names it
    assert not engine.named_by_rule("dns", "db1", "qname", "x.org")  # rule without qname names nothing
    assert not engine.named_by_rule("http", "web1", "host", "x.org")  # host "*" is not naming
    assert engine.named_by_rule("http", "web1", "host", "old.example.net")
    assert not engine.named_by_rule("tls", "web1", "dst", "192.168.1.1")  # deny rule
    with pytest.raises(ValueError, match="dns rules have no key 'host'"):
        engine.named_by_rule("dns", "web1", "host", "x")


def test_unknown_protocol_is_a_programming_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match="unknown protocol 'ftp'"):
        engine.decide("ftp", "web1", {})


def _load(tmp_path: Path, text: str, **kw: Any) -> Engine:
    p = tmp_path / "rules.yaml"
    p.write_text(textwrap.dedent(text))
    return load_policy(p, GUESTS, **kw)


def test_monitor_mode_turns_every_denial_into_would_deny(tmp_path: Path) -> None:
    e = _load(tmp_path, """\
        mode: monitor
        default: deny
        rules:
          - {id: block, action: deny, protocol: dns, match: {qname: ["*.evil.test"]}}
          - {id: ok, action: allow, protocol: dns, match: {qname: [good.test]}}
        """)
    blocked = e.decide("dns", "web1", {"qname": "x.evil.test"})
    assert (blocked.verdict, blocked.code, blocked.rule, blocked.allowed) == (
        Verdict.WOULD_DENY, ReasonCode.RULE, "block", True)
    assert blocked.detail == "qname x.evil.test matches *.evil.test; monitor mode: would deny, let through"
    default = e.decide("dns", "web1", {"qname": "other.test"})
    assert (default.verdict, default.code, default.at) == (Verdict.WOULD_DENY, ReasonCode.DEFAULT, "rules.yaml:2")
    assert default.detail == "no rule matched; default deny (monitor mode: let through)"
    assert e.decide("dns", "web1", {"qname": "good.test"}).verdict == Verdict.ALLOW
    assert not blocked.plaintext


def test_default_allow(tmp_path: Path) -> None:
    e = _load(tmp_path, "default: allow\n")
    d = e.decide("smtp", "web1", {"mail_from": "a@b", "rcpt_to": "c@d"})
    assert (d.verdict, d.code, d.rule, d.detail, d.at) == (
        Verdict.ALLOW, ReasonCode.DEFAULT, "default", "no rule matched; default allow", "rules.yaml:1")


def test_no_default_key_means_deny(tmp_path: Path) -> None:
    e = _load(tmp_path, "rules: []\n")
    d = e.decide("dns", "web1", {"qname": "a"})
    assert (d.verdict, d.rule, d.at) == (Verdict.DENY, "default", "rules.yaml:1")


class FakeClock:
    """An injected clock: the token bucket must follow it, not the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_per_rule_and_guest(tmp_path: Path) -> None:
    clock = FakeClock()
    e = _load(tmp_path, """\
        rules:
          - id: mail-out
            action: allow
            protocol: smtp
            match: {rcpt_to: ["*@example.org"], max_size: 1MB}
            rate: 3/minute
          - {id: dns, action: allow, protocol: dns, rate: 1/second}
        """, clock=clock)
    req = {"mail_from": "a@example.com", "rcpt_to": "b@example.org"}
    got = [e.decide("smtp", "mail1", req).code for _ in range(4)]
    assert got == ["rule", "rule", "rule", "rate_limited"]
    limited = e.decide("smtp", "mail1", req)
    assert (limited.verdict, limited.rule, limited.allowed, dict(limited.limits)) == (
        Verdict.DENY, "mail-out", False, {})
    assert limited.detail == "rcpt_to b@example.org matches *@example.org; over rate 3/minute for guest mail1"
    # another guest has its own bucket; an unlisted guest shares the "unknown" bucket
    assert e.decide("smtp", "web1", req).code == "rule"
    assert [e.decide("smtp", g, req).code for g in ("nobody", "stranger", "unknown", "x")] == [
        "rule", "rule", "rule", "rate_limited"]
    # another rule has its own bucket
    assert e.decide("dns", "mail1", {"qname": "a"}).code == "rule"
    assert e.decide("dns", "mail1", {"qname": "a"}).code == "rate_limited"
    # refill: 3/minute = one token per 20 s
    clock.now += 19.9
    assert e.decide("smtp", "mail1", req).code == "rate_limited"
    clock.now += 0.2
    assert e.decide("smtp", "mail1", req).code == "rule"
    assert e.decide("smtp", "mail1", req).code == "rate_limited"
    # a long idle period refills to the burst size, never beyond
    clock.now += 3600
    assert [e.decide("smtp", "mail1", req).code for _ in range(4)] == ["rule", "rule", "rule", "rate_limited"]
    # a clock going backwards never adds tokens
    clock.now -= 100
    assert e.decide("smtp", "mail1", req).code == "rate_limited"


def test_rate_limited_in_monitor_mode_is_let_through(tmp_path: Path) -> None:
    clock = FakeClock()
    e = _load(tmp_path, """\
        mode: monitor
        rules:
          - {id: web, action: allow, protocol: http, rate: 1/hour, plaintext: true, match: {max_body: 1KB}}
        """, clock=clock)
    req = {"method": "GET", "host": "a", "path": "/"}
    assert e.decide("http", "web1", req).code == "rule"
    d = e.decide("http", "web1", req)
    assert (d.verdict, d.code, d.allowed, d.plaintext, dict(d.limits)) == (
        Verdict.WOULD_DENY, ReasonCode.RATE_LIMITED, True, True, {"max_body": 1000})
    assert d.detail == "rule matches any http request; over rate 1/hour for guest web1; monitor mode: let through"


def test_rate_state_survives_reload_for_unchanged_rules(tmp_path: Path) -> None:
    clock = FakeClock()
    text = "rules:\n  - {id: d, action: allow, protocol: dns, rate: 1/hour}\n"
    old = _load(tmp_path, text, clock=clock)
    assert old.decide("dns", "web1", {"qname": "a"}).code == "rule"
    new = _load(tmp_path, "rules:\n  - {id: x, action: allow, protocol: smtp}\n" + text.split("\n", 1)[1],
                clock=clock)
    new.inherit_rate_state(old)
    assert new.decide("dns", "web1", {"qname": "a"}).code == "rate_limited"
    changed = _load(tmp_path, text.replace("1/hour", "2/hour"), clock=clock)
    changed.inherit_rate_state(old)
    assert changed.decide("dns", "web1", {"qname": "a"}).code == "rule"


def test_name_file_formats(tmp_path: Path) -> None:
    (tmp_path / "block.txt").write_text(
        "\ufeff# comment line after a byte-order mark\n"
        "\n"
        "ads.example.com\n"
        "  Tracker.Example.NET.   # trailing comment, case and dot\n"
        "0.0.0.0 hosts1.test hosts2.test\n"
        "::1\tv6hosts.test\n"
        "*.wild.test\n"
        "\r\n"
    )
    e = _load(tmp_path, """\
        default: allow
        rules:
          - {id: block, action: deny, protocol: dns, match: {qname_file: block.txt, qname: [inline.test]}}
          - {id: web, action: deny, protocol: http, match: {host_file: block.txt}}
          - {id: sni, action: deny, protocol: tls, match: {sni_file: block.txt}}
        """)
    for name in ("ads.example.com", "tracker.example.net", "hosts1.test", "hosts2.test", "v6hosts.test",
                 "a.wild.test", "inline.test"):
        d = e.decide("dns", "web1", {"qname": name, "qtype": "A"})
        assert d.rule == "block", name
    for name in ("0.0.0.0", "wild.test", "x.ads.example.com", "comment", "example.com"):
        assert e.decide("dns", "web1", {"qname": name}).rule == "default", name
    assert e.decide("dns", "web1", {"qname": "b.wild.test"}).detail == (
        "qname b.wild.test matches *.wild.test (listed in block.txt)")
    assert e.decide("dns", "web1", {"qname": "inline.test"}).detail == "qname inline.test matches inline.test"
    assert e.decide("http", "web1", {"host": "hosts2.test", "method": "GET", "path": "/"}).rule == "web"
    assert e.decide("tls", "web1", {"sni": "ads.example.com", "dst": "1.2.3.4"}).rule == "sni"
    assert e.stats()["dns_names"] == 7  # 6 exact names + 1 "*.x"


def test_large_name_file_lookup(tmp_path: Path) -> None:
    n = 100_000
    (tmp_path / "big.txt").write_text("".join(f"host{i}.block{i % 97}.test\n" for i in range(n)))
    e = _load(tmp_path, """\
        default: allow
        rules:
          - {id: ok, action: allow, protocol: dns, match: {qname: [host5.block5.test]}}
          - {id: big, action: deny, protocol: dns, match: {qname_file: big.txt}}
        """)
    assert e.decide("dns", "web1", {"qname": "host5.block5.test"}).rule == "ok"  # earlier rule wins
    last = n - 1
    assert e.decide("dns", "web1", {"qname": f"host{last}.block{last % 97}.test"}).rule == "big"
    assert e.decide("dns", "web1", {"qname": f"host{last}.block{last % 97 + 1}.test"}).rule == "default"
    assert e.decide("dns", "web1", {"qname": f"host{n}.block{n % 97}.test"}).rule == "default"


def test_make_decision_equals_the_dataclass() -> None:
    args: tuple[Any, ...] = (Verdict.ALLOW, ReasonCode.RULE, "r", "f:1", "why", True, {"max_size": 1})
    fast, slow = make_decision(*args), Decision(*args)
    assert fast == slow and repr(fast) == repr(slow)
    with pytest.raises(AttributeError):
        fast.verdict = Verdict.DENY  # type: ignore[misc]


@pytest.mark.parametrize("value", [5, b"www.example.com", 3.5, ["x"], {"a": 1}, "\u00b2", "\x00", ""])
def test_non_string_values_never_raise(engine: Engine, value: Any) -> None:
    for protocol, key in [("dns", "qname"), ("dns", "answer_ip"), ("smtp", "rcpt_to"), ("snmp", "oid"),
                          ("http", "path"), ("http", "port"), ("tls", "dst")]:
        d = engine.decide(protocol, "web1", {key: value})
        assert d.verdict is Verdict.DENY and d.detail


def test_none_value_counts_as_missing(engine: Engine) -> None:
    d = engine.decide("dns", "db1", {"qname": "x.org", "qtype": "A", "answer_ip": None})
    assert d.rule == "dns-any-for-db"


def test_name_files_store_no_per_name_objects(tmp_path: Path) -> None:
    """Names are kept as plain str dict keys: loading 100k names must not create ~100k GC-tracked
    objects (tuples, lists, patterns), which would blow the memory goal at 1M names."""
    import gc

    (tmp_path / "big.txt").write_text("".join(f"n{i}.example.test\n*.w{i}.test\n" for i in range(50_000)))
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - {id: big, action: deny, protocol: dns, match: {qname_file: big.txt}}\n")
    gc.collect()
    before = len(gc.get_objects())
    engine = load_policy(tmp_path / "rules.yaml", GUESTS)
    gc.collect()
    assert len(gc.get_objects()) - before < 5_000
    assert engine.stats()["dns_names"] == 100_000
    assert engine.decide("dns", "web1", {"qname": "a.w49999.test"}).rule == "big"


def test_below_patterns_at_several_depths(tmp_path: Path) -> None:
    """'*.x' parents live in one table per label count: every depth must still be probed, a rule
    must see parents of other depths, and the detail names the longest parent that fits."""
    (tmp_path / "deep.txt").write_text("*.a.b.example.test\n*.test\nexact.b.example.test\n")
    e = _load(tmp_path, """\
        default: allow
        rules:
          - {id: mid, action: deny, protocol: dns, match: {qname: ["*.b.example.test"]}}
          - {id: file, action: deny, protocol: dns, match: {qname_file: deep.txt, qname: ["*.example.test"]}}
        """)
    d = e.decide("dns", "web1", {"qname": "x.b.example.test"})
    assert (d.rule, d.detail) == ("mid", "qname x.b.example.test matches *.b.example.test")
    d = e.decide("dns", "web1", {"qname": "b.example.test"})  # not below itself: the file's *.test fits
    assert (d.rule, d.detail) == ("file", "qname b.example.test matches *.example.test")
    d = e.decide("dns", "web1", {"qname": "Z.Y.A.B.Example.Test."})
    assert (d.rule, d.detail) == ("mid", "qname Z.Y.A.B.Example.Test. matches *.b.example.test")
    d = e.decide("dns", "web1", {"qname": "other.test"})
    assert (d.rule, d.detail) == ("file", "qname other.test matches *.test (listed in deep.txt)")
    assert e.decide("dns", "web1", {"qname": "test"}).rule == "default"
    assert e.named_by_rule("dns", "web1", "qname", "q.a.b.example.test") is False  # deny rules only
    assert e.stats()["dns_names"] == 5


def test_non_ascii_values_keep_unicode_case_mapping(tmp_path: Path) -> None:
    """Values already in canonical form skip lower()/upper(); others, non-ASCII ones included, are
    still mapped exactly as before (U+212A KELVIN SIGN lower-cases to ASCII "k")."""
    e = _load(tmp_path, """\
        rules:
          - {id: k, action: allow, protocol: dns, match: {qname: [k.example.test], qtype: [A]}}
          - {id: get, action: allow, protocol: http, match: {host: [h.test], method: [GET]}}
          - {id: op, action: allow, protocol: snmp, match: {op: [get]}}
        """)
    d = e.decide("dns", "web1", {"qname": "\u212a.example.test", "qtype": "a"})
    assert (d.rule, d.detail) == ("k", "qname \u212a.example.test matches k.example.test; qtype a is one of A")
    assert e.decide("dns", "web1", {"qname": "k.example.test", "qtype": "A"}).rule == "k"
    assert e.decide("dns", "web1", {"qname": "k.example.test", "qtype": "AAAA"}).rule == "default"
    assert e.decide("http", "web1", {"host": "h.test", "method": "get", "path": "/"}).rule == "get"
    assert e.decide("http", "web1", {"host": "h.test", "method": "GET", "path": "/"}).rule == "get"
    assert e.decide("snmp", "web1", {"op": "GET", "oid": "1.3"}).rule == "op"
    assert e.decide("snmp", "web1", {"op": "get", "oid": "1.3"}).rule == "op"


def test_rules_without_match_reuse_one_decision_per_known_guest(tmp_path: Path) -> None:
    e = _load(tmp_path, """\
        rules:
          - {id: web, action: allow, protocol: http, guests: [web1]}
          - {id: strangers, action: deny, protocol: smtp, guests: [unknown]}
          - {id: any, action: deny, protocol: http}
        """)
    a, b = e.decide("http", "web1", {"host": "a"}), e.decide("http", "web1", {"host": "b"})
    assert a is b and a == Decision(Verdict.ALLOW, ReasonCode.RULE, "web", "rules.yaml:2",
                                    "rule matches any http request from guest web1")
    d = e.decide("http", "stranger\x00", {"host": "a"})  # unknown guest: the "any" rule, shown safely
    assert (d.rule, d.detail) == ("any", "rule matches any http request")
    assert e.decide("http", "mail1", {}) is e.decide("http", "db1", {})
    d = e.decide("smtp", "stranger\x00", {})  # the name as given, quoted: not the cached "unknown" one
    assert d.detail == "rule matches any smtp request from guest 'stranger\\x00'"
    assert e.decide("smtp", "unknown", {}).detail == "rule matches any smtp request from guest unknown"
