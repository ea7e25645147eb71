"""The compiled policy engine: `load_policy()` and `Engine.decide()`.

Owns: compiling a parsed `Policy` into per-protocol tables of indexes (see `policy.matchers`),
first-match evaluation over those indexes, per-(rule, guest) token buckets for `rate:`, monitor
mode, and building a fully filled `Decision` on every path.
Must not: do I/O after loading (no files, sockets or logging in `decide`), block, or raise for bad
request *values* (a value that fits no pattern simply fits no rule). It raises only for programming
errors: an unknown protocol or key name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from policy.decision import Decision, ReasonCode, Verdict, decision_factory, make_decision
from policy.digest import policy_digest
from policy.matchers import Index, NameIndex, new_index
from policy.model import (
    MATCH_KEYS,
    PROTOCOLS,
    Action,
    Cidr,
    EmailPattern,
    KeyKind,
    Mode,
    NameKind,
    NamePattern,
    OidPrefix,
    Pattern,
    Policy,
    Rule,
)
from policy.parser import UNKNOWN_GUEST, parse_policy, read_name_file
from policy.shared_rate import bucket_key
from policy.source import Problem, SourceError

Clock = Callable[[], float]

_NO_LIMITS: Mapping[str, int] = MappingProxyType({})
_SHOW_MAX = 200
_RULE = ReasonCode.RULE
_SET_KINDS = frozenset({KeyKind.QTYPE, KeyKind.METHOD, KeyKind.OP, KeyKind.PORT, KeyKind.TEXT})


def load_policy(
    path: str | os.PathLike[str], guests: Iterable[str] = (), clock: Clock = time.monotonic
) -> Engine:
    """Parse, check and compile a rules file. `guests` are the guest names the config defines
    ("unknown" is always valid). Raises `policy.source.SourceError` listing every problem found."""
    known = frozenset(guests)
    return Engine.compile(parse_policy(path, known), known, clock)


def _show(value: Any) -> str:
    """A request value as it may appear in a human detail (no control characters, bounded)."""
    s = value if isinstance(value, str) else str(value)
    if len(s) <= _SHOW_MAX and s.isprintable():
        return s
    r = repr(s)
    return r if len(r) <= _SHOW_MAX else r[: _SHOW_MAX - 3] + "..."


def canonical(p: Pattern) -> str:
    """A pattern as the indexes' `explain` spells it (lower-case names, normalised networks)."""
    if isinstance(p, NamePattern):
        return {NameKind.ANY: "*", NameKind.EXACT: p.name}.get(p.kind, "*." + p.name)
    if isinstance(p, EmailPattern):
        if p.null_sender:
            return "<>"
        if p.domain is None:
            return "*"
        return f"{'*' if p.local is None else p.local}@{canonical(p.domain)}"
    if isinstance(p, Cidr):
        return str(p.network)
    if isinstance(p, OidPrefix):
        return p.oid
    return p.text


def _fmt_list(texts: Iterable[str]) -> str:
    items = list(texts)
    return ", ".join(items[:6]) + (f", ... ({len(items)} values)" if len(items) > 6 else "")


@dataclass(frozen=True, slots=True)
class _KeyCheck:
    key: str
    kind: KeyKind
    index: Index
    free: int  # rules that do not constrain this key (they fit any value, and a missing key)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float


def _part(head: str, explain: Callable[[Any, int], str | None], mid: str, suffix: str,
          inline: frozenset[str], file: str, bit: int) -> Callable[[Any], str]:
    """One constrained key's piece of the detail, `value -> "qname x matches *.example.com"`, with
    everything that does not depend on the request fixed at load time."""
    if suffix:  # the pattern text is known without asking the index
        def fixed(value: Any) -> str:
            if value.__class__ is str and len(value) <= _SHOW_MAX and value.isprintable():
                return f"{head}{value}{suffix}"
            return f"{head}{_show(value)}{suffix}"
        return fixed
    listed = f" (listed in {file})" if file else ""

    def explained(value: Any) -> str:
        if value.__class__ is str and len(value) <= _SHOW_MAX and value.isprintable():
            shown = value
        else:
            shown = _show(value)
        pat = explain(value, bit) or "?"  # patterns come from the validated rules file
        if listed and pat not in inline:
            return f"{head}{shown}{mid}{pat}{listed}"
        return f"{head}{shown}{mid}{pat}"
    return explained


