"""The audit log: one JSON line per decision, hash-chained, written by one writer.

Owns: assigning `seq`, `ts` and `prev` (sha256 hex of the previous line's bytes), appending and
rotating files so the chain continues across them, the `.head` file that pins the newest line (so
removing or editing the last lines is detected too), and `verify` for `proxyvm audit verify`.
Must not: decide anything, or accept records from anyone but the supervisor (services send theirs
over their control channel; there is exactly one writer per file).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.base import MilliClock  # noqa: F401 - the audit ts clock, shared with the services

GENESIS = "0" * 64
# Keys written first, in this order (docs/audit.md); anything else follows, `prev` is always last.
_ORDER = ("seq", "ts", "guest", "src", "protocol", "verdict", "rule", "at", "reason", "request", "upstream")
_ORDER_REST = _ORDER[1:]


def now_iso(t: float | None = None) -> str:
    d = dt.datetime.fromtimestamp(t, dt.UTC) if t is not None else dt.datetime.now(dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


_dumps = json.JSONEncoder(separators=(", ", ": "), ensure_ascii=False, default=str).encode


def _encode(record: dict[str, Any]) -> bytes:
    """One line: `seq` first, `prev` last, the rest in docs/audit.md order, then any extra keys."""
    body = {k: record[k] for k in _ORDER_REST if k in record}
    for k, v in record.items():
        if k not in body and k != "seq" and k != "prev":
            body[k] = v
    return f'{{"seq": {int(record["seq"])}, {_dumps(body)[1:-1]}, "prev": "{record["prev"]}"}}'.encode()


def _last_line(path: Path) -> bytes | None:
    """The last complete line of a file, read from the end (files may be large)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end == 0:
                return None
            pos, chunk, buf = end, 65536, b""
            while pos > 0:
                step = min(chunk, pos)
                pos -= step
                f.seek(pos)
                buf = f.read(step) + buf
                stripped = buf.rstrip(b"\n")
                if b"\n" in stripped:
                    return stripped.rsplit(b"\n", 1)[1]
            return buf.rstrip(b"\n") or None
    except FileNotFoundError:
        return None


