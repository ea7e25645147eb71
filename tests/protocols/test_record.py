"""The one decision-record path: `ServiceContext.record` / `.event` and `policy.decision.builtin`.

Pure units (no sockets): the documented field order, address text, the policy digest on decisions
only, `duration_ms` and one call of the latency hook; that every service's built-in decisions follow
the one `at` convention; and a source check that no module under `protocols/` builds a decision
record (or a `kind:` record, or a Decision) by hand again.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from policy.decision import Decision, ReasonCode, Verdict, builtin
from protocols.base import MemoryAudit, MilliClock, ServiceContext, StaticGuests, audit_record

HEAD = ["guest", "src", "protocol", "verdict", "rule", "at", "reason", "request", "upstream"]
DIGEST = "sha256:" + "ab" * 32
RULE = Decision(Verdict.WOULD_DENY, ReasonCode.RULE, "r1", "rules.yaml:3", "qname x matches x")
PROTOCOLS = Path(__file__).resolve().parents[2] / "protocols"


def _ctx(*, policy: str = DIGEST, ts: bool = True) -> tuple[ServiceContext, MemoryAudit, list[tuple[Any, ...]]]:
    audit = MemoryAudit()
    seen: list[tuple[Any, ...]] = []
    ctx = ServiceContext(settings=None, engine=None, audit=audit, guests=StaticGuests(), log=logging.getLogger("t"),
                         observe=lambda *a: seen.append(a), policy=policy,
                         timestamp=(lambda: "2026-12-08T00:00:00.000Z") if ts else None)
    return ctx, audit, seen


CASES: list[tuple[str, dict[str, Any], list[str], dict[str, Any]]] = [
    (
        "ipv4 tuple, elapsed after the outcome field",
        {"src": ("198.18.0.10", 4000), "protocol": "dns", "elapsed": 0.25, "rcode": "NOERROR", "cache": "hit"},
        ["ts", *HEAD, "rcode", "duration_ms", "cache", "policy"],
        {"src": "198.18.0.10:4000", "duration_ms": 250.0, "rcode": "NOERROR", "cache": "hit"},
    ),
    (
        "ipv6 4-tuple src and ipv6 orig_dst",
        {"src": ("fd00::11", 40312, 0, 0), "orig_dst": ("2001:db8::53", 53, 0, 0), "protocol": "dns",
         "elapsed": 0.0015, "rcode": "REFUSED"},
        ["ts", *HEAD, "rcode", "duration_ms", "orig_dst", "policy"],
        {"src": "[fd00::11]:40312", "orig_dst": "[2001:db8::53]:53", "duration_ms": 1.5},
    ),
    (
        "text src kept, ipv4 orig_dst after the extras",
        {"src": "[fd00::12]:5000", "orig_dst": ("192.0.2.7", 443), "protocol": "http", "elapsed": 0.002,
         "upstream": {"address": "192.0.2.7:443"}, "status": 200, "bytes_in": 1, "bytes_out": 2},
        ["ts", *HEAD, "status", "duration_ms", "bytes_in", "bytes_out", "orig_dst", "policy"],
        {"src": "[fd00::12]:5000", "orig_dst": "192.0.2.7:443", "upstream": {"address": "192.0.2.7:443"}},
    ),
    (
        "text orig_dst kept (DNS carries it formatted)",
        {"src": ("198.18.0.10", 1), "orig_dst": "[fd00::1]:53", "protocol": "dns", "elapsed": 0.0, "rcode": "NOERROR"},
        ["ts", *HEAD, "rcode", "duration_ms", "orig_dst", "policy"],
        {"orig_dst": "[fd00::1]:53", "duration_ms": 0.0},
    ),
    (
        "no elapsed: no duration_ms, extras in order",
        {"src": ("198.18.0.20", 25), "protocol": "smtp", "event": "rcpt", "quarantine": "honeypot"},
        ["ts", *HEAD, "event", "quarantine", "policy"],
        {"src": "198.18.0.20:25", "upstream": None, "event": "rcpt"},
    ),
    (
        "a fields dict follows the keywords (no re-packing of a service's own dict)",
        {"src": ("198.18.0.10", 53), "protocol": "dns", "elapsed": 0.001, "rcode": "NOERROR",
         "fields": {"cache": "miss", "ede": 15}},
        ["ts", *HEAD, "rcode", "duration_ms", "cache", "ede", "policy"],
        {"cache": "miss", "ede": 15, "duration_ms": 1.0},
    ),
    (
        "only a fields dict: duration_ms after its first field, orig_dst after it",
        {"src": "198.18.0.30:161", "orig_dst": ("fd00::161", 161), "protocol": "snmp", "elapsed": 0.002,
         "fields": {"status": "noError", "past_view": 2}},
        ["ts", *HEAD, "status", "duration_ms", "past_view", "orig_dst", "policy"],
        {"status": "noError", "orig_dst": "[fd00::161]:161", "duration_ms": 2.0},
    ),
    (
        "elapsed and no extras",
        {"src": ("198.18.0.30", 161), "protocol": "snmp", "elapsed": 0.001},
        ["ts", *HEAD, "duration_ms", "policy"],
        {"duration_ms": 1.0},
    ),
]


@pytest.mark.parametrize(("call", "keys", "values"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_record_field_order_addresses_digest_and_observe(call: dict[str, Any], keys: list[str],
                                                         values: dict[str, Any]) -> None:
    ctx, audit, seen = _ctx()
    request = {"qname": "x", "qtype": "A"}
    ctx.record(RULE, guest="web1", request=request, **call)
    [rec] = audit.records
    assert list(rec) == keys
    for k, v in values.items():
        assert rec[k] == v, k
    assert (rec["verdict"], rec["rule"], rec["at"], rec["reason"]) == ("would_deny", "r1", "rules.yaml:3",
                                                                        "qname x matches x")
    assert rec["ts"] == "2026-12-08T00:00:00.000Z" and rec["policy"] == DIGEST and rec["request"] == request
    if "elapsed" in call:
        assert seen == [(call["protocol"], "web1", "would_deny", "r1", call["elapsed"])]
    else:
        assert seen == []
    # audit_record is the same record without ts and digest (what tests compare against)
    expected = audit_record(RULE, guest="web1", request=request, **call)
    assert {k: v for k, v in rec.items() if k not in ("ts", "policy")} == expected
    assert list(expected) == [k for k in keys if k not in ("ts", "policy")]


def test_event_is_not_a_decision_no_digest_no_observe() -> None:
    ctx, audit, seen = _ctx()
    ctx.event("delivery", guest="mail1", src="198.18.0.20:4000", protocol="smtp", verdict="allow", rule="mail",
              at="rules.yaml:9", reason="delivery attempt to mx: delivered", request={"message": "m1"},
              upstream={"peer": "mx"}, event="attempt", outcome="delivered")
    ctx.event("delivery", src=("fd00::20", 25), protocol="smtp", request={"message": "m2"}, event="final")
    a, b = audit.records
    assert list(a) == ["ts", *HEAD, "kind", "event", "outcome"]
    assert a["kind"] == "delivery" and "policy" not in a and a["upstream"] == {"peer": "mx"}
    assert b["src"] == "[fd00::20]:25" and b["guest"] is None and b["verdict"] is None and "policy" not in b
    assert seen == []


def test_without_digest_or_clock_the_sink_gets_neither() -> None:
    ctx, audit, seen = _ctx(policy="", ts=False)
    ctx.record(RULE, guest="web1", src=("198.18.0.10", 1), protocol="dns", request={}, rcode="NOERROR")
    assert list(audit.records[0]) == [*HEAD, "rcode"]


def test_a_failing_observer_does_not_break_serving() -> None:
    ctx, audit, _ = _ctx()

    def boom(*_: Any) -> None:
        raise RuntimeError("observer bug")

    ctx.observe = boom
    ctx.record(RULE, guest="web1", src=("198.18.0.10", 1), protocol="dns", request={}, elapsed=0.1)
    assert len(audit.records) == 1


def test_through_the_worker_sink_one_encode_documented_order() -> None:
    """The worker's real sink: a record from ctx.record is encoded as built (ts first, digest last);
    a raw dict still gets both from the sink's fallback."""
    from proxyvm.worker import ChannelAudit

    sink = ChannelAudit()
    sink.policy = DIGEST
    ctx = ServiceContext(settings=None, engine=None, audit=sink, guests=StaticGuests(), log=logging.getLogger("t"),
                         policy=DIGEST, timestamp=MilliClock())
    ctx.record(RULE, guest="web1", src=("fd00::11", 53), protocol="dns", request={"qname": "x"}, elapsed=0.001,
               rcode="NOERROR")
    ctx.event("delivery", protocol="smtp", request={"message": "m"})
    sink.emit({"guest": "web1", "protocol": "dns", "verdict": "allow"})
    lines = [json.loads(ln.split(b"\t", 6)[6]) for ln in bytes(sink.buf).splitlines()]
    assert list(lines[0]) == ["ts", *HEAD, "rcode", "duration_ms", "policy"]
    assert lines[0]["src"] == "[fd00::11]:53" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[0]["ts"])
    assert "policy" not in lines[1] and lines[1]["kind"] == "delivery"
    assert list(lines[2]) == ["ts", "guest", "protocol", "verdict", "policy"]


