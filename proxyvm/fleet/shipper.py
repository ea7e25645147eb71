"""Audit shipping: every line of the local chain, byte for byte, to the JetStream stream
`PROXYVM_AUDIT` (docs/audit.md#fleet-shipping).

Owns: the line observer (`Shipper.on_line`, called by the supervisor's writer with the exact
bytes of each line: it appends to the spool and returns, never blocks, never raises), the spool
(`state_dir/fleet/spool/*.spool`: append-only segments of `<seq>\\t<line>\\n`, bounded by
`fleet.spool_max`), the cursor (`state_dir/fleet/cursor`: the last seq the stream acknowledged,
every seq before it acknowledged too), and the publisher task: lines in seq order, subject
`proxyvm.audit.<node>.<protocol>`, header `Nats-Msg-Id: <node>:<chain>:<seq>`, a window of
publishes in flight, each acknowledged by the stream before the cursor moves past it.
Must not: slow down or stop the audit writer, alter a line, or let a record reach the stream
twice (a re-send after a failure or a crash carries the same message id: JetStream drops it
within the stream's duplicate window).

Recovery after a crash (kill -9): the spool's torn tail line is cut; lines the local log has
but the spool missed (the writer's buffers are flushed to the log first, then to the spool) are
read back from the log's tail; lines the spool has but the log lost are cut from the spool;
publishing resumes at cursor + 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxyvm.fleet import STREAM, msg_id, subject

log = logging.getLogger("proxyvm.fleet")

SEGMENT_BYTES = 8 * 1024 * 1024
WINDOW = 512  # publishes in flight
ACK_TIMEOUT = 5.0
FLUSH_EVERY = 0.02  # seconds between spool flushes (after the audit log's) while records come
CURSOR_EVERY = 0.05

_SEQ = re.compile(rb'^\{"seq": ?(\d+)')
_PROTOCOL = re.compile(rb'"protocol": ?"([a-z0-9_-]{1,32})"')


def line_seq(line: bytes) -> int | None:
    m = _SEQ.match(line)
    return int(m.group(1)) if m else None


def line_protocol(line: bytes) -> str:
    m = _PROTOCOL.search(line, 0, 2048)
    return m.group(1).decode() if m else "other"


# -- the spool ------------------------------------------------------------------------------------
class Spool:
    """Segments `<first seq, 20 digits>.spool` of `<seq>\\t<line>\\n`. Single-threaded (the
    supervisor's loop): the writer appends to the newest segment; readers read flushed bytes."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segments: list[int] = []  # first seqs, oldest first
        self.sizes: dict[int, int] = {}
        self.total = 0
        self.last_seq = 0
        self._f: Any = None
        self._cur_size = 0
        self.dirty = False
        self._open_existing()

    def path(self, first: int) -> Path:
        return self.dir / f"{first:020d}.spool"

    def _open_existing(self) -> None:
        for p in sorted(self.dir.glob("*.spool")):
            try:
                first = int(p.stem)
            except ValueError:
                continue
            self.segments.append(first)
            self.sizes[first] = p.stat().st_size
        if self.segments:
            last = self.segments[-1]
            p = self.path(last)
            data = p.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning("fleet spool: cut a torn last line of %s (%d bytes; it was written mid-crash)", p,
                            len(data) - keep)
                with open(p, "r+b") as f:
                    f.truncate(keep)
                data = data[:keep]
                self.sizes[last] = keep
            for seg in reversed(self.segments):
                s = self._last_seq_of(seg)
                if s:
                    self.last_seq = s
                    break
        self.total = sum(self.sizes.values())

    def _last_seq_of(self, first: int) -> int:
        data = self.path(first).read_bytes()
        end = data.rstrip(b"\n")
        if not end:
            return 0
        line = end.rsplit(b"\n", 1)[-1]
        try:
            return int(line.split(b"\t", 1)[0])
        except ValueError:
            return 0

    def _roll(self, first: int) -> None:
        if self._f is not None:
            self._f.close()
        self.segments.append(first)
        self.sizes[first] = 0
        self._f = open(self.path(first), "ab", buffering=4 * 1024 * 1024)  # noqa: SIM115
        self._cur_size = 0

    def append(self, seq: int, line: bytes) -> bool:
        data = b"%d\t%s\n" % (seq, line)
        n = len(data)
        if self.total + n > self.max_bytes:
            return False
        if self._f is None or self._cur_size + n > self.segment_bytes:
            if self._f is None and self.segments and self.sizes[self.segments[-1]] + n <= self.segment_bytes:
                last = self.segments[-1]
                self._f = open(self.path(last), "ab", buffering=4 * 1024 * 1024)  # noqa: SIM115
                self._cur_size = self.sizes[last]
            else:
                self._roll(seq)
        self._f.write(data)
        self._cur_size += n
        self.sizes[self.segments[-1]] += n
        self.total += n
        self.last_seq = seq
        self.dirty = True
        return True

    def flush(self) -> None:
        if self._f is not None and self.dirty:
            self._f.flush()
        self.dirty = False

    def cut_after(self, seq: int) -> int:
        """Drop lines with seq > `seq` (lines the local log does not have). Returns how many."""
        self.flush()
        cut = 0
        for first in list(reversed(self.segments)):
            p = self.path(first)
            if first > seq:
                cut += p.read_bytes().count(b"\n")
                p.unlink()
                self.segments.remove(first)
                self.total -= self.sizes.pop(first)
                continue
            lines = p.read_bytes().splitlines(keepends=True)
            keep = [ln for ln in lines if int(ln.split(b"\t", 1)[0]) <= seq]
            cut += len(lines) - len(keep)
            if cut:
                data = b"".join(keep)
                p.write_bytes(data)
                self.total += len(data) - self.sizes[first]
                self.sizes[first] = len(data)
            break
        if self._f is not None:
            self._f.close()
            self._f = None
        self.last_seq = min(self.last_seq, seq)
        return cut

    def release_through(self, acked: int, next_first: int | None = None) -> None:
        """Delete segments whose every line is acknowledged (never the one being written)."""
        while len(self.segments) > 1 and self.segments[1] <= acked + 1:
            first = self.segments.pop(0)
            self.total -= self.sizes.pop(first)
            with contextlib.suppress(FileNotFoundError):
                self.path(first).unlink()
        # the newest segment, all acknowledged and big enough to matter: start a new one
        if (len(self.segments) == 1 and self.last_seq <= acked and self.sizes[self.segments[0]] > 256 * 1024
                and self._f is not None):
            old = self.segments[0]
            self._f.close()
            self._f = None
            self.segments.clear()
            self.total -= self.sizes.pop(old)
            with contextlib.suppress(FileNotFoundError):
                self.path(old).unlink()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            self._f.close()
            self._f = None


class SpoolReader:
    """Reads (seq, line, (segment, offset)) in order, from any position, only flushed bytes."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.seg: int | None = None
        self.off = 0
        self._f: Any = None

    def seek(self, pos: tuple[int, int] | None) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if pos is None:
            self.seg, self.off = None, 0
        else:
            self.seg, self.off = pos

    def seek_after(self, acked: int) -> None:
        """Position at the first line with seq > acked (the spool must be flushed)."""
        self.seek(None)
        for first in self.spool.segments:
            with open(self.spool.path(first), "rb") as f:
                off = 0
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    if int(raw.split(b"\t", 1)[0]) > acked:
                        self.seek((first, off))
                        return
                    off += len(raw)
        # everything in the spool is acknowledged: read from the end
        if self.spool.segments:
            last = self.spool.segments[-1]
            self.seek((last, self.spool.sizes[last]))

    def read(self, n: int) -> list[tuple[int, bytes, tuple[int, int]]]:
        out: list[tuple[int, bytes, tuple[int, int]]] = []
        segs = self.spool.segments
        while len(out) < n:
            if self.seg is None or self.seg not in self.spool.sizes:
                if not segs:
                    return out
                # the oldest segment after the one we were reading
                nxt = [s for s in segs if self.seg is None or s > self.seg]
                if not nxt:
                    return out
                self.seek((nxt[0], 0))
            if self._f is None:
                try:
                    self._f = open(self.spool.path(self.seg), "rb")  # noqa: SIM115
                except FileNotFoundError:
                    self.seg = None
                    continue
                self._f.seek(self.off)
            raw = self._f.readline()
            if raw.endswith(b"\n"):
                tab = raw.index(b"\t")
                out.append((int(raw[:tab]), raw[tab + 1:-1], (self.seg, self.off)))
                self.off += len(raw)
                continue
            # end of the flushed data of this segment: on to the next one if there is one
            self._f.seek(self.off)
            later = [s for s in segs if s > self.seg]
            if later and not raw:
                self._f.close()
                self._f = None
                self.seek((later[0], 0))
                continue
            return out
        return out

    def close(self) -> None:
        self.seek(None)


# -- the local log's tail ---------------------------------------------------------------------
def log_lines_after(path: Path, after: int, upto: int) -> Iterator[tuple[int, bytes]]:
    """Lines with after < seq <= upto from the local log `path` (and its first rotation), read
    from the end (they are the newest)."""
    found: list[tuple[int, bytes]] = []
    for p in (path, path.with_name(path.name + ".1")):
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                pos = f.tell()
                buf = b""
                done = False
                while pos > 0 and not done:
                    step = min(1024 * 1024, pos)
                    pos -= step
                    f.seek(pos)
                    buf = f.read(step) + buf
                    lines = buf.split(b"\n")
                    buf = lines[0] if pos > 0 else b""
                    chunk = lines[1:] if pos > 0 else lines
                    for line in reversed(chunk):
                        s = line_seq(line) if line else None
                        if s is None:
                            continue
                        if s <= after:
                            done = True
                            break
                        if s <= upto:
                            found.append((s, line))
                if done:
                    break
        except FileNotFoundError:
            continue
    found.sort()
    return iter(found)


# -- the shipper ----------------------------------------------------------------------------------
class Shipper:
    def __init__(self, node: Any, state_dir: Path, spool_max: int, chain: str = "audit"):
        self.node = node  # proxyvm.fleet.node.FleetNode: its supervisor, connection, reporting
        self.name = node.settings.node
        self.chain = chain
        self.dir = Path(state_dir) / "fleet"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cursor_path = self.dir / "cursor"
        self.spool = Spool(self.dir / "spool", spool_max)
        self.reader = SpoolReader(self.spool)
        self.acked = 0
        self.written = 0  # newest seq the writer handed us
        self.caught_up_at = time.monotonic()
        self.dropped = 0  # records never spooled (the spool was full): they are in the local log only
        self.overflowing = False
        self.drop_first = 0
        self.drop_count = 0
        self.shipped = 0
        self.duplicates = 0
        self.errors = 0
        self._wake = asyncio.Event()
        self._cursor_saved_at = 0.0
        self._cursor_saved = -1
        self._flushed_at = 0.0
        self._subjects: dict[bytes, str] = {}

    # -- start: cursor, spool and local log agree -----------------------------------------------
    def start(self, audit: Any) -> None:
        audit_seq = int(audit.seq)
        cur = self._read_cursor()
        if cur is None:
            # First start in a fleet: ship from here on (earlier records stay in the local log).
            cur = audit_seq if not self.spool.segments else max(0, self.spool.segments[0] - 1)
            if audit_seq:
                log.info("fleet: shipping starts after seq %d (earlier records stay in the local log)", audit_seq)
        self.acked = cur
        if self.spool.last_seq > audit_seq:
            n = self.spool.cut_after(audit_seq)
            log.warning("fleet spool: %d lines past the local log's last seq %d were cut (the log lost them "
                        "in a crash)", n, audit_seq)
        if cur > audit_seq:
            log.error("fleet: the cursor (seq %d) is past the local log's last seq %d: was the local log "
                      "replaced? records with seqs the stream already has will be taken for duplicates", cur, audit_seq)
        have = max(cur, self.spool.last_seq)
        if have < audit_seq:
            n = 0
            for seq, line in log_lines_after(Path(audit.path), have, audit_seq):
                if not self.spool.append(seq, line):
                    break
                n += 1
            self.spool.flush()
            if n:
                log.info("fleet: %d records read back from the local log's tail into the spool (seq %d..%d)",
                         n, have + 1, audit_seq)
        self.written = audit_seq
        self.reader.seek_after(self.acked)
        self.spool.release_through(self.acked)
        self._save_cursor(force=True)

    def _read_cursor(self) -> int | None:
        try:
            data = json.loads(self.cursor_path.read_text())
            return int(data["acked"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.error("fleet: cursor %s unreadable; resending the whole spool (the stream drops duplicates)",
                      self.cursor_path)
            return max(0, self.spool.segments[0] - 1) if self.spool.segments else None

    def _save_cursor(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.acked == self._cursor_saved or (not force and now - self._cursor_saved_at < CURSOR_EVERY):
            return
        tmp = self.cursor_path.with_name(".cursor.tmp")
        tmp.write_text(json.dumps({"chain": self.chain, "acked": self.acked}) + "\n")
        os.replace(tmp, self.cursor_path)
        self._cursor_saved, self._cursor_saved_at = self.acked, now

    # -- the writer's side: never blocks, never raises ------------------------------------------
    def on_line(self, seq: int, line: bytes) -> None:
        try:
            self.written = seq
            spool = self.spool
            if self.overflowing and spool.total > spool.max_bytes // 2:
                stored = False  # full: drop until half of it is free again (no flapping)
            else:
                stored = spool.append(seq, line)
            if stored:
                if self.overflowing:
                    self.overflowing = False
                    asyncio.get_running_loop().call_soon(self.node.spool_resumed, self.drop_first, seq - 1,
                                                         self.drop_count)
            else:
                if not self.overflowing:
                    self.overflowing, self.drop_first, self.drop_count = True, seq, 0
                    asyncio.get_running_loop().call_soon(self.node.spool_full, seq, spool.total)
                self.drop_count += 1
                self.dropped += 1
                self.node.m_dropped.inc()
            self._wake.set()
        except Exception:  # noqa: BLE001 - the writer must go on whatever happens here
            self.errors += 1

    # -- the publisher --------------------------------------------------------------------------
    def lag_records(self) -> int:
        return max(0, self.written - self.acked)

    def lag_seconds(self) -> float:
        return 0.0 if self.written <= self.acked else time.monotonic() - self.caught_up_at

    def _flush(self) -> None:
        """Spool bytes reach the kernel only after the audit log's (a crash then never leaves the
        spool ahead of the log)."""
        if self.spool.dirty:
            self.node.sup.audit.flush()
            self.spool.flush()
            self._flushed_at = time.monotonic()

    def _subject(self, line: bytes) -> str:
        p = line_protocol(line).encode()
        s = self._subjects.get(p)
        if s is None:
            s = self._subjects[p] = subject(self.name, p.decode())
        return s

    async def run(self, js: Any) -> None:
        """Publish until an error (raised after rewinding to the first unacknowledged line)."""
        inflight: deque[tuple[int, Any, tuple[int, int]]] = deque()
        self._flush()  # the reader sees only flushed bytes
        self.reader.seek_after(self.acked)
        try:
            while True:
                if len(inflight) < WINDOW:
                    if self.spool.dirty and time.monotonic() - self._flushed_at >= FLUSH_EVERY:
                        self._flush()
                    batch = self.reader.read(WINDOW - len(inflight))
                    for seq, line, pos in batch:
                        if seq <= self.acked:
                            continue
                        fut = await js.publish_async(
                            self._subject(line), line, stream=STREAM,
                            headers={"Nats-Msg-Id": msg_id(self.name, self.chain, seq)})
                        inflight.append((seq, fut, pos))
                if not inflight:
                    self._wake.clear()
                    if self.spool.dirty:
                        await asyncio.sleep(FLUSH_EVERY)
                        self._flush()
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                seq, fut, pos = inflight[0]
                ack = await asyncio.wait_for(asyncio.shield(fut), ACK_TIMEOUT)
                self._acked(seq, ack)
                inflight.popleft()
                while inflight and inflight[0][1].done():
                    seq, fut, pos = inflight.popleft()
                    self._acked(seq, fut.result())
                self._after_acks()
        except BaseException:
            if inflight:
                self.reader.seek(inflight[0][2])
            for _, fut, _ in inflight:
                fut.cancel()
            self._save_cursor(force=True)
            raise

    def _acked(self, seq: int, ack: Any) -> None:
        if getattr(ack, "duplicate", False):
            self.duplicates += 1
            self.node.m_duplicates.inc()
        else:
            self.shipped += 1
            self.node.m_shipped.inc()
        self.acked = seq

    def _after_acks(self) -> None:
        if self.acked >= self.written:
            self.caught_up_at = time.monotonic()
        self._save_cursor()
        self.spool.release_through(self.acked)

    def close(self) -> None:
        self._flush()
        self.reader.close()
        self.spool.close()
        with contextlib.suppress(OSError):
            self._save_cursor(force=True)
