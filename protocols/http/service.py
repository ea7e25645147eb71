"""The HTTP service: mitmproxy 11 embedded as a library in the service's own event loop.

Owns: building one mitmproxy `Master` (no console, no web UI, no `master.run()`: the worker's loop
is the loop) with only the addons we need (mitmproxy's `Proxyserver` for its options, our
`PolicyAddon`), binding the guest-side listeners ourselves (so SO_REUSEPORT and the original
destination are ours to handle), one mitmproxy connection handler per accepted connection,
connection limits, reload and drain.
Must not: decide anything about a request (the addon does) or open upstream connections itself.

Why not mitmproxy's own mode servers: its transparent mode closes any connection whose
SO_ORIGINAL_DST lookup fails (a guest using the listener directly, loopback tests) and it never sets
SO_REUSEPORT. Here the original destination is read with the same `getsockopt(SO_ORIGINAL_DST)`
mitmproxy uses; when it fails or equals the listener's own address, the guest was not redirected
and the Host header (resolved through our DNS) decides where to connect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any, ClassVar

from mitmproxy import hooks as mhooks
from mitmproxy import options as moptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.master import Master
from mitmproxy.platform import original_addr
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler

from protocols.addr import hostport
from protocols.base import ServiceContext
from protocols.http.addon import HOOKS, ConnInfo, PolicyAddon
from protocols.http.resolve import UpstreamResolver
from protocols.http.settings import HTTPSettings
from protocols.http.workers import WorkerPool, WorkerSpec, listening_socket

_MODE = mode_specs.ProxyMode.parse("regular")


class GuestConnectionHandler(ProxyConnectionHandler):
    """mitmproxy's connection handler with hooks dispatched straight to our addon.

    mitmproxy's own `handle_hook` walks every loaded addon by method name and then fires an extra
    `update` hook per flow event; with one addon that matters that is pure overhead (about a third
    of the CPU per small request here). The dispatch table is built from `addon.HOOKS`, which
    `verify_hooks` checks at start-up, so registration stays explicit."""

    dispatch: dict[str, Any] = {}

    async def handle_hook(self, hook: Any) -> None:
        fn = self.dispatch.get(hook.name)
        if fn is None:
            return
        with self.timeout_watchdog.disarm():
            (data,) = hook.args()
            await fn(data)


def _original_dst(sock: socket.socket | None) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST when the kernel redirected this connection, else None."""
    if sock is None or original_addr is None:
        return None
    try:
        dst = original_addr(sock)
    except OSError:
        return None  # no conntrack entry: the guest connected to us directly
    own = sock.getsockname()
    if (dst[0], dst[1]) == (own[0], own[1]):
        return None
    return (str(dst[0]), int(dst[1]))


