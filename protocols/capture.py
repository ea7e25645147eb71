"""Forensic capture: the guest-side bytes of denied and quarantined flows, as pcap files per guest
(docs/configuration.md#forensics).

Owns: the `forensics:` config section (`CaptureSettings`, `parse`), turning one flow's guest-side
byte chunks into packets with scapy (`synthesise`: UDP datagrams; TCP with a handshake, data
segments whose seq/ack follow the bytes, and a FIN exchange; IPv4 or IPv6 from the addresses), the
per-guest ring of pcap files `dir/<guest>/<n>-<tag>.pcap` bounded by `per_guest`, `total` and
`keep` (`Ring`), and `Capture`, the object a service is handed (`ServiceContext.capture`): its
`flow()` only queues (bounded: past it, flows are dropped and counted) and one writer thread
synthesises and appends, so a service's event loop never waits on scapy or the disk.
Must not: import `proxyvm`; be handed bytes of the outside side (upstream TLS, credentials,
anything the proxy sent or received beyond the guest: callers pass only what the guest sent us and
what we sent the guest); raise into a service; keep writing into a full disk (an `OSError` on
write stops capture for `SUSPEND_S`, counted in `disk_errors`, logged once, a torn record is cut
off again).

Several processes write one guest's directory (one worker per protocol, HTTP pool children): each
writes its own files (`tag` = service name and pid) and every process enforces the bounds over the
whole directory, oldest file (by modification time) first. A guest's directory exceeds `per_guest`
by at most the files being written (each below `chunk`). The link type is LINKTYPE_RAW (101): each
record is an IPv4 or IPv6 packet without an Ethernet header.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import queue
import random
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy.source import Node

DEFAULT_PER_GUEST = 50 * 1000**2
DEFAULT_TOTAL = 1000**3
DEFAULT_KEEP = 7 * 86400.0
SUSPEND_S = 30.0  # after a write error, capture pauses this long before it tries again
QUEUE_FLOWS = 512  # flows waiting for the writer; past it (or QUEUE_BYTES) a flow is dropped
QUEUE_BYTES = 16 * 1024 * 1024
FLOW_MAX = 256 * 1024  # guest-side bytes of one flow kept (callers bound their buffers to this too)
SEGMENT = 1460  # TCP payload per synthesised segment
LINKTYPE_RAW = 101
SNAPLEN = 262144
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_FILE = re.compile(r"^(\d+)-([A-Za-z0-9_.-]+)\.pcap$")

IN = "in"  # guest -> proxy
OUT = "out"  # proxy -> guest
Chunk = tuple[float, str, bytes]  # (unix time, IN | OUT, bytes)


# -- config -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CaptureSettings:
    enabled: bool = True
    dir: Path | None = None  # None: state_dir/forensics
    per_guest: int = DEFAULT_PER_GUEST  # bytes of pcap kept per guest
    total: int = DEFAULT_TOTAL  # bytes of pcap kept for all guests together
    keep: float = DEFAULT_KEEP  # seconds a file is kept after its last packet

    @property
    def chunk(self) -> int:
        """Size at which a file is closed and the next begun (so the oldest bytes can go first)."""
        return max(4096, min(self.per_guest // 8, 8 * 1024 * 1024))

    def directory(self, state_dir: Path | str) -> Path:
        return self.dir if self.dir is not None else Path(state_dir) / "forensics"


def parse(node: Node, base: Path | None = None) -> CaptureSettings:
    """`forensics:` — absent or `true`: on with the defaults; `false`: off; a mapping sets keys."""
    if node.value is False:
        return CaptureSettings(enabled=False)
    if node.value is None or node.value is True:
        return CaptureSettings()
    fields = node.get_map(allowed={"dir", "per_guest", "total", "keep"}, what="forensics")
    kw: dict[str, Any] = {}
    if "dir" in fields:
        kw["dir"] = fields["dir"].path("forensics dir")
    if "per_guest" in fields:
        kw["per_guest"] = fields["per_guest"].size("forensics per_guest")
        if kw["per_guest"] < 10_000:
            raise fields["per_guest"].fail("forensics per_guest must be at least 10KB")
    if "total" in fields:
        kw["total"] = fields["total"].size("forensics total")
        if kw["total"] < kw.get("per_guest", DEFAULT_PER_GUEST):
            raise fields["total"].fail("forensics total is smaller than per_guest",
                                       "total bounds every guest together: make it at least per_guest")
    if "keep" in fields:
        kw["keep"] = fields["keep"].duration("forensics keep")
        if kw["keep"] <= 0:
            raise fields["keep"].fail("forensics keep must be a positive duration")
    return CaptureSettings(**kw)


# -- packets ------------------------------------------------------------------------------------
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _pair(guest_ip: str, proxy_ip: str) -> tuple[str, str, int]:
    g, p = _ip(guest_ip), _ip(proxy_ip or guest_ip)
    if g.version == p.version:
        return str(g), str(p), g.version
    # mixed families (a v4 guest on a dual-stack socket reported oddly): both as IPv6
    def six(a: Any) -> str:
        return str(a) if a.version == 6 else f"::ffff:{a}"

    return six(g), six(p), 6


def synthesise(transport: str, guest: tuple[str, int], proxy: tuple[str, int], chunks: Sequence[Chunk],
               *, start: float | None = None, end: float | None = None,
               isn: tuple[int, int] | None = None) -> list[tuple[float, bytes]]:
    """The packets of one flow as (time, raw IP packet) built with scapy. UDP: one datagram per
    chunk. TCP: SYN, SYN-ACK, ACK at `start` (default: the first chunk), each chunk in segments of
    at most SEGMENT bytes (seq/ack count the bytes each side sent), the other side's ACK, then at
    `end` (default: the last chunk) FIN from the guest, FIN-ACK, ACK."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw

    gip, pip, version = _pair(guest[0], proxy[0])
    gport, pport = int(guest[1]), int(proxy[1])

    def ip(src_guest: bool) -> Any:
        s, d = (gip, pip) if src_guest else (pip, gip)
        return IP(src=s, dst=d, ttl=64) if version == 4 else IPv6(src=s, dst=d, hlim=64)

    out: list[tuple[float, bytes]] = []
    if transport == "udp":
        for t, direction, data in chunks:
            g = direction == IN
            sport, dport = (gport, pport) if g else (pport, gport)
            out.append((t, bytes(ip(g) / UDP(sport=sport, dport=dport) / Raw(data))))
        return out
    if transport != "tcp":
        raise ValueError(f"transport {transport!r}: udp or tcp")
    t0 = start if start is not None else (chunks[0][0] if chunks else time.time())
    t_end = end if end is not None else (chunks[-1][0] if chunks else t0)
    gseq, pseq = isn if isn is not None else (random.getrandbits(32), random.getrandbits(32))

    def seg(t: float, g: bool, flags: str, data: bytes = b"") -> None:
        nonlocal gseq, pseq
        sport, dport = (gport, pport) if g else (pport, gport)
        seq, ack = (gseq, pseq) if g else (pseq, gseq)
        tcp = TCP(sport=sport, dport=dport, seq=seq, ack=ack if "A" in flags else 0, flags=flags, window=65535)
        pkt = ip(g) / tcp / Raw(data) if data else ip(g) / tcp
        out.append((t, bytes(pkt)))
        used = len(data) + (1 if ("S" in flags or "F" in flags) else 0)
        if g:
            gseq = (gseq + used) & 0xFFFFFFFF
        else:
            pseq = (pseq + used) & 0xFFFFFFFF

    seg(t0, True, "S")
    seg(t0, False, "SA")
    seg(t0, True, "A")
    last = t0
    for t, direction, data in chunks:
        t = max(t, last)
        last = t
        g = direction == IN
        for i in range(0, len(data), SEGMENT):
            seg(t, g, "PA", data[i:i + SEGMENT])
        if data:
            seg(t, not g, "A")
    t_end = max(t_end, last)
    seg(t_end, True, "FA")
    seg(t_end, False, "FA")
    seg(t_end, True, "A")
    return out


