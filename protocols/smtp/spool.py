"""The durable mail spool: what has been answered `250` is on disk, and stays until delivered or bounced.

Owns: the on-disk layout, atomic durable writes (write temp, fsync file, rename, fsync directory),
recovery at start, per-recipient delivery state, the retry schedule arithmetic, and the `flush`
trigger file that `proxyvm mailq --flush` drops.
Must not: speak SMTP, decide policy, or log message bodies. All calls are blocking file I/O: callers
in coroutines run them in a worker thread (`asyncio.to_thread`).

Layout under the spool directory:
  tmp/          partial writes; anything here at start is garbage from a crash and is removed
  queue/ID.msg  one committed message: a JSON envelope line, "\\n", then the message bytes
  queue/ID.st   per-recipient state (absent = nothing attempted yet), replaced atomically
  bad/          entries that could not be read back (kept for a human, never deleted)
  flush         trigger: when present, every deferred message is retried now
  workers/I/    the same layout again for SMTP worker I >= 1 (`workers: N`, below)

With `workers: N` the spool is partitioned: worker 0 owns the directory itself, worker I its
`workers/I` partition. A message belongs to the worker that answered its `250` (it was fsync'd
into that worker's partition first), and only that worker ever reads, delivers or removes it, so no
message is delivered twice and no cross-process claim or lock is needed; a worker restarted after a
crash (same index) recovers exactly its own partition. Partitions of indexes no longer running
(`workers:` lowered) are adopted by worker 0 at its start (`adopt_orphans`). `proxyvm mailq` lists
and flushes every partition.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from protocols.smtp.settings import RetrySettings

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_FORMAT = 1


class SpoolError(Exception):
    """The spool could not store or update an entry (disk full, unwritable, corrupt)."""

    def __init__(self, message: str, *, full: bool = False):
        super().__init__(message)
        self.full = full


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the guest told us, fixed at acceptance. `rules` holds (rule, at) per recipient."""

    id: str
    guest: str
    src: str
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    received: float
    size: int
    message_id: str = ""
    body_8bit: bool = False
    smtputf8: bool = False
    rules: tuple[tuple[str, str], ...] = ()
    dsn_of: str = ""  # set on bounces we generated: the id of the bounced message

    def to_json(self) -> str:
        d = asdict(self)
        d["v"] = _FORMAT
        return json.dumps(d, separators=(",", ":"), ensure_ascii=True)

    @staticmethod
    def from_json(text: str | bytes) -> Envelope:
        d = json.loads(text)
        if not isinstance(d, dict) or d.pop("v", None) != _FORMAT:
            raise ValueError("unknown spool format")
        d["rcpts"] = tuple(d["rcpts"])
        d["rules"] = tuple(tuple(x) for x in d.get("rules", ()))
        return Envelope(**d)


@dataclass(frozen=True, slots=True)
class RcptState:
    status: str = PENDING  # pending | delivered | failed
    reply: str = ""  # the last reply or error for this recipient (no secrets: peer text only)
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class EntryState:
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    last_attempt: float = 0.0
    rcpts: dict[str, RcptState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"v": _FORMAT, "attempts": self.attempts, "next_attempt": self.next_attempt,
             "last_error": self.last_error, "last_attempt": self.last_attempt,
             "rcpts": {k: asdict(v) for k, v in self.rcpts.items()}},
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str | bytes) -> EntryState:
        d = json.loads(text)
        if d.get("v") != _FORMAT:
            raise ValueError("unknown state format")
        return EntryState(
            attempts=int(d["attempts"]), next_attempt=float(d["next_attempt"]),
            last_error=str(d["last_error"]), last_attempt=float(d.get("last_attempt", 0.0)),
            rcpts={k: RcptState(**v) for k, v in d["rcpts"].items()},
        )


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    envelope: Envelope
    state: EntryState

    @property
    def id(self) -> str:
        return self.envelope.id

    def rcpt_state(self, rcpt: str) -> RcptState:
        return self.state.rcpts.get(rcpt, RcptState())

    def pending(self) -> list[str]:
        return [r for r in self.envelope.rcpts if self.rcpt_state(r).status == PENDING]

    def failed(self) -> list[str]:
        return [r for r in self.envelope.rcpts if self.rcpt_state(r).status == FAILED]

    def done(self) -> bool:
        return not self.pending()


