"""`proxyvm learn`: a least-privilege rules file from the requests an audit log shows were allowed.

Owns: gathering the allowed decisions per guest and protocol, collapsing what was seen into
patterns, and writing the rules file (deterministic: the same records, in any order, give the same
bytes). What becomes a pattern:
- DNS qnames, HTTP/WebSocket hosts, TLS SNIs and SMTP domains: exact names, or `*.parent` once a
  parent has `threshold` or more distinct children in use; the widest wildcard is `*.<registrable
  domain>` by the Public Suffix List (`publicsuffixlist`, bundled), so never `*.com` or `*.co.uk`;
  IP addresses and public suffixes themselves stay exact;
- qtypes, HTTP methods, SNMP ops and agents: as seen;
- HTTP paths: a segment trie; a prefix with `threshold` or more distinct next segments becomes
  `prefix/*` (`/v1/items/123`, `/v1/items/124`, ... -> `/v1/items/*`);
- SNMP OIDs: the same on arcs, never shorter than `MIN_OID_DEPTH` arcs (mib-2 groups,
  enterprise numbers), a collapsed node covering its whole subtree.
One rule per guest and protocol (HTTP: per guest and host pattern), each with a comment giving its
request count and first/last seen, every pattern checked with the policy's own parser; the file ends
with `default: deny`.
Must not: read files or print (records come from `proxyvm.auditlog_read`, the CLI writes), or emit
a pattern `policy` would reject.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from publicsuffixlist import PublicSuffixList

from policy.model import (
    HTTP_METHODS,
    PROTOCOLS,
    SNMP_OPS,
    KeyKind,
    normalize_name,
    normalize_oid,
    parse_pattern,
)
from proxyvm.auditlog_read import DECISION, Entry, classify, ts_key
from proxyvm.replay import snmp_oids

THRESHOLD = 3
MIN_OID_DEPTH = 7  # 1.3.6.1.2.1.<group>, 1.3.6.1.4.1.<enterprise>
_ID_OK = re.compile(r"[^A-Za-z0-9_.:/@+-]")
_psl: PublicSuffixList | None = None


def _public_suffixes() -> PublicSuffixList:
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()  # parses the bundled list once (~0.1 s)
    return _psl


@dataclass(slots=True)
class Seen:
    count: int = 0
    first: str = ""
    last: str = ""

    def add(self, ts: str, n: int = 1) -> None:
        self.count += n
        if ts and (not self.first or ts < self.first):
            self.first = ts
        if ts > self.last:
            self.last = ts

    def merge(self, other: Seen) -> None:
        self.count += other.count
        for t in (other.first, other.last):
            if t and (not self.first or t < self.first):
                self.first = t
            if t > self.last:
                self.last = t


def _n(count: int, what: str) -> str:
    return f"{count} {what}" if count == 1 else f"{count} {what}s"


def _bump(d: dict[str, Seen], key: str, ts: str) -> None:
    s = d.get(key)
    if s is None:
        s = d[key] = Seen()
    s.add(ts)


@dataclass(slots=True)
class _Group:
    """What one guest did with one protocol."""

    seen: Seen = field(default_factory=Seen)
    values: dict[str, dict[str, Seen]] = field(default_factory=lambda: defaultdict(dict))
    http: dict[str, dict[str, dict[str, Seen]]] = field(default_factory=dict)  # host -> key -> value
    unusable: dict[str, Seen] = field(default_factory=dict)  # values no pattern can express


def _valid(kind: KeyKind, text: str) -> bool:
    try:
        parse_pattern(kind, text)
    except ValueError:
        return False
    return True


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- collapsing ----------------------------------------------------------------------------------
def collapse_names(names: Iterable[str], threshold: int = THRESHOLD) -> dict[str, list[str]]:
    """pattern -> the names it covers. Names are normalised, valid DNS names."""
    psl = _public_suffixes()
    out: dict[str, list[str]] = {}
    by_domain: dict[str, set[str]] = defaultdict(set)
    for n in names:
        reg = None if _is_ip(n) else psl.privatesuffix(n)
        if reg is None or reg == n:
            out[n] = [n]  # a registrable domain, a public suffix, a single label or an address
        else:
            by_domain[reg].add(n)
    for reg, below in by_domain.items():
        _collapse_below(reg, below, threshold, out, psl)
    return out


def _collapse_below(parent: str, below: set[str], threshold: int, out: dict[str, list[str]],
                    psl: PublicSuffixList) -> None:
    """Cover `below` (names strictly below `parent`) with exact names and the narrowest wildcards."""
    if len(below) < threshold:
        for n in below:
            out[n] = [n]
        return
    cut = len(parent) + 1
    children: dict[str, set[str]] = defaultdict(set)
    for n in below:
        children[n[:-cut].rsplit(".", 1)[-1] + "." + parent].add(n)
    if len(children) >= threshold and not psl.is_public(parent):
        out["*." + parent] = sorted(below)
        return
    for child, members in children.items():
        if child in members:
            out[child] = [child]
            members.discard(child)
        if members:
            _collapse_below(child, members, threshold, out, psl)


def _clean_path(path: str) -> str:
    """A recorded path as a glob that matches it: '*' runs squeezed, and from the first character a
    glob cannot hold (space, control, '?', '#') on, a '*'."""
    if not path.startswith("/"):
        return "*"
    path = re.sub(r"\*+", "*", path)
    m = re.search(r"[\s?#\x00-\x1f\x7f]", path)
    if m:
        path = path[: m.start()] + "*"
        path = re.sub(r"\*+", "*", path)
    return path


def collapse_paths(paths: Iterable[str], threshold: int = THRESHOLD) -> dict[str, list[str]]:
    """glob -> the paths it covers (paths as recorded)."""
    out: dict[str, list[str]] = {}
    members: list[tuple[list[str], str]] = []
    for p in paths:
        g = _clean_path(p)
        if g == p and "*" not in p:
            members.append((p[1:].split("/"), p))
        else:
            out.setdefault(g, []).append(p)
    _walk_paths([], members, threshold, out)
    return out


def _walk_paths(prefix: list[str], members: list[tuple[list[str], str]], threshold: int,
                out: dict[str, list[str]]) -> None:
    depth = len(prefix)
    groups: dict[str, list[tuple[list[str], str]]] = defaultdict(list)
    for segs, path in members:
        if len(segs) == depth:
            out.setdefault(path, []).append(path)
        else:
            groups[segs[depth]].append((segs, path))
    if not groups:
        return
    if len(groups) >= threshold:
        glob = "/" + "/".join(prefix) + ("/*" if prefix else "*")
        out.setdefault(glob, []).extend(p for g in groups.values() for _, p in g)
        return
    for seg, group in groups.items():
        _walk_paths([*prefix, seg], group, threshold, out)


def collapse_oids(oids: Iterable[str], threshold: int = THRESHOLD) -> dict[str, list[str]]:
    """subtree -> the OIDs it covers."""
    out: dict[str, list[str]] = {}
    _walk_oids([], [(o.split("."), o) for o in oids], threshold, out)
    return out


def _walk_oids(prefix: list[str], members: list[tuple[list[str], str]], threshold: int,
               out: dict[str, list[str]]) -> None:
    depth = len(prefix)
    groups: dict[str, list[tuple[list[str], str]]] = defaultdict(list)
    here = []
    for arcs, oid in members:
        if len(arcs) == depth:
            here.append(oid)
        else:
            groups[arcs[depth]].append((arcs, oid))
    if depth >= MIN_OID_DEPTH and len(groups) >= threshold:
        out[".".join(prefix)] = here + [o for g in groups.values() for _, o in g]
        return
    for oid in here:
        out[oid] = [oid]
    for arc, group in groups.items():
        _walk_oids([*prefix, arc], group, threshold, out)


# -- gathering -----------------------------------------------------------------------------------
def _domain(address: Any) -> str | None:
    """The domain of an envelope address, "<>" for the null sender, None when there is none."""
    if not isinstance(address, str):
        return None
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if a == "":
        return "<>"
    if "@" not in a:
        return None
    return normalize_name(a.rpartition("@")[2])


class Learner:
    """Feed entries with `add`; `render()` gives the rules file."""

    def __init__(self, threshold: int = THRESHOLD, guests: Iterable[str] | None = None,
                 since: str = "", until: str = ""):
        self.threshold = threshold
        self.only = frozenset(guests) if guests else None
        self.since, self.until = since, until
        self.groups: dict[tuple[str, str], _Group] = {}
        self.not_learned: dict[str, int] = defaultdict(int)
        self.learned = 0
        self.policies: Counter[str] = Counter()  # digests of the policies that allowed what was learned

    def add_all(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            self.add(e)

    def add(self, e: Entry) -> None:
        what = classify(e)
        rec = e.rec
        if what != DECISION:
            self.not_learned[what] += 1
            return
        guest = rec.get("guest") if isinstance(rec.get("guest"), str) else "unknown"
        if self.only is not None and guest not in self.only:
            self.not_learned["other_guest"] += 1
            return
        ts = ts_key(rec.get("ts"))
        if (self.since and ts < self.since) or (self.until and ts >= self.until):
            self.not_learned["outside_time"] += 1
            return
        verdict = rec["verdict"]
        if verdict != "allow":
            self.not_learned[verdict] += 1
            return
        protocol, req = rec["protocol"], rec["request"]
        g = self.groups.get((guest, protocol))
        if g is None:
            g = self.groups[(guest, protocol)] = _Group()
        g.seen.add(ts)
        self.learned += 1
        self.policies[str(rec.get("policy") or "(no digest: recorded before provenance)")] += 1
        v = g.values
        if protocol == "dns":
            self._name(g, "qname", req.get("qname"), ts)
            qtype = req.get("qtype")
            if isinstance(qtype, str) and _valid(KeyKind.QTYPE, qtype):
                _bump(v["qtype"], qtype.upper(), ts)
            else:
                _bump(g.unusable, f"qtype {qtype!r}", ts)
        elif protocol == "smtp":
            for key in ("mail_from", "rcpt_to"):
                dom = _domain(req.get(key))
                if dom == "<>":
                    _bump(v[key], "<>", ts)
                elif dom and _valid(KeyKind.NAME, dom):
                    _bump(v[key + "_domain"], dom, ts)
                else:
                    _bump(g.unusable, f"{key} {req.get(key)!r}", ts)
        elif protocol == "snmp":
            agent, op = req.get("agent"), req.get("op")
            if isinstance(agent, str) and agent.strip():
                _bump(v["agent"], agent.strip(), ts)
            else:
                _bump(g.unusable, f"agent {agent!r}", ts)
            if op in SNMP_OPS:
                _bump(v["op"], op, ts)
            else:
                _bump(g.unusable, f"op {op!r}", ts)
            for oid in snmp_oids(req):
                oid = normalize_oid(oid)
                if _valid(KeyKind.OID, oid):
                    _bump(v["oid"], oid, ts)
                else:
                    _bump(g.unusable, f"oid {oid!r}", ts)
        elif protocol in ("http", "ws"):
            host = req.get("host")
            host = normalize_name(host) if isinstance(host, str) else ""
            if not host or not _valid(KeyKind.NAME, host):
                _bump(g.unusable, f"host {req.get('host')!r}", ts)
                return
            _bump(v["host"], host, ts)
            if protocol == "http":
                per = g.http.setdefault(host, defaultdict(dict))
                method = req.get("method")
                if isinstance(method, str) and method.upper() in HTTP_METHODS:
                    _bump(per["method"], method.upper(), ts)
                else:
                    _bump(g.unusable, f"method {method!r}", ts)
                path = req.get("path")
                _bump(per["path"], path if isinstance(path, str) and path else "/", ts)
        elif protocol == "tls":
            sni = req.get("sni")
            if isinstance(sni, str) and sni:
                self._name(g, "sni", sni, ts)
            else:
                dst = req.get("dst")
                if isinstance(dst, str) and _valid(KeyKind.CIDR, dst):
                    _bump(v["dst"], dst, ts)
                else:
                    _bump(g.unusable, f"dst {dst!r}", ts)

    def _name(self, g: _Group, key: str, value: Any, ts: str) -> None:
        name = normalize_name(value) if isinstance(value, str) else ""
        if name and _valid(KeyKind.NAME, name) and "*" not in name:
            _bump(g.values[key], name, ts)
        else:
            _bump(g.unusable, f"{key} {value!r}", ts)

    # -- output ----------------------------------------------------------------------------------
    def drop_guests(self, keep: Iterable[str]) -> list[tuple[str, int]]:
        """Leave out guests a config does not define (its `proxyvm check` would reject them)."""
        allowed = set(keep) | {"unknown"}
        dropped: dict[str, int] = defaultdict(int)
        for key in [k for k in self.groups if k[0] not in allowed]:
            dropped[key[0]] += self.groups.pop(key).seen.count
        return sorted(dropped.items())

    def rules(self) -> list[_RuleText]:
        out: list[_RuleText] = []
        order = {p: i for i, p in enumerate(PROTOCOLS)}
        for (guest, protocol), g in sorted(self.groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
            out.extend(self._rules_for(guest, protocol, g))
        return out

    def _names(self, seen: dict[str, Seen], fmt: str = "{}") -> list[tuple[str, str]]:
        """(pattern, comment) for names, collapsed."""
        items = []
        for pat, covered in collapse_names(seen, self.threshold).items():
            s = Seen()
            for n in covered:
                s.merge(seen[n])
            note = (f"{_n(len(covered), 'name')}, {_n(s.count, 'request')}" if pat.startswith("*.")
                    else _n(s.count, "request"))
            items.append((fmt.format(pat), note))
        return sorted(items)

    @staticmethod
    def _plain(seen: dict[str, Seen]) -> list[tuple[str, str]]:
        return [(k, "") for k in sorted(seen)]

    def _rules_for(self, guest: str, protocol: str, g: _Group) -> list[_RuleText]:
        v = g.values
        base = f"learn-{guest}-{protocol}"
        if protocol == "dns":
            if not v.get("qname"):
                return []
            return [_RuleText(base, protocol, guest, g.seen, [("qname", self._names(v["qname"])),
                                                              ("qtype", self._plain(v.get("qtype", {})))],
                              g.unusable)]
        if protocol == "smtp":
            match = []
            for key in ("mail_from", "rcpt_to"):
                pats = self._names(v.get(key + "_domain", {}), "*@{}")
                if "<>" in v.get(key, {}):
                    pats.insert(0, ("<>", _n(v[key]["<>"].count, "request") + " (null sender)"))
                if not pats:
                    return []
                match.append((key, pats))
            return [_RuleText(base, protocol, guest, g.seen, match, g.unusable)]
        if protocol == "snmp":
            if not (v.get("agent") and v.get("op") and v.get("oid")):
                return []
            oids = []
            for pat, covered in sorted(collapse_oids(v["oid"], self.threshold).items()):
                s = Seen()
                for o in covered:
                    s.merge(v["oid"][o])
                oids.append((pat, f"{_n(len(covered), 'OID')}, {_n(s.count, 'request')}" if len(covered) > 1
                             else _n(s.count, "request")))
            return [_RuleText(base, protocol, guest, g.seen, [("agent", self._plain(v["agent"])),
                                                              ("op", self._plain(v["op"])), ("oid", oids)],
                              g.unusable)]
        if protocol == "ws":
            if not v.get("host"):
                return []
            return [_RuleText(base, protocol, guest, g.seen, [("host", self._names(v["host"]))], g.unusable)]
        if protocol == "tls":
            out = []
            if v.get("sni"):
                out.append(_RuleText(base, protocol, guest, _total(v["sni"]), [("sni", self._names(v["sni"]))],
                                     g.unusable))
            if v.get("dst"):
                out.append(_RuleText(base + "-dst", protocol, guest, _total(v["dst"]),
                                     [("dst", [(d, _n(s.count, "request") + " without SNI") for d, s in sorted(v["dst"].items())])],
                                     {} if out else g.unusable))
            return out
        # http: one rule per host pattern, with the methods and paths seen on the hosts it covers
        out = []
        for pat, covered in sorted(collapse_names(v.get("host", {}), self.threshold).items()):
            methods: dict[str, Seen] = {}
            paths: dict[str, Seen] = {}
            seen = Seen()
            for h in covered:
                per = g.http.get(h, {})
                for m, s in per.get("method", {}).items():
                    methods.setdefault(m, Seen()).merge(s)
                for p, s in per.get("path", {}).items():
                    paths.setdefault(p, Seen()).merge(s)
                seen.merge(v["host"][h])
            if not methods:
                continue
            path_pats = []
            for glob, cov in sorted(collapse_paths(paths, self.threshold).items()):
                n = sum(paths[p].count for p in cov)
                path_pats.append((glob, f"{_n(len(cov), 'path')}, {_n(n, 'request')}" if len(cov) > 1
                                  else _n(n, "request")))
            host_note = f"{_n(len(covered), 'name')}, {_n(seen.count, 'request')}" if pat.startswith("*.") else ""
            out.append(_RuleText(f"{base}-{pat.replace('*', 'any')}", protocol, guest, seen,
                                 [("host", [(pat, host_note)]), ("method", self._plain(methods)), ("path", path_pats)],
                                 g.unusable if not out else {}))
        return out

    def render(self, sources: Iterable[str], mode: str = "monitor") -> str:
        rules = self.rules()
        lines = [
            "# Learned by `proxyvm learn` from the allowed requests in:",
            *(f"#   {s}" for s in sorted(set(sources))),
            f"# {self.learned} allowed requests of {len({g for g, _ in self.groups})} guests, "
            f"{len(rules)} rules (collapse threshold {self.threshold}).",
        ]
        if self.policies:
            lines.append("# Allowed under policy " + ", ".join(
                f"{d} ({n})" for d, n in sorted(self.policies.items(), key=lambda kv: (-kv[1], kv[0]))) + ".")
        if self.not_learned:
            lines.append("# Not learned: " + ", ".join(f"{n} {k.replace('_', ' ')}"
                                                     for k, n in sorted(self.not_learned.items())) + ".")
        lines += [
            "# Review every rule: each allows what the guest did, nothing about whether it should have.",
            "# Then: `proxyvm replay --policy THIS_FILE` over recent logs, mode: monitor, then mode: enforce.",
            f"mode: {mode}",
            "",
            "rules:" if rules else "rules: []",
        ]
        ids: set[str] = set()
        for r in rules:
            lines.extend(r.lines(ids))
        lines += ["", "default: deny", ""]
        return "\n".join(lines)


def _total(seen: dict[str, Seen]) -> Seen:
    s = Seen()
    for x in seen.values():
        s.merge(x)
    return s


def _q(text: str) -> str:
    """A YAML scalar: JSON's double-quoted string is valid YAML."""
    return json.dumps(text)


