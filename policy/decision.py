"""The one answer the policy gives: `Decision`.

Owns: the verdict vocabulary, stable reason codes, the audit fields a decision contributes, and
the one factory for built-in decisions (`builtin`, with its `at` convention).
Must not: evaluate rules (see `policy.engine`) or know about sockets and protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    WOULD_DENY = "would_deny"  # monitor mode: audited as a denial, let through


class ReasonCode(StrEnum):
    RULE = "rule"  # a rule matched and decided
    DEFAULT = "default"  # no rule matched; the file's `default:` decided
    RATE_LIMITED = "rate_limited"  # the matching rule's `rate` is exhausted for this guest
    LEARN = "learn"  # `mode: learn`: allowed and recorded without consulting any rule


_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    code: ReasonCode
    rule: str  # rule id, or "default"
    at: str  # "rules.yaml:5"
    detail: str  # human reason
    plaintext: bool = False
    limits: Mapping[str, int] = field(default_factory=lambda: _EMPTY)

    @property
    def allowed(self) -> bool:
        """True when the request may proceed (allow, or a monitored denial)."""
        return self.verdict is not Verdict.DENY

    def audit_fields(self) -> dict[str, str]:
        return {"verdict": str(self.verdict), "rule": self.rule, "at": self.at, "reason": self.detail}


_FIELDS = ("verdict", "code", "rule", "at", "detail", "plaintext", "limits")
if tuple(Decision.__dataclass_fields__) != _FIELDS:  # keep make_decision in step with the fields
    raise ImportError("policy.decision.make_decision is out of date with Decision's fields")
_SETTERS = tuple(Decision.__dict__[name].__set__ for name in _FIELDS)


def make_decision(
    verdict: Verdict,
    code: ReasonCode,
    rule: str,
    at: str,
    detail: str,
    plaintext: bool = False,
    limits: Mapping[str, int] = _EMPTY,
) -> Decision:
    """`Decision(...)` for the engine's hot path: the same frozen value, built about twice as fast
    (the dataclass-generated frozen `__init__` goes through `object.__setattr__` per field)."""
    d = object.__new__(Decision)
    s = _SETTERS
    s[0](d, verdict)
    s[1](d, code)
    s[2](d, rule)
    s[3](d, at)
    s[4](d, detail)
    s[5](d, plaintext)
    s[6](d, limits)
    return d


def decision_factory(
    verdict: Verdict,
    code: ReasonCode,
    rule: str,
    at: str,
    plaintext: bool = False,
    limits: Mapping[str, int] = _EMPTY,
) -> Callable[[str], Decision]:
    """A function `detail -> Decision` with every other field fixed: the engine builds one per rule
    at load time, so a hit costs one call with the constants already in the closure (no global or
    attribute look-ups, no argument passing for the six fixed fields)."""
    new, cls = object.__new__, Decision
    s0, s1, s2, s3, s4, s5, s6 = _SETTERS

    def make(detail: str) -> Decision:
        d = new(cls)
        s0(d, verdict)
        s1(d, code)
        s2(d, rule)
        s3(d, at)
        s4(d, detail)
        s5(d, plaintext)
        s6(d, limits)
        return d

    return make


def builtin(service: str, rule: str, detail: str, verdict: Verdict = Verdict.DENY, *, table: str = "") -> Decision:
    """The one factory for a decision a service makes itself, not a rule of the policy file
    (malformed input, limits, SSRF guard, upstream failure, quarantine): `rule` is the check's id,
    `at` the service's name (`dns`, `smtp`, `snmp`, `http`), or `<service>.<table>` when a table
    other than the policy decided (`dns.quarantine`)."""
    return make_decision(verdict, ReasonCode.RULE, rule, f"{service}.{table}" if table else service, detail)