# -- one factory, one `at` convention ------------------------------------------------------------------

def test_builtin_at_convention_across_services() -> None:
    from protocols import quarantine
    from protocols.dns.service import _builtin
    from protocols.http.addon import _decision
    from protocols.snmp.service import _guard

    made = {
        "dns": _builtin(Verdict.DENY, "dns-builtin", "x"),
        "snmp": _guard("snmp.malformed", "x"),
        "http": _decision(Verdict.DENY, "ssrf_guard", "x"),
        "http.quarantine": quarantine.decision("http", "web1", {"profile": "block"}),
        "dns.quarantine": quarantine.decision("dns", "web1", {"profile": "block"}),
    }
    for at, d in made.items():
        assert d.at == at and d.code is ReasonCode.RULE
    assert builtin("smtp", "spool", "x") == Decision(Verdict.DENY, ReasonCode.RULE, "spool", "smtp", "x")
    assert builtin("dns", "r", "x", Verdict.ALLOW, table="quarantine").at == "dns.quarantine"


# -- no copy comes back ------------------------------------------------------------------------------

# A decision record, a `kind:` record or a Decision built by hand, or a record emitted around the
# context: only protocols/base.py builds records, only policy.decision.builtin makes built-ins.
_BY_HAND = [
    (re.compile(r"""["']verdict["']\s*:"""), "a record dict with a verdict key"),
    (re.compile(r"""["']kind["']\s*:"""), "a kind: record dict"),
    (re.compile(r"\baudit_record\("), "audit_record() instead of ctx.record()"),
    (re.compile(r"\baudit\.emit\("), "audit.emit() instead of ctx.record()/ctx.event()"),
    (re.compile(r"\bDecision\("), "a Decision built by hand instead of policy.decision.builtin"),
    (re.compile(r"\b(stamp_policy|_record|_ts)\("), "a service's own record/ts helper"),
]


