"""The seam between a protocol service and the appliance that runs it.

Owns: the `Service` interface every protocol implements, the `ServiceContext` it receives, the
`AuditSink` and `GuestLookup` shapes, the one way a service writes an audit record
(`ServiceContext.record` for decisions, `ServiceContext.event` for `kind: ...` records: field order
of docs/audit.md, `ts`, address formatting, the policy digest, `duration_ms` and the latency hook),
and two test conveniences (`MemoryAudit`, `run_standalone`).
Must not: import `proxyvm` (the appliance wires services; services never reach back), open sockets,
or encode records (the sink encodes each record once: proxyvm.worker.ChannelAudit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from policy.decision import Decision
from protocols.addr import hostport


class AuditSink(Protocol):
    def emit(self, record: dict[str, Any]) -> None:
        """Queue one audit record. Never blocks, never raises."""


class GuestLookup(Protocol):
    def lookup(self, address: str) -> str:
        """The guest name owning `address` (IPv4/IPv6 text), or "unknown"."""


@runtime_checkable
class Service(Protocol):
    name: ClassVar[str]

    def __init__(self, ctx: ServiceContext) -> None: ...

    async def start(self) -> list[str]:
        """Bind every listener and start serving; return what it listens on ("udp 1.2.3.4:53")."""

    async def reload(self, settings: Any, engine: Any) -> None:
        """Swap settings and policy without dropping connections or queued work."""

    async def drain(self, timeout: float) -> None:
        """Stop accepting, finish in-flight work (up to `timeout` s), close everything."""

    def health(self) -> dict[str, Any]:
        """{"state": "ok" | "degraded", ...} for /healthz."""


@dataclass(slots=True)
class ServiceContext:
    settings: Any
    engine: Any  # policy.Engine; replaced on reload
    audit: AuditSink
    guests: GuestLookup
    log: logging.Logger
    config: Any = None  # the whole typed config (for cross-service settings such as config.dns)
    state_dir: Path = field(default_factory=lambda: Path("/var/lib/proxyvm"))
    clock: Callable[[], float] = time.time
    observe: Callable[[str, str, str, str, float], None] | None = None
    """Optional latency hook: observe(protocol, guest, verdict, rule, seconds)."""
    quarantine: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Quarantined guests -> their entry (protocols.quarantine); replaced in place by the worker when
    the supervisor pushes a new table. Services look the guest up once per request."""
    policy: str = ""
    """Digest of the policy in force (`sha256:...`), stamped on every decision record; set by the
    worker at start and on reload. Empty: no `policy` field (unit tests with MemoryAudit)."""
    timestamp: Callable[[], str] | None = None
    """Source of `ts` (a MilliClock in the worker). None leaves `ts` to the sink (unit tests)."""

    worker: int = 0
    """This process's index among the service's `workers` (0..workers-1)."""
    workers: int = 1
    """`workers: N`: processes serving this service; above 1 every listener is bound with
    SO_REUSEPORT (`reuse_port`) so that each process has its own socket on the same port."""

    @property
    def reuse_port(self) -> bool:
        return self.workers > 1

    capture: Any = None
    """protocols.capture.Capture: forensic capture of denied and quarantined flows (None: off).
    Services call `capture.flow(...)` next to the decision; it only queues."""

    def record(
        self,
        decision: Decision,
        *,
        guest: str,
        src: Any,
        protocol: str,
        request: dict[str, Any],
        upstream: dict[str, Any] | None = None,
        orig_dst: Any = None,
        elapsed: float | None = None,
        fields: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        """Audit one decision: the one call every service makes for a decision record.

        `src` and `orig_dst` are socket addresses ((host, port, ...) tuples; text is kept as is);
        `elapsed` (seconds) becomes `duration_ms`, placed after the first extra field (the outcome:
        `rcode`, `status`), and is passed once to the latency hook `observe`. Extra fields follow in
        the order given (keywords, then the `fields` dict of a service that already holds them in
        one: cheaper than `**fields`, which re-packs every keyword), then `orig_dst`, then
        `policy`. Never raises for a failing observer."""
        # Runs once per request (every DNS query): one dict literal, no helper calls on the way.
        if src.__class__ is not str:
            src = hostport(src[0], src[1])
        verdict = decision.verdict.value
        ts = self.timestamp
        if ts is None:
            rec = {"guest": guest, "src": src, "protocol": protocol, "verdict": verdict, "rule": decision.rule,
                   "at": decision.at, "reason": decision.detail, "request": request, "upstream": upstream}
        else:
            rec = {"ts": ts(), "guest": guest, "src": src, "protocol": protocol, "verdict": verdict,
                   "rule": decision.rule, "at": decision.at, "reason": decision.detail, "request": request,
                   "upstream": upstream}
        if elapsed is not None:
            if extra:
                first = next(iter(extra))
                rec[first] = extra.pop(first)
            elif fields:
                first = next(iter(fields))
                rec[first] = fields[first]
            rec["duration_ms"] = int(elapsed * 1e6) / 1000  # duration_ms(elapsed), inline
        if extra:
            rec.update(extra)
        if fields:
            rec.update(fields)
        if orig_dst:
            rec["orig_dst"] = orig_dst if orig_dst.__class__ is str else hostport(orig_dst[0], orig_dst[1])
        if self.policy:
            rec["policy"] = self.policy
        self.audit.emit(rec)
        obs = self.observe
        if obs is not None and elapsed is not None:
            try:
                obs(protocol, guest, verdict, decision.rule, elapsed)
            except Exception:  # noqa: BLE001 - an observer must not break serving
                self.log.debug("observe hook failed", exc_info=True)

    def event(
        self,
        kind: str,
        *,
        protocol: str,
        request: dict[str, Any],
        guest: str | None = None,
        src: Any = None,
        verdict: str | None = None,
        rule: str | None = None,
        at: str | None = None,
        reason: str | None = None,
        upstream: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        """Audit one record that is not a decision (`kind: delivery`, ...): the documented field
        order with `kind` right after `upstream`, then the extra fields; never a policy digest."""
        ts = self.timestamp
        rec: dict[str, Any] = {"ts": ts()} if ts is not None else {}
        rec["guest"] = guest
        rec["src"] = src if src is None or src.__class__ is str else hostport(src[0], src[1])
        rec["protocol"] = protocol
        rec["verdict"] = verdict
        rec["rule"] = rule
        rec["at"] = at
        rec["reason"] = reason
        rec["request"] = request
        rec["upstream"] = upstream
        rec["kind"] = kind
        rec.update(extra)
        self.audit.emit(rec)


def duration_ms(seconds: float) -> float:
    """`duration_ms` as every record writes it: milliseconds, microsecond precision."""
    return int(seconds * 1e6) / 1000


async def reload_service(service: Service, old_engine: Any, settings: Any, engine: Any) -> None:
    """The one reload path of every service process (`proxyvm.worker`).

    The bookkeeping a reload owes every guest happens here, not in the services: the token buckets
    of rules whose id and rate are unchanged carry over to the new engine, so a SIGHUP never hands
    out a fresh allowance. The service then only swaps in the new objects (`Service.reload`)."""
    inherit = getattr(engine, "inherit_rate_state", None)
    if inherit is not None and old_engine is not None and old_engine is not engine \
            and type(old_engine) is type(engine):
        inherit(old_engine)
    await service.reload(settings, engine)


def stamp_record(record: dict[str, Any], ts: str, digest: str) -> dict[str, Any]:
    """A sink's fallback for a record that did not come from `ServiceContext.record`/`event` (it
    has no `ts`): a copy with `ts` first and, on a decision (no `kind`, no `policy` yet), the digest."""
    out = {"ts": ts, **record}
    if digest and "kind" not in record and "policy" not in record:
        out["policy"] = digest
    return out


class MilliClock:
    """The audit `ts` (UTC, milliseconds) for a hot path: the text is built once per millisecond."""

    __slots__ = ("_ms", "_text")

    def __init__(self) -> None:
        self._ms = -1
        self._text = ""

    def __call__(self) -> str:
        t = time.time()
        ms = int(t * 1000)
        if ms != self._ms:
            self._ms = ms
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
        return self._text


class MemoryAudit:
    """An AuditSink that keeps records in a list (unit tests only)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))


class StaticGuests:
    """A GuestLookup from a plain {address: name} dict (unit tests and simple embeddings)."""

    def __init__(self, table: dict[str, str] | None = None) -> None:
        self.table = dict(table or {})

    def lookup(self, address: str) -> str:
        return self.table.get(address, "unknown")


def audit_record(
    decision: Decision,
    *,
    guest: str,
    src: Any,
    protocol: str,
    request: dict[str, Any],
    upstream: dict[str, Any] | None = None,
    orig_dst: Any = None,
    elapsed: float | None = None,
    fields: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record `ServiceContext.record` emits, without `ts` and digest (for comparing in tests)."""
    sink = MemoryAudit()
    ctx = ServiceContext(settings=None, engine=None, audit=sink, guests=StaticGuests(), log=logging.getLogger(__name__))
    ctx.record(decision, guest=guest, src=src, protocol=protocol, request=request, upstream=upstream,
               orig_dst=orig_dst, elapsed=elapsed, fields=fields, **extra)
    return sink.records[0]


async def run_standalone(service: Service, stop: asyncio.Event) -> None:
    """Start a service, serve until `stop` is set, then drain (tests and embedding)."""
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.drain(5.0)
