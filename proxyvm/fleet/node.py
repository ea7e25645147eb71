"""The fleet node: the supervisor's side of fleet mode (docs/deployment.md#fleet-mode-nats-jetstream).

Owns: the NATS connection of a running appliance (reconnecting for ever), the audit shipper's
task, the policy watcher (KV `PROXYVM_POLICY`, key `current`: verify the Ed25519 signature, refuse
older revisions, write the files to `state_dir/fleet/policy/<revision>/`, reload like SIGHUP), the
quarantine watcher (KV `PROXYVM_QUARANTINE`, keys `<node>.<guest>`, applied through
`proxyvm.quarantine` with `by: "fleet"`), the node's status (KV `PROXYVM_NODES`, key `<node>`;
also `/healthz` and metrics) and the checks of the cluster's clock against ours.
Must not: block or stop the supervisor (everything here runs in its own tasks, every failure is
a log line + a record, then retried), or apply a policy that is not signed by `fleet.policy_key`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from proxyvm.audit import now_iso
from proxyvm.fleet import (
    MIN_DUPLICATE_WINDOW,
    NODES_BUCKET,
    POLICY_BUCKET,
    POLICY_KEY,
    QUARANTINE_BUCKET,
    STREAM,
    SUBJECT_PREFIX,
    FleetSettings,
)
from proxyvm.fleet.bundle import BundleError, check_bundle, load_public_key, write_files
from proxyvm.fleet.conn import connect_settings, describe
from proxyvm.fleet.shipper import Shipper

log = logging.getLogger("proxyvm.fleet")

MAX_CLOCK_SKEW = 30.0  # seconds
CLOCK_CHECK_EVERY = 60.0
KEEP_REVISIONS = 3
RETRY = 2.0


def stream_problems(cfg: Any) -> list[str]:
    """Why an existing PROXYVM_AUDIT stream cannot take our records as they must be kept."""
    out = []
    subjects = list(cfg.subjects or [])
    if not any(s in (f"{SUBJECT_PREFIX}.>", "proxyvm.>", ">") for s in subjects):
        out.append(f"its subjects {subjects} do not cover {SUBJECT_PREFIX}.>")
    retention = getattr(cfg.retention, "value", cfg.retention)
    if retention not in (None, "limits"):
        out.append(f"retention is {retention}, not limits (records would be deleted once read)")
    dw = float(cfg.duplicate_window or 0)
    if dw < MIN_DUPLICATE_WINDOW:
        out.append(f"its duplicate_window is {dw:g}s, under {MIN_DUPLICATE_WINDOW:g}s (a re-send after a "
                   "crash could be stored twice)")
    return out


class FleetNode:
    def __init__(self, sup: Any, settings: FleetSettings):
        self.sup = sup
        self.settings = settings
        self.name = settings.node
        self.state_dir = Path(sup.config.state_dir)
        self.policy_dir = self.state_dir / "fleet" / "policy"
        self.key = load_public_key(settings.policy_key) if settings.policy_key else None
        self.nc: Any = None
        self.js: Any = None
        self.connected = False
        self.server = ""
        self.applied: dict[str, Any] = {"revision": 0, "digest": "", "created": ""}
        self.faults: dict[str, str] = {}
        self._refused: set[str] = set()
        self._q_seen: dict[str, int] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._watchers: list[asyncio.Task[Any]] = []
        self._status_now = asyncio.Event()
        self._clock_checked = 0.0
        self._ever_connected = False
        self._apply_lock = asyncio.Lock()
        self._metrics(sup.metrics.registry)
        chain = Path(sup.config.audit.path).stem  # one chain per local log (for now: `audit`)
        self.shipper = Shipper(self, self.state_dir, settings.spool_max, chain=chain)

    # -- metrics -------------------------------------------------------------------------------
    def _metrics(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.m_connected = Gauge("proxyvm_fleet_connected", "1 while connected to a NATS server", registry=registry)
        self.m_shipped = Counter("proxyvm_fleet_shipped_records", "Audit records the stream acknowledged",
                                 registry=registry)
        self.m_duplicates = Counter("proxyvm_fleet_duplicate_acks", "Re-sent records the stream already had "
                                    "(dropped by its duplicate window)", registry=registry)
        self.m_dropped = Counter("proxyvm_fleet_spool_dropped_records", "Records not spooled because the spool "
                                 "was full (they are in the local log only)", registry=registry)
        self.m_refused = Counter("proxyvm_fleet_bundles_refused", "Policy bundles refused", ["reason"],
                                 registry=registry)
        self.m_revision = Gauge("proxyvm_fleet_policy_revision", "Revision of the fleet policy bundle in force "
                                "(0: none)", registry=registry)
        self.m_policy = Gauge("proxyvm_fleet_policy_info", "The fleet policy in force (value 1)",
                              ["revision", "digest"], registry=registry)
        lag_r = Gauge("proxyvm_fleet_shipping_lag_records", "Records written but not yet acknowledged by the stream",
                      registry=registry)
        lag_r.set_function(lambda: self.shipper.lag_records())
        lag_s = Gauge("proxyvm_fleet_shipping_lag_seconds", "Seconds since the stream last had every record",
                      registry=registry)
        lag_s.set_function(lambda: self.shipper.lag_seconds())
        spool = Gauge("proxyvm_fleet_spool_bytes", "Bytes in the spool", registry=registry)
        spool.set_function(lambda: self.shipper.spool.total)

    def _set_policy_metrics(self) -> None:
        self.m_revision.set(self.applied["revision"])
        self.m_policy.clear()
        if self.applied["revision"]:
            self.m_policy.labels(str(self.applied["revision"]), self.applied["digest"]).set(1)

    # -- reporting -----------------------------------------------------------------------------
    def record(self, event: str, reason: str, kind: str = "service", **extra: Any) -> None:
        try:
            self.sup.audit_event(event, reason, kind=kind, fleet={"node": self.name, **extra})
        except Exception:  # noqa: BLE001 - reporting must not take anything down
            log.exception("fleet: could not write a record")

    def fault(self, key: str, message: str, record: bool = True) -> None:
        if self.faults.get(key) == message:
            return
        self.faults[key] = message
        log.error("fleet: %s", message)
        if record:
            self.record(f"fleet_{key}", message)

    def resolve(self, *keys: str) -> None:
        for k in keys:
            if self.faults.pop(k, None) is not None:
                log.info("fleet: %s: resolved", k)

    # -- start / stop --------------------------------------------------------------------------
    def start(self) -> None:
        """Synchronous part (before the workers start): the stored bundle, the shipper's spool."""
        self._load_applied()
        self.shipper.start(self.sup.audit)
        self.sup.line_observers.append(self.shipper.on_line)
        self._tasks.append(asyncio.create_task(self._main()))

    async def close(self) -> None:
        for t in [*self._watchers, *self._tasks]:
            t.cancel()
        await asyncio.gather(*self._watchers, *self._tasks, return_exceptions=True)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 3)
        with contextlib.suppress(ValueError):
            self.sup.line_observers.remove(self.shipper.on_line)
        self.shipper.close()

    # -- connection ----------------------------------------------------------------------------
    async def _on_error(self, e: BaseException) -> None:
        import ssl

        if isinstance(e, ssl.SSLError):
            key = "tls"
        elif "authorization" in str(e).lower() or "authentication" in str(e).lower():
            key = "auth"
        elif "plaintext" in str(e):
            key = "plaintext"
        else:
            key = "connect"
        if isinstance(e, OSError) and e.errno and not isinstance(e, ssl.SSLError):
            text = f"cannot reach a NATS server: {os.strerror(e.errno)}" if e.errno != errno.ETIMEDOUT else \
                "cannot reach a NATS server: timed out"
        else:
            text = describe(e)
        self.fault(key, text + ("" if self.connected else "; retrying (records wait in the spool)"))

    async def _on_disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.m_connected.set(0)
            self.fault("disconnected", "lost the connection to NATS; reconnecting (records wait in the spool)")

    async def _on_reconnect(self) -> None:
        self._connected()
        self._restart_watchers()

    def _connected(self) -> None:
        self.connected = True
        self.m_connected.set(1)
        url = getattr(self.nc, "connected_url", None)
        self.server = f"{url.hostname}:{url.port}" if url is not None else ""
        was = bool(self.faults) or not self._ever_connected
        self.resolve("connect", "tls", "auth", "plaintext", "disconnected")
        self._ever_connected = True
        if was:
            log.info("fleet: connected to NATS %s as node %s", self.server, self.name)
            self.record("fleet_connected", f"connected to NATS server {self.server}", server=self.server)
        self._status_now.set()

    async def _main(self) -> None:
        self.nc = await connect_settings(self.settings, f"proxyvm {self.name}", on_error=self._on_error,
                                         on_disconnect=self._on_disconnect, on_reconnect=self._on_reconnect)
        self.js = self.nc.jetstream(timeout=5)
        self._connected()
        self._tasks.append(asyncio.create_task(self._ship_loop()))
        self._tasks.append(asyncio.create_task(self._status_loop()))
        self._restart_watchers()

    def _restart_watchers(self) -> None:
        for t in self._watchers:
            t.cancel()
        self._watchers = [asyncio.create_task(self._policy_loop()), asyncio.create_task(self._quarantine_loop())]

    # -- shipping --------------------------------------------------------------------------------
    async def _stream_ok(self) -> bool:
        import nats.js.errors

        try:
            info = await self.js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            self.fault("stream", f"stream {STREAM} does not exist: run `proxyvm fleet init` (records wait in the spool)")
            return False
        problems = stream_problems(info.config)
        if problems:
            self.fault("stream", f"stream {STREAM} exists with other settings: {'; '.join(problems)}. Not shipping "
                       "to it (records wait in the spool); fix it with `proxyvm fleet init --update`")
            return False
        self.resolve("stream")
        return True

    async def _ship_loop(self) -> None:
        while True:
            try:
                if not await self._stream_ok():
                    await asyncio.sleep(5)
                    continue
                self.resolve("publish")
                await self.shipper.run(self.js)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - retried; records wait in the spool
                text = "no acknowledgement from the stream in time" if isinstance(e, TimeoutError) else describe(e)
                self.fault("publish", f"publishing to {STREAM} failed: {text}; retrying from seq "
                           f"{self.shipper.acked + 1} (records wait in the spool)", record=False)
                await asyncio.sleep(1)

    def spool_full(self, seq: int, total: int) -> None:
        msg = (f"fleet spool full ({total} bytes, fleet.spool_max {self.settings.spool_max}): records from seq "
               f"{seq} on are not shipped until it drains; they stay in the local chain, decisions go on")
        log.error("fleet: %s", msg)
        self.record("fleet_spool_full", msg, severity="high")

    def spool_resumed(self, first: int, last: int, count: int) -> None:
        msg = (f"fleet spool has room again: {count} records (seq {first}..{last}) were not shipped and are in the "
               "local chain only; shipping goes on")
        log.warning("fleet: %s", msg)
        self.record("fleet_spool_resumed", msg, not_shipped=[first, last], count=count)

    # -- policy ----------------------------------------------------------------------------------
    def _load_applied(self) -> None:
        p = self.policy_dir / "applied.json"
        try:
            data = json.loads(p.read_text())
            rev = int(data["revision"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("fleet: %s unreadable (%s): running the config's policy", p, e)
            return
        from proxyvm.config import load_all

        try:
            b = check_bundle((self.policy_dir / str(rev) / "bundle.json").read_bytes(), self.key)
            rules = write_files(b, self.policy_dir / str(rev))  # the verified bytes, not whatever is on disk
            _, engine = load_all(self.sup.config_path, policy_path=rules)
        except (OSError, BundleError, Exception) as e:  # noqa: BLE001
            msg = f"the last applied fleet policy (revision {rev}) cannot be used: {e}; running the config's policy"
            log.error("fleet: %s", msg)
            self.record("fleet_policy_stored_refused", msg, kind="reload", revision=rev)
            return
        self.sup.policy_path = rules
        self.sup.policy_digest = engine.digest
        self.sup.policy_mode = str(getattr(engine, "mode", "enforce"))
        self.applied = {"revision": b.revision, "digest": b.digest, "created": b.created}
        self._set_policy_metrics()
        log.info("fleet: policy revision %d (%s) from %s in force (the last applied bundle)", b.revision,
                 b.digest, rules.parent)

    def _refuse(self, raw: bytes, reason: str, message: str, revision: Any = None) -> None:
        h = hashlib.sha256(raw or b"").hexdigest()
        self.m_refused.labels(reason).inc()
        if h in self._refused:
            return
        self._refused.add(h)
        msg = f"policy bundle refused ({reason}): {message}; the policy in force stays (revision " \
              f"{self.applied['revision'] or 'none: the config policy'})"
        log.error("fleet: %s", msg)
        self.record("fleet_policy_refused", msg, kind="reload", reason_code=reason, revision=revision,
                    policy=self.sup.policy_digest)

    async def apply_bundle(self, raw: bytes) -> bool:
        async with self._apply_lock:
            return await self._apply_bundle(raw)

    async def _apply_bundle(self, raw: bytes) -> bool:
        try:
            b = check_bundle(raw, self.key)
        except BundleError as e:
            self._refuse(raw, e.reason, str(e))
            return False
        cur = self.applied["revision"]
        if b.revision == cur and b.digest == self.applied["digest"]:
            return True  # in force already (a watch delivers the current value on every start)
        if b.revision <= cur:
            self._refuse(raw, "replayed", f"revision {b.revision} is not newer than revision {cur} in force "
                         "(an older bundle put back, or a replay)", b.revision)
            return False
        started = time.monotonic()
        d = self.policy_dir / str(b.revision)
        rules = await asyncio.to_thread(write_files, b, d)
        ok = await self.sup.reload(policy_path=rules)
        if not ok:
            self._refuse(raw, "invalid", f"revision {b.revision} ({b.digest}) did not load or validate on this node "
                         "(see the reload record before this one)", b.revision)
            shutil.rmtree(d, ignore_errors=True)
            return False
        self.applied = {"revision": b.revision, "digest": b.digest, "created": b.created}
        tmp = self.policy_dir / ".applied.json.tmp"
        tmp.write_text(json.dumps({**self.applied, "rules": str(rules), "applied": now_iso()}) + "\n")
        os.replace(tmp, self.policy_dir / "applied.json")
        self._set_policy_metrics()
        took = time.monotonic() - started
        log.info("fleet: policy revision %d (%s) applied in %.2fs", b.revision, b.digest, took)
        self.record("fleet_policy_applied", f"fleet policy revision {b.revision} applied", kind="reload",
                    revision=b.revision, policy=b.digest, created=b.created, key_id=b.key_id,
                    seconds=round(took, 3))
        for old in self.policy_dir.iterdir():
            if old.is_dir() and old.name.isdigit() and int(old.name) <= b.revision - KEEP_REVISIONS:
                shutil.rmtree(old, ignore_errors=True)
        self._status_now.set()
        return True

    async def _bucket(self, name: str) -> Any:
        import nats.js.errors

        while True:
            try:
                kv = await self.js.key_value(name)
                self.resolve(f"bucket_{name}")
                return kv
            except nats.js.errors.BucketNotFoundError:
                self.fault(f"bucket_{name}", f"KV bucket {name} does not exist: run `proxyvm fleet init`")
            except Exception as e:  # noqa: BLE001
                self.fault(f"bucket_{name}", f"KV bucket {name}: {describe(e)}", record=False)
            await asyncio.sleep(RETRY * 2)

    async def _policy_loop(self) -> None:
        while True:
            try:
                kv = await self._bucket(POLICY_BUCKET)
                w = await kv.watch(POLICY_KEY)
                async for e in w:
                    if e is None or e.operation in ("DEL", "PURGE"):
                        continue
                    await self.apply_bundle(e.value)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - watch again
                self.fault("policy_watch", f"policy watch failed: {describe(e)}; watching again", record=False)
                await asyncio.sleep(RETRY)

    # -- quarantine --------------------------------------------------------------------------------
    def _q_state_path(self) -> Path:
        return self.state_dir / "fleet" / "quarantine-seen.json"

    async def _quarantine_loop(self) -> None:
        q = self.sup.quarantine
        if q is None:
            return
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._q_seen = {str(k): int(v) for k, v in json.loads(self._q_state_path().read_text()).items()}
        prefix = f"{self.name}."
        while True:
            try:
                kv = await self._bucket(QUARANTINE_BUCKET)
                w = await kv.watch(f"{self.name}.>")
                async for e in w:
                    if e is None:
                        continue
                    guest = e.key[len(prefix):]
                    if self._q_seen.get(guest) == e.revision:
                        continue  # applied already (a watch delivers current values on every start)
                    self._q_seen[guest] = e.revision
                    self._apply_quarantine(q, guest, e.operation, e.value)
                    tmp = self._q_state_path().with_name(".quarantine-seen.json.tmp")
                    tmp.write_text(json.dumps(self._q_seen))
                    os.replace(tmp, self._q_state_path())
                    self._status_now.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - watch again
                self.fault("quarantine_watch", f"quarantine watch failed: {describe(e)}; watching again", record=False)
                await asyncio.sleep(RETRY)

    def _apply_quarantine(self, q: Any, guest: str, op: str | None, value: bytes | None) -> None:
        from proxyvm.quarantine import QuarantineError

        try:
            if op in ("DEL", "PURGE"):
                if guest in q.table:
                    q.release(guest, "released through the fleet", "fleet")
                return
            try:
                entry = json.loads(value or b"")
                if not isinstance(entry, dict):
                    raise ValueError
            except ValueError:
                raise QuarantineError("the value is not a quarantine entry (a JSON object)") from None
            if guest in q.table:
                return
            q.quarantine(guest, str(entry.get("profile") or "block"), str(entry.get("reason") or ""), "fleet",
                         str(entry.get("user") or ""))
        except QuarantineError as e:
            msg = f"fleet quarantine of guest {guest!r} not applied: {e}"
            log.error("fleet: %s", msg)
            self.record("fleet_quarantine_refused", msg, guest=guest)
        except OSError as e:
            log.error("fleet: quarantine of %s: cannot write the table: %s", guest, e.strerror)

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        sh = self.shipper
        q = self.sup.quarantine
        return {
            "node": self.name, "chain": sh.chain, "ts": now_iso(), "server": self.server,
            "seq": sh.written, "acked": sh.acked, "lag_records": sh.lag_records(),
            "lag_seconds": round(sh.lag_seconds(), 3), "spool_bytes": sh.spool.total, "dropped": sh.dropped,
            "shipped": sh.shipped, "duplicates": sh.duplicates,
            "policy": dict(self.applied), "policy_in_force": self.sup.policy_digest,
            "quarantined": {g: e.get("profile") for g, e in (q.table.items() if q is not None else [])},
            "faults": dict(self.faults),
        }

    def health(self) -> dict[str, Any]:
        s = self.status()
        return {"node": self.name, "connected": self.connected, "server": self.server,
                "policy_revision": self.applied["revision"], "policy_digest": self.applied["digest"],
                "audit": {k: s[k] for k in ("seq", "acked", "lag_records", "lag_seconds", "spool_bytes", "dropped")},
                **({"faults": dict(self.faults)} if self.faults else {})}

    async def _status_loop(self) -> None:
        kv = None
        while True:
            try:
                if kv is None:
                    kv = await self._bucket(NODES_BUCKET)
                t0 = time.time()
                await kv.put(self.name, json.dumps(self.status()).encode())
                t1 = time.time()
                if time.monotonic() - self._clock_checked > CLOCK_CHECK_EVERY:
                    await self._check_clock((t0 + t1) / 2)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.fault("status", f"status update failed: {describe(e)}", record=False)
            else:
                self.resolve("status")
            self._status_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_now.wait(), self.settings.status_every)

    async def _check_clock(self, ours: float) -> None:
        msg = await self.js.get_last_msg(f"KV_{NODES_BUCKET}", f"$KV.{NODES_BUCKET}.{self.name}")
        self._clock_checked = time.monotonic()
        if msg.time is None:
            return
        skew = ours - msg.time.timestamp()
        if abs(skew) > MAX_CLOCK_SKEW:
            self.fault("clock", f"this node's clock is {skew:+.0f}s off the NATS cluster's (more than "
                       f"{MAX_CLOCK_SKEW:g}s): record times (ts) and fleet --since/--until are off; fix NTP")
        elif "clock" in self.faults:
            self.resolve("clock")
            self.record("fleet_clock_ok", f"this node's clock is within {MAX_CLOCK_SKEW:g}s of the cluster's again")


async def attach(sup: Any) -> FleetNode:
    """Start the fleet node of a starting supervisor (before its workers: a stored bundle is in
    force from their first request). Returns at once; NATS is reached in the background."""
    node = FleetNode(sup, sup.config.fleet)
    node.start()
    return node