def pcap_header() -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)


def pcap_records(packets: Iterable[tuple[float, bytes]]) -> bytes:
    parts = []
    for t, raw in packets:
        sec = int(t)
        usec = min(999_999, int(round((t - sec) * 1_000_000)))
        parts.append(struct.pack("<IIII", sec, usec, len(raw), len(raw)) + raw)
    return b"".join(parts)


# -- the ring on disk ----------------------------------------------------------------------------
def guest_dirname(guest: str) -> str:
    return _SAFE.sub("_", guest) or "_"


@dataclass
class _Current:
    path: Path
    size: int


@dataclass
class Ring:
    """Appends pcap records to `dir/<guest>/<n>-<tag>.pcap` and keeps the bounds. Blocking: the
    writer thread (or a test) calls it. Raises OSError from the disk (after cutting a torn
    record off again)."""

    root: Path
    tag: str
    per_guest: int = DEFAULT_PER_GUEST
    total: int = DEFAULT_TOTAL
    keep: float = DEFAULT_KEEP
    chunk: int = 1024 * 1024
    clock: Callable[[], float] = time.time
    current: dict[str, _Current] = field(default_factory=dict)
    total_estimate: int = -1  # from the last full scan plus what we wrote since
    next_sweep: float = 0.0
    deleted: int = 0

    def append(self, guest: str, records: bytes) -> Path:
        d = self.root / guest_dirname(guest)
        cur = self.current.get(guest)
        if cur is None or cur.size >= self.chunk or not cur.path.exists():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            cur = self.current[guest] = _Current(d / f"{self._next_n(d):06d}-{self.tag}.pcap", 0)
        fd = os.open(cur.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            pos = os.fstat(fd).st_size
            data = (pcap_header() + records) if pos == 0 else records
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            except OSError:
                try:
                    os.ftruncate(fd, pos)  # no half record: the file stays readable
                except OSError:
                    pass
                raise
            cur.size = pos + len(data)
        finally:
            os.close(fd)
        if self.total_estimate >= 0:
            self.total_estimate += len(data)
        self._bound_guest(d)
        now = self.clock()
        if now >= self.next_sweep or self.total_estimate < 0 or self.total_estimate > self.total:
            self.sweep(now)
        return cur.path

    @staticmethod
    def _next_n(d: Path) -> int:
        top = 0
        try:
            for e in os.scandir(d):
                m = _FILE.match(e.name)
                if m:
                    top = max(top, int(m.group(1)))
        except FileNotFoundError:
            pass
        return top + 1

    def _files(self, d: Path) -> list[tuple[float, int, int, Path]]:
        """(mtime, n, size, path) of every pcap file in a guest directory, oldest first."""
        out = []
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for e in entries:
            m = _FILE.match(e.name)
            if not m:
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, int(m.group(1)), st.st_size, Path(e.path)))
        out.sort()
        return out

    def _unlink(self, p: Path) -> None:
        try:
            p.unlink()
            self.deleted += 1
        except FileNotFoundError:
            pass

    def _bound_guest(self, d: Path) -> None:
        files = self._files(d)
        size = sum(f[2] for f in files)
        mine = {c.path for c in self.current.values()}
        for _, _, fsize, p in files:
            if size <= self.per_guest:
                break
            if p in mine:
                continue
            self._unlink(p)
            size -= fsize
            if self.total_estimate >= 0:
                self.total_estimate -= fsize

    def sweep(self, now: float | None = None) -> None:
        """Every guest directory: files older than `keep` go, then the oldest files until all
        guests together are within `total`."""
        now = self.clock() if now is None else now
        self.next_sweep = now + min(60.0, max(1.0, self.keep / 4))
        everything: list[tuple[float, int, int, Path]] = []
        try:
            dirs = [Path(e.path) for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            dirs = []
        mine = {c.path for c in self.current.values()}
        for d in dirs:
            for f in self._files(d):
                if f[0] < now - self.keep:
                    self._unlink(f[3])
                    if f[3] in mine:
                        self.current = {g: c for g, c in self.current.items() if c.path != f[3]}
                else:
                    everything.append(f)
        everything.sort()
        total = sum(f[2] for f in everything)
        for _, _, fsize, p in everything:
            if total <= self.total:
                break
            if p in mine:
                continue
            self._unlink(p)
            total -= fsize
        self.total_estimate = total


# -- what a service holds ------------------------------------------------------------------------
@dataclass
class _Flow:
    guest: str
    protocol: str
    transport: str
    guest_addr: tuple[str, int]
    proxy_addr: tuple[str, int]
    chunks: list[Chunk]
    start: float | None
    end: float | None
    size: int


class Capture:
    """Handed to a service as `ServiceContext.capture`. `flow(...)` queues one flow for the writer
    thread and returns at once; it never raises. `wanted(guest, verdict, quarantined)` says whether
    a flow is captured (denied, would_deny, or any flow of a quarantined guest)."""

    def __init__(self, settings: CaptureSettings | None = None, directory: Path | None = None, *,
                 tag: str = "proxyvm", log: logging.Logger | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings if settings is not None else CaptureSettings(enabled=False)
        self.enabled = bool(self.settings.enabled and directory is not None)
        self.dir = directory
        self.tag = _SAFE.sub("_", tag)
        self.log = log or logging.getLogger("proxyvm.capture")
        self.clock = clock
        self.flows = 0
        self.packets = 0
        self.bytes = 0  # pcap bytes written
        self.dropped = 0  # flows not captured: queue full, capture stopped after a disk error, too big
        self.disk_errors = 0
        self.stopped_until = 0.0  # capture pauses after a disk error (monotonic time)
        self._failing = False  # logged the stop; cleared by the next good write
        self._q: queue.Queue[_Flow | None] = queue.Queue(QUEUE_FLOWS)
        self._pending = 0  # bytes in the queue
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.ring: Ring | None = None
        if self.enabled and directory is not None:
            s = self.settings
            self.ring = Ring(directory, self.tag, s.per_guest, s.total, s.keep, s.chunk, clock)

    @staticmethod
    def wanted(verdict: Any, quarantined: bool = False) -> bool:
        return quarantined or str(verdict) in ("deny", "would_deny")

    def flow(self, guest: str, protocol: str, transport: str, guest_addr: tuple[Any, ...],
             proxy_addr: tuple[Any, ...] | None, chunks: Sequence[Chunk], *, start: float | None = None,
             end: float | None = None) -> bool:
        """Queue one flow: the guest-side chunks (time, IN | OUT, bytes) in the order they crossed.
        False when it was not queued (off, stopped after a disk error, queue full)."""
        if not self.enabled:
            return False
        try:
            if time.monotonic() < self.stopped_until:
                self.dropped += 1
                return False
            kept: list[Chunk] = []
            size = 0
            for t, direction, data in chunks:
                if not data:
                    continue
                room = FLOW_MAX - size
                if room <= 0:
                    break
                data = bytes(data[:room])
                kept.append((float(t), direction, data))
                size += len(data)
            if not kept and transport == "udp":
                return False
            pa = proxy_addr or ("0.0.0.0", 0)
            f = _Flow(guest, protocol, transport, (str(guest_addr[0]), int(guest_addr[1])),
                      (str(pa[0]), int(pa[1])), kept, start, end, size)
            with self._lock:
                if self._pending + size > QUEUE_BYTES:
                    self.dropped += 1
                    return False
                self._q.put_nowait(f)
                self._pending += size
            if self._thread is None:
                self.start()
            return True
        except queue.Full:
            self.dropped += 1
            return False
        except Exception:  # noqa: BLE001 - capture never breaks a service
            self.dropped += 1
            self.log.exception("forensics: cannot queue a flow of %s", guest)
            return False

    def start(self) -> None:
        """Start the writer thread (also ages files out while no flow comes). Idempotent."""
        if self._thread is None and self.enabled:
            self._thread = threading.Thread(target=self._run, name="proxyvm-capture", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        ring = self.ring
        while True:
            try:
                f = self._q.get(timeout=1.0)
            except queue.Empty:
                if ring is not None and self.clock() >= ring.next_sweep:
                    try:
                        ring.sweep()
                    except OSError as e:
                        ring.next_sweep = self.clock() + SUSPEND_S
                        self.log.debug("forensics: sweep of %s failed: %s", self.dir, e)
                continue
            if f is None:
                return
            with self._lock:
                self._pending -= f.size
            self._write(f)

    def _write(self, f: _Flow) -> None:
        if time.monotonic() < self.stopped_until or self.ring is None:
            self.dropped += 1
            return
        try:
            pkts = synthesise(f.transport, f.guest_addr, f.proxy_addr, f.chunks, start=f.start, end=f.end)
        except Exception:  # noqa: BLE001 - an address scapy cannot take: skip that flow
            self.dropped += 1
            self.log.exception("forensics: cannot build packets for a %s flow of %s", f.protocol, f.guest)
            return
        records = pcap_records(pkts)
        try:
            self.ring.append(f.guest, records)
        except OSError as e:
            self.disk_errors += 1
            self.dropped += 1
            self.stopped_until = time.monotonic() + SUSPEND_S
            if not self._failing:
                self._failing = True
                kind = errno.errorcode.get(e.errno or 0, "error")
                self.log.error("forensics: capture stopped: cannot write under %s: %s (%s); retrying every "
                               "%gs, the service keeps serving", self.dir, e.strerror or e, kind, SUSPEND_S)
            return
        if self._failing:
            self._failing = False
            self.log.warning("forensics: capture resumed under %s", self.dir)
        self.flows += 1
        self.packets += len(pkts)
        self.bytes += len(records)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout` s) and stop the writer thread. Blocking."""
        t = self._thread
        if t is None:
            return
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            return
        t.join(timeout)

    def health(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "flows": self.flows, "packets": self.packets, "bytes": self.bytes,
                "dropped": self.dropped, "disk_errors": self.disk_errors,
                "stopped": time.monotonic() < self.stopped_until}


def sum_health(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' `Capture.health()` as one (an HTTP parent and its children)."""
    out: dict[str, Any] = {"enabled": False, "flows": 0, "packets": 0, "bytes": 0, "dropped": 0,
                           "disk_errors": 0, "stopped": False}
    for p in parts:
        for k, v in p.items():
            if k in ("enabled", "stopped"):
                out[k] = out[k] or bool(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def make(settings: CaptureSettings | None, state_dir: Path | str, tag: str, log: logging.Logger | None = None
         ) -> Capture:
    """The Capture a worker hands its service (`forensics:` off or absent settings: a no-op one)."""
    s = settings if settings is not None else CaptureSettings()
    return Capture(s, s.directory(state_dir) if s.enabled else None, tag=tag, log=log)