class AuditLog:
    """Appends chained records. Not thread-safe: the supervisor owns the single instance."""

    def __init__(self, path: Path | str, rotate_size: int = 100 * 1024 * 1024, keep: int = 10):
        self.path = Path(path)
        self.rotate_size = rotate_size
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.seq, self.prev = self._resume()
        self._prev_b = self.prev.encode()
        self._f = open(self.path, "ab", buffering=1024 * 1024)  # noqa: SIM115 - lives with the object
        self._size = self._f.tell()
        self.written = 0
        self.last_line = b""  # the exact bytes of the newest line (without its newline)

    def _resume(self) -> tuple[int, str]:
        for candidate in (self.path, self.path.with_name(self.path.name + ".1")):
            last = _last_line(candidate)
            if last:
                try:
                    seq = int(json.loads(last)["seq"])
                except (ValueError, KeyError, TypeError):
                    # A torn last line (crash mid-write) still chains: the next record links to it.
                    seq = self._seq_from_head()
                return seq, line_hash(last)
        return 0, GENESIS

    def _seq_from_head(self) -> int:
        try:
            return int(json.loads(self.head_path.read_text())["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one record; returns it with seq/ts/prev filled."""
        rec = dict(record)
        self.seq += 1
        rec["seq"] = self.seq
        if "ts" not in rec:
            rec["ts"] = now_iso()
        rec["prev"] = self.prev
        line = _encode(rec)
        if self._size and self._size + len(line) + 1 > self.rotate_size:
            self._rotate()
        self._f.write(line + b"\n")
        self._size += len(line) + 1
        self.prev = line_hash(line)
        self._prev_b = self.prev.encode()
        self.written += 1
        self.last_line = line
        return rec

    def append_encoded(self, body: bytes) -> int:
        """Write one record a worker encoded already (a JSON object without `seq`/`prev`, no
        newline): `seq` is spliced in first and `prev` last, without decoding. Returns its seq."""
        if len(body) < 3 or body[:1] != b"{" or body[-1:] != b"}":
            raise ValueError("not an encoded audit record")
        self.seq += 1
        line = b'{"seq":%d,%s,"prev":"%s"}' % (self.seq, body[1:-1], self._prev_b)
        if self._size and self._size + len(line) + 1 > self.rotate_size:
            self._rotate()
        self._f.write(line + b"\n")
        self._size += len(line) + 1
        self._prev_b = hashlib.sha256(line).hexdigest().encode()
        self.prev = self._prev_b.decode()
        self.written += 1
        self.last_line = line
        return self.seq

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.append(r)

    def flush(self, fsync: bool = False) -> None:
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps({"seq": self.seq, "hash": self.prev, "file": self.path.name}) + "\n")
        os.replace(tmp, self.head_path)

    def _rotate(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        stale = self.path.with_name(f"{self.path.name}.{self.keep + 1}")
        if stale.exists():
            stale.unlink()
        self._f = open(self.path, "ab", buffering=1024 * 1024)  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        if not self._f.closed:
            self.flush(fsync=True)
            self._f.close()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int
    file: str = ""
    line: int = 0
    message: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.records} records, chain intact"
        return f"{self.file}:{self.line}: {self.message}"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def _prev_of(raw: bytes) -> str | None:
    try:
        return str(json.loads(raw)["prev"])
    except (ValueError, KeyError, TypeError):
        return None


def verify(files: list[Path | str], use_head: bool = True) -> VerifyResult:
    """Check the chain over `files` given oldest first (rotation: `audit.jsonl.2 audit.jsonl.1
    audit.jsonl`). The first line of the first file anchors the chain; every later line must carry
    seq+1 and the sha256 of the line before it. The newest file is also checked against its
    `.head` file when present, so truncating or editing the tail is caught."""
    prev_hash: str | None = None
    prev_seq: int | None = None
    count = 0
    last_file, last_line = "", 0
    for fp in map(Path, files):
        try:
            lines = list(_lines(fp))
        except OSError as e:
            return VerifyResult(False, count, str(fp), 0, f"cannot read: {e.strerror}")
        for idx, (n, raw) in enumerate(lines):
            last_file, last_line = str(fp), n
            if not raw.endswith(b"\n"):
                return VerifyResult(False, count, str(fp), n, "truncated line (no newline)")
            line = raw[:-1]
            try:
                rec = json.loads(line)
                seq, prev = int(rec["seq"]), str(rec["prev"])
            except (ValueError, KeyError, TypeError):
                return VerifyResult(False, count, str(fp), n, "not an audit record (bad JSON or no seq/prev)")
            if prev_hash is not None:
                if seq != prev_seq + 1:  # type: ignore[operator]
                    return VerifyResult(
                        False, count, str(fp), n, f"seq {seq} follows {prev_seq}: a record was removed, inserted or moved"
                    )
                if prev != prev_hash:
                    # Either the previous line was edited or this one was. If this line still
                    # links correctly to the next one, the previous line is the edited one.
                    nxt = lines[idx + 1][1] if idx + 1 < len(lines) else None
                    if nxt is not None and _prev_of(nxt) == line_hash(line) and idx > 0:
                        return VerifyResult(
                            False, count - 1, str(fp), lines[idx - 1][0],
                            "line was edited: its hash does not match the prev of the next line",
                        )
                    return VerifyResult(
                        False, count, str(fp), n, "prev does not match the previous line: a line was edited or moved"
                    )
            prev_hash, prev_seq = line_hash(line), seq
            count += 1
    if use_head and files:
        newest = Path(files[-1])
        head = newest.with_name(newest.name + ".head")
        if head.exists():
            try:
                h = json.loads(head.read_text())
                hseq, hhash = int(h["seq"]), str(h["hash"])
            except (OSError, ValueError, KeyError, TypeError):
                return VerifyResult(False, count, str(head), 1, "head file unreadable")
            if prev_seq is None or hseq > prev_seq:
                return VerifyResult(
                    False, count, last_file or str(newest), last_line + 1,
                    f"log ends at seq {prev_seq} but the head file records seq {hseq}: lines were removed from the end",
                )
            if hseq == prev_seq and hhash != prev_hash:
                return VerifyResult(False, count, last_file, last_line, "last line differs from the head file's hash: it was edited")
    return VerifyResult(True, count)