@dataclass(slots=True)
class _RuleText:
    id: str
    protocol: str
    guest: str
    seen: Seen
    match: list[tuple[str, list[tuple[str, str]]]]
    unusable: dict[str, Seen]

    def lines(self, ids: set[str]) -> list[str]:
        rid = _ID_OK.sub("_", self.id)
        if len(rid) > 128 or rid in ids:
            rid = rid[:119] + "-" + hashlib.sha256(self.id.encode()).hexdigest()[:8]
        ids.add(rid)
        s = self.seen
        out = ["", f"  # {self.guest} {self.protocol}: {_n(s.count, 'request')}, first seen {s.first or '?'}, "
                   f"last seen {s.last or '?'}"]
        if self.unusable:
            shown = sorted(self.unusable.items())[:5]
            more = len(self.unusable) - len(shown)
            out.append("  # left to the default (no pattern can express them): "
                       + "; ".join(f"{k} x{v.count}" for k, v in shown) + (f"; {more} more" if more else ""))
        out += [f"  - id: {rid}", "    action: allow", f"    protocol: {self.protocol}",
                f"    guests: [{_q(self.guest)}]", "    match:"]
        for key, pats in self.match:
            if all(not note for _, note in pats) and len(pats) <= 12:
                out.append(f"      {key}: [{', '.join(_q(p) for p, _ in pats)}]")
                continue
            out.append(f"      {key}:")
            width = max(len(_q(p)) for p, _ in pats)
            for p, note in pats:
                out.append(f"        - {_q(p).ljust(width)}  # {note}" if note else f"        - {_q(p)}")
        return out