class _RuleEntry:
    """What `decide` needs of a winning rule, precomputed: `build(request, guest)` gives the detail
    (without the monitor-mode note), `hit(request, guest)` the whole Decision for a rule without
    `rate` (one call on the hot path; the six fields other than `detail` are fixed per rule)."""

    __slots__ = ("rule", "id", "rate", "bit", "keys", "verdict", "monitor_verdict", "plaintext",
                 "limits", "at", "global_index", "any_detail", "detail_suffix", "build", "hit")

    def __init__(self, rule: Rule, bit: int, keys: list[_KeyCheck], monitor: bool, protocol: str,
                 guests: frozenset[str] = frozenset()) -> None:
        self.rule = rule
        self.id = rule.id
        self.rate = rule.rate
        self.bit = bit
        self.keys = keys  # the keys this rule constrains, in schema order
        allow = rule.action is Action.ALLOW
        self.verdict = Verdict.ALLOW if allow else (Verdict.WOULD_DENY if monitor else Verdict.DENY)
        self.monitor_verdict = Verdict.WOULD_DENY if monitor else Verdict.DENY  # for rate limiting
        self.detail_suffix = "; monitor mode: would deny, let through" if self.verdict is Verdict.WOULD_DENY else ""
        self.plaintext = allow and rule.plaintext
        self.limits = rule.limits if allow and rule.limits else _NO_LIMITS
        self.at = rule.at
        self.global_index = rule.index
        self.any_detail = f"rule matches any {protocol} request"
        files = {nf.key: nf.path.name for nf in rule.name_files}
        parts: list[tuple[str, Callable[[Any], str]]] = []
        for check in keys:
            kind, key = check.kind, check.key
            inline = frozenset(p.text.strip().lower().removesuffix(".")
                               for p in rule.match.get(key, ()) if isinstance(p, NamePattern))
            if kind in (KeyKind.NAME, KeyKind.EMAIL, KeyKind.PATH):
                mid = " matches "
            elif kind is KeyKind.CIDR:
                mid = " is in "
            elif kind is KeyKind.OID:
                mid = " is in subtree "
            else:  # sets: the rule's own list reads better than the one value that matched
                mid = ""
            pats = rule.match.get(key, ())
            if not mid:
                suffix = " is one of " + _fmt_list(p.text for p in pats)
            elif len(pats) == 1 and key not in files:
                # one pattern and no name file: a fit can only be that pattern; no need to ask the index
                suffix = mid + canonical(pats[0])
            else:
                suffix = ""
            parts.append((key, _part(key + " ", check.index.explain, mid, suffix, inline, files.get(key, ""), bit)))
        self.build, self.hit = self._builders(parts, guests)

    def _builders(self, parts: list[tuple[str, Callable[[Any], str]]], guests: frozenset[str]) -> tuple[
            Callable[[Mapping[str, Any], str], str], Callable[[Mapping[str, Any], str], Decision]]:
        """`build` and `hit`, specialised for the number of constrained keys (no loop for 1 or 2)."""
        make = decision_factory(self.verdict, _RULE, self.id, self.at, self.plaintext, self.limits)
        tail = self.detail_suffix
        build: Callable[[Mapping[str, Any], str], str]
        hit: Callable[[Mapping[str, Any], str], Decision]
        if not parts:
            any_detail = self.any_detail
            if self.rule.guests is None:
                const = make(any_detail + tail)

                def build(request: Mapping[str, Any], guest: str) -> str:
                    return any_detail

                def hit(request: Mapping[str, Any], guest: str) -> Decision:
                    return const  # nothing request-specific in it: one frozen value per rule
            else:
                # per known guest (a bounded set); an unknown guest's name is shown as given
                per_guest = {g: make(f"{any_detail} from guest {_show(g)}{tail}") for g in guests}

                def build(request: Mapping[str, Any], guest: str) -> str:
                    return f"{any_detail} from guest {_show(guest)}"

                def hit(request: Mapping[str, Any], guest: str) -> Decision:
                    d = per_guest.get(guest)
                    return make(f"{any_detail} from guest {_show(guest)}{tail}") if d is None else d
        elif len(parts) == 1:
            (k0, p0), = parts

            def build(request: Mapping[str, Any], guest: str) -> str:
                return p0(request[k0])

            if tail:
                def hit(request: Mapping[str, Any], guest: str) -> Decision:
                    return make(p0(request[k0]) + tail)
            else:
                def hit(request: Mapping[str, Any], guest: str) -> Decision:
                    return make(p0(request[k0]))
        elif len(parts) == 2:
            (k0, p0), (k1, p1) = parts

            def build(request: Mapping[str, Any], guest: str) -> str:
                return f"{p0(request[k0])}; {p1(request[k1])}"

            def hit(request: Mapping[str, Any], guest: str) -> Decision:
                return make(f"{p0(request[k0])}; {p1(request[k1])}{tail}")
        else:
            def build(request: Mapping[str, Any], guest: str) -> str:
                return "; ".join([p(request[k]) for k, p in parts])

            def hit(request: Mapping[str, Any], guest: str) -> Decision:
                return make("; ".join([p(request[k]) for k, p in parts]) + tail)
        return build, hit


