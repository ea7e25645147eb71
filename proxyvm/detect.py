"""Detectors: abnormal behaviour of a guest, seen in its audit records (docs/configuration.md#detect).

Owns: the `detect:` config section, the six detectors (new_destination, dns_tunnel, rate_spike,
deny_burst, smtp_burst, snmp_sweep), and what an alert does: one `kind: alert` audit record (guest,
detector, severity, evidence, the seqs of the triggering records), the Prometheus counter
`proxyvm_alerts_total{guest, detector}`, a log line, and — with `action: quarantine` — the guest's
quarantine (proxyvm.quarantine).
Must not: block (each runs inside `Supervisor.write_audit`, once per record, in O(1) per record),
see its own alerts as traffic (records with a `kind` are skipped), flood (new_destination raises at
most one alert per guest per window, gathering the rest), or grow without bound: every per-guest
structure is capped (windows are fixed rings of buckets, sets — the long `slow_window` ones too —
stop growing at the threshold they are compared with, key tables evict the oldest, the gathered new
destinations stop at `max_listed`), whatever the guest sends.

Every detector keeps its state per guest; the guests are the config's (plus `unknown`), so the
whole is bounded by (guests x detectors x the caps below).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from policy.source import Node, SourceError

log = logging.getLogger("proxyvm")

SEVERITIES = ("low", "medium", "high")
ACTIONS = ("alert", "quarantine")
MAX_KEYS = 256  # per guest and detector: base domains, agents, ... tracked at once (oldest evicted)
MAX_SEQS = 20  # seqs of triggering records kept as evidence
MAX_EXAMPLES = 5

# name -> {threshold: (default, kind)}; kind: int | float | duration | size. The documentation
# (docs/configuration.md#detect) lists the same table; tests/test_docs.py checks every key is there.
DETECTORS: dict[str, dict[str, tuple[float, str]]] = {
    "new_destination": {
        "min_baseline": (50, "int"),  # records a guest needs in its baseline before anything is "new"
        "max_destinations": (10000, "int"),  # destinations remembered per guest
        "history": (7 * 86400, "duration"),  # how far back the audit log seeds a learned baseline
        "window": (300, "duration"),  # at most one alert per guest in this time; it lists the new ones
        "max_listed": (50, "int"),  # new destinations named in one alert (the rest are only counted)
    },
    "dns_tunnel": {
        "window": (60, "duration"),
        "label_length": (40, "int"),  # a label this long is "long"
        "entropy": (3.8, "float"),  # bits per character of the subdomain part ...
        "entropy_min_length": (20, "int"),  # ... when it is at least this long
        "suspicious": (10, "int"),  # distinct long-label or high-entropy names under one base domain per window
        "unique_subdomains": (60, "int"),  # distinct names under one base domain per window
        "txt_share": (0.5, "float"),  # TXT/NULL share of the queries under one base domain (mail auth exempt) ...
        "min_queries": (20, "int"),  # ... once there are this many in the window
        "dga_domains": (20, "int"),  # distinct NXDOMAIN base domains with a random-looking name per window
        "dga_entropy": (2.5, "float"),  # bits per character of such a name's first label (6+ chars)
        "slow_window": (1800, "duration"),  # the long window of the low-and-slow signals below
        "slow_suspicious": (30, "int"),  # distinct suspicious names under one base domain per slow_window
        "slow_dga_domains": (40, "int"),  # distinct random-looking NXDOMAIN base domains per slow_window
    },
    "rate_spike": {
        "window": (60, "duration"),
        "factor": (10.0, "float"),  # requests in a window over this many times the guest's usual
        "min_requests": (300, "int"),  # and at least this many
        "warmup": (10, "int"),  # windows of history before it may alert
        "history": (60, "int"),  # windows the usual rate is averaged over (EWMA span)
    },
    "deny_burst": {
        "window": (60, "duration"),
        "count": (20, "int"),  # denials of one guest within the window
    },
    "smtp_burst": {
        "window": (300, "duration"),
        "recipients": (100, "int"),  # recipients asked for (RCPT) within the window
        "messages": (50, "int"),  # messages accepted within the window
        "bytes": (100 * 1000**2, "size"),  # bytes of accepted messages within the window
    },
    "snmp_sweep": {
        "window": (60, "duration"),
        "agents": (10, "int"),  # distinct agents walked (getnext/getbulk) within the window
    },
}
SEVERITY = {"new_destination": "low", "dns_tunnel": "high", "rate_spike": "medium", "deny_burst": "medium",
            "smtp_burst": "high", "snmp_sweep": "medium"}
COMMON = {"action", "profile", "severity", "cooldown"}
DEFAULT_COOLDOWN = 300.0  # one alert per guest, detector and key in this time


# -- config -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DetectorSettings:
    name: str
    action: str = "alert"  # alert | quarantine
    profile: str = "block"  # the quarantine profile when action is quarantine
    severity: str = "medium"
    cooldown: float = DEFAULT_COOLDOWN
    params: MappingProxyType[str, float] = field(default_factory=lambda: MappingProxyType({}))
    baseline: Path | None = None  # new_destination: a rules file instead of a learned baseline

    def __getitem__(self, key: str) -> float:
        return self.params[key]


@dataclass(frozen=True, slots=True)
class DetectSettings:
    detectors: MappingProxyType[str, DetectorSettings]

    def enabled(self) -> list[str]:
        return list(self.detectors)


def default_detector(name: str) -> DetectorSettings:
    return DetectorSettings(name, severity=SEVERITY[name],
                            params=MappingProxyType({k: v for k, (v, _) in DETECTORS[name].items()}))


def parse_detect(node: Node) -> DetectSettings:
    """`detect:` — present (a mapping, `true` or empty) = every detector on with action alert;
    `detect: false` = all off; `NAME: false` turns one off; `NAME: {...}` sets its keys."""
    if node.value is False:
        return DetectSettings(MappingProxyType({}))
    if node.value is None or node.value is True:
        return DetectSettings(MappingProxyType({n: default_detector(n) for n in DETECTORS}))
    fields = node.get_map(allowed=set(DETECTORS), what="detect")
    out: dict[str, DetectorSettings] = {}
    problems = []
    for name in DETECTORS:
        if name not in fields:
            out[name] = default_detector(name)
            continue
        try:
            d = _parse_detector(name, fields[name])
        except SourceError as e:
            problems.extend(e.problems)
            continue
        if d is not None:
            out[name] = d
    if problems:
        raise SourceError(problems)
    return DetectSettings(MappingProxyType(out))


def _parse_detector(name: str, node: Node) -> DetectorSettings | None:
    if node.value is False:
        return None
    if node.value is None or node.value is True:
        return default_detector(name)
    table = DETECTORS[name]
    allowed = COMMON | set(table) | ({"baseline"} if name == "new_destination" else set())
    if not isinstance(node.value, dict):
        raise node.fail(f"expected true, false or a mapping for detector {name}, found {node._type_name()}")
    fields = node.get_map(allowed=allowed, what=f"detector {name}")
    action = fields["action"].enum(ACTIONS, "detect action") if "action" in fields else "alert"
    profile = "block"
    if "profile" in fields:
        profile = fields["profile"].enum(("block", "honeypot"), "quarantine profile")
        if action != "quarantine":
            raise fields["profile"].fail(f"profile is only used with action: quarantine (detector {name})",
                                         "add `action: quarantine` or remove profile")
    severity = fields["severity"].enum(SEVERITIES, "severity") if "severity" in fields else SEVERITY[name]
    cooldown = DEFAULT_COOLDOWN
    if "cooldown" in fields:
        cooldown = fields["cooldown"].duration(f"{name} cooldown")
    params = {}
    for key, (default, kind) in table.items():
        if key not in fields:
            params[key] = default
            continue
        n = fields[key]
        what = f"{name} {key}"
        if kind == "int":
            params[key] = n.int(min=1, max=10**9, what=what)
        elif kind == "duration":
            v = n.duration(what)
            if not 1 <= v <= 30 * 86400:
                raise n.fail(f"{what} must be between 1s and 30d, found {n.value!r}")
            params[key] = v
        elif kind == "size":
            params[key] = n.size(what)
        else:
            v = n.value
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise n.fail(f"expected a positive number for {what}, found {v!r}")
            if key.endswith("share") and v > 1:
                raise n.fail(f"{what} is a share: between 0 and 1, found {v}")
            params[key] = float(v)
    baseline = None
    if "baseline" in fields:
        bn = fields["baseline"]
        baseline = bn.path("baseline rules file")
        if not baseline.is_file():
            raise bn.fail(f"baseline rules file {baseline} does not exist",
                          "name a rules file (e.g. one written by `proxyvm learn`), or omit baseline to learn it")
    return DetectorSettings(name, action, profile, severity, cooldown, MappingProxyType(params), baseline)


# -- small bounded structures ---------------------------------------------------------------------
class Window:
    """Counts (and sums) over a sliding window, as a fixed ring of buckets: O(BUCKETS) memory."""

    BUCKETS = 12
    __slots__ = ("width", "counts", "sums", "stamps")

    def __init__(self, window: float) -> None:
        self.width = window / self.BUCKETS
        self.counts = [0] * self.BUCKETS
        self.sums = [0.0] * self.BUCKETS
        self.stamps = [-1] * self.BUCKETS

    def add(self, now: float, n: int = 1, amount: float = 0.0) -> tuple[int, float]:
        """Add and return (count, sum) over the window ending now."""
        slot = int(now / self.width)
        i = slot % self.BUCKETS
        if self.stamps[i] != slot:
            self.stamps[i], self.counts[i], self.sums[i] = slot, 0, 0.0
        self.counts[i] += n
        self.sums[i] += amount
        lo = slot - self.BUCKETS + 1
        c, s = 0, 0.0
        for j in range(self.BUCKETS):
            if self.stamps[j] >= lo:
                c += self.counts[j]
                s += self.sums[j]
        return c, s


class Distinct:
    """Distinct values seen in a window, bounded: values expire after `window` s and the set stops
    growing at `cap` (it is only compared with a threshold <= cap)."""

    __slots__ = ("window", "cap", "seen")

    def __init__(self, window: float, cap: int) -> None:
        self.window, self.cap = window, cap
        self.seen: OrderedDict[Any, float] = OrderedDict()

    def count(self, now: float) -> int:
        """Distinct values within the window ending now (expired ones dropped)."""
        seen = self.seen
        while seen:
            k, t = next(iter(seen.items()))
            if now - t <= self.window:
                break
            seen.popitem(last=False)
        return len(seen)

    def add(self, value: Any, now: float) -> int:
        seen = self.seen
        self.count(now)
        if value in seen:
            seen.move_to_end(value)
            seen[value] = now
        elif len(seen) < self.cap:
            seen[value] = now
        return len(seen)


class Keyed:
    """A per-guest table of per-key states, capped at MAX_KEYS (the least recently used goes)."""

    __slots__ = ("make", "items", "cap")

    def __init__(self, make: Callable[[], Any], cap: int = MAX_KEYS) -> None:
        self.make, self.cap = make, cap
        self.items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        v = self.items.get(key)
        if v is None:
            if len(self.items) >= self.cap:
                self.items.popitem(last=False)
            v = self.items[key] = self.make()
        else:
            self.items.move_to_end(key)
        return v


def entropy(s: str) -> float:
    """Shannon entropy of `s` in bits per character."""
    if not s:
        return 0.0
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


_TWO_LEVEL = frozenset({"co", "com", "net", "org", "gov", "ac", "edu", "ne", "or", "go"})


def base_domain(qname: str) -> str:
    """The name a guest's queries are grouped under: the last two labels, or three when the
    second-level label is a common registry level (`example.co.uk`). No public-suffix list is
    shipped; this is a grouping for detection, not a policy boundary."""
    labels = qname.rstrip(".").lower().split(".")
    if len(labels) <= 2:
        return ".".join(labels)
    if len(labels[-1]) == 2 and labels[-2] in _TWO_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


# -- the detectors ----------------------------------------------------------------------------
@dataclass(slots=True)
class Alert:
    guest: str
    detector: str
    protocol: str
    reason: str
    evidence: dict[str, Any]
    records: list[int]
    key: str = ""


class Detector:
    name = ""

    def __init__(self, s: DetectorSettings) -> None:
        self.s = s
        self.guests: dict[str, Any] = {}

    def state(self, guest: str) -> Any:
        st = self.guests.get(guest)
        if st is None:
            if len(self.guests) >= 4096:  # the config bounds guests; this bounds a bug
                self.guests.pop(next(iter(self.guests)))
            st = self.guests[guest] = self.new_state()
        return st

    def new_state(self) -> Any:
        raise NotImplementedError

    def observe(self, rec: dict[str, Any], now: float) -> Alert | None:
        raise NotImplementedError


class _Seqs:
    __slots__ = ("q",)

    def __init__(self) -> None:
        self.q: deque[int] = deque(maxlen=MAX_SEQS)

    def add(self, seq: Any) -> None:
        if isinstance(seq, int):
            self.q.append(seq)


_MAIL_AUTH_LABELS = frozenset({"_dmarc", "_domainkey", "_mta-sts", "_smtp", "_tls", "_bimi", "_adsp"})


def mail_auth(qname: str, base: str) -> bool:
    """A TXT name mail servers look up by design: SPF (the domain itself, `_spf.*`, `spf*.*`),
    DMARC (`_dmarc.`), DKIM (`SELECTOR._domainkey.`), MTA-STS (`_mta-sts.`), TLS-RPT (`_smtp._tls.`),
    BIMI. Such TXT queries do not count toward txt_share (their names still count as names)."""
    if qname == base:
        return True
    for label in qname[: -len(base)].split("."):
        if label in _MAIL_AUTH_LABELS or label.startswith(("_spf", "spf")):
            return True
    return False


class DNSTunnel(Detector):
    """DNS tunnelling and DGA. Per guest and base domain within `window`: distinct names with a long
    label or a high-entropy subdomain part (`suspicious`; a CDN's hashed name asked again is one
    name, a tunnel never repeats), distinct names (`unique_subdomains`), the TXT/NULL share
    (`txt_share` once `min_queries`; SPF/DMARC/DKIM/MTA-STS lookups exempt); within `slow_window`:
    distinct suspicious names (`slow_suspicious`, the low-and-slow tunnel). Per guest: distinct
    random-looking base domains answered NXDOMAIN within `window` (`dga_domains`) and within
    `slow_window` (`slow_dga_domains`)."""

    name = "dns_tunnel"

    class _Base:
        __slots__ = ("total", "txt", "names", "odd", "slow", "seqs", "examples")

        def __init__(self, s: DetectorSettings) -> None:
            w = s["window"]
            self.total, self.txt = Window(w), Window(w)
            self.names = Distinct(w, int(s["unique_subdomains"]))
            self.odd = Distinct(w, int(s["suspicious"]))
            self.slow = Distinct(s["slow_window"], int(s["slow_suspicious"]))
            self.seqs = _Seqs()
            self.examples: deque[str] = deque(maxlen=MAX_EXAMPLES)

    def new_state(self) -> Any:
        s = self.s
        return {"bases": Keyed(lambda: DNSTunnel._Base(s)), "dga": Distinct(s["window"], int(s["dga_domains"])),
                "dga_slow": Distinct(s["slow_window"], int(s["slow_dga_domains"])),
                "dga_seqs": _Seqs(), "dga_examples": deque(maxlen=MAX_EXAMPLES)}

    def observe(self, rec: dict[str, Any], now: float) -> Alert | None:
        if rec.get("protocol") != "dns":
            return None
        req = rec.get("request") or {}
        qname = str(req.get("qname") or "").rstrip(".").lower()
        if not qname:
            return None
        qtype = str(req.get("qtype") or "")
        s = self.s
        st = self.state(rec.get("guest") or "unknown")
        base = base_domain(qname)
        sub = qname[: -len(base)].rstrip(".") if qname != base else ""
        labels = qname.split(".")
        long_label = max(len(x) for x in labels) >= s["label_length"]
        flat = sub.replace(".", "")
        high_entropy = len(flat) >= s["entropy_min_length"] and entropy(flat) >= s["entropy"]
        odd_name = long_label or high_entropy
        b = st["bases"].get(base)
        total, _ = b.total.add(now)
        is_txt = qtype in ("TXT", "NULL") and not mail_auth(qname, base)
        txt, _ = b.txt.add(now, 1 if is_txt else 0)
        unique = b.names.add(qname, now)
        if odd_name:
            odd, slow = b.odd.add(qname, now), b.slow.add(qname, now)
        else:
            odd, slow = b.odd.count(now), b.slow.count(now)
        b.seqs.add(rec.get("seq"))
        if odd_name or not b.examples or b.examples[-1] != qname:
            b.examples.append(qname)
        why = ""
        window = s["window"]
        if odd >= s["suspicious"]:
            why = f"{odd} distinct names with long labels or high entropy under {base}"
        elif unique >= s["unique_subdomains"]:
            why = f"{unique} distinct names under {base}"
        elif total >= s["min_queries"] and txt / total >= s["txt_share"]:
            why = f"{txt} of {total} queries under {base} are TXT/NULL"
        elif odd_name and slow >= s["slow_suspicious"]:
            why, window = f"low and slow: {slow} distinct names with long labels or high entropy under {base}", \
                s["slow_window"]
        if why:
            ev = {"base_domain": base, "window_s": window, "queries": total, "unique_names": unique,
                  "odd_names": odd, "slow_odd_names": slow, "txt_null": txt,
                  "txt_null_share": round(txt / total, 3) if total else 0.0, "examples": list(b.examples),
                  "thresholds": {k: s[k] for k in ("label_length", "entropy", "suspicious", "unique_subdomains",
                                                     "txt_share", "min_queries", "slow_suspicious", "slow_window")}}
            return Alert(rec.get("guest") or "unknown", self.name, "dns",
                         f"DNS tunnelling suspected: {why} within {window:g}s", ev, list(b.seqs.q), base)
        # DGA: random-looking names that do not exist, across many base domains
        if rec.get("rcode") == "NXDOMAIN":
            first = base.split(".")[0]
            if len(first) >= 6 and entropy(first) >= s["dga_entropy"]:
                n = st["dga"].add(base, now)
                n_slow = st["dga_slow"].add(base, now)
                st["dga_seqs"].add(rec.get("seq"))
                st["dga_examples"].append(qname)
                if n >= s["dga_domains"]:
                    n_at, window = n, s["window"]
                elif n_slow >= s["slow_dga_domains"]:
                    n_at, window = n_slow, s["slow_window"]
                else:
                    return None
                ev = {"nxdomain_base_domains": n_at, "window_s": window, "examples": list(st["dga_examples"]),
                      "thresholds": {k: s[k] for k in ("dga_domains", "dga_entropy", "slow_dga_domains",
                                                         "slow_window")}}
                return Alert(rec.get("guest") or "unknown", self.name, "dns",
                             f"DGA suspected: {n_at} random-looking domains answered NXDOMAIN within "
                             f"{window:g}s", ev, list(st["dga_seqs"].q), "dga")
        return None


class DenyBurst(Detector):
    """`count` denials of one guest within `window` (any protocol)."""

    name = "deny_burst"

    def new_state(self) -> Any:
        return {"w": Window(self.s["window"]), "seqs": _Seqs(), "rules": Keyed(lambda: [0], 16)}

    def observe(self, rec: dict[str, Any], now: float) -> Alert | None:
        if rec.get("verdict") != "deny":
            return None
        st = self.state(rec.get("guest") or "unknown")
        n, _ = st["w"].add(now)
        st["seqs"].add(rec.get("seq"))
        st["rules"].get(str(rec.get("rule")))[0] += 1
        if n < self.s["count"]:
            return None
        ev = {"denials": n, "window_s": self.s["window"], "threshold": self.s["count"],
              "rules": {k: v[0] for k, v in st["rules"].items.items()}}
        return Alert(rec.get("guest") or "unknown", self.name, str(rec.get("protocol")),
                     f"{n} denied requests within {self.s['window']:g}s", ev, list(st["seqs"].q))


class RateSpike(Detector):
    """Requests of one guest and protocol per `window` against that guest's own usual rate (an
    exponentially weighted mean over `history` windows, learned while it runs): an alert when a
    window reaches `factor` times the usual and at least `min_requests`, after `warmup` windows."""

    name = "rate_spike"

    class _Rate:
        __slots__ = ("slot", "count", "mean", "windows", "seqs", "alerted")

        def __init__(self) -> None:
            self.slot, self.count, self.mean, self.windows, self.alerted = -1, 0, 0.0, 0, -1
            self.seqs = _Seqs()

    def new_state(self) -> Any:
        return Keyed(RateSpike._Rate, 16)

    def observe(self, rec: dict[str, Any], now: float) -> Alert | None:
        proto = rec.get("protocol")
        if not rec.get("verdict") or rec.get("event") in _FOLLOW_UPS:
            return None
        s = self.s
        r = self.state(rec.get("guest") or "unknown").get(proto)
        slot = int(now / s["window"])
        if slot != r.slot:
            alpha = 2.0 / (s["history"] + 1)
            if r.slot >= 0:
                # a plain mean while there are fewer windows than the span (no bias toward 0 at start)
                r.mean += max(alpha, 1.0 / (r.windows + 1)) * (r.count - r.mean)
                r.windows += 1
                gap = min(slot - r.slot - 1, 10_000)
                if gap > 0:  # idle windows count as zero requests
                    r.mean *= (1 - max(alpha, 1.0 / (r.windows + 1))) ** gap
                    r.windows += gap
            r.slot, r.count = slot, 0
        r.count += 1
        r.seqs.add(rec.get("seq"))
        if r.windows < s["warmup"] or r.alerted == slot:
            return None
        usual = max(r.mean, 1.0)
        if r.count >= s["min_requests"] and r.count >= s["factor"] * usual:
            r.alerted = slot
            ev = {"requests": r.count, "window_s": s["window"], "usual": round(r.mean, 2),
                  "factor": round(r.count / usual, 1), "windows_of_history": r.windows,
                  "thresholds": {"factor": s["factor"], "min_requests": s["min_requests"]}}
            return Alert(rec.get("guest") or "unknown", self.name, str(proto),
                         f"{r.count} {proto} requests within {s['window']:g}s, {r.count / usual:.0f}x the usual "
                         f"{r.mean:.1f}", ev, list(r.seqs.q), str(proto))
        return None


_FOLLOW_UPS = frozenset({"accepted", "spool_failed", "attempt", "final", "dsn", "closed"})


class SMTPBurst(Detector):
    """Recipients (RCPT decisions), accepted messages and their bytes per guest within `window`."""

    name = "smtp_burst"

    def new_state(self) -> Any:
        w = self.s["window"]
        return {"rcpt": Window(w), "msg": Window(w), "seqs": _Seqs(), "domains": Keyed(lambda: [0], 32)}

    def observe(self, rec: dict[str, Any], now: float) -> Alert | None:
        if rec.get("protocol") != "smtp" or "kind" in rec:
            return None
        ev_name = rec.get("event")
        s = self.s
        st = self.state(rec.get("guest") or "unknown")
        req = rec.get("request") or {}
        why = ""
        if ev_name == "rcpt":
            st["seqs"].add(rec.get("seq"))
            dom = str(req.get("rcpt_to") or "").rpartition("@")[2].lower().rstrip(">")
            st["domains"].get(dom)[0] += 1
            n, _ = st["rcpt"].add(now)
            if n >= s["recipients"]:
                why = f"{n} recipients"
        elif ev_name == "accepted":
            st["seqs"].add(rec.get("seq"))
            n, size = st["msg"].add(now, 1, float(req.get("size") or 0))
            if n >= s["messages"]:
                why = f"{n} messages"
            elif size >= s["bytes"]:
                why = f"{int(size)} bytes of mail"
        else:
            return None
        if not why:
            return None
        rc, _ = st["rcpt"].add(now, 0)
        mc, mb = st["msg"].add(now, 0)
        ev = {"recipients": rc, "messages": mc, "bytes": int(mb), "window_s": s["window"],
              "recipient_domains": {k: v[0] for k, v in st["domains"].items.items()},
              "thresholds": {k: s[k] for k in ("recipients", "messages", "bytes")}}
        return Alert(rec.get("guest") or "unknown", self.name, "smtp",
                     f"SMTP burst: {why} within {s['window']:g}s", ev, list(st["seqs"].q))


class SNMPSweep(Detector):
    """Distinct agents one guest walks (getnext/getbulk) within `window`."""

    name = "snmp_sweep"

    def new_state(self) -> Any:
        return {"agents": Distinct(self.s["window"], int(self.s["agents"])), "seqs": _Seqs()}

    def observe(self, rec: dict[str, Any], now: float) -> Alert | None:
        if rec.get("protocol") != "snmp" or "kind" in rec:
            return None
        req = rec.get("request") or {}
        if req.get("op") not in ("getnext", "getbulk"):
            return None
        agent = f"{req.get('agent')}@{rec.get('orig_dst')}" if rec.get("orig_dst") else str(req.get("agent"))
        st = self.state(rec.get("guest") or "unknown")
        n = st["agents"].add(agent, now)
        st["seqs"].add(rec.get("seq"))
        if n < self.s["agents"]:
            return None
        ev = {"agents": list(st["agents"].seen)[:50], "count": n, "window_s": self.s["window"],
              "threshold": self.s["agents"]}
        return Alert(rec.get("guest") or "unknown", self.name, "snmp",
                     f"SNMP sweep: {n} agents walked within {self.s['window']:g}s", ev, list(st["seqs"].q))


def destination(rec: dict[str, Any]) -> str | None:
    """What a decision record reached for, as new_destination compares it: dns base domain, http/ws
    host, tls SNI (or address), smtp recipient domain, snmp agent."""
    p = rec.get("protocol")
    req = rec.get("request") or {}
    if p == "dns":
        q = req.get("qname")
        return f"dns:{base_domain(str(q))}" if q else None
    if p in ("http", "ws"):
        h = req.get("host")
        return f"http:{str(h).lower()}" if h else None
    if p == "tls":
        h = req.get("sni") or req.get("dst")
        return f"tls:{str(h).lower()}" if h else None
    if p == "smtp" and rec.get("event") == "rcpt":
        r = str(req.get("rcpt_to") or "")
        return f"smtp:{r.rpartition('@')[2].lower().rstrip('>')}" if "@" in r else None
    if p == "snmp":
        a = req.get("agent")
        return f"snmp:{a}" if a else None
    return None


class NewDestination(Detector):
    """A destination the guest's baseline does not have. The baseline is either a rules file
    (`baseline:`; a destination is known when that file allows the request for the guest) or
    learned: seeded from the audit log (allowed decisions of the last `history`), then every
    allowed destination joins it. Nothing is "new" for a guest with fewer than `min_baseline`
    records in a learned baseline; at most `max_destinations` are remembered per guest.
    At most one alert per guest per `window`: the first new destination alerts at once; the ones
    after it within the window are gathered (`max_listed` named, the rest counted, each with its
    request count) and reported by one alert on the guest's first record after the window."""

    name = "new_destination"

    class _Known:
        __slots__ = ("dests", "records", "seqs", "last_alert", "pending", "more", "pseqs", "pending_since")

        def __init__(self) -> None:
            self.dests: set[str] = set()
            self.records = 0
            self.seqs = _Seqs()
            self.last_alert = -math.inf
            self.pending: dict[str, int] = {}  # new destination -> requests, at most max_listed
            self.more = 0  # new destinations past max_listed (not named)
            self.pseqs = _Seqs()
            self.pending_since = 0.0

    def __init__(self, s: DetectorSettings, guests: Iterable[str] = ()) -> None:
        super().__init__(s)
        self.engine: Any = None
        if s.baseline is not None:
            from policy import load_policy

            self.engine = load_policy(s.baseline, guests=set(guests))

    def new_state(self) -> Any:
        return NewDestination._Known()

    def baseline(self, guest: str, limit: int = 50) -> dict[str, Any]:
        """What the guest's baseline holds, for the console's guest page: the rules file, or the
        learned destinations (sorted, at most `limit` named) with the counts that decide whether
        anything is "new" yet."""
        if self.engine is not None:
            return {"source": "rules", "file": str(self.s.baseline)}
        k = self.guests.get(guest)
        dests = sorted(k.dests) if k is not None else []
        records = k.records if k is not None else 0
        return {"source": "learned", "records": records, "min_records": self.s["min_baseline"],
                "active": records >= self.s["min_baseline"], "destinations": len(dests),
                "named": dests[:limit], "max_destinations": self.s["max_destinations"]}

    def learn(self, rec: dict[str, Any]) -> None:
        if rec.get("verdict") != "allow" or "kind" in rec:
            return
        d = destination(rec)
        if d is None:
            return
        k = self.state(rec.get("guest") or "unknown")
        k.records += 1
        if len(k.dests) < self.s["max_destinations"]:
            k.dests.add(d)

    def observe(self, rec: dict[str, Any], now: float) -> Alert | None:
        if not rec.get("verdict") or rec.get("event") in _FOLLOW_UPS:
            return None
        guest = rec.get("guest") or "unknown"
        k = self.state(guest)
        d = destination(rec)
        new = False
        ev_base: dict[str, Any] = {}
        if d is not None:
            if self.engine is not None:
                new = not self._in_rules(rec, guest)
                ev_base = {"baseline": str(self.s.baseline)}
            else:
                new = d not in k.dests and k.records >= self.s["min_baseline"] \
                    and len(k.dests) < self.s["max_destinations"]
                ev_base = {"baseline": "learned", "baseline_records": k.records, "baseline_destinations": len(k.dests)}
                self.learn(rec)
        if d is not None and d in k.pending:
            k.pending[d] += 1  # requests to it since it was new (a beacon keeps calling)
        elif new and d is not None:
            if len(k.pending) < self.s["max_listed"]:
                if not k.pending:
                    k.pending_since = now
                k.pending[d] = 1
                if isinstance(rec.get("seq"), int):
                    k.pseqs.add(rec["seq"])
            else:
                k.more += 1
        if not k.pending or now - k.last_alert < self.s["window"]:
            return None
        names = dict(k.pending)
        first = next(iter(names))
        ev = {"destination": first, "destinations": names, "new_destinations": len(names) + k.more,
              "not_listed": k.more, "since_s": round(now - k.pending_since, 1), "window_s": self.s["window"],
              "verdict": rec.get("verdict") if new else None, "rule": rec.get("rule") if new else None,
              **(ev_base or {"baseline": "learned" if self.engine is None else str(self.s.baseline)})}
        seqs = list(k.pseqs.q)
        k.pending, k.more, k.pseqs, k.last_alert = {}, 0, _Seqs(), now
        listed = ", ".join(x.partition(":")[2] for x in list(names)[:3])
        n = ev["new_destinations"]
        reason = (f"new destination {listed} ({first.partition(':')[0]}) not in the guest's baseline" if n == 1 else
                  f"{n} new destinations not in the guest's baseline since the last alert: {listed}, ...")
        return Alert(guest, self.name, first.partition(":")[0], reason, ev, seqs, first)

    def _in_rules(self, rec: dict[str, Any], guest: str) -> bool:
        req = dict(rec.get("request") or {})
        proto = str(rec.get("protocol"))
        try:
            return bool(self.engine.decide(proto, guest, req).allowed) \
                and str(self.engine.decide(proto, guest, req).code) != "default"
        except (KeyError, ValueError, TypeError):
            return True  # a request the baseline cannot decide is not evidence of anything


