"""Audit logs for the reading commands' tests (audit show, replay, learn), written by the real
`proxyvm.audit.AuditLog` so chains, rotation and `.head` files are the product's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from proxyvm.audit import AuditLog, now_iso

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


def ts(offset: float) -> str:
    return now_iso(T0 + offset)


def dns(guest: str, qname: str, qtype: str = "A", verdict: str = "allow", rule: str = "learn",
        at: str = "rules.yaml:1", t: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"ts": ts(t), "guest": guest, "src": "198.18.0.10:4000", "protocol": "dns", "verdict": verdict,
            "rule": rule, "at": at, "reason": "test", "request": {"qname": qname, "qtype": qtype},
            "upstream": None, **extra}


def http(guest: str, host: str, path: str, method: str = "GET", verdict: str = "allow", rule: str = "learn",
         at: str = "rules.yaml:1", t: float = 0.0, protocol: str = "http", **extra: Any) -> dict[str, Any]:
    return {"ts": ts(t), "guest": guest, "src": "198.18.0.10:5000", "protocol": protocol, "verdict": verdict,
            "rule": rule, "at": at, "reason": "test",
            "request": {"method": method, "host": host, "path": path, "port": "80"}, "upstream": None, **extra}


def smtp(guest: str, mail_from: str, rcpt_to: str, verdict: str = "allow", rule: str = "learn",
         at: str = "rules.yaml:1", t: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"ts": ts(t), "guest": guest, "src": "198.18.0.11:2500", "protocol": "smtp", "verdict": verdict,
            "rule": rule, "at": at, "reason": "test",
            "request": {"mail_from": mail_from, "rcpt_to": rcpt_to, "size": 100}, "upstream": None,
            "event": "rcpt", **extra}


def snmp(guest: str, op: str, oids: list[str], agent: str = "router1", verdict: str = "allow",
         rule: str = "learn", at: str = "rules.yaml:1", t: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"ts": ts(t), "guest": guest, "src": "198.18.0.12:1610", "protocol": "snmp", "verdict": verdict,
            "rule": rule, "at": at, "reason": "test",
            "request": {"agent": agent, "op": op, "version": "v2c", "oid_count": len(oids), "oids": oids},
            "upstream": None, "status": "noError", **extra}


def tls(guest: str, sni: str, dst: str = "203.0.113.9", verdict: str = "allow", rule: str = "learn",
        at: str = "rules.yaml:1", t: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"ts": ts(t), "guest": guest, "src": "198.18.0.10:6000", "protocol": "tls", "verdict": verdict,
            "rule": rule, "at": at, "reason": "test", "request": {"sni": sni, "dst": dst}, "upstream": None,
            **extra}


def supervisor(event: str, t: float = 0.0) -> dict[str, Any]:
    return {"ts": ts(t), "guest": None, "src": None, "protocol": "proxyvm", "verdict": None, "rule": None,
            "at": "proxyvm.yaml", "reason": event, "request": {"event": event}, "upstream": None}


def write_log(path: Path, records: list[dict[str, Any]], rotate_size: int = 100 * 1024 * 1024, keep: int = 100) -> Path:
    log = AuditLog(path, rotate_size=rotate_size, keep=keep)
    for r in records:
        log.append(r)
    log.close()
    return path


def config(d: Path, guests: list[str], audit: str = "audit.jsonl", policy: str | None = None) -> Path:
    lines = ["guests:"] + [f"  {g}: {{addresses: [198.18.0.{10 + i}]}}" for i, g in enumerate(guests)]
    if policy:
        lines.append(f"policy: {policy}")
    lines.append(f"audit: {{path: {audit}}}")
    p = d / "proxyvm.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyvm", *args], capture_output=True, text=True, timeout=timeout)
