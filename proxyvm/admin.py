"""The admin endpoint: `/healthz` (each service's state) and `/metrics` (Prometheus).

Owns: the metric families and a tiny HTTP/1.1 GET server on `admin.listen`.
Must not: expose configuration, secrets or audit contents; accept anything but GET/HEAD.
"""

from __future__ import annotations

import asyncio
import json
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from protocols.addr import hostport

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _RecordMetrics(Collector):
    """Decisions and request latency, counted from audit records into plain dicts (a dict update
    per record: the audit writer's hot path) and rendered as Prometheus families on scrape."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[bytes, bytes, bytes, bytes], int] = {}
        self.latency: dict[bytes, list[float]] = {}  # protocol -> bucket counts..., +Inf count, sum

    def collect(self) -> Any:
        fam = CounterMetricFamily("proxyvm_decisions", "Policy decisions",
                                  labels=["protocol", "guest", "verdict", "rule"])
        for key, n in sorted(self.decisions.items()):
            fam.add_metric([x.decode(errors="replace") for x in key], n)
        yield fam
        hist = HistogramMetricFamily("proxyvm_request_seconds",
                                     "Request latency as reported by each service (duration_ms in the audit record)",
                                     labels=["protocol"])
        for protocol, counts in sorted(self.latency.items()):
            cumulative, acc = [], 0.0
            for bound, c in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=False):
                acc += c
                cumulative.append((floatToGoString(bound), acc))
            hist.add_metric([protocol.decode(errors="replace")], cumulative, sum_value=counts[-1])
        yield hist


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._records = _RecordMetrics()
        self.registry.register(self._records)
        self.restarts = Counter("proxyvm_service_restarts", "Service restarts after a crash", ["service"], registry=self.registry)
        self.up = Gauge("proxyvm_service_up", "1 when the service is running and ready", ["service"], registry=self.registry)
        self.audit_records = Counter("proxyvm_audit_records", "Audit records written", registry=self.registry)
        self.audit_malformed = Counter("proxyvm_audit_malformed_records", "Records from a worker that were not "
                                       "audit records (not written; logged)", registry=self.registry)
        self.reloads = Counter("proxyvm_reloads", "Policy/config reloads", ["result"], registry=self.registry)

    def observe_summary(self, kind: bytes, protocol: bytes, guest: bytes, verdict: bytes, rule: bytes,
                        duration: bytes) -> None:
        """Count one audit record from the fields a worker put before its JSON (once per request)."""
        if verdict and not kind:
            d = self._records.decisions
            key = (protocol, guest, verdict, rule)
            d[key] = d.get(key, 0) + 1
        if duration:
            try:
                seconds = float(duration) / 1000.0
            except ValueError:
                return
            counts = self._records.latency.get(protocol)
            if counts is None:
                counts = self._records.latency[protocol] = [0.0] * (len(LATENCY_BUCKETS) + 2)
            counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            counts[-1] += seconds

    def observe_record(self, rec: dict[str, Any]) -> None:
        """observe_summary for a record given as a dict (the supervisor's own records, tests)."""
        def b(key: str) -> bytes:
            v = rec.get(key)
            return b"" if v is None else str(v).encode()

        self.observe_summary(b("kind"), b("protocol"), b("guest"), b("verdict"), b("rule"), b("duration_ms"))

    def render(self) -> bytes:
        return generate_latest(self.registry)



class AdminServer:
    def __init__(self, host: str, port: int, metrics: Metrics, health: Callable[[], tuple[bool, dict[str, Any]]]):
        self.host, self.port = host, port
        self.metrics = metrics
        self.health = health
        self.server: asyncio.AbstractServer | None = None
        self.console: Any = None  # proxyvm.console.server.Console when `admin.console: true`

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, self.host, self.port, limit=8192)
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        return f"tcp {hostport(self.host, self.port)}"

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3:
                await self._reply(writer, 400, "text/plain", b"bad request\n")
                return
            method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1").split("?", 1)[0]
            if self.console is not None and self.console.owns(target):
                await self.console.handle(head, reader, writer)  # its own methods, auth and replies
            elif method not in ("GET", "HEAD"):
                await self._reply(writer, 405, "text/plain", b"only GET\n")
            elif target == "/healthz":
                ok, body = self.health()
                await self._reply(
                    writer, 200 if ok else 503, "application/json", json.dumps(body, indent=1).encode() + b"\n", method
                )
            elif target == "/metrics":
                await self._reply(writer, 200, CONTENT_TYPE_LATEST, self.metrics.render(), method)
            else:
                await self._reply(writer, 404, "text/plain", b"not found; try /healthz or /metrics\n", method)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(w: asyncio.StreamWriter, status: int, ctype: str, body: bytes, method: str = "GET") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
        w.write(
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        if method != "HEAD":
            w.write(body)
        await w.drain()