class _Table:
    """One protocol's compiled rules."""

    __slots__ = ("protocol", "entries", "checks", "guest_masks", "unknown_mask", "allow_mask",
                 "default_decision", "by_key", "fast")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.entries: list[_RuleEntry] = []
        self.checks: tuple[_KeyCheck, ...] = ()
        self.guest_masks: dict[str, int] = {}
        self.unknown_mask = 0
        self.allow_mask = 0
        self.default_decision: Decision
        self.by_key: dict[str, _KeyCheck] = {}
        self.fast: tuple[tuple[str, Callable[[Any], int], int], ...] = ()  # (key, lookup, free)


def _compile_table(policy: Policy, protocol: str, guests: frozenset[str], problems: list[Problem]) -> _Table:
    """One protocol's rules as indexes (reads the name files its rules name)."""
    table = _Table(protocol)
    rules = [r for r in policy.rules if r.protocol == protocol]
    every = (1 << len(rules)) - 1
    checks: list[_KeyCheck] = []
    for key, kind in MATCH_KEYS[protocol].items():
        constrained = [(pos, r) for pos, r in enumerate(rules) if key in r.constrained_keys()]
        if not constrained:
            continue
        index = new_index(kind)
        cmask = 0
        for pos, r in constrained:
            bit = 1 << pos
            cmask |= bit
            for pattern in r.match.get(key, ()):
                index.add(pattern, bit)
            for nf in r.name_files:
                if nf.key != key:
                    continue
                try:
                    names = read_name_file(nf)
                except SourceError as e:
                    problems.extend(e.problems)
                    continue
                assert isinstance(index, NameIndex)
                index.add_names(names.exact, names.below, names.any, bit)
                del names
        checks.append(_KeyCheck(key, kind, index, every & ~cmask))
    # AND is commutative: probe the most selective keys first so a miss stops early.
    checks.sort(key=lambda c: (c.kind in _SET_KINDS, -len(c.index)))
    table.checks = tuple(checks)
    table.fast = tuple((c.key, c.index.lookup, c.free) for c in checks)
    table.by_key = {c.key: c for c in checks}
    for pos, r in enumerate(rules):
        keys = [table.by_key[k] for k in MATCH_KEYS[protocol] if k in r.constrained_keys()]
        table.entries.append(_RuleEntry(r, 1 << pos, keys, policy.mode is Mode.MONITOR, protocol, guests))
        if r.action is Action.ALLOW:
            table.allow_mask |= 1 << pos
    for guest in guests:
        table.guest_masks[guest] = sum(
            1 << pos for pos, r in enumerate(rules) if r.guests is None or guest in r.guests)
    table.unknown_mask = table.guest_masks[UNKNOWN_GUEST]

    pol = policy
    if pol.default is Action.ALLOW:
        verdict, detail = Verdict.ALLOW, "no rule matched; default allow"
    elif policy.mode is Mode.MONITOR:
        verdict, detail = Verdict.WOULD_DENY, "no rule matched; default deny (monitor mode: let through)"
    else:
        verdict, detail = Verdict.DENY, "no rule matched; default deny"
    table.default_decision = Decision(verdict, ReasonCode.DEFAULT, "default", pol.default_at, detail)
    if policy.mode is Mode.LEARN:
        # Learn mode: no rule fits any guest, so every request reaches the "default" path, which
        # answers the one learn decision. The hot path stays as it is (no mode test per request).
        table.fast = ()
        table.guest_masks = dict.fromkeys(table.guest_masks, 0)
        table.unknown_mask = 0
        table.default_decision = Decision(
            Verdict.ALLOW, ReasonCode.LEARN, "learn", pol.mode_at,
            "learn mode: allowed and recorded without consulting the rules (mode: learn)")
    return table


