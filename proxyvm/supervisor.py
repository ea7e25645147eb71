"""The supervisor behind `proxyvm run`: `workers: N` processes per protocol service (default 1),
each restarted when it dies.

Owns: spawning workers (`proxyvm.worker`, the same code path for every worker of every service)
with a control channel each, restart with backoff (per worker: the others keep serving), the
shared rate table of each service (created before its workers start, policy.shared_rate), one
/healthz entry per service with its workers, the single audit writer (records arrive from workers
over their channels),
the single audit writer (records arrive from workers over their channels), the admin endpoint,
and the signals: SIGHUP validates config + policy and, only if valid, tells every worker to reload
(an invalid file is rejected with its errors and the old one stays in force); SIGTERM/SIGINT drain
every worker, flush the audit log and exit 0.
Must not: parse guest traffic (that happens only in the compartments), or read secrets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from policy import shared_rate
from proxyvm import channel, quarantine
from proxyvm.admin import AdminServer, Metrics
from proxyvm.audit import AuditLog
from proxyvm.config import load_all
from proxyvm.fleet import node as fleet_node

log = logging.getLogger("proxyvm")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker up this long has its backoff reset
READY_TIMEOUT = 60.0
LEARN_WARNING_EVERY = 3600.0  # `mode: learn` lets everything through: say so in the log every hour
LEARN_WARNING = ("policy mode is learn: every request is allowed and recorded, nothing is enforced; "
                 "run `proxyvm learn`, review, then switch to mode: monitor or enforce")


@dataclass
class ServiceState:
    """One worker process of a service (`index` among its `workers: N`)."""

    name: str  # the service
    index: int = 0
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    state: str = "starting"  # starting | ready | restarting | failed | stopped
    listening: list[str] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    last_error: str = ""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reload_waiter: asyncio.Future[dict[str, Any]] | None = None

    @property
    def label(self) -> str:
        """For logs: "dns" (worker 0), "dns.1", ..."""
        return f"{self.name}.{self.index}" if self.index else self.name


class Supervisor:
    def __init__(self, config_path: str | None, config: Any, services: list[str], unavailable: dict[str, str],
                 policy_digest: str = "", policy_mode: str = "enforce"):
        self.config_path = config_path
        self.config = config
        self.policy_mode = policy_mode  # of the policy the workers run (updated by a successful reload)
        self.learn_warning_every = LEARN_WARNING_EVERY
        self.policy_digest = policy_digest  # "sha256:..." of the policy the workers run
        # service -> its workers, in index order (`workers: N` of its section)
        self.services: dict[str, list[ServiceState]] = {
            name: [ServiceState(name, i) for i in range(config.workers_of(name))] for name in services}
        self.unavailable = unavailable
        self.metrics = Metrics()
        self.audit = AuditLog(config.audit.path, config.audit.rotate_size, config.audit.keep)
        self.admin: AdminServer | None = None
        self.stopping = asyncio.Event()
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # Called with every record as written (a dict with its `seq`), after it is in the chain:
        # detectors hook in here. Must not block; an exception is logged and the record stays.
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        # Called with (seq, the exact line bytes) of every record as written: audit shipping hooks
        # in here (the stream must carry the chain's own bytes). Must not block.
        self.line_observers: list[Callable[[int, bytes], None]] = []
        self.quarantine: quarantine.Quarantine | None = None  # table + control socket, set in run()
        from proxyvm.service_metrics import ServiceMetrics  # per-service families from the health dicts

        self.metrics.registry.register(ServiceMetrics(self))
        self.fleet: Any = None  # proxyvm.fleet.node.FleetNode when `fleet:` is set (run())
        self.policy_path: Path | None = None  # a fleet policy bundle in force instead of `policy:`
        self.rate_tables: dict[str, Path] = {}  # service -> its shared rate table (run())

    # -- audit --------------------------------------------------------------------------------
    def write_audit(self, records: list[dict[str, Any]]) -> None:
        observers = self.observers
        for rec in records:
            written = self.audit.append(rec)
            self.metrics.observe_record(rec)
            for lfn in self.line_observers:
                lfn(written["seq"], self.audit.last_line)
            for fn in observers:
                try:
                    fn(written)
                except Exception:  # noqa: BLE001 - a broken detector must not stop the writer
                    log.exception("audit observer failed")
        self.metrics.audit_records.inc(len(records))

    def write_encoded(self, payload: bytes) -> None:
        """Records a worker encoded (an audit frame): chain, count and observe them, decoding a
        record only when an observer (a detector) wants it."""
        append = self.audit.append_encoded
        observe = self.metrics.observe_summary
        observers = self.observers
        line_observers = self.line_observers
        n = 0
        for line in payload.split(b"\n"):
            if not line:
                continue
            try:
                kind, protocol, guest, verdict, rule, duration, body = line.split(b"\t", 6)
                seq = append(body)
            except ValueError:
                log.error("audit: a malformed record from a worker was not written: %r", line[:200])
                self.metrics.audit_malformed.inc()
                continue
            n += 1
            observe(kind, protocol, guest, verdict, rule, duration)
            for lfn in line_observers:
                lfn(seq, self.audit.last_line)
            if observers:
                rec = orjson.loads(body)
                rec["seq"] = seq
                for fn in observers:
                    try:
                        fn(rec)
                    except Exception:  # noqa: BLE001 - a broken detector must not stop the writer
                        log.exception("audit observer failed")
        self.metrics.audit_records.inc(n)

    def audit_event(self, event: str, reason: str, kind: str = "service", **extra: Any) -> None:
        """The supervisor's own records (start, crash, reload): protocol "proxyvm", with a `kind`
        (`service` or `reload`) so that no reader takes them for decisions."""
        self.write_audit(
            [
                {
                    "kind": kind,
                    "guest": None,
                    "src": None,
                    "protocol": "proxyvm",
                    "verdict": None,
                    "rule": None,
                    "at": self.config.source,
                    "reason": reason,
                    "request": {"event": event},
                    "upstream": None,
                    **extra,
                }
            ]
        )
        self.audit.flush()

    # -- health -------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {"status": "ok", "policy_mode": self.policy_mode, "services": {}}
        if self.policy_mode == "learn":
            body["warnings"] = [LEARN_WARNING]
        ok = True
        for name, group in self.services.items():
            states = [_worker_state(w) for w in group]
            svc_ok = all(st == "ok" for st in states)
            ok = ok and svc_ok
            first = group[0]
            errors = [f"{w.label}: {w.last_error}" if w.index else w.last_error for w in group if w.last_error]
            body["services"][name] = {
                # ok when every worker is; a dead worker makes the service degraded while the others
                # serve (restarting / failed only when none is up)
                "state": "ok" if svc_ok else (next(st for st in states if st != "ok") if len(group) == 1 or
                                              "ok" not in states else "degraded"),
                "pid": first.proc.pid if first.proc else None,
                "listening": first.listening,
                "restarts": sum(w.restarts for w in group),
                **({"last_error": "; ".join(errors)} if errors else {}),
                "detail": self.service_health(name),
                "workers": [
                    {"index": w.index, "pid": w.proc.pid if w.proc else None, "state": st, "restarts": w.restarts,
                     **({"last_error": w.last_error} if w.last_error else {}), "detail": w.health}
                    for w, st in zip(group, states, strict=True)
                ],
            }
        for name, why in self.unavailable.items():
            body["services"][name] = {"state": "unavailable", "reason": why}
        if not ok:
            body["status"] = "degraded"
        if self.fleet is not None:  # fleet trouble never degrades serving guests
            body["fleet"] = self.fleet.health()
        return ok, body

    def service_health(self, name: str) -> dict[str, Any]:
        """The health of service `name` as one dict: its workers' health dicts merged (counters
        summed; see `proxyvm.service_metrics.merge_health`)."""
        from proxyvm.service_metrics import merge_health

        group = self.services.get(name) or []
        if len(group) == 1:
            return group[0].health
        return merge_health([w.health for w in group if w.health])

    def procs(self) -> list[ServiceState]:
        """Every worker process of every service."""
        return [w for group in self.services.values() for w in group]

    def _set_up(self, name: str) -> None:
        """proxyvm_service_up: 1 while every worker of the service is ready."""
        self.metrics.up.labels(name).set(int(all(w.state == "ready" for w in self.services.get(name, []))))

    # -- workers ------------------------------------------------------------------------------
    async def _spawn(self, s: ServiceState) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "proxyvm.worker", "--service", s.name, "--fd", str(child.fileno()),
                "--index", str(s.index)]
        rates = self.rate_tables.get(s.name)
        if rates is not None:
            argv += ["--rates", str(rates)]
        if self.config_path:
            argv += ["--config", self.config_path]
        if self.policy_path is not None:
            argv += ["--policy", str(self.policy_path)]
        s.ready.clear()
        s.state = "starting"
        s.proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(child.fileno(),))
        child.close()
        s.started_at = time.monotonic()
        reader, s.writer = await asyncio.open_unix_connection(sock=parent, limit=channel.MAX_LINE)
        self._spawn_task(self._read_worker(s, reader))

    def _spawn_task(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _read_worker(self, s: ServiceState, reader: asyncio.StreamReader) -> None:
        proc = s.proc
        assert proc is not None
        try:
            while True:
                msg = await channel.read_any(reader)
                if msg is None:
                    break
                if isinstance(msg, bytes):
                    self.write_encoded(msg)
                    continue
                t = msg.get("t")
                if t == "audit":  # records as dicts (older workers, tests)
                    self.write_audit(msg.get("r", []))
                elif t == "ready":
                    s.state = "ready"
                    s.listening = list(msg.get("listening", []))
                    s.last_error = ""
                    self._set_up(s.name)
                    for item in s.listening:
                        log.info("%s listening on %s", s.label, item)
                    if self.quarantine is not None:  # every (re)started worker gets the table
                        self.quarantine.send_to(s)
                    s.ready.set()
                elif t == "health":
                    s.health = dict(msg.get("h", {}))
                elif t == "reloaded":
                    if s.reload_waiter and not s.reload_waiter.done():
                        s.reload_waiter.set_result(msg)
                elif t == "fatal":
                    s.last_error = str(msg.get("error", ""))
                    log.error("%s failed: %s", s.label, s.last_error)
        except (ConnectionError, ValueError) as e:
            log.error("%s: control channel broken: %s", s.label, e)
        rc = await proc.wait()
        s.state = "restarting"
        self._set_up(s.name)
        if s.reload_waiter and not s.reload_waiter.done():
            s.reload_waiter.set_result({"ok": False, "errors": "worker exited"})
        if self.draining:
            s.state = "stopped"
            s.ready.set()
            return
        # An unexpected exit: log, audit, restart with backoff.
        if time.monotonic() - s.started_at > STABLE_AFTER:
            s.backoff = BACKOFF_FIRST
        s.restarts += 1
        self.metrics.restarts.labels(s.name).inc()
        why = s.last_error or (f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}")
        s.last_error = why
        s.state = "restarting"
        log.error("%s worker (pid %d) died: %s; restarting in %.1fs", s.label, proc.pid, why, s.backoff)
        self.audit_event("service_crash", f"{s.label} service died ({why}); restarting", service=s.name,
                         **({"worker": s.index} if len(self.services.get(s.name, ())) > 1 else {}))
        s.ready.set()
        delay, s.backoff = s.backoff, min(s.backoff * 2, BACKOFF_MAX)
        try:
            await asyncio.wait_for(self.stopping.wait(), delay)
            return
        except TimeoutError:
            pass
        await self._spawn(s)

    # -- signals ------------------------------------------------------------------------------
    async def reload(self, policy_path: Path | None = None) -> bool:
        """SIGHUP: validate first; only a valid config + policy reaches the workers. `policy_path`:
        a fleet bundle's rules file (it then stays in force over later SIGHUPs)."""
        policy_path = policy_path or self.policy_path
        try:
            config, engine = load_all(self.config_path, policy_path=policy_path)
        except Exception as e:  # noqa: BLE001 - any load failure rejects the reload
            msg = str(e)
            log.error("reload rejected; the running policy stays in force:\n%s", msg)
            self.metrics.reloads.labels("rejected").inc()
            self.audit_event("reload_rejected", "new config/policy invalid; old one stays in force", kind="reload",
                             errors=msg, policy=self.policy_digest)
            return False
        changed = [n for n in ("audit", "admin", "user", "state_dir", "workers")
                   if getattr(config, n) != getattr(self.config, n)]
        if changed:
            log.warning("reload: %s changed; those take effect on restart", ", ".join(changed))
        results: dict[str, dict[str, Any]] = {}
        packed = channel.encode({"t": "reload", "config": channel.pack(config)})

        async def one(s: ServiceState) -> dict[str, Any]:
            assert s.writer is not None
            s.reload_waiter = asyncio.get_running_loop().create_future()
            s.writer.write(packed)
            try:
                return await asyncio.wait_for(s.reload_waiter, 120)
            except TimeoutError:
                return {"ok": False, "errors": "timeout"}

        ready = [s for s in self.procs() if s.state == "ready" and s.writer is not None]
        for s, r in zip(ready, await asyncio.gather(*(one(s) for s in ready)), strict=True):
            prev = results.get(s.name)
            if prev is None or (prev.get("ok") and not r.get("ok")):  # a service's result: its worst worker's
                results[s.name] = r
        ok = all(r.get("ok") for r in results.values())
        old_digest = self.policy_digest
        if ok:
            self.policy_path = policy_path
            self.policy_digest = engine.digest
            new_mode = str(getattr(engine, "mode", "enforce"))
            if new_mode != self.policy_mode:
                log.warning("policy mode is now %s (was %s)", new_mode, self.policy_mode)
                self.policy_mode = new_mode
        self.metrics.reloads.labels("ok" if ok else "partial").inc()
        self.audit_event(
            "reload", "policy and config reloaded" if ok else "reload failed in some services",
            kind="reload", services={k: v.get("ok") for k, v in results.items()},
            old_policy=old_digest, policy=engine.digest,
        )
        log.info("reload %s: %s", "done" if ok else "incomplete", {k: v.get("ok") for k, v in results.items()})
        return ok

    async def drain(self, timeout: float = 10.0) -> None:
        self.draining = True
        for s in self.procs():
            if s.writer and not s.writer.is_closing():
                try:
                    s.writer.write(channel.encode({"t": "drain", "timeout": timeout}))
                except ConnectionError:
                    pass
        for s in self.procs():
            if s.proc and s.proc.returncode is None:
                try:
                    await asyncio.wait_for(s.proc.wait(), timeout + 5)
                except TimeoutError:
                    log.error("%s did not drain in time; killing", s.label)
                    s.proc.kill()
                    await s.proc.wait()
        # let readers consume the last audit batches
        await asyncio.sleep(0.05)

    # -- main ---------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        hup_pending = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, hup_pending.set)
        if self.config.admin and self.config.admin.listen:
            host, port = self.config.admin.listen
            self.admin = AdminServer(host, port, self.metrics, self.health)
            if self.config.admin.console:  # the operator console (proxyvm.console)
                from proxyvm.console.server import attach as attach_console

                self.admin.console = attach_console(self)
            log.info("admin listening on %s (/healthz, /metrics)", await self.admin.start())
        self.quarantine = await quarantine.attach(self)  # quarantine table, control socket, detectors
        self.fleet = await fleet_node.attach(self) if self.config.fleet else None  # NATS, in the background
        for name, why in self.unavailable.items():
            log.warning("%s: not available yet — %s", name, why)
        self.audit_event("start", f"proxyvm started with {self.config.source}", services=list(self.services),
                         policy=self.policy_digest)
        for name in self.services:
            self.rate_tables[name] = shared_rate.create(shared_rate.table_path(self.config.state_dir, name))
        for s in self.procs():
            await self._spawn(s)
        for s in self.procs():
            try:
                await asyncio.wait_for(s.ready.wait(), READY_TIMEOUT)
            except TimeoutError:
                log.error("%s not ready after %ds", s.label, READY_TIMEOUT)
        if not self.services:
            log.warning("no service is enabled and available; serving only the admin endpoint")
        log.info("proxyvm ready")
        flush = asyncio.create_task(self._flush_loop())
        learn_warning = asyncio.create_task(self._learn_warning_loop())
        while not self.stopping.is_set():
            hup = asyncio.create_task(hup_pending.wait())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({hup, stop}, return_when=asyncio.FIRST_COMPLETED)
            hup.cancel()
            stop.cancel()
            if hup_pending.is_set() and not self.stopping.is_set():
                hup_pending.clear()
                try:
                    await self.reload()
                except Exception:  # a reload must never take the supervisor down
                    log.exception("reload failed")
                    self.metrics.reloads.labels("error").inc()
        log.info("draining")
        await self.drain()
        flush.cancel()
        learn_warning.cancel()
        self.audit_event("stop", "proxyvm stopped (SIGTERM)")
        if self.quarantine is not None:
            await self.quarantine.close()
        if self.fleet is not None:
            await self.fleet.close()
        self.audit.close()
        if self.admin:
            await self.admin.close()
        log.info("stopped")
        return 0

    async def _learn_warning_loop(self) -> None:
        """While the policy is in learn mode: a warning at start and every `learn_warning_every`."""
        while True:
            if self.policy_mode == "learn":
                log.warning(LEARN_WARNING)
            await asyncio.sleep(self.learn_warning_every)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.audit.flush()


def _worker_state(w: ServiceState) -> str:
    """One worker's state for /healthz: its own, or its service's health state once ready."""
    return w.state if w.state != "ready" else str(w.health.get("state", "ok"))


def prepare_dirs(config: Any) -> None:
    """Create state/audit directories owned by the service user (before workers drop root)."""
    user = getattr(config, "user", None)
    dirs = [config.state_dir, config.audit.path.parent]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    capture_dir = getattr(config, "capture_dir", None)
    if capture_dir is not None:
        try:
            capture_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:  # capture is evidence, not service: run without it (workers count errors)
            log.error("forensics: cannot create %s: %s; the services run, capture writes fail", capture_dir, e)
            capture_dir = None
    if os.getuid() == 0 and user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return
        os.chown(config.state_dir, pw.pw_uid, pw.pw_gid)
        if capture_dir is not None:
            os.chown(capture_dir, pw.pw_uid, pw.pw_gid)
