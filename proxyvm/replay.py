"""`proxyvm replay`: every recorded decision decided again under another rules file.

Owns: rebuilding each protocol's policy request from an audit record (what the service passed to
`Engine.decide`), deciding it with a compiled engine (identical requests decided once, unless the
deciding rule has a `rate`), and the report: unchanged / allow->deny / deny->allow, grouped by guest
and by (old rule, new rule), with a few example requests per group.
"Passed" means the traffic went through: `allow` and `would_deny` pass, `deny` does not; a change
between `allow` and `would_deny` is not a verdict change but is counted apart.
Must not: read files itself (entries come from `proxyvm.auditlog_read`), print, or exit.

Limits of a replay (the record does not hold everything the service saw): DNS `answer_ip` rules
are not re-checked (answer addresses are not recorded); an SNMP request is re-decided on the OIDs
the record lists (the first four).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policy import Engine, Verdict
from policy.model import MATCH_KEYS
from proxyvm.auditlog_read import DECISION, Entry, classify, summary

EXAMPLES = 3
TEXT_GROUPS = 30  # the text report lists the biggest change groups; --json has all
_DENY = Verdict.DENY
_WOULD = Verdict.WOULD_DENY
UNCHANGED, ALLOW_TO_DENY, DENY_TO_ALLOW = "unchanged", "allow->deny", "deny->allow"


def snmp_oids(request: Mapping[str, Any]) -> list[str]:
    """The OIDs the SNMP service decided a record's request on."""
    oids = request.get("oids")
    if isinstance(oids, list):
        return [str(o) for o in oids] or ["0"]
    trap = request.get("trap_oid")
    return [str(trap) if trap else "0"]


@dataclass(slots=True)
class Group:
    change: str
    guest: str
    protocol: str
    old_rule: str
    new_rule: str
    old_verdict: str
    new_verdict: str
    new_at: str = ""
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "change": self.change, "guest": self.guest, "protocol": self.protocol,
            "old_rule": self.old_rule, "new_rule": self.new_rule, "new_at": self.new_at,
            "old_verdict": self.old_verdict, "new_verdict": self.new_verdict,
            "count": self.count, "examples": self.examples,
        }


