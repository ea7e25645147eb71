"""Quarantine, as each protocol service sees it (docs/cli.md#quarantine, docs/configuration.md#quarantine).

Owns: the built-in `Decision` a quarantined guest gets (rule `quarantine`), the honeypot recorder
(every request of a honeypot guest, in full, to `state_dir/quarantine/<guest>/requests.jsonl`,
bounded in size) and the quarantine mail spool (`state_dir/quarantine/<guest>/mail/`, never
delivered).
Must not: decide who is quarantined (the supervisor does, and pushes the table into
`ServiceContext.quarantine`), or import `proxyvm`.

A table entry, as pushed by the supervisor: {"profile": "block" | "honeypot", "reason": str,
"by": "cli" | "detector:<name>", "since": ISO time, "sinkhole": {"a": [...], "aaaa": [...]},
"record_max": bytes}. Services look a guest up with one dict access on every request.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from policy.decision import Decision, builtin

RULE = "quarantine"
DEFAULT_RECORD_MAX = 50 * 1000**2
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def apply_table(ctx: Any, service: Any, table: dict[str, dict[str, Any]] | None) -> None:
    """The worker's side of `{"t": "quarantine", "table": ...}`: replace the table in place (services
    keep a reference to the same dict) and tell the service, if it has a `quarantine_changed` hook."""
    q = ctx.quarantine
    q.clear()
    q.update(table or {})
    hook = getattr(service, "quarantine_changed", None)
    if hook is not None:
        hook()


def decision(protocol: str, guest: str, entry: dict[str, Any], answer: str = "") -> Decision:
    """The decision for a request of a quarantined guest: always a denial (nothing reaches its
    destination), naming the profile, who quarantined the guest and why."""
    profile = entry.get("profile", "block")
    why = entry.get("reason") or "no reason given"
    detail = f"guest {guest} is quarantined ({profile}, by {entry.get('by', '?')}): {why}"
    if answer:
        detail += f"; {answer}"
    return builtin(protocol, RULE, detail, table="quarantine")


def refusal_text(guest: str, entry: dict[str, Any], limit: int = 200) -> str:
    """A short refusal for the guest, in the words the protocol carries (EDE text, SMTP reply)."""
    why = entry.get("reason") or "no reason given"
    return f"guest {guest} quarantined: {why}"[:limit]


def guest_dir(state_dir: Path | str, guest: str) -> Path:
    return Path(state_dir) / "quarantine" / _SAFE.sub("_", guest)


class Recorder:
    """Appends one JSON line per honeypot request to the guest's `requests.jsonl`. Past the
    entry's `record_max` bytes a guest's recording stops (counted in `dropped`) so a guest
    cannot fill the disk; the audit record of each request is still written."""

    def __init__(self, state_dir: Path | str, clock: Any = time.time) -> None:
        self.state_dir = Path(state_dir)
        self.clock = clock
        self.sizes: dict[str, int] = {}
        self.dropped = 0
        self.errors = 0

    def record(self, guest: str, entry: dict[str, Any], protocol: str, data: dict[str, Any]) -> bool:
        rec = {"ts": _iso(self.clock()), "guest": guest, "protocol": protocol, **data}
        line = (json.dumps(rec, ensure_ascii=False, default=_bytes_json) + "\n").encode()
        d = guest_dir(self.state_dir, guest)
        path = d / "requests.jsonl"
        size = self.sizes.get(guest)
        try:
            if size is None:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                size = path.stat().st_size if path.exists() else 0
            limit = int(entry.get("record_max", DEFAULT_RECORD_MAX))
            if size + len(line) > limit:
                self.dropped += 1
                self.sizes[guest] = size
                return False
            with open(path, "ab") as f:
                f.write(line)
            self.sizes[guest] = size + len(line)
            return True
        except OSError:
            self.errors += 1
            return False


def write_durably(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `path` so a crash leaves the old file or the new one, never half of either:
    a 0600 temporary file, fsync, rename, then fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def store_message(state_dir: Path | str, guest: str, ident: str, message: bytes, meta: dict[str, Any]) -> Path:
    """Write one message of a honeypot guest durably into its quarantine spool, with its envelope
    beside it. Blocking: call it in a thread."""
    d = guest_dir(state_dir, guest) / "mail"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = _SAFE.sub("_", ident)
    write_durably(d / f"{name}.json", json.dumps(meta, ensure_ascii=False).encode() + b"\n", sync_dir=False)
    write_durably(d / f"{name}.eml", message)
    return d / f"{name}.eml"


def _bytes_json(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return {"base64": base64.b64encode(bytes(v)).decode()}
    return str(v)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
