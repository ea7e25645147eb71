"""SO_REUSEPORT worker processes for the HTTP service (`http.workers: N`).

Owns: starting N-1 extra processes that serve the same listening ports, each with its own socket
(bound by the parent with SO_REUSEPORT before privileges drop, passed as an inherited fd, so the
kernel spreads connections across processes), restarting a child that dies (on the same sockets),
the parent<->child channel (a socketpair carrying
length-prefixed pickles: audit batches and health up, reload and drain down), dropping the child's
privileges to the user the parent will become, and children exiting when the parent goes away.
Must not: write audit records itself (the parent's sink does: one hash chain, one writer), or
unpickle anything that did not come from its own parent over the private socketpair.

Limits: each process keeps its own rate-limit buckets (a `rate:` of N/minute admits up to
N x workers), and the supervisor sees one service (the parent) whose health sums its workers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import pwd
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.base import stamp_policy

_LEN = struct.Struct("!I")
_REPO = str(Path(__file__).resolve().parents[2])
MAX_MESSAGE = 64 * 1024 * 1024
AUDIT_FLUSH_S = 0.02


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listening socket with SO_REUSEPORT (one per process)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(1024)
    s.setblocking(False)
    return s


def encode(msg: Any) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def read_message(reader: asyncio.StreamReader) -> Any:
    try:
        head = await reader.readexactly(_LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE:
            return None
        return pickle.loads(await reader.readexactly(n))  # noqa: S301 - our own child/parent only
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


@dataclass
class WorkerSpec:
    """Everything a child needs; pickled to it over the socketpair."""

    index: int
    settings: Any
    policy_file: str
    guest_names: frozenset[str]
    guests: Any  # GuestLookup (picklable)
    dns: Any
    state_dir: str
    fds: dict[str, list[int]]  # listener kind -> inherited fds, in settings order
    user: str | None = None
    log_level: int = logging.INFO
    capture: Any = None  # protocols.capture.CaptureSettings (None: capture on with the defaults)


@dataclass
class WorkerHandle:
    proc: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    spec: WorkerSpec
    socks: list[socket.socket]  # the parent keeps them: a restarted child gets the same sockets
    task: asyncio.Task[None] | None = None
    health: dict[str, Any] = field(default_factory=dict)


class WorkerPool:
    """Parent side: spawn, feed, restart and stop the extra processes.

    The parent keeps its copy of every child's listening sockets. If a child dies, connections the
    kernel hands to its sockets wait in their backlog until the restarted child (same sockets: no
    privilege needed to re-bind) accepts them; nothing is refused meanwhile."""

    MAX_RESTARTS = 5  # per slot within RESTART_WINDOW; beyond it the slot stays down (degraded)
    RESTART_WINDOW = 60.0

    def __init__(self, emit: Callable[[dict[str, Any]], None], log: logging.Logger) -> None:
        self.emit = emit
        self.log = log
        self.workers: list[WorkerHandle] = []
        self.stopping = False
        self.restarts = 0
        self._latest: dict[str, Any] = {}  # the last reload, for children started after it
        self._quarantine: dict[str, Any] | None = None  # the last quarantine table, likewise
        self._history: dict[int, list[float]] = {}

    async def spawn(self, spec: WorkerSpec, socks: list[socket.socket]) -> None:
        self.workers.append(await self._launch(spec, socks))

    async def _launch(self, spec: WorkerSpec, socks: list[socket.socket]) -> WorkerHandle:
        parent_end, child_end = socket.socketpair()
        fds = [s.fileno() for s in socks] + [child_end.fileno()]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "protocols.http.workers", "--channel-fd", str(child_end.fileno()),
            pass_fds=fds,
            cwd=_REPO,
        )
        child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end)
        writer.write(encode(spec))
        await writer.drain()
        try:
            first = await asyncio.wait_for(read_message(reader), 60.0)
        except TimeoutError:
            first = None
        if not isinstance(first, dict) or first.get("t") != "ready":
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            writer.close()
            raise RuntimeError(f"http worker {spec.index} failed to start (exit {proc.returncode})")
        h = WorkerHandle(proc, writer, reader, spec, socks)
        h.task = asyncio.create_task(self._read(h))
        return h

    async def _read(self, h: WorkerHandle) -> None:
        while True:
            msg = await read_message(h.reader)
            if msg is None:
                break
            t = msg.get("t")
            if t == "audit":
                for rec in msg["r"]:
                    self.emit(rec)
            elif t == "health":
                h.health = msg["h"]
        if self.stopping:
            return
        try:
            await asyncio.wait_for(h.proc.wait(), 5.0)
        except TimeoutError:
            h.proc.kill()
            await h.proc.wait()
        h.writer.close()
        self.log.error("http worker %d (pid %d) died with %s; restarting", h.spec.index, h.proc.pid,
                       h.proc.returncode)
        await self._restart(h)

    async def _restart(self, h: WorkerHandle) -> None:
        now = time.monotonic()
        hist = [t for t in self._history.get(h.spec.index, []) if now - t < self.RESTART_WINDOW]
        if len(hist) >= self.MAX_RESTARTS:
            self.log.error("http worker %d restarted %d times in %.0fs; leaving it down",
                           h.spec.index, len(hist), self.RESTART_WINDOW)
            return
        self._history[h.spec.index] = [*hist, now]
        await asyncio.sleep(0.2 * len(hist))
        spec = h.spec
        if self._latest:
            spec.settings = self._latest["settings"]
            spec.policy_file = self._latest["policy_file"]
            spec.guest_names = self._latest["guest_names"]
        spec.user = None  # we already run as that user: nothing to drop
        try:
            nh = await self._launch(spec, h.socks)
        except (RuntimeError, OSError) as e:
            self.log.error("http worker %d restart failed: %s", spec.index, e)
            return
        if self._quarantine is not None:
            nh.writer.write(encode(self._quarantine))
        if self.stopping:
            nh.writer.write(encode({"t": "drain", "timeout": 0.1}))
        self.workers[self.workers.index(h)] = nh
        self.restarts += 1

    def send_all(self, msg: Any) -> None:
        if msg.get("t") == "reload":
            self._latest = msg
        elif msg.get("t") == "quarantine":
            self._quarantine = msg
        data = encode(msg)
        for h in self.workers:
            if not h.writer.is_closing():
                h.writer.write(data)

    def alive(self) -> int:
        return sum(1 for h in self.workers if h.proc.returncode is None)

    def connections(self) -> int:
        return sum(int(h.health.get("connections", 0)) for h in self.workers if h.proc.returncode is None)

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self.send_all({"t": "drain", "timeout": timeout})
        for h in list(self.workers):
            try:
                await asyncio.wait_for(h.proc.wait(), timeout + 5.0)
            except TimeoutError:
                h.proc.kill()
                await h.proc.wait()
            if h.task is not None:
                try:
                    await asyncio.wait_for(h.task, 1.0)
                except (TimeoutError, asyncio.CancelledError):
                    h.task.cancel()
            h.writer.close()
            for s in h.socks:
                s.close()
        self.workers.clear()


class PipeAudit:
    """Child-side AuditSink: batches records to the parent. Never blocks, never raises."""

    MAX = 100_000

    def __init__(self) -> None:
        self.buf: list[dict[str, Any]] = []
        self.dropped = 0
        self.policy = ""  # digest of this child's policy, stamped on its decision records

    def emit(self, record: dict[str, Any]) -> None:
        if len(self.buf) >= self.MAX:
            self.dropped += 1
            return
        if "ts" not in record:
            record = {"ts": _now_iso(), **record}
        record = stamp_policy(record, self.policy)
        self.buf.append(record)


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _drop_privileges(user: str | None) -> None:
    if os.getuid() != 0 or not user:
        return
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


async def _child(channel_fd: int) -> int:
    from policy import load_policy
    from protocols import capture
    from protocols.base import ServiceContext, reload_service
    from protocols.http.service import HTTPService
    from protocols.quarantine import apply_table

    sock = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    spec: WorkerSpec | None = await read_message(reader)
    if spec is None:
        return 1
    logging.basicConfig(level=spec.log_level, format=f"http-worker[{spec.index}] %(levelname)s %(message)s")
    log = logging.getLogger("proxyvm.http.worker")
    audit = PipeAudit()
    engine = load_policy(spec.policy_file, guests=spec.guest_names)
    audit.policy = engine.digest
    ctx = ServiceContext(
        settings=spec.settings,
        engine=engine,
        audit=audit,
        guests=spec.guests,
        log=log,
        config=_DNSOnly(spec.dns),
        state_dir=Path(spec.state_dir),
        capture=capture.make(spec.capture, spec.state_dir, f"http-{os.getpid()}", log),
    )
    svc = HTTPService(ctx)
    svc.inherited = {k: [socket.socket(fileno=fd) for fd in fds] for k, fds in spec.fds.items()}
    await svc.start()
    _drop_privileges(spec.user)
    ctx.capture.start()
    writer.write(encode({"t": "ready", "pid": os.getpid()}))
    await writer.drain()
    stopping = asyncio.Event()
    drain_timeout = 10.0

    async def flush() -> None:
        ticks = 0
        while not stopping.is_set():
            await asyncio.sleep(AUDIT_FLUSH_S)
            ticks += 1
            if audit.buf:
                batch, audit.buf = audit.buf, []
                writer.write(encode({"t": "audit", "r": batch}))
            if ticks % 50 == 0:  # about once a second
                writer.write(encode({"t": "health", "h": svc.health()}))
            try:
                await writer.drain()
            except ConnectionError:
                stopping.set()

    async def commands() -> None:
        nonlocal drain_timeout
        while True:
            msg = await read_message(reader)
            if msg is None:  # parent gone: never serve unsupervised
                stopping.set()
                return
            if msg.get("t") == "reload":
                new = load_policy(msg["policy_file"], guests=msg["guest_names"])
                replace = getattr(ctx.guests, "replace", None)
                if replace is not None and msg.get("guests") is not None:
                    replace(msg["guests"])  # new guest addresses, as in the parent
                audit.policy = new.digest
                await reload_service(svc, ctx.engine, msg["settings"], new)
            elif msg.get("t") == "quarantine":
                apply_table(ctx, svc, msg.get("table"))
            elif msg.get("t") == "drain":
                drain_timeout = float(msg.get("timeout", 10.0))
                stopping.set()
                return

    tasks = [asyncio.create_task(flush()), asyncio.create_task(commands())]
    await stopping.wait()
    await svc.drain(drain_timeout)
    await asyncio.to_thread(ctx.capture.close, 2.0)
    for t in tasks:
        t.cancel()
    if audit.buf:
        writer.write(encode({"t": "audit", "r": audit.buf}))
        try:
            await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, TimeoutError):
            pass
    return 0


@dataclass(frozen=True)
class _DNSOnly:
    """The slice of the whole config a worker needs (`config.dns`)."""

    dns: Any


def main() -> int:
    ap = argparse.ArgumentParser(description="internal: one SO_REUSEPORT HTTP worker (started by HTTPService)")
    ap.add_argument("--channel-fd", type=int, required=True)
    a = ap.parse_args()
    return asyncio.run(_child(a.channel_fd))


if __name__ == "__main__":
    raise SystemExit(main())
