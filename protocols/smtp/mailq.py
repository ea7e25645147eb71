"""`proxyvm mailq`: list the spool, and `--flush` to retry every deferred message now.

Owns: reading the spool directory read-only from another process (the CLI), one row per queued
message (id, guest, from, recipients with their state, age, last error), the text table, and the
flush request (a trigger file the running service polls about once a second).
Must not: modify entries, or print message bodies (only envelope data and peer replies).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.smtp.spool import PENDING, Spool, partitions, request_flush


@dataclass(frozen=True, slots=True)
class QueueRow:
    id: str
    guest: str
    mail_from: str
    rcpts: tuple[tuple[str, str], ...]  # (recipient, pending|delivered|failed)
    size: int
    age: float  # seconds since acceptance
    attempts: int
    next_attempt: float  # seconds from now (negative: due)
    last_error: str


def list_spool(spool_dir: Path | str, now: float | None = None) -> list[QueueRow]:
    """Every message in the spool, oldest first. Unreadable entries are skipped (the service moves
    them to bad/ at its next start)."""
    now = time.time() if now is None else now
    rows: list[QueueRow] = []
    for part in partitions(spool_dir):  # every SMTP worker's partition (spool.py)
        rows += _list_partition(Spool(part, time.time), now)
    rows.sort(key=lambda r: r.id)  # ids start with the acceptance time: oldest first
    return rows


def _list_partition(spool: Spool, now: float) -> list[QueueRow]:
    rows: list[QueueRow] = []
    if not spool.queue.is_dir():
        return rows
    for p in sorted(spool.queue.glob("*.msg")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            e = spool.read_entry(p.stem)
            env, st = e.envelope, e.state
            rows.append(QueueRow(
                id=env.id, guest=env.guest, mail_from=env.mail_from or "<>",
                rcpts=tuple((r, e.rcpt_state(r).status) for r in env.rcpts), size=env.size,
                age=max(0.0, now - env.received), attempts=st.attempts,
                next_attempt=st.next_attempt - now if st.attempts else 0.0,
                last_error=st.last_error,
            ))
    return rows


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_rows(rows: list[QueueRow]) -> str:
    """A postqueue-like listing."""
    if not rows:
        return "Mail queue is empty\n"
    out = [f"{'ID':<20} {'SIZE':>9} {'AGE':>5} {'TRIES':>5}  GUEST / FROM / RECIPIENTS"]
    for r in rows:
        out.append(f"{r.id:<20} {r.size:>9} {_age(r.age):>5} {r.attempts:>5}  {r.guest}  {r.mail_from}")
        if r.last_error:
            out.append(f"{'':<44}({r.last_error[:200]})")
        for rcpt, status in r.rcpts:
            mark = "" if status == PENDING else f"  [{status}]"
            out.append(f"{'':<44}{rcpt}{mark}")
    pending = sum(1 for r in rows for _, s in r.rcpts if s == PENDING)
    out.append(f"-- {len(rows)} message(s), {pending} recipient(s) pending")
    return "\n".join(out) + "\n"


def flush(spool_dir: Path | str) -> None:
    """Ask the running service to retry everything now (picked up within about a second)."""
    request_flush(spool_dir)


def cli(settings: Any, *, flush: bool = False, out: Any = None) -> int:
    """Entry point for `proxyvm mailq [--flush]` (settings: the parsed `smtp:` section)."""
    out = out or sys.stdout
    spool_dir = Path(settings.spool)
    if not (spool_dir / "queue").is_dir():
        print(f"proxyvm mailq: no spool at {spool_dir} (has the smtp service run?)", file=sys.stderr)
        return 1
    if flush:
        try:
            request_flush(spool_dir)
        except OSError as e:
            print(f"proxyvm mailq: cannot request a flush in {spool_dir}: {e.strerror}", file=sys.stderr)
            return 1
        print("flush requested: deferred mail will be retried within a second", file=out)
    out.write(format_rows(list_spool(spool_dir)))
    return 0
