"""A minimal non-blocking UDP endpoint on the asyncio loop, for the SNMP hot path.

Owns: one datagram socket, reading every queued datagram per readiness event (asyncio's
transport reads one per loop iteration, which costs an extra epoll round per packet under load),
and sending without a user-space queue: if the kernel buffer is full the datagram is dropped and
counted, exactly what the network would do to UDP.
Must not: parse SNMP or decide anything.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

READ_BATCH = 64  # datagrams per readiness event before yielding to the loop
MAX_DATAGRAM = 65535


class UDPEndpoint:
    def __init__(self, sock: socket.socket, on_datagram: Callable[[bytes, Any], None],
                 on_error: Callable[[OSError], None] | None = None):
        sock.setblocking(False)
        self.sock = sock
        self.on_datagram = on_datagram
        self.on_error = on_error
        self.send_drops = 0
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._ready)
        self.closed = False

    @classmethod
    def bind(cls, host: str, port: int, on_datagram: Callable[[bytes, Any], None],
             reuse_port: bool = False) -> UDPEndpoint:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if reuse_port:  # `workers: N`: one socket per process on the same port
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
        except OSError:
            s.close()
            raise
        return cls(s, on_datagram)

    @classmethod
    def connect(cls, address: tuple[str, int], on_datagram: Callable[[bytes, Any], None],
                on_error: Callable[[OSError], None] | None = None) -> UDPEndpoint:
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
        fam, _, _, _, sa = infos[0]
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.connect(sa)
        except OSError:
            s.close()
            raise
        return cls(s, on_datagram, on_error)

    def _ready(self) -> None:
        recv = self.sock.recvfrom
        for _ in range(READ_BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ICMP errors surface here on connected sockets
                if self.on_error is not None:
                    self.on_error(e)
                continue
            self.on_datagram(data, addr)

    def sendto(self, data: bytes, addr: Any = None) -> None:
        try:
            if addr is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.send_drops += 1
        except OSError as e:
            self.send_drops += 1
            if self.on_error is not None:
                self.on_error(e)

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def stop_reading(self) -> None:
        """Stop accepting datagrams; replies can still be sent (drain)."""
        if not self.closed:
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._fd)
            self.sock.close()
