"""The seam between a protocol service and the appliance that runs it.

Owns: the `Service` interface every protocol implements, the `ServiceContext` it receives, the
`AuditSink` and `GuestLookup` shapes, and two test conveniences (`MemoryAudit`, `run_standalone`).
Must not: import `proxyvm` (the appliance wires services; services never reach back), open sockets.
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
    capture: Any = None
    """protocols.capture.Capture: forensic capture of denied and quarantined flows (None: off).
    Services call `capture.flow(...)` next to the decision; it only queues."""


async def reload_service(service: Service, old_engine: Any, settings: Any, engine: Any) -> None:
    """The one reload path of every service process (the worker and each HTTP pool child).

    The bookkeeping a reload owes every guest happens here, not in the services: the token buckets
    of rules whose id and rate are unchanged carry over to the new engine, so a SIGHUP never hands
    out a fresh allowance. The service then only swaps in the new objects (`Service.reload`)."""
    inherit = getattr(engine, "inherit_rate_state", None)
    if inherit is not None and old_engine is not None and old_engine is not engine \
            and type(old_engine) is type(engine):
        inherit(old_engine)
    await service.reload(settings, engine)


def stamp_policy(record: dict[str, Any], digest: str) -> dict[str, Any]:
    """`record` with the digest of the policy in force (decision records only; a record that
    already names one, e.g. from an HTTP pool child, keeps it)."""
    if "kind" in record or "policy" in record or not digest:
        return record
    return {**record, "policy": digest}


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
    src: str,
    protocol: str,
    request: dict[str, Any],
    upstream: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build an audit record in the field order of docs/audit.md."""
    rec: dict[str, Any] = {"guest": guest, "src": src, "protocol": protocol}
    rec.update(decision.audit_fields())
    rec["request"] = request
    rec["upstream"] = upstream
    rec.update(extra)
    return rec


async def run_standalone(service: Service, stop: asyncio.Event) -> None:
    """Start a service, serve until `stop` is set, then drain (tests and embedding)."""
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.drain(5.0)
