"""The admin endpoint: `/healthz` (each service's state) and `/metrics` (Prometheus).

Owns: the metric families and a tiny HTTP/1.1 GET server on `admin.listen`.
Must not: expose configuration, secrets or audit contents; accept anything but GET/HEAD.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocols.addr import hostport


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "proxyvm_decisions", "Policy decisions", ["protocol", "guest", "verdict", "rule"], registry=self.registry
        )
        self.latency = Histogram(
            "proxyvm_request_seconds",
            "Request latency as reported by each service (duration_ms in the audit record)",
            ["protocol"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.restarts = Counter("proxyvm_service_restarts", "Service restarts after a crash", ["service"], registry=self.registry)
        self.up = Gauge("proxyvm_service_up", "1 when the service is running and ready", ["service"], registry=self.registry)
        self.audit_records = Counter("proxyvm_audit_records", "Audit records written", registry=self.registry)
        self.reloads = Counter("proxyvm_reloads", "Policy/config reloads", ["result"], registry=self.registry)
        self._decision_children: dict[tuple[Any, ...], Any] = {}
        self._latency_children: dict[Any, Any] = {}

    def observe_record(self, rec: dict[str, Any]) -> None:
        """Count one audit record (runs once per request: label children are cached)."""
        verdict = rec.get("verdict")
        protocol = rec.get("protocol", "")
        if verdict and "kind" not in rec:  # decisions only (delivery outcomes carry a kind)
            key = (protocol, rec.get("guest", ""), verdict, rec.get("rule", ""))
            child = self._decision_children.get(key)
            if child is None:
                child = self._decision_children[key] = self.decisions.labels(*map(str, key))
            child.inc()
        d = rec.get("duration_ms")
        if isinstance(d, (int, float)):
            hist = self._latency_children.get(protocol)
            if hist is None:
                hist = self._latency_children[protocol] = self.latency.labels(str(protocol))
            hist.observe(d / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AdminServer:
    def __init__(self, host: str, port: int, metrics: Metrics, health: Callable[[], tuple[bool, dict[str, Any]]]):
        self.host, self.port = host, port
        self.metrics = metrics
        self.health = health
        self.server: asyncio.AbstractServer | None = None

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
            if method not in ("GET", "HEAD"):
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