@dataclass(slots=True)
class Report:
    policy: str
    digest: str = ""  # the new policy's digest
    replayed: int = 0
    read_policies: Counter[str] = field(default_factory=Counter)  # digests of the recorded decisions
    skipped: Counter[str] = field(default_factory=Counter)
    totals: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)  # "allow->would_deny": n
    by_guest: dict[str, Counter[str]] = field(default_factory=dict)
    groups: dict[tuple[str, ...], Group] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return self.totals[ALLOW_TO_DENY] + self.totals[DENY_TO_ALLOW]

    def as_dict(self) -> dict[str, Any]:
        groups = sorted(self.groups.values(), key=lambda g: (g.change != ALLOW_TO_DENY, g.change, -g.count, g.guest,
                                                             g.protocol, g.old_rule, g.new_rule))
        return {
            "policy": self.policy,
            "policy_digest": self.digest,
            "recorded_under": dict(sorted(self.read_policies.items(), key=lambda kv: (-kv[1], kv[0]))),
            "replayed": self.replayed,
            "unchanged": self.totals[UNCHANGED],
            "allow_to_deny": self.totals[ALLOW_TO_DENY],
            "deny_to_allow": self.totals[DENY_TO_ALLOW],
            "verdicts": dict(sorted(self.verdicts.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "by_guest": {g: {UNCHANGED: c[UNCHANGED], ALLOW_TO_DENY: c[ALLOW_TO_DENY], DENY_TO_ALLOW: c[DENY_TO_ALLOW]}
                         for g, c in sorted(self.by_guest.items())},
            "groups": [g.as_dict() for g in groups],
        }

    def text(self) -> str:
        d = self.as_dict()
        out = [f"replayed {d['replayed']} decisions under {self.policy}: {d['unchanged']} unchanged, "
               f"{d['allow_to_deny']} allow->deny, {d['deny_to_allow']} deny->allow"]
        out.append(f"new policy {self.policy}: {self.digest or 'digest unknown'}")
        if d["recorded_under"]:
            out.append("recorded under: " + ", ".join(f"{k} ({v})" for k, v in d["recorded_under"].items()))
        if d["skipped"]:
            out.append("skipped: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in d["skipped"].items()))
        shifts = {k: v for k, v in d["verdicts"].items() if "would_deny" in k and k.split("->")[0] != k.split("->")[1]}
        if shifts:
            out.append("would_deny (passes, reported apart): " + ", ".join(f"{k} {v}" for k, v in shifts.items()))
        if len(d["by_guest"]) > 0:
            out.append("")
            out.append(f"{'guest':<16} {'unchanged':>10} {'allow->deny':>12} {'deny->allow':>12}")
            for g, c in d["by_guest"].items():
                out.append(f"{g:<16} {c[UNCHANGED]:>10} {c[ALLOW_TO_DENY]:>12} {c[DENY_TO_ALLOW]:>12}")
        changes = [g for g in d["groups"] if g["change"] != UNCHANGED]
        if changes:
            out.append("")
            out.append("changes (guest, protocol, old rule -> new rule):")
            for g in changes[:TEXT_GROUPS]:
                at = f" ({g['new_at']})" if g["new_at"] else ""
                out.append(f"  {g['change']:<12} {g['count']:>7}  {g['guest']} {g['protocol']}: "
                           f"{g['old_rule']} -> {g['new_rule']}{at}")
                for ex in g["examples"]:
                    out.append(f"      e.g. {ex['file']}:{ex['line']} seq {ex['seq']} {ex['ts']} {ex['summary']}")
            if len(changes) > TEXT_GROUPS:
                out.append(f"  ... {len(changes) - TEXT_GROUPS} more groups ({sum(g['count'] for g in changes[TEXT_GROUPS:])} "
                           "changed decisions): --json lists them all")
        return "\n".join(out) + "\n"


class Replayer:
    """Feed entries with `add`; read the `report`. The engine's clock follows the records' time so
    `rate:` rules see the recorded pace."""

    def __init__(self, engine: Engine, policy_name: str, clock_cell: list[float] | None = None):
        self.engine = engine
        self.report = Report(policy_name, getattr(engine, "digest", ""))
        self._cache: dict[tuple[Any, ...], Any] = {}
        rate_rules = {r.id for r in engine.rules if r.rate is not None}
        self._rate_rules = frozenset(rate_rules)
        self._clock = clock_cell if rate_rules else None  # engine built with `lambda: clock_cell[0]`
        self._keys = {p: tuple(keys) for p, keys in MATCH_KEYS.items()}

    def add_all(self, entries: Iterable[Entry]) -> Report:
        for e in entries:
            self.add(e)
        return self.report

    def _decide(self, protocol: str, guest: str, request: Mapping[str, Any], ts: Any) -> Any:
        if self._clock is not None:
            try:
                self._clock[0] = dt.datetime.fromisoformat(ts).timestamp()
            except (TypeError, ValueError):
                pass
        if protocol == "snmp":
            decide = self.engine.decide
            agent, op = request.get("agent"), request.get("op")
            chosen = None
            for oid in snmp_oids(request):  # the service's rule: the first denial decides
                d = decide("snmp", guest, {"agent": agent, "op": op, "oid": oid})
                if d.verdict is _DENY:
                    return d
                if chosen is None or (d.verdict is _WOULD and chosen.verdict is not _WOULD):
                    chosen = d
            return chosen
        return self.engine.decide(protocol, guest, request)

    def add(self, e: Entry) -> None:
        what = classify(e)
        rep = self.report
        if what != DECISION:
            rep.skipped[what] += 1
            return
        rec = e.rec
        protocol, request = rec["protocol"], rec["request"]
        guest = rec.get("guest")
        guest = guest if guest.__class__ is str else "unknown"
        if protocol == "snmp":
            oids = request.get("oids")
            key: tuple[Any, ...] | None = (protocol, guest, request.get("agent"), request.get("op"),
                                           tuple(oids) if isinstance(oids, list) else request.get("trap_oid"))
        else:
            key = (protocol, guest, *map(request.get, self._keys[protocol]))
        try:
            d = self._cache.get(key) if key is not None else None
        except TypeError:  # an unhashable value (list in an edited record): decide it uncached
            key, d = None, None
        if d is None:
            d = self._decide(protocol, guest, request, rec.get("ts"))
            if key is not None and d.rule not in self._rate_rules:
                self._cache[key] = d
        rep.replayed += 1
        rep.read_policies[str(rec.get("policy") or "(no digest: recorded before provenance)")] += 1
        old_v, new_v = rec["verdict"], d.verdict.value
        old_pass, new_pass = old_v != "deny", new_v != "deny"
        change = UNCHANGED if old_pass == new_pass else (ALLOW_TO_DENY if old_pass else DENY_TO_ALLOW)
        rep.totals[change] += 1
        rep.verdicts[f"{old_v}->{new_v}"] += 1
        per_guest = rep.by_guest.get(guest)
        if per_guest is None:
            per_guest = rep.by_guest[guest] = Counter()
        per_guest[change] += 1
        old_rule = str(rec.get("rule"))
        gkey = (change, guest, protocol, old_rule, d.rule, old_v, new_v)
        g = rep.groups.get(gkey)
        if g is None:
            g = rep.groups[gkey] = Group(change, guest, protocol, old_rule, d.rule, old_v, new_v, d.at)
        g.count += 1
        if change != UNCHANGED and len(g.examples) < EXAMPLES:
            g.examples.append({"file": e.file, "line": e.line, "seq": rec.get("seq"), "ts": rec.get("ts"),
                               "request": request, "summary": summary(rec), "new_reason": d.detail})
