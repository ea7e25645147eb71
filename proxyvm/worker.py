"""One protocol service in its own process (a compartment), driven by the supervisor.

Owns: loading config + policy for one service, building its `ServiceContext` (with this process's
index among the service's `workers: N`; above 1 the service binds with SO_REUSEPORT), opening the
service's shared rate table (policy.shared_rate) before the drop, binding (via the service's
`start`), dropping privileges after binding and checking that the drop held, forwarding audit records and health to the
supervisor, and applying reload/drain requests.
Must not: write the audit log (the supervisor is the only writer) or outlive its supervisor (EOF on
the channel means drain and exit).

Run as: python -m proxyvm.worker --service NAME --fd N [--index I] [--rates TABLE] [--config PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pwd
import signal
import socket
import sys
import time
from typing import Any

import orjson

from policy import load_policy
from protocols import capture
from protocols.base import MilliClock, reload_service, stamp_record
from protocols.quarantine import apply_table
from proxyvm import channel
from proxyvm.config import load_all
from proxyvm.inventory import Inventory
from proxyvm.services import load_service_class

AUDIT_FLUSH_S = 0.02
AUDIT_BUFFER_MAX = 64 * 1024 * 1024  # bytes; beyond this the supervisor is stuck: count drops, don't grow
HEALTH_EVERY_S = 2.0


def _default(value: Any) -> str:
    return str(value)


_OPTS = orjson.OPT_NON_STR_KEYS


def encode_record(record: dict[str, Any]) -> bytes:
    """One record as the JSON object the log stores (keys in the order the record was built)."""
    try:
        return orjson.dumps(record, default=_default, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError):
        # Deeper than orjson nests, or an integer beyond 64 bits: the stdlib encoder copes.
        return json.dumps(record, default=str, ensure_ascii=False, separators=(",", ":")).encode()


class ChannelAudit:
    """AuditSink that encodes every record once, here (orjson), and hands the lines to the
    supervisor in the same event-loop iteration: the supervisor adds `seq` and `prev` without
    decoding. `emit` never blocks and never raises. Records come complete from
    `ServiceContext.record`/`event` (`ts`, digest); one without `ts` gets both here
    (`protocols.base.stamp_record`), at the cost of a copy.

    Frame on the channel: `\x1e<length>\n` then `length` bytes of lines, one per record:
    `kind \t protocol \t guest \t verdict \t rule \t duration_ms \t <JSON object>` (the fields
    before the JSON feed the supervisor's metrics; JSON never holds a raw tab or newline)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pending = 0  # records in buf
        self.dropped = 0
        self.policy = ""  # digest stamped on a decision record that arrives without `ts` (stamp_record)
        self.writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._ts = MilliClock()

    def attach(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        self.writer, self._loop = writer, loop
        self.flush()

    def emit(self, record: dict[str, Any]) -> None:
        if len(self.buf) >= AUDIT_BUFFER_MAX:
            self.dropped += 1
            return
        if "ts" not in record:  # not built by ServiceContext: one copy
            record = stamp_record(record, self._ts(), self.policy)
        g = record.get
        self.buf += (f"{g('kind') or ''}\t{g('protocol') or ''}\t{g('guest') or ''}\t{g('verdict') or ''}\t"
                     f"{g('rule') or ''}\t{g('duration_ms') or ''}\t").encode() + encode_record(record) + b"\n"
        self.pending += 1
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand what is buffered to the channel (the kernel takes it at once unless the supervisor
        lags; then the transport buffers it, up to AUDIT_BUFFER_MAX before records are dropped)."""
        self._scheduled = False
        w = self.writer
        if not self.buf or w is None or w.is_closing():
            return
        if w.transport.get_write_buffer_size() > AUDIT_BUFFER_MAX:
            return  # the supervisor is behind: keep buffering here (bounded above)
        data, self.buf, self.pending = bytes(self.buf), bytearray(), 0
        w.write(b"\x1e%d\n" % len(data) + data)


def drop_privileges(user: str | None, log: logging.Logger) -> None:
    """After binding: become `user` (no supplementary groups). No-op when not root or no user."""
    if os.getuid() != 0 or not user:
        return
    # Codecs and modules that the standard library loads lazily (name resolution needs idna)
    # must be loaded while their files are still readable: an interpreter installed under a
    # private home (pyenv in /root) is unreadable to the service user.
    "localhost".encode("idna")
    import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread (policy reloads)
    import encodings.idna  # noqa: F401
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        log.warning("user %r does not exist; keeping root", user)
        return
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0 or os.getegid() != pw.pw_gid or os.getgroups():
        raise RuntimeError("failed to drop root")  # pragma: no cover - a kernel bug
    try:  # and root cannot be had back
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover
        raise RuntimeError("privileges dropped but root could be regained")
    log.info("dropped privileges to %s (uid %d)", user, pw.pw_uid)


class Worker:
    def __init__(self, name: str, config_path: str | None, sock: socket.socket, policy_path: str | None = None,
                 index: int = 0, rates: str | None = None):
        self.name = name
        self.index = index  # among the service's `workers: N`
        self.rates_path = rates  # the service's shared rate table (the supervisor created it)
        self.rates: Any = None  # policy.shared_rate.SharedRates, opened before the privilege drop
        self.config_path = config_path
        self.policy_path = policy_path  # a fleet policy bundle in force instead of the config's `policy:`
        self.sock = sock
        self.log = logging.getLogger(f"proxyvm.{name}")
        self.audit = ChannelAudit()
        self.service: Any = None
        self.engine: Any = None  # the policy in force in this process
        self.inventory = Inventory()  # guest addresses; replaced in place on reload
        self.writer: asyncio.StreamWriter | None = None
        self.stopping = asyncio.Event()
        self._drain_timeout = 10.0  # the supervisor's drain message may change it

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(channel.encode(msg))

    async def run(self) -> int:
        from protocols.base import ServiceContext

        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        self.audit.attach(self.writer, asyncio.get_running_loop())
        try:
            config, engine = load_all(self.config_path, policy_path=self.policy_path)
        except Exception as e:  # noqa: BLE001 - reported to the supervisor verbatim, then exit
            self.send({"t": "fatal", "error": str(e)})
            await self.writer.drain()
            return 1
        settings = getattr(config, self.name)
        cls = load_service_class(self.name)
        self.inventory = Inventory(config.guests)
        if self.rates_path:
            from policy.shared_rate import SharedRates

            try:
                self.rates = SharedRates(self.rates_path)
            except (OSError, ValueError) as e:
                self.send({"t": "fatal", "error": f"rate table: {e}"})
                await self.writer.drain()
                return 1
            engine.shared_rates = self.rates
        self.engine = engine
        ctx = ServiceContext(
            settings=settings,
            engine=engine,
            audit=self.audit,
            guests=self.inventory,
            log=self.log,
            config=config,
            state_dir=config.state_dir,
            timestamp=MilliClock(),
            worker=self.index,
            workers=config.workers_of(self.name),
            capture=capture.make(config.forensics, config.state_dir, f"{self.name}-{os.getpid()}", self.log),
        )
        self._set_policy(ctx, getattr(engine, "digest", ""))
        self.service = cls(ctx)
        self.ctx = ctx
        try:
            listening = await self.service.start()
        except Exception as e:
            self.log.exception("start failed")
            self.send({"t": "fatal", "error": f"{type(e).__name__}: {e}"})
            await self.writer.drain()
            return 1
        drop_privileges(config.user, self.log)
        ctx.capture.start()  # the writer thread (as the service user: it creates the pcap files)
        self.send({"t": "ready", "listening": listening, "pid": os.getpid(), "index": self.index})
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor decides reloads
        flusher = asyncio.create_task(self._flush_audit())
        health = asyncio.create_task(self._health())
        commands = asyncio.create_task(self._commands(reader))
        await self.stopping.wait()
        await self.service.drain(self._drain_timeout)
        await asyncio.to_thread(ctx.capture.close, 2.0)  # what is queued is written
        for t in (health, commands):
            t.cancel()
        self.stopping.set()
        flusher.cancel()
        self._send_audit()
        try:
            await asyncio.wait_for(self.writer.drain(), 5)
        except (ConnectionError, TimeoutError):
            pass
        return 0

    def _set_policy(self, ctx: Any, digest: str) -> None:
        """The digest of the policy in force: ServiceContext.record stamps it on decisions (the
        sink's fallback for a record without `ts` uses the same one)."""
        ctx.policy = self.audit.policy = digest

    def _send_audit(self) -> None:
        self.audit.flush()

    async def _flush_audit(self) -> None:
        """Backpressure and leftovers: records are flushed as they come (ChannelAudit.flush);
        this retries what a lagging supervisor left buffered and waits for the channel to drain."""
        while True:
            await asyncio.sleep(AUDIT_FLUSH_S)
            self._send_audit()
            if self.writer is not None:
                try:
                    await self.writer.drain()
                except ConnectionError:
                    self.stopping.set()
                    return

    async def _health(self) -> None:
        while True:
            try:
                h = dict(self.service.health())
            except Exception as e:  # noqa: BLE001 - a broken health() is itself a health fact
                h = {"state": "degraded", "error": f"health() failed: {e}"}
            if self.audit.dropped:
                h["audit_dropped"] = self.audit.dropped
            if self.rates is not None and self.rates.full:
                h["rate_table_full"] = self.rates.full
            cap = getattr(self, "ctx", None) and self.ctx.capture
            if cap is not None and "capture" not in h:
                h["capture"] = cap.health()
            self.send({"t": "health", "h": h})
            await asyncio.sleep(HEALTH_EVERY_S)

    async def _commands(self, reader: asyncio.StreamReader) -> None:
        while True:
            msg = await channel.read_message(reader)
            if msg is None:  # supervisor gone: never run unsupervised
                self.log.warning("supervisor channel closed; draining")
                self.stopping.set()
                return
            t = msg.get("t")
            if t == "reload":
                await self._reload(msg.get("config"))
            elif t == "quarantine":  # the whole table after each change (proxyvm.quarantine)
                apply_table(self.ctx, self.service, msg.get("table"))
            elif t == "drain":
                self._drain_timeout = float(msg.get("timeout", 10.0))
                self.stopping.set()
                return

    async def _reload(self, packed: str | None) -> None:
        started = time.monotonic()
        try:
            # Compiling a policy (a 1M-name blocklist takes seconds) runs off the event loop, so
            # cached answers and open connections keep being served during a reload.
            if packed is None:
                config, engine = await asyncio.to_thread(load_all, self.config_path, policy_path=self.policy_path)
            else:
                # Parsed (secrets included) by the supervisor; the policy is compiled here.
                config = channel.unpack(packed)
                engine = await asyncio.to_thread(load_policy, config.policy_file, guests=set(config.guests))
            inventory = Inventory(config.guests)  # validated by the supervisor already
            previous = Inventory()
            previous.replace(self.inventory)
            self.inventory.replace(inventory)
            if self.rates is not None:
                engine.shared_rates = self.rates  # same table: buckets of unchanged rules go on
            old_digest = self.ctx.policy
            self._set_policy(self.ctx, getattr(engine, "digest", ""))
            try:
                await reload_service(self.service, self.engine, getattr(config, self.name), engine)
            except BaseException:
                self._set_policy(self.ctx, old_digest)
                self.inventory.replace(previous)
                raise
            self.engine = engine
        except Exception as e:  # noqa: BLE001 - old config stays in force; report why
            self.log.error("reload rejected, old policy stays in force: %s", e)
            self.send({"t": "reloaded", "ok": False, "errors": str(e)})
            return
        self.send({"t": "reloaded", "ok": True, "seconds": round(time.monotonic() - started, 3)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxyvm-worker")
    ap.add_argument("--service", required=True)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--config")
    ap.add_argument("--policy", help="rules file in force instead of the config's policy: (a fleet bundle)")
    ap.add_argument("--index", type=int, default=0, help="this worker's index among the service's workers")
    ap.add_argument("--rates", help="the service's shared rate table (created by the supervisor)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("PROXYVM_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {args.service}{'.' + str(args.index) if args.index else ''}[%(process)d] "
               "%(levelname)s %(message)s",
        stream=sys.stderr,
    )
    sock = socket.socket(fileno=args.fd)
    return asyncio.run(Worker(args.service, args.config, sock, args.policy, args.index, args.rates).run())


if __name__ == "__main__":
    sys.exit(main())
