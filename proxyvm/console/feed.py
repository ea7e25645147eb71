"""What the console shows, kept by the supervisor from the records it writes (docs/console.md).

Owns: a bounded ring of recent records (each cut down to the fields the console shows: no request
bodies, no query strings, no honeypot recordings), per-guest counters (allowed/denied per
protocol, a per-second rate ring, top destinations, the last denials and alerts), and the filter
the audit view applies. Fed by `Supervisor.observers` (`Feed.observe`, once per record written).
Must not: block or grow: everything is capped (the guests are the config's plus `unknown`; any
other name a record carries is counted as `unknown`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proxyvm.auditlog_read import record_kind

RING = 5000  # recent records kept for the audit view
SERIES_SECONDS = 300  # the per-guest rate ring (1 s slots)
RATE_WINDOW = 10  # seconds the "live rate" averages over
MAX_DESTINATIONS = 256  # per guest; past this the least seen half is dropped
LAST_DENIALS = 50
LAST_ALERTS = 20
MAX_TEXT = 200
FILTER_TEXT_MAX = 200
PROTOCOLS = ("dns", "smtp", "snmp", "http", "ws", "tls")


def clean(value: Any, limit: int = MAX_TEXT) -> str:
    """Text safe to show: printable, bounded (the browser escapes it; this keeps it readable)."""
    if value is None:
        return ""
    s = value if isinstance(value, str) else str(value)
    if not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _strip_query(path: Any) -> str:
    """An HTTP path without its query string (tokens live there; the audit log keeps them, the
    console does not show them)."""
    return str(path).split("?", 1)[0] if path is not None else ""


def destination(rec: dict[str, Any]) -> str:
    req = rec.get("request")
    if not isinstance(req, dict):
        return ""
    p = rec.get("protocol")
    if p == "dns":
        return clean(req.get("qname"), 120)
    if p in ("http", "ws"):
        return clean(req.get("host"), 120)
    if p == "tls":
        return clean(req.get("sni") or req.get("dst"), 120)
    if p == "smtp":
        rcpt = req.get("rcpt_to")
        if isinstance(rcpt, list) and rcpt:
            rcpt = rcpt[0]
        return clean(str(rcpt).rpartition("@")[2] if rcpt else "", 120)
    if p == "snmp":
        return clean(req.get("agent"), 120)
    return ""


def summary(rec: dict[str, Any]) -> str:
    req = rec.get("request")
    if not isinstance(req, dict):
        return ""
    p = rec.get("protocol")
    g = req.get
    if p == "dns":
        parts = [g("qname"), g("qtype")]
    elif p in ("http", "ws"):
        parts = [g("method"), g("host"), _strip_query(g("path"))]
    elif p == "smtp":
        rcpt = g("rcpt_to")
        if isinstance(rcpt, list):
            rcpt = ",".join(map(str, rcpt[:5]))
        parts = [f"<{g('mail_from') or ''}>", "->", rcpt]
    elif p == "snmp":
        oids = g("oids")
        parts = [g("op"), g("agent"), ",".join(map(str, oids[:5])) if isinstance(oids, list) else g("trap_oid")]
    elif p == "tls":
        parts = [g("sni") or "(no sni)", g("dst")]
    else:
        parts = [g("event")]
    return clean(" ".join(str(x) for x in parts if x not in (None, "")), MAX_TEXT)


def view(rec: dict[str, Any]) -> dict[str, Any]:
    """The part of a record the console shows."""
    kind = record_kind(rec)
    out = {
        "seq": rec.get("seq"), "ts": clean(rec.get("ts"), 40), "kind": kind,
        "guest": clean(rec.get("guest"), 80) or None, "protocol": clean(rec.get("protocol"), 20),
        "verdict": clean(rec.get("verdict"), 20) or None, "rule": clean(rec.get("rule"), 80) or None,
        "at": clean(rec.get("at"), 120), "what": summary(rec), "reason": clean(rec.get("reason")),
    }
    for k in ("rcode", "status", "event", "detector", "severity", "by", "user", "profile"):
        v = rec.get(k)
        if v is not None and not isinstance(v, dict | list):
            out[k] = clean(v, 80)
    return out


@dataclass(slots=True)
class GuestStats:
    allowed: dict[str, int] = field(default_factory=dict)  # protocol -> count
    denied: dict[str, int] = field(default_factory=dict)
    alerts: int = 0
    slot_sec: list[int] = field(default_factory=lambda: [0] * SERIES_SECONDS)
    slot_counts: list[dict[str, int]] = field(default_factory=lambda: [{} for _ in range(SERIES_SECONDS)])
    destinations: dict[str, int] = field(default_factory=dict)
    last_denials: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LAST_DENIALS))
    last_alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LAST_ALERTS))

    def count(self, sec: int, protocol: str) -> None:
        i = sec % SERIES_SECONDS
        if self.slot_sec[i] != sec:
            self.slot_sec[i] = sec
            self.slot_counts[i] = {}
        c = self.slot_counts[i]
        c[protocol] = c.get(protocol, 0) + 1

    def rate(self, now: int, window: int = RATE_WINDOW) -> dict[str, float]:
        """Requests per second per protocol over the last `window` whole seconds."""
        total: dict[str, int] = {}
        for sec in range(now - window, now):
            i = sec % SERIES_SECONDS
            if self.slot_sec[i] == sec:
                for p, n in self.slot_counts[i].items():
                    total[p] = total.get(p, 0) + n
        return {p: round(n / window, 2) for p, n in sorted(total.items())}

    def series(self, now: int, points: int = 60, step: int = 5) -> list[int]:
        """Requests per `step` seconds, oldest first, ending with the last whole second."""
        out = []
        start = now - points * step
        for b in range(points):
            n = 0
            for sec in range(start + b * step, start + (b + 1) * step):
                i = sec % SERIES_SECONDS
                if self.slot_sec[i] == sec:
                    n += sum(self.slot_counts[i].values())
            out.append(n)
        return out

    def add_destination(self, dest: str) -> None:
        d = self.destinations
        d[dest] = d.get(dest, 0) + 1
        if len(d) > MAX_DESTINATIONS:
            keep = sorted(d.items(), key=lambda kv: -kv[1])[: MAX_DESTINATIONS // 2]
            self.destinations = dict(keep)


class Feed:
    def __init__(self, guests: Iterable[str], clock: Any = time.time) -> None:
        self.clock = clock
        self.ring: deque[dict[str, Any]] = deque(maxlen=RING)
        self.last_seq = 0
        self.guests: dict[str, GuestStats] = {}
        self.set_guests(guests)

    def set_guests(self, names: Iterable[str]) -> None:
        """The config's guests (after a reload too): stats of kept guests stay."""
        wanted = set(names) | {"unknown"}
        self.guests = {g: self.guests.get(g) or GuestStats() for g in sorted(wanted)}

    def observe(self, rec: dict[str, Any]) -> None:
        v = view(rec)
        self.ring.append(v)
        seq = rec.get("seq")
        if isinstance(seq, int):
            self.last_seq = seq
        kind = v["kind"]
        guest = rec.get("guest")
        if guest is None:
            return
        st = self.guests.get(guest) or self.guests["unknown"]
        if kind == "alert":
            st.alerts += 1
            st.last_alerts.append(v)
            return
        if kind != "decision" or rec.get("event") is not None:
            return  # follow-ups (smtp attempts, closed websockets) are not new requests
        protocol = v["protocol"]
        verdict = rec.get("verdict")
        if verdict == "deny":
            st.denied[protocol] = st.denied.get(protocol, 0) + 1
            st.last_denials.append(v)
        else:
            st.allowed[protocol] = st.allowed.get(protocol, 0) + 1
        st.count(int(self.clock()), protocol)
        dest = destination(rec)
        if dest:
            st.add_destination(dest)

    # -- queries ------------------------------------------------------------------------------
    def records(self, flt: RecordQuery, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first, at most `limit`, only those after `flt.after`."""
        out: list[dict[str, Any]] = []
        for v in reversed(self.ring):
            if flt.after and (v["seq"] or 0) <= flt.after:
                break
            if flt(v):
                out.append(v)
                if len(out) >= limit:
                    break
        return out

    def guest_summary(self, name: str, st: GuestStats, now: int) -> dict[str, Any]:
        return {
            "name": name, "rate": st.rate(now), "allowed": sum(st.allowed.values()),
            "denied": sum(st.denied.values()), "alerts": st.alerts, "series": st.series(now),
            "by_protocol": {p: {"allowed": st.allowed.get(p, 0), "denied": st.denied.get(p, 0)}
                            for p in sorted(set(st.allowed) | set(st.denied))},
        }


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """The audit view's filter: exact guest/protocol/verdict/rule/kind, and `text`, a literal
    case-insensitive substring (never a regular expression) of what the row shows."""

    guest: str = ""
    protocol: str = ""
    verdict: str = ""
    rule: str = ""
    kind: str = ""
    text: str = ""
    after: int = 0

    def __call__(self, v: dict[str, Any]) -> bool:
        if self.guest and v.get("guest") != self.guest:
            return False
        if self.protocol and v.get("protocol") != self.protocol:
            return False
        if self.verdict and v.get("verdict") != self.verdict:
            return False
        if self.rule and v.get("rule") != self.rule:
            return False
        if self.kind and v.get("kind") != self.kind:
            return False
        if self.text:
            hay = " ".join(str(v.get(k) or "") for k in ("guest", "protocol", "verdict", "rule", "what", "reason",
                                                          "rcode", "status", "detector", "user"))
            if self.text.casefold() not in hay.casefold():
                return False
        return True
