"""Original destinations in transparent gateway mode (the guest thinks it talks to the real server).

Owns: reading the original destination of a REDIRECTed TCP connection (`SO_ORIGINAL_DST`),
opening UDP sockets that receive TPROXY'd datagrams (`IP_TRANSPARENT` set before bind,
`IP_RECVORIGDSTADDR` for the original destination), and replying *from* that original address
so the guest's client accepts the answer.
Must not: decide anything or parse protocols; services call these and keep their own logic.

Facts (FIELD-NOTES): IP_TRANSPARENT needs CAP_NET_ADMIN/CAP_NET_RAW when set, so the listening
sockets are created in `start()`, before the worker drops root. Replies normally leave through the
listening socket itself (IP_PKTINFO source address), which needs no capability afterwards; only a
listener on another port than the guest used needs extra per-address sockets (`ReplyFrom`), and
those work only while CAP_NET_ADMIN is kept (systemd AmbientCapabilities in the VM image).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from protocols.addr import hostport

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_TRANSPARENT = 75
IPV6_ORIGDSTADDR = 74
IPV6_RECVORIGDSTADDR = 74
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

Address = tuple[str, int]


def tcp_original_dst(sock: socket.socket) -> Address | None:
    """The address a REDIRECTed IPv4 TCP connection was really for; None when not redirected
    (the socket's own address comes back then, which we report as None)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack_from("!H", raw, 2)[0]
    ip = socket.inet_ntoa(raw[4:8])
    dst = (ip, port)
    local = sock.getsockname()[:2]
    return None if dst == tuple(local) else dst


def _parse_sockaddr(data: bytes) -> Address | None:
    family = struct.unpack_from("=H", data, 0)[0]
    if family == socket.AF_INET and len(data) >= 8:
        return socket.inet_ntoa(data[4:8]), struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET6 and len(data) >= 24:
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), struct.unpack_from("!H", data, 2)[0]
    return None


def open_transparent_udp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket that accepts TPROXY'd datagrams for any destination and reports
    each one's original destination. `reuse_port`: SO_REUSEPORT (one socket per worker process)."""
    v6 = ipaddress.ip_address(host).version == 6
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6:
            s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            s.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        s.bind((host, port))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def recv_with_orig_dst(sock: socket.socket, bufsize: int = 65535) -> tuple[bytes, Address, Address | None]:
    """One datagram, its source and its original destination (None if the kernel gave none)."""
    data, anc, _flags, src = sock.recvmsg(bufsize, socket.CMSG_SPACE(32))
    orig: Address | None = None
    for level, kind, cdata in anc:
        if (level, kind) in ((socket.SOL_IP, IP_RECVORIGDSTADDR), (SOL_IPV6, IPV6_ORIGDSTADDR)):
            orig = _parse_sockaddr(cdata)
    return data, (src[0], src[1]), orig


class ReplyFrom:
    """Sends replies from arbitrary (original-destination) addresses. Keeps a small LRU of bound
    transparent sockets, one per source address."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._socks: OrderedDict[Address, socket.socket] = OrderedDict()

    def _sock(self, src: Address) -> socket.socket:
        s = self._socks.get(src)
        if s is not None:
            self._socks.move_to_end(src)
            return s
        v6 = ipaddress.ip_address(src[0]).version == 6
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if v6:
                s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.bind(src)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._socks[src] = s
        if len(self._socks) > self.limit:
            _, old = self._socks.popitem(last=False)
            old.close()
        return s

    def sendto(self, data: bytes, dst: Address, from_addr: Address) -> None:
        with contextlib.suppress(BlockingIOError):
            self._sock(from_addr).sendto(data, dst)

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()


def send_from(sock: socket.socket, reply: ReplyFrom, data: bytes, dst: Address, orig: Address | None) -> None:
    """Send `data` to the guest `dst` from its original destination `orig`. When the original port
    is the listener's own port (53/161/162 steered to listeners on the same ports), the listening
    socket itself sends, with IP_PKTINFO naming the source address: the socket's IP_TRANSPARENT
    flag, set before privileges were dropped, allows a non-local source with no capability now.
    Otherwise a per-address transparent socket (`reply`) sends it."""
    local = sock.getsockname()[:2]
    if orig is None or tuple(orig) == tuple(local):
        sock.sendto(data, dst)
    elif orig[1] == local[1] and sock.family == socket.AF_INET:
        pktinfo = struct.pack("=I4s4s", 0, socket.inet_aton(orig[0]), b"\0" * 4)
        sock.sendmsg([data], [(socket.SOL_IP, IP_PKTINFO, pktinfo)], 0, dst)
    else:
        reply.sendto(data, dst, orig)


class OrigSrc(tuple):
    """A guest's (ip, port) that also carries the original destination ("ip:port") it asked for,
    so a service can put it in the audit record without changing its call signatures."""

    orig: str | None = None

    @classmethod
    def of(cls, src: tuple, orig: Address | None) -> OrigSrc:
        out = cls(src)
        out.orig = hostport(orig[0], orig[1]) if orig else None
        return out


Handler = Callable[[bytes, Address, Address | None], Awaitable[bytes | None]]


class TransparentUDP:
    """Serve a TPROXY'd UDP port: `handler(data, src, orig_dst)` returns the reply (or None), which
    is sent from `orig_dst` when known, else from the listening socket."""

    def __init__(self, host: str, port: int, handler: Handler, reuse_port: bool = False):
        self.sock = open_transparent_udp(host, port, reuse_port)
        self.handler = handler
        self.reply = ReplyFrom()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):  # bounded burst so one flood cannot starve the loop
            try:
                data, src, orig = recv_with_orig_dst(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            t = asyncio.ensure_future(self._handle(data, src, orig))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _handle(self, data: bytes, src: Address, orig: Address | None) -> None:
        try:
            out = await self.handler(data, src, orig)
        except Exception:  # noqa: BLE001 - the service logs its own errors; the socket stays up
            return
        if out is None:
            return
        try:
            self.send_reply(out, src, orig)
        except OSError:
            pass

    def send_reply(self, data: bytes, dst: Address, orig: Address | None) -> None:
        send_from(self.sock, self.reply, data, dst, orig)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.reply.close()
