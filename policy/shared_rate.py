"""Token buckets shared by every worker process of one service (`workers: N`), in an mmap'd file.

Owns: the table file's layout, creating it (the supervisor, before it spawns the workers), opening
it (each worker, before it drops privileges: the open descriptor is what it keeps), and taking a
token from the (rule, guest) bucket under a per-slot `fcntl` range lock.
Must not: decide anything (policy.engine does), grow without bound, or block for long (a slot is
locked for one read-modify-write of 24 bytes).

Layout: `SLOTS` slots of `SLOT` bytes: `key u64 | tokens f64 | last f64 | unused u64`, where `key`
is a 64-bit BLAKE2b of (rule id, rate, guest) and 0 marks a free slot. Keys name the rule by id and
rate, not by position, so a SIGHUP that keeps a rule's id and rate keeps its buckets (the reloaded
engine finds the same slots), and a changed rate starts a fresh bucket, as
`Engine.inherit_rate_state` does for a process's own buckets. `last` is `time.monotonic()`, which
is the same clock in every process of the machine.

Why `fcntl` range locks: they are released by the kernel when a process dies, so a worker killed
by SIGKILL while holding one leaves no stuck lock (a process-shared mutex would), and they need
nothing inherited from the supervisor but the file. Each take costs two `fcntl` calls (a few µs,
`bench/rate_table.py`). A slot found once is remembered per process (`_slots`), so the probe and
the hash happen once per (rule, guest).

Bounded: `SLOTS` slots, probed at most `PROBES` deep. A bucket that finds no free slot is kept in
the process (the caller's fallback, logged once): its guest then gets up to N x the rate.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
from pathlib import Path

SLOT = 32
SLOTS = 1 << 15  # 1 MiB: far more than (rules with a rate) x (guests) in any real policy
PROBES = 32
_HEAD = struct.Struct("<Q")
_BODY = struct.Struct("<dd")
_LOCK_EX, _LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

log = logging.getLogger("proxyvm.rate")


def table_path(state_dir: Path | str, service: str) -> Path:
    return Path(state_dir) / f"rate-{service}.table"


def create(path: Path | str) -> Path:
    """A fresh, zeroed table (the supervisor at start: buckets outlive worker restarts and reloads,
    not the supervisor). Mode 0600: only root, which opens it for the workers, reads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, SLOTS * SLOT)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def bucket_key(rule_id: str, rate_text: str, guest: str) -> int:
    h = hashlib.blake2b(f"{rule_id}\0{rate_text}\0{guest}".encode(), digest_size=8).digest()
    return _HEAD.unpack(h)[0] or 1  # 0 marks a free slot


class SharedRates:
    """One worker's view of its service's table (open once, before the privilege drop)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR)
        size = os.fstat(self.fd).st_size
        if size != SLOTS * SLOT:
            os.close(self.fd)
            raise ValueError(f"{self.path}: {size} bytes, expected {SLOTS * SLOT} (not a rate table)")
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._slots: dict[int, int] = {}  # key -> byte offset of its slot
        self._mutex = threading.Lock()  # fcntl locks are per process: threads also need this
        self.full = 0  # buckets that found no slot (kept in the process instead)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def _find(self, key: int) -> int:
        """Offset of key's slot, claiming a free one; -1 when PROBES slots are all taken."""
        start = key % SLOTS
        m, fd = self.map, self.fd
        for i in range(PROBES):
            off = ((start + i) % SLOTS) * SLOT
            fcntl.lockf(fd, _LOCK_EX, SLOT, off)
            try:
                (k,) = _HEAD.unpack_from(m, off)
                if k == key:
                    return off
                if k == 0:
                    _HEAD.pack_into(m, off, key)
                    _BODY.pack_into(m, off + 8, -1.0, 0.0)  # tokens < 0: not started yet
                    return off
            finally:
                fcntl.lockf(fd, _LOCK_UN, SLOT, off)
        return -1

    def take(self, key: int, count: float, period: float, now: float) -> bool | None:
        """Take one token from the bucket `key` (capacity `count`, refilled over `period` s).
        None: no slot for it (the caller keeps a bucket of its own)."""
        off = self._slots.get(key)
        if off is None:
            with self._mutex:
                off = self._find(key)
            if off < 0:
                if not self.full:
                    log.warning("rate table %s is full: some buckets are per process", self.path)
                self.full += 1
                return None
            self._slots[key] = off
        m, fd = self.map, self.fd
        with self._mutex:
            fcntl.lockf(fd, _LOCK_EX, SLOT, off)
            try:
                tokens, last = _BODY.unpack_from(m, off + 8)
                if tokens < 0.0:  # a new bucket starts full
                    tokens, last = count, now
                elif now > last:
                    tokens = min(count, tokens + (now - last) * count / period)
                    last = now
                ok = tokens >= 1.0
                if ok:
                    tokens -= 1.0
                _BODY.pack_into(m, off + 8, tokens, last)
            finally:
                fcntl.lockf(fd, _LOCK_UN, SLOT, off)
        return ok
