"""Reading audit logs back: which files make a log, their records in order, filters, time bounds.

Owns: finding the files of a log set (the main chain `audit.jsonl` with its rotations
`audit.jsonl.N … audit.jsonl.1`, and per-service chains `audit.<service>.jsonl` next to it, each
with rotations), reading each chain oldest first as `Entry` values that keep the exact stored line,
merging chains by time, classifying records (decision, follow-up, built-in, non-decision), the
filters of `proxyvm audit show`, and the `--since/--until` syntax ("1h", "30m", "2d", ISO time).
Every problem in a file is an `AuditReadError` naming FILE:LINE.
Must not: write or repair logs, verify the hash chain (that is `proxyvm.audit.verify`), or decide
requests (see `proxyvm.replay`).
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from proxyvm.errors import ProxyVMError

MAX_LINE = 1024 * 1024  # an audit line is a few hundred bytes; a megabyte is not one of ours
VERDICTS = frozenset({"allow", "deny", "would_deny"})
DECISION_PROTOCOLS = frozenset({"dns", "smtp", "snmp", "http", "ws", "tls"})
#: records that repeat an earlier decision for the same request (SMTP delivery, closed tunnels)
FOLLOW_UP_EVENTS = frozenset({"accepted", "spool_failed", "attempt", "final", "dsn", "closed"})
KINDS = ("decision", "alert", "quarantine", "release", "service", "reload")

_ROTATED = re.compile(r"^(?P<base>.+)\.(?P<n>[1-9][0-9]*)$")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_DURATION_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_POLICY_AT = re.compile(r":[0-9]+$")  # "rules.yaml:5": decided by a rules file, not by a service


class AuditReadError(ProxyVMError):
    """A problem at one place of an audit file."""

    def __init__(self, file: str, line: int, message: str):
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")
        self.file, self.line, self.message = file, line, message


class Entry(NamedTuple):
    """One record as stored: where it is, its exact bytes (no newline) and its decoded value.
    (A NamedTuple: a million of them are built per replay, and tuples build fastest.)"""

    file: str
    line: int
    raw: bytes
    rec: dict[str, Any]

    @property
    def ts(self) -> str:
        return ts_key(self.rec.get("ts"))


@dataclass(frozen=True, slots=True)
class Chain:
    """One hash chain: its files oldest first (`audit.jsonl.2`, `audit.jsonl.1`, `audit.jsonl`)."""

    name: str
    files: tuple[Path, ...]


# -- which files -----------------------------------------------------------------------------
def _rotations(path: Path) -> list[Path]:
    """`path` with its rotations, oldest first (those that exist)."""
    numbered = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = _ROTATED.match(p.name)
            if m and m.group("base") == path.name and p.is_file():
                numbered.append((int(m.group("n")), p))
    out = [p for _, p in sorted(numbered, reverse=True)]
    if path.is_file():
        out.append(path)
    return out


def log_set(path: Path | str) -> list[Chain]:
    """Every chain of the log whose main file is `path` (the config's `audit.path`): the main chain
    and the per-service chains `<stem>.<service><suffix>` next to it, each with its rotations.
    Chains with no file are left out; the order is the main chain, then services by name."""
    path = Path(path)
    chains = []
    main = _rotations(path)
    if main:
        chains.append(Chain(str(path), tuple(main)))
    stem, suffix = path.stem, path.suffix
    sibling = re.compile(rf"^{re.escape(stem)}\.([A-Za-z0-9_-]+){re.escape(suffix)}$")
    if path.parent.is_dir():
        for p in sorted(path.parent.iterdir()):
            if p != path and sibling.match(p.name) and p.is_file():
                files = _rotations(p)
                if files:
                    chains.append(Chain(str(p), tuple(files)))
    return chains


def chains_of(files: Iterable[Path | str]) -> list[Chain]:
    """Files named on the command line, grouped into chains: `audit.jsonl.1` belongs with
    `audit.jsonl`; within a chain the highest rotation number comes first. Only the files given are
    read (name the rotated ones too, or use the config's log)."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    for f in map(Path, files):
        m = _ROTATED.match(f.name)
        if m:
            base, n = str(f.with_name(m.group("base"))), int(m.group("n"))
        else:
            base, n = str(f), 0
        groups.setdefault(base, [])
        if all(p != f for _, p in groups[base]):
            groups[base].append((n, f))
    return [
        Chain(base, tuple(p for _, p in sorted(items, key=lambda t: (t[0] == 0, -t[0]))))
        for base, items in groups.items()
    ]


# -- records ---------------------------------------------------------------------------------
OnError = Callable[[AuditReadError], None]
_decode = json.JSONDecoder().decode  # on str: json.loads(bytes) first sniffs the encoding


def _raise(e: AuditReadError) -> None:
    raise e


def read_file(path: Path, on_error: OnError = _raise) -> Iterator[Entry]:
    """The records of one file in order. A bad line goes to `on_error` (default: raise); when
    `on_error` returns, the line is skipped."""
    name = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a generator cannot use `with` across yields cleanly
    except OSError as e:
        on_error(AuditReadError(name, 0, f"cannot read: {e.strerror}"))
        return
    decode = _decode
    try:
        n = 0
        readline = f.readline
        while True:
            raw = readline(MAX_LINE + 1)
            if not raw:
                break
            n += 1
            if raw[-1:] != b"\n":
                if len(raw) > MAX_LINE:
                    while raw and raw[-1:] != b"\n":  # skip the rest of the monster line
                        raw = readline(MAX_LINE)
                    on_error(AuditReadError(name, n, f"line longer than {MAX_LINE} bytes: not an audit record"))
                    continue
                on_error(AuditReadError(name, n, "truncated line (no newline): the file was cut mid-write"))
                break
            line = raw[:-1]
            try:
                rec = decode(line.decode())
            except ValueError as e:  # includes bad UTF-8
                why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                on_error(AuditReadError(name, n, f"not JSON ({why}): not an audit record"))
                continue
            if rec.__class__ is not dict or "seq" not in rec or "ts" not in rec:
                on_error(AuditReadError(name, n, "not an audit record (a JSON object with seq and ts expected)"))
                continue
            yield Entry(name, n, line, rec)
    except OSError as e:
        on_error(AuditReadError(name, 0, f"read failed: {e.strerror}"))
    finally:
        f.close()


def read_chain(chain: Chain, on_error: OnError = _raise) -> Iterator[Entry]:
    for p in chain.files:
        yield from read_file(p, on_error)


def read_chains(chains: list[Chain], on_error: OnError = _raise) -> Iterator[Entry]:
    """Every record of every chain; several chains are merged by `ts` (each chain keeps its order)."""
    if len(chains) == 1:
        return read_chain(chains[0], on_error)
    return heapq.merge(*(read_chain(c, on_error) for c in chains), key=_entry_ts)


def _entry_ts(e: Entry) -> str:
    return ts_key(e.rec.get("ts"))


# -- time ------------------------------------------------------------------------------------
def _fmt(d: dt.datetime) -> str:
    d = d.astimezone(dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def ts_key(value: Any) -> str:
    """A record's `ts` in the one sortable form the log writes ("2026-11-27T10:00:00.123Z");
    "" when it is missing or not a time."""
    if value.__class__ is str and len(value) == 24 and value[-1] == "Z" and value[10] == "T":
        return value  # the writer's own format: compare as text
    if not isinstance(value, str):
        return ""
    try:
        d = dt.datetime.fromisoformat(value)
    except ValueError:
        return ""
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return _fmt(d)


def parse_time(text: str, now: dt.datetime | None = None) -> str:
    """`--since`/`--until`: a duration ago ("90s", "30m", "1h", "2d", "1w") or an ISO time
    ("2026-11-27", "2026-11-27T10:00", "2026-11-27T10:00:00+01:00"; no zone = UTC). Returns the
    bound as a `ts_key`. ValueError with a message for anything else."""
    now = now or dt.datetime.now(dt.UTC)
    m = _DURATION.match(text)
    if m:
        return _fmt(now - dt.timedelta(seconds=int(m.group(1)) * _DURATION_S[m.group(2)]))
    try:
        d = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"bad time {text!r}: write a duration ago (30m, 1h, 2d) or an ISO time (2026-11-27T10:00:00Z)"
        ) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return _fmt(d)


# -- what a record is --------------------------------------------------------------------------
def record_kind(rec: dict[str, Any]) -> str:
    """`decision`, or the record's `kind` (`alert`, `quarantine`, `release`, `service`, `reload`).
    The supervisor's own records (protocol "proxyvm") are `reload` or `service`."""
    kind = rec.get("kind")
    if kind is not None:
        return str(kind)
    if rec.get("protocol") == "proxyvm" or rec.get("verdict") is None:
        req = rec.get("request")
        event = req.get("event") if isinstance(req, dict) else None
        return "reload" if isinstance(event, str) and event.startswith("reload") else "service"
    return "decision"


DECISION, FOLLOW_UP, BUILTIN, OTHER = "decision", "follow_up", "builtin", "non_decision"


def classify(e: Entry) -> str:
    """What replay and learn make of a record:
    - `other`: not a decision (has `kind`, or the supervisor's own record);
    - `follow_up`: repeats an earlier decision for the same request (SMTP accepted/attempt/final,
      a closed tunnel or WebSocket);
    - `builtin`: decided by a service itself (malformed input, limits, SSRF and rebinding guards),
      not by the rules file, so another rules file cannot change it;
    - `decision`: decided by the rules file.
    A record that looks like a decision but has an unknown protocol, verdict or request shape is
    from another version (or edited): AuditReadError."""
    rec = e.rec
    if "kind" in rec or rec.get("protocol") == "proxyvm":
        return OTHER
    protocol, verdict, request = rec.get("protocol"), rec.get("verdict"), rec.get("request")
    if verdict is None and protocol is None:
        return OTHER
    if protocol not in DECISION_PROTOCOLS:
        raise AuditReadError(e.file, e.line, f"unknown protocol {protocol!r}: a record from another version of proxyvm?")
    if verdict not in VERDICTS:
        raise AuditReadError(e.file, e.line, f"unknown verdict {verdict!r}: a record from another version of proxyvm?")
    if request.__class__ is not dict:
        raise AuditReadError(e.file, e.line, "request is not an object: a record from another version of proxyvm?")
    if rec.get("event") in FOLLOW_UP_EVENTS:
        return FOLLOW_UP
    at = rec.get("at")
    if at.__class__ is not str or not _POLICY_AT.search(at):
        return BUILTIN
    return DECISION


# -- filters (`proxyvm audit show`) ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecordFilter:
    guests: frozenset[str] = frozenset()
    protocols: frozenset[str] = frozenset()
    verdicts: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    since: str = ""  # ts_key bounds, inclusive since, exclusive until
    until: str = ""

    def __call__(self, rec: dict[str, Any]) -> bool:
        if self.guests and rec.get("guest") not in self.guests:
            return False
        if self.protocols and rec.get("protocol") not in self.protocols:
            return False
        if self.verdicts and rec.get("verdict") not in self.verdicts:
            return False
        if self.rules and rec.get("rule") not in self.rules:
            return False
        if self.kinds and record_kind(rec) not in self.kinds:
            return False
        if self.since or self.until:
            ts = ts_key(rec.get("ts"))
            if self.since and ts < self.since:
                return False
            if self.until and ts >= self.until:
                return False
        return True


# -- one line per record ------------------------------------------------------------------------
def _clean(value: Any, limit: int = 120) -> str:
    """A value safe for a terminal: control characters escaped, bounded."""
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def summary(rec: dict[str, Any]) -> str:
    """The request of a record in a few words."""
    req = rec.get("request")
    if not isinstance(req, dict):
        return _clean(req) if req is not None else ""
    p = rec.get("protocol")
    g = req.get
    if p == "dns":
        parts = [g("qname"), g("qtype")]
    elif p in ("http", "ws"):
        parts = [g("method"), g("host"), g("path")]
    elif p == "smtp":
        rcpt = g("rcpt_to")
        if isinstance(rcpt, list):
            rcpt = ",".join(map(str, rcpt))
        parts = [f"<{g('mail_from') or ''}>", "->", rcpt]
    elif p == "snmp":
        oids = g("oids")
        parts = [g("op"), g("agent"), ",".join(map(str, oids)) if isinstance(oids, list) else g("trap_oid")]
    elif p == "tls":
        parts = [g("sni") or "(no sni)", g("dst")]
    else:
        parts = [f"{k}={v}" for k, v in req.items()]
    return _clean(" ".join(str(x) for x in parts if x not in (None, "")), 160)


def table_line(rec: dict[str, Any]) -> str:
    kind = record_kind(rec)
    ts = rec.get("ts", "")
    seq = rec.get("seq", "")
    guest = _clean(rec.get("guest") or "-", 16)
    if kind == "decision":
        event = rec.get("event")
        what = summary(rec) + (f" [{_clean(event, 20)}]" if event else "")
        return (f"{_clean(ts, 30)} {seq!s:>7} {guest:<12} {_clean(rec.get('protocol'), 8):<5} "
                f"{_clean(rec.get('verdict'), 12):<10} {_clean(rec.get('rule'), 40):<20} {what}")
    reason = rec.get("reason") or rec.get("detector") or ""
    return f"{_clean(ts, 30)} {seq!s:>7} {guest:<12} {kind:<5} {'':<10} {'':<20} {_clean(reason, 160)}"


_GUEST = re.compile(rb'"guest": "([A-Za-z0-9][A-Za-z0-9_.-]{0,62})"')


def guest_names_in(files: Iterable[Path | str]) -> set[str]:
    """Guest names that appear in the files, found without decoding them (a fast first pass, so a
    replay without a config knows which guests the new policy may name). Unreadable files add
    nothing; the read proper reports them."""
    names: set[bytes] = set()
    for f in files:
        try:
            with open(f, "rb") as fh:
                tail = b""
                while True:
                    chunk = fh.read(8 * 1024 * 1024)
                    if not chunk:
                        break
                    buf = tail + chunk
                    names.update(_GUEST.findall(buf))
                    tail = buf[-100:]
        except OSError:
            continue
    return {n.decode() for n in names} - {"unknown"}