class Engine:
    """A compiled, immutable policy plus its rate-limit state. Build with `load_policy`."""

    def __init__(self, policy: Policy, tables: Mapping[str, _Table], guests: Iterable[str] = (),
                 clock: Clock = time.monotonic) -> None:
        """Wrap already compiled tables (no I/O here); use `load_policy` or `Engine.compile`."""
        self.policy = policy
        self.guests = frozenset(guests) | {UNKNOWN_GUEST}
        self.clock = clock
        self._buckets: dict[tuple[int, str], _Bucket] = {}
        # `workers: N`: buckets in a table every worker of the service shares (policy.shared_rate);
        # None: this process's own (_buckets). `_keys` caches each (rule, guest)'s table key.
        self.shared_rates: Any = None
        self._keys: dict[tuple[int, str], int] = {}
        self._tables: dict[str, _Table] = dict(tables)
        self.digest = ""  # "sha256:<hex>" of the rules (and list) files compiled; set by compile()

    @classmethod
    def compile(cls, policy: Policy, guests: Iterable[str] = (), clock: Clock = time.monotonic) -> Engine:
        """Build the indexes of a parsed policy, reading its name files. SourceError on bad files."""
        known = frozenset(guests) | {UNKNOWN_GUEST}
        problems: list[Problem] = []
        tables = {protocol: _compile_table(policy, protocol, known, problems) for protocol in PROTOCOLS}
        if problems:
            raise SourceError(problems)
        engine = cls(policy, tables, known, clock)
        try:
            engine.digest = policy_digest(policy)
        except OSError:  # a Policy built in memory (tests): no file to hash
            engine.digest = ""
        return engine

    # -- properties -----------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self.policy.mode

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.policy.rules

    @property
    def file(self) -> str:
        return self.policy.file

    # -- deciding -------------------------------------------------------------------------------
    def decide(self, protocol: str, guest: str, request: Mapping[str, Any]) -> Decision:
        """Decide one request.

        Precedence:
          1. Only rules of `protocol` are considered, in file order.
          2. A rule fits when its `guests` list names `guest` (or it has no `guests`; a guest name the
             config does not know counts as "unknown") and every key in its `match:` fits the
             request: names "x" exactly, "*.x" strictly below x, "*" anything; e-mail patterns
             likewise on the domain with a literal or `*` local part; paths as globs; addresses by
             CIDR; OIDs by subtree; qtype/method/op/port/agent as sets. A rule that matches on a key
             the request does not carry (e.g. `answer_ip`) does not fit. Limit keys (`max_size`,
             `max_body`, `max_message`) never affect fitting; they are returned in `limits`.
          3. The first fitting rule decides. If it has a `rate` and the (rule, guest) bucket is
             empty, the answer is `rate_limited` (deny) instead of the rule's action.
          4. No fitting rule: the file's `default`.
          5. In monitor mode every deny (rule, rate or default) becomes `would_deny`, which lets the
             request through and is audited as a denial.
          6. In learn mode no rule is consulted: every request is `allow` with rule `learn` (at the
             `mode:` line), no rate applies, and nothing may leave in plaintext.
        `plaintext` is True only when an allow rule with `plaintext: true` lets the request through;
        `limits` are the allow rule's limits.
        """
        table = self._tables.get(protocol)
        if table is None:
            raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
        m = table.guest_masks.get(guest, table.unknown_mask)
        get = request.get
        try:
            for key, lookup, free in table.fast:
                if not m:
                    break
                value = get(key)
                m &= free if value is None else lookup(value) | free
        except (AttributeError, TypeError, ValueError):
            # A service passed a non-string value (int, bytes...): compare its text form instead of
            # failing. Costs nothing on the normal path (try is free in CPython 3.11).
            if all(v.__class__ is str for v in request.values() if v is not None):
                raise  # not a value problem: a bug here, and it must not be hidden
            fixed = {k: v if v.__class__ is str else str(v) for k, v in request.items() if v is not None}
            return self.decide(protocol, guest, fixed)
        if not m:
            return table.default_decision
        entry = table.entries[(m & -m).bit_length() - 1]
        if entry.rate is None:
            return entry.hit(request, guest)  # the hot path: one call builds detail and Decision
        detail = entry.build(request, guest)
        if not self._take_token(entry, guest):
            rule = entry.rule
            verdict = entry.monitor_verdict
            let_through = verdict is Verdict.WOULD_DENY
            return make_decision(
                verdict, ReasonCode.RATE_LIMITED, rule.id, entry.at,
                f"{detail}; over rate {entry.rate.text} for guest {_show(guest)}"
                + ("; monitor mode: let through" if let_through else ""),
                entry.plaintext and let_through,
                entry.limits if let_through else _NO_LIMITS,
            )
        return make_decision(entry.verdict, _RULE, entry.id, entry.at, detail + entry.detail_suffix,
                             entry.plaintext, entry.limits)

    def _take_token(self, entry: _RuleEntry, guest: str) -> bool:
        rate = entry.rule.rate
        assert rate is not None
        if guest not in self.guests:
            guest = UNKNOWN_GUEST  # bounded state: one bucket per known guest
        key = (entry.global_index, guest)
        now = self.clock()
        shared = self.shared_rates
        if shared is not None:
            k = self._keys.get(key)
            if k is None:
                k = self._keys[key] = bucket_key(entry.rule.id, rate.text, guest)
            took = shared.take(k, float(rate.count), float(rate.period), now)
            if took is not None:
                return took
        b = self._buckets.get(key)
        if b is None:
            self._buckets[key] = _Bucket(rate.count - 1.0, now)
            return True
        elapsed = now - b.last
        if elapsed > 0:
            b.tokens = min(float(rate.count), b.tokens + elapsed * rate.count / rate.period)
            b.last = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def named_by_rule(self, protocol: str, guest: str, key: str, value: Any) -> bool:
        """True when an allow rule of `protocol` that applies to `guest` names `value` for `key`
        explicitly: by an exact pattern or a subtree/suffix pattern ("*.example.com", 10.0.0.0/8),
        not merely by a match-anything pattern ("*", 0.0.0.0/0) or by not constraining `key` at all.
        Services use it for exemptions (DNS rebinding protection, SSRF checks)."""
        table = self._tables.get(protocol)
        if table is None:
            raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
        if key not in MATCH_KEYS[protocol]:
            raise ValueError(f"{protocol} rules have no key {key!r}")
        check = table.by_key.get(key)
        if check is None or value is None:
            return False
        m = table.allow_mask & table.guest_masks.get(guest, table.unknown_mask)
        return bool(m and check.index.lookup(value, explicit=True) & m)

    def inherit_rate_state(self, old: Engine) -> None:
        """After a reload, keep the token buckets of rules whose id and rate are unchanged, so a
        SIGHUP does not hand every guest a fresh allowance. A shared table (workers: N) carries
        over as a whole: its keys name rules by id and rate."""
        if self.shared_rates is None:
            self.shared_rates = old.shared_rates
        new_by_id = {r.id: r for r in self.policy.rules}
        old_rules = old.policy.rules
        for (index, guest), bucket in old._buckets.items():
            orule = old_rules[index]
            nrule = new_by_id.get(orule.id)
            if nrule is not None and nrule.rate == orule.rate and guest in self.guests:
                self._buckets[(nrule.index, guest)] = _Bucket(bucket.tokens, bucket.last)

    def stats(self) -> dict[str, int]:
        """Rule and indexed-name counts per protocol (for logs and /healthz)."""
        out: dict[str, int] = {}
        for protocol, table in self._tables.items():
            out[f"{protocol}_rules"] = len(table.entries)
            names = sum(len(c.index) for c in table.checks if isinstance(c.index, NameIndex))
            if names:
                out[f"{protocol}_names"] = names
        return out