FACTORIES: dict[str, Callable[..., Detector]] = {
    "dns_tunnel": DNSTunnel, "deny_burst": DenyBurst, "rate_spike": RateSpike, "smtp_burst": SMTPBurst,
    "snmp_sweep": SNMPSweep, "new_destination": NewDestination,
}
if set(FACTORIES) != set(DETECTORS):  # pragma: no cover - keep the two tables in step
    raise ImportError("proxyvm.detect: FACTORIES and DETECTORS differ")


# -- the engine --------------------------------------------------------------------------------
class Detectors:
    """All enabled detectors behind one observer. `emit(alert)` writes it (the supervisor's)."""

    def __init__(self, settings: DetectSettings, emit: Callable[[Alert, DetectorSettings], None],
                 guests: Iterable[str] = (), clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.emit = emit
        self.clock = clock
        guests = list(guests)
        self.detectors: list[Detector] = []
        for name, s in settings.detectors.items():
            f = FACTORIES[name]
            self.detectors.append(f(s, guests) if name == "new_destination" else f(s))
        self.cooldowns: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self.errors = 0

    def baseline(self, guest: str) -> dict[str, Any] | None:
        """The new_destination baseline of `guest` (None when that detector is off)."""
        for d in self.detectors:
            if isinstance(d, NewDestination):
                return d.baseline(guest)
        return None

    def __call__(self, rec: dict[str, Any]) -> None:
        if "kind" in rec or rec.get("rule") == "quarantine":
            return  # alerts, quarantine, service records: not traffic; a quarantined guest's is known
        now = self.clock()
        for d in self.detectors:
            try:
                alert = d.observe(rec, now)
            except Exception:  # noqa: BLE001 - a detector bug must not lose the record or the others
                self.errors += 1
                if self.errors <= 10:
                    log.exception("detector %s failed on record %s", d.name, rec.get("seq"))
                continue
            if alert is not None and self._cool(alert, now, d.s.cooldown):
                self.emit(alert, d.s)

    def _cool(self, a: Alert, now: float, cooldown: float) -> bool:
        key = (a.guest, a.detector, a.key)
        last = self.cooldowns.get(key)
        if last is not None and now - last < cooldown:
            return False
        self.cooldowns[key] = now
        self.cooldowns.move_to_end(key)
        while len(self.cooldowns) > 65536:
            self.cooldowns.popitem(last=False)
        return True

    def seed(self, records: Iterable[dict[str, Any]]) -> int:
        """Learn a baseline from past records (new_destination); returns how many were read."""
        nd = [d for d in self.detectors if isinstance(d, NewDestination) and d.engine is None]
        n = 0
        if not nd:
            return 0
        for rec in records:
            n += 1
            for d in nd:
                d.learn(rec)
        return n


SEED_MAX = 2_000_000  # records read back at start at most (a bound on start-up time)


def seed_from_log(det: Detectors, path: Path, history: float) -> int:
    """Learned baselines start from the audit log's allowed decisions of the last `history`
    seconds (every chain of the log set, unreadable lines skipped)."""
    import datetime as dt

    from proxyvm.auditlog_read import log_set, read_chains, ts_key

    since = ts_key((dt.datetime.now(dt.UTC) - dt.timedelta(seconds=history)).isoformat())

    def records() -> Iterable[dict[str, Any]]:
        for i, e in enumerate(read_chains(log_set(path), lambda _e: None)):
            if i >= SEED_MAX:
                return
            if e.rec.get("verdict") == "allow" and ts_key(e.rec.get("ts")) >= since:
                yield e.rec

    try:
        return det.seed(records())
    except OSError as e:
        log.warning("new_destination: cannot read %s for the baseline: %s", path, e)
        return 0


_COUNTERS: dict[int, Any] = {}  # one counter per metrics registry (a reload re-attaches)


def _counter(sup: Any) -> Any:
    registry = sup.metrics.registry
    c = _COUNTERS.get(id(registry))
    if c is None:
        from prometheus_client import Counter

        c = _COUNTERS[id(registry)] = Counter("proxyvm_alerts", "Detector alerts", ["guest", "detector"],
                                              registry=registry)
    return c


def reattach(sup: Any, quarantine: Any, config: Any) -> None:
    """After a reload: keep the running detectors when `detect:` is unchanged, else start anew."""
    old = getattr(quarantine, "detectors", None)
    new = getattr(config, "detect", None)
    if (old.settings if old is not None else None) == new:
        return
    if old is not None and old in sup.observers:
        sup.observers.remove(old)
    quarantine.detectors = None
    attach(sup, quarantine, new)


def attach(sup: Any, quarantine: Any, settings: DetectSettings | None = None) -> Detectors | None:
    """Register the detectors of `sup.config.detect` (or `settings`) as an audit observer."""
    if settings is None:
        settings = getattr(sup.config, "detect", None)
    if settings is None or not settings.detectors:
        return None
    counter = _counter(sup)

    def emit(a: Alert, s: DetectorSettings) -> None:
        counter.labels(a.guest, a.detector).inc()
        log.warning("alert %s guest=%s severity=%s: %s (records %s)", a.detector, a.guest, s.severity, a.reason,
                    a.records[-5:])
        sup.write_audit([{
            "kind": "alert", "guest": a.guest, "src": None, "protocol": a.protocol, "verdict": None, "rule": None,
            "at": f"detect.{a.detector}", "reason": a.reason, "request": {"event": "alert"}, "upstream": None,
            "detector": a.detector, "severity": s.severity, "evidence": a.evidence, "records": a.records,
            "action": s.action,
        }])
        if s.action == "quarantine" and a.guest not in quarantine.table:
            try:
                quarantine.quarantine(a.guest, s.profile, f"{a.detector}: {a.reason}", f"detector:{a.detector}")
            except Exception as e:  # noqa: BLE001 - the alert stands; say why the quarantine did not
                log.error("detector %s could not quarantine %s: %s", a.detector, a.guest, e)

    det = Detectors(settings, emit, guests=list(sup.config.guests))
    nd = settings.detectors.get("new_destination")
    if nd is not None and nd.baseline is None:
        n = seed_from_log(det, sup.config.audit.path, nd["history"])
        log.info("new_destination: baseline learned from %d audit records of the last %s", n,
                 f"{nd['history'] / 86400:g}d")
    sup.observers.append(det)
    quarantine.detectors = det
    log.info("detectors on: %s", ", ".join(f"{n} ({s.action})" for n, s in settings.detectors.items()))
    return det