def _hand_built(text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for rx, what in _BY_HAND:
            if rx.search(line):
                out.append(f"{n}: {what}: {line.strip()}")
    return out


def test_the_source_check_catches_the_old_builders() -> None:
    old = '''
        rec = {"guest": guest, "src": src, "protocol": "dns", "verdict": verdict}
        self.audit.emit({"kind": "delivery", "guest": g})
        svc.ctx.audit.emit(audit_record(d, guest=guest, src=src, protocol="smtp", request=request))
        return Decision(verdict, ReasonCode.RULE, rule, "dns", detail)
        rec = _record(_guard(rule, reason), guest, src, {}, None)
        record = stamp_policy(record, self.policy)
    '''
    lines = [ln for ln in old.splitlines() if ln.strip()]
    assert all(_hand_built(ln) for ln in lines)
    assert not _hand_built('self.ctx.record(d, guest=g, src=s, protocol="dns", request={"qname": q})')


def test_no_module_under_protocols_builds_a_record_by_hand() -> None:
    found = []
    for path in sorted(PROTOCOLS.rglob("*.py")):
        if path.name == "base.py" and path.parent == PROTOCOLS:
            continue  # the one place
        found += [f"{path.relative_to(PROTOCOLS.parent)}:{hit}" for hit in _hand_built(path.read_text())]
    assert found == [], "\n".join(found)