def backoff(attempts: int, retry: RetrySettings) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: first, 2×first, 4×first ... capped."""
    n = max(1, attempts)
    return min(retry.first * (2 ** min(n - 1, 40)), max(retry.max_interval, retry.first))


_ID_RANDOM = random.Random(os.urandom(16))  # ids need uniqueness, not secrecy: no syscall per message


def new_id(now: float) -> str:
    """Sortable by arrival, unique without coordination: seconds (hex) + 40 random bits."""
    return f"{int(now):09X}{_ID_RANDOM.getrandbits(40):010X}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A spool directory. Thread-safe for distinct ids; `store` never leaves a half entry behind."""

    def __init__(self, directory: Path | str, clock: Callable[[], float]):
        self.dir = Path(directory)
        self.tmp = self.dir / "tmp"
        self.queue = self.dir / "queue"
        self.bad = self.dir / "bad"
        self.flush_file = self.dir / "flush"
        self.clock = clock
        self._lock = threading.Lock()

    # -- start ----------------------------------------------------------------------------
    def open(self) -> tuple[list[SpoolEntry], list[str]]:
        """Create the layout, remove crash garbage, and read back every committed entry.
        Returns (entries, problems) — problems name entries moved to bad/."""
        for d in (self.dir, self.tmp, self.queue, self.bad):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for p in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        entries: list[SpoolEntry] = []
        problems: list[str] = []
        msgs = {p.stem for p in self.queue.glob("*.msg")}
        for st in self.queue.glob("*.st"):
            if st.stem not in msgs:  # crash between the two unlinks of a finished entry
                st.unlink(missing_ok=True)
        for ident in sorted(msgs):
            try:
                entries.append(self.read_entry(ident))
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{ident}: {type(e).__name__}: {e}")
                for suffix in (".msg", ".st"):
                    src = self.queue / f"{ident}{suffix}"
                    if src.exists():
                        os.replace(src, self.bad / src.name)
        _fsync_dir(self.queue)
        return entries, problems

    # -- writes ---------------------------------------------------------------------------
    def _durable_write(self, final: Path, chunks: Iterable[bytes]) -> None:
        tmp = self.tmp / f"{final.name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for c in chunks:
                    view = memoryview(c)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            _fsync_dir(self.queue)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise SpoolError(f"spool write failed: {os.strerror(e.errno or 0) or e}", full=full) from None

    def store(self, envelope: Envelope, message: bytes) -> SpoolEntry:
        """Commit a new message durably. Raises SpoolError; then nothing of it remains."""
        final = self.queue / f"{envelope.id}.msg"
        self._durable_write(final, (envelope.to_json().encode("ascii"), b"\n", message))
        return SpoolEntry(envelope, EntryState())

    def save_state(self, entry: SpoolEntry) -> None:
        self._durable_write(self.queue / f"{entry.id}.st", (entry.state.to_json().encode(),))

    def remove(self, ident: str) -> None:
        self.remove_many([ident])

    def remove_many(self, idents: Iterable[str]) -> None:
        """Forget finished entries (message first, so a crash leaves only an orphan state file),
        then one directory fsync for the whole batch."""
        for ident in idents:
            (self.queue / f"{ident}.msg").unlink(missing_ok=True)
            (self.queue / f"{ident}.st").unlink(missing_ok=True)
        _fsync_dir(self.queue)

    # -- reads ----------------------------------------------------------------------------
    def read_entry(self, ident: str) -> SpoolEntry:
        with open(self.queue / f"{ident}.msg", "rb") as f:
            head = f.readline(1_000_000)
        if not head.endswith(b"\n"):
            raise ValueError("no envelope line")
        env = Envelope.from_json(head)
        if env.id != ident:
            raise ValueError("envelope id does not match the file name")
        state = EntryState()
        st = self.queue / f"{ident}.st"
        if st.exists():
            state = EntryState.from_json(st.read_bytes())
        return SpoolEntry(env, state)

    def message(self, ident: str) -> bytes:
        data = (self.queue / f"{ident}.msg").read_bytes()
        return data[data.index(b"\n") + 1 :]

    # -- flush trigger --------------------------------------------------------------------
    def take_flush_request(self) -> bool:
        try:
            self.flush_file.unlink()
            return True
        except FileNotFoundError:
            return False


def with_state(entry: SpoolEntry, **changes: Any) -> SpoolEntry:
    return replace(entry, state=replace(entry.state, **changes))


def request_flush(spool_dir: Path | str) -> None:
    """Ask the running service to retry every deferred message now (each worker polls the trigger
    of its own partition)."""
    for d in partitions(spool_dir):
        fd = os.open(d / "flush", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)


def partition_dir(spool_dir: Path | str, worker: int) -> Path:
    """The part of the spool that SMTP worker `worker` owns (0: the spool directory itself)."""
    return Path(spool_dir) if worker == 0 else Path(spool_dir) / "workers" / str(worker)


def partitions(spool_dir: Path | str) -> list[Path]:
    """Every partition present: the spool directory, then `workers/I` in index order."""
    top = Path(spool_dir)
    extra = top / "workers"
    found = sorted((p for p in extra.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name)) \
        if extra.is_dir() else []
    return [top, *found]


def adopt_orphans(spool_dir: Path | str, workers: int) -> int:
    """Worker 0, before it opens its partition: move the committed entries of partitions whose
    worker no longer runs (index >= `workers`) into its own queue. Each file moves by rename (same
    file system: atomic); the state file goes first, so a crash in between leaves the message in
    the old partition, adopted again at the next start. Returns the messages adopted."""
    top = Path(spool_dir)
    queue = top / "queue"
    n = 0
    for part in partitions(top)[1:]:
        if int(part.name) < workers or not (part / "queue").is_dir():
            continue
        queue.mkdir(mode=0o700, parents=True, exist_ok=True)
        for msg in sorted((part / "queue").glob("*.msg")):
            st = msg.with_suffix(".st")
            if st.exists():
                os.replace(st, queue / st.name)
            os.replace(msg, queue / msg.name)
            n += 1
        if n:
            _fsync_dir(queue)
    return n