class HTTPService:
    name: ClassVar[str] = "http"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.master: Master | None = None
        self.addon: PolicyAddon | None = None
        self.resolver: UpstreamResolver | None = None
        self._servers: list[tuple[str, asyncio.base_events.Server]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listen_addrs: set[tuple[str, int]] = set()
        self._accepting = False
        self.refused = 0
        self.inherited: dict[str, list[socket.socket]] | None = None  # set in SO_REUSEPORT workers
        self.pool: WorkerPool | None = None
        self._dispatch: dict[str, Any] = {}

    @property
    def settings(self) -> HTTPSettings:
        return self.ctx.settings

    # -- lifecycle ------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        s = self.settings
        confdir = Path(self.ctx.state_dir) / "mitmproxy"
        return {
            "confdir": str(confdir),
            "connection_strategy": "lazy",
            "stream_large_bodies": str(s.limits.stream_above),
            "ssl_insecure": False,
            "http2": False,  # we speak HTTP/1 to guests; keep the same version upstream
            "http3": False,
            "websocket": True,
            "rawtcp": False,
            "validate_inbound_headers": True,
            "keep_host_header": True,
            "server": False,  # mitmproxy's own listeners stay off; we bind ours
            "mode": [],
        }

    async def start(self) -> list[str]:
        s = self.settings
        for name in ("mitmproxy", "hpack", "h2", "wsproto"):
            logging.getLogger(name).setLevel(logging.WARNING)
        confdir = Path(self.ctx.state_dir) / "mitmproxy"
        confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        dns_settings = getattr(self.ctx.config, "dns", None) if self.ctx.config is not None else None
        if self.resolver is None:  # tests may inject one before start()
            self.resolver = UpstreamResolver(dns_settings, s.hosts, timeout=s.timeouts.dns, log=self.log)
        if self.resolver.source == "system":
            self.log.warning("http: no dns section configured; upstream names resolve through the system resolver")
        loop = asyncio.get_running_loop()
        opts = moptions.Options()
        self.master = Master(opts, event_loop=loop)
        # mitmproxy would turn every log record of this process into an `add_log` hook task.
        self.master._legacy_log_events.uninstall()
        self._listen_addrs = {a for _, a in s.all_listeners}
        self.addon = PolicyAddon(self.ctx, self.resolver, self._listen_addrs)
        self.addon.ssl_context()  # read the CA file now, before the worker drops privileges
        self.master.addons.add(Proxyserver(), self.addon)
        self._dispatch = {name: getattr(self.addon, name) for name in HOOKS if name != "load"}
        opts.update(**self._options())
        await self.master.addons.trigger_event(mhooks.RunningHook())
        out: list[str] = []
        spawn = s.workers - 1 if self.inherited is None else 0  # workers never spawn workers
        extra: list[list[socket.socket]] = [[] for _ in range(max(0, spawn))]
        fds: list[dict[str, list[int]]] = [{} for _ in extra]
        seen: dict[str, int] = {}
        try:
            for kind, (host, port) in s.all_listeners:
                if self.inherited is not None:  # an SO_REUSEPORT worker: the parent bound for us
                    sock = self.inherited[kind][seen.get(kind, 0)]
                    seen[kind] = seen.get(kind, 0) + 1
                    server = await asyncio.start_server(lambda r, w, k=kind: self._accept(k, r, w), sock=sock)
                elif extra:
                    sock = listening_socket(host, port)
                    port = sock.getsockname()[1]
                    for i in range(len(extra)):
                        other = listening_socket(host, port)
                        extra[i].append(other)
                        fds[i].setdefault(kind, []).append(other.fileno())
                    server = await asyncio.start_server(lambda r, w, k=kind: self._accept(k, r, w), sock=sock)
                else:
                    server = await asyncio.start_server(
                        lambda r, w, k=kind: self._accept(k, r, w), host, port, reuse_address=True, backlog=1024
                    )
                self._servers.append((kind, server))
                bound = server.sockets[0].getsockname()
                out.append(f"tcp {hostport(bound[0], bound[1])} (http {kind})")
            if extra:
                self.pool = WorkerPool(self.ctx.audit.emit, self.log)
                for i, socks in enumerate(extra):
                    await self.pool.spawn(self._worker_spec(i + 1, fds[i]), socks)
                out.append(f"http: {s.workers} processes share these ports (SO_REUSEPORT)")
        except OSError:
            for _, srv in self._servers:
                srv.close()
            self._servers.clear()
            for socks in extra:
                for sock in socks:
                    sock.close()
            raise
        # what is really bound (port 0 in tests) is what the loop check must know
        self._listen_addrs.clear()
        for _, srv in self._servers:
            for sock in srv.sockets:
                name = sock.getsockname()
                self._listen_addrs.add((str(name[0]), int(name[1])))
        self._accepting = True
        return out

    def _worker_spec(self, index: int, fds: dict[str, list[int]]) -> WorkerSpec:
        engine = self.ctx.engine
        config = self.ctx.config
        return WorkerSpec(
            index=index,
            settings=self.settings,
            policy_file=str(engine.file),
            guest_names=frozenset(g for g in engine.guests if g != "unknown"),
            guests=self.ctx.guests,
            dns=getattr(config, "dns", None) if config is not None else None,
            state_dir=str(self.ctx.state_dir),
            fds=fds,
            user=getattr(config, "user", None) if config is not None else None,
            log_level=self.log.getEffectiveLevel(),
            capture=getattr(config, "forensics", None) if config is not None else None,
        )

    def bound_addresses(self) -> dict[str, list[tuple[str, int]]]:
        """{kind: [(host, port), ...]} as actually bound (tests use port 0)."""
        out: dict[str, list[tuple[str, int]]] = {}
        for kind, srv in self._servers:
            for sock in srv.sockets:
                name = sock.getsockname()
                out.setdefault(kind, []).append((name[0], name[1]))
        return out

    async def _accept(self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self.master is not None and self.addon is not None
        if not self._accepting or len(self.addon.conns) >= self.settings.limits.connections:
            self.refused += 1
            writer.close()
            return
        self._tasks.add(task)
        handler: ProxyConnectionHandler | None = None
        try:
            sock = writer.get_extra_info("socket")
            peer = writer.get_extra_info("peername")
            orig = _original_dst(sock) if kind in ("transparent", "passthrough") else None
            handler = GuestConnectionHandler(self.master, reader, writer, self.master.options, _MODE)
            handler.dispatch = self._dispatch
            handler.timeout_watchdog.timeout = self.settings.timeouts.idle  # type: ignore[assignment]
            handler.layer = modes.HttpProxy(handler.layer.context)
            info = ConnInfo(
                kind=kind,
                guest=self.ctx.guests.lookup(str(peer[0])),
                src=hostport(str(peer[0]), int(peer[1])),
                orig_dst=orig,
            )
            self.addon.conns[handler.client.id] = info
            await handler.handle_client()
        except asyncio.CancelledError:
            writer.close()
            raise
        except Exception:
            self.log.exception("http: connection handler failed")
            writer.close()
        finally:
            if handler is not None:
                info_done = self.addon.conns.pop(handler.client.id, None)
                if info_done is not None:
                    self.addon.connection_closed(info_done)
            self._tasks.discard(task)

    async def reload(self, settings: Any, engine: Any) -> None:
        old: HTTPSettings = self.ctx.settings
        self.ctx.settings = settings
        self.ctx.engine = engine
        if settings.all_listeners != old.all_listeners or settings.workers != old.workers:
            self.log.warning("http: listener changes take effect on restart, not on reload")
        if self.addon is not None and settings.ca_file != old.ca_file:
            self.addon.reset_tls()
        if self.resolver is not None:
            self.resolver.hosts = dict(settings.hosts)
        if self.pool is not None:
            self.pool.send_all({
                "t": "reload",
                "settings": settings,
                "policy_file": str(engine.file),
                "guest_names": frozenset(g for g in engine.guests if g != "unknown"),
                "guests": self.ctx.guests,  # the worker swapped new guest addresses in already
            })
        if self.master is not None:
            self.master.options.update(
                stream_large_bodies=str(settings.limits.stream_above),
                proxyvm_header_size=settings.limits.header_size,
                proxyvm_header_timeout=settings.timeouts.header,
            )

    def quarantine_changed(self) -> None:
        """The worker replaced ctx.quarantine: the SO_REUSEPORT children need the same table."""
        if self.pool is not None:
            self.pool.send_all({"t": "quarantine", "table": dict(self.ctx.quarantine)})

    async def drain(self, timeout: float) -> None:
        self._accepting = False
        for _, srv in self._servers:
            srv.close()
        pool_stop = asyncio.create_task(self.pool.stop(timeout)) if self.pool is not None else None
        if self._tasks:
            # in-flight connections finish on their own (keep-alive ones idle out) until the deadline
            await asyncio.wait(list(self._tasks), timeout=max(0.0, timeout))
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for _, srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except TimeoutError:
                pass
        self._servers.clear()
        if pool_stop is not None:
            await pool_stop
            self.pool = None
        if self.master is not None:
            await self.master.addons.trigger_event(mhooks.DoneHook())
        if self.resolver is not None:
            try:
                await self.resolver.close()
            except Exception:
                self.log.debug("http: resolver close failed", exc_info=True)

    def health(self) -> dict[str, Any]:
        conns = len(self.addon.conns) if self.addon else 0
        failures = self.addon.failures if self.addon else 0
        state = "ok" if self._servers and self._accepting else "degraded"
        if self.pool is not None:
            conns += self.pool.connections()
            if self.pool.alive() < len(self.pool.workers):
                state = "degraded"
        return {
            "state": state,
            "workers": 1 + (self.pool.alive() if self.pool is not None else 0),
            "worker_restarts": self.pool.restarts if self.pool is not None else 0,
            "connections": conns,
            "refused": self.refused,
            "hook_failures": failures,
            "listeners": [f"{k} {hostport(*a)}" for k, v in self.bound_addresses().items() for a in v],
            "pid": os.getpid(),
            "traffic": self._traffic(),
            "capture": self._capture(),
        }

    def _capture(self) -> dict[str, Any]:
        """Forensic capture counters of this process plus its SO_REUSEPORT children's."""
        from protocols.capture import sum_health

        cap = self.ctx.capture
        parts = [cap.health() if cap is not None else {}]
        if self.pool is not None:
            parts += [h.health.get("capture") or {} for h in self.pool.workers]
        return sum_health(parts)

    def _traffic(self) -> dict[str, Any]:
        """This process's counters plus, in the parent, its SO_REUSEPORT children's (for /metrics)."""
        from protocols.http.addon import new_traffic, sum_traffic

        parts = [self.addon.traffic if self.addon else new_traffic()]
        if self.pool is not None:
            parts += [h.health.get("traffic") or {} for h in self.pool.workers]
        return sum_traffic(parts)
