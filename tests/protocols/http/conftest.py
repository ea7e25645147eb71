"""Shared fixtures for the HTTP service tests: one nginx lab per session, an in-process service per
test (real `policy.load_policy` engine, MemoryAudit), and curl / raw-socket helpers run without
blocking the service's event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from policy import load_policy
from protocols.base import MemoryAudit, ServiceContext, StaticGuests
from protocols.http.service import HTTPService
from protocols.http.settings import HTTPSettings, LimitSettings, TimeoutSettings
from tests.labs import nginx_lab

PROXY_IP = "127.0.7.1"
GUEST_IP = "127.0.7.2"  # curl binds here (--interface) so the guest is a named one

LAB_RULES = """\
mode: {mode}
default: deny
rules:
  - id: lab-web
    action: allow
    protocol: http
    guests: [web1]
    match: {{host: [www.lab.test, untrusted.lab.test, plain.lab.test, mismatch.lab.test, legacy.lab.test]}}
  - id: lab-ws
    action: allow
    protocol: ws
    match: {{host: [ws.lab.test]}}
  - id: lab-tls
    action: allow
    protocol: tls
    match: {{sni: [www.lab.test]}}
"""


def _need_lab() -> None:
    if not nginx_lab.available():
        pytest.skip("nginx binary not installed (apt-get install nginx-light)")
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    if os.geteuid() != 0:
        pytest.skip("the nginx lab listens on port 443 and needs root")


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> nginx_lab.NginxLab:
    _need_lab()
    lab = nginx_lab.NginxLab(tmp_path_factory.mktemp("nginx-lab"))
    lab.start()
    yield lab
    lab.stop()


@dataclass
class Running:
    service: HTTPService
    audit: MemoryAudit
    settings: HTTPSettings
    lab: nginx_lab.NginxLab

    def addr(self, kind: str) -> tuple[str, int]:
        return self.service.bound_addresses()[kind][0]

    def port(self, kind: str) -> int:
        return self.addr(kind)[1]

    def records(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.audit.records if all(r.get(k) == v for k, v in match.items())]


@pytest.fixture
async def make_service(lab: nginx_lab.NginxLab, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await make_service(rules=..., **settings_overrides)` -> Running (drained at teardown)."""
    started: list[HTTPService] = []

    async def make(rules: str | None = None, mode: str = "enforce", **over: Any) -> Running:
        rules_path = tmp_path / "rules.yaml"
        rules_path.write_text(rules if rules is not None else LAB_RULES.format(mode=mode))
        engine = load_policy(rules_path, guests={"web1"})
        base = HTTPSettings(
            listen=((PROXY_IP, 0),),  # port 0: the kernel picks, no race with other tests
            proxy_listen=((PROXY_IP, 0),),
            passthrough_listen=((PROXY_IP, 0),),
            ca_file=lab.ca_pem,
            hosts=tuple((k, (v,)) for k, v in lab.hosts().items()),
            limits=LimitSettings(),
            timeouts=TimeoutSettings(header=5.0, idle=10.0),
        )
        settings = replace(base, **over)
        audit = MemoryAudit()
        ctx = ServiceContext(
            settings=settings,
            engine=engine,
            audit=audit,
            guests=StaticGuests({GUEST_IP: "web1"}),
            log=logging.getLogger("test.http"),
            state_dir=tmp_path / "state",
        )
        svc = HTTPService(ctx)
        await svc.start()
        started.append(svc)
        return Running(svc, audit, settings, lab)

    yield make
    for svc in started:
        await svc.drain(0.1)


@pytest.fixture
async def svc(make_service: Callable[..., Any]) -> Running:
    return await make_service()


@dataclass(frozen=True)
class CurlResult:
    status: int
    body: str
    stderr: str
    rc: int


async def curl(*args: str, timeout: float = 15.0) -> CurlResult:
    """Run curl as the guest (source address GUEST_IP) without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(timeout), "--interface", GUEST_IP, "-o", "-",
        "-w", "\n%{http_code}", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    text = out.decode(errors="replace")
    body, _, code = text.rpartition("\n")
    return CurlResult(int(code) if code.isdigit() else 0, body, err.decode(errors="replace"), proc.returncode or 0)


async def raw_exchange(
    addr: tuple[str, int], payload: bytes, *, wait: float = 3.0, pause_after: float = 0.0
) -> bytes:
    """Send raw bytes from GUEST_IP and read until the server closes (or `wait` passes)."""
    reader, writer = await asyncio.open_connection(addr[0], addr[1], local_addr=(GUEST_IP, 0))
    try:
        if payload:
            writer.write(payload)
            await writer.drain()
        if pause_after:
            await asyncio.sleep(pause_after)
        out = b""
        try:
            async with asyncio.timeout(wait):
                while chunk := await reader.read(65536):
                    out += chunk
        except TimeoutError:
            pass
        return out
    finally:
        writer.close()


async def eventually(probe: Callable[[], Any], timeout: float = 3.0) -> Any:
    """Poll `probe` until it returns something truthy (records and peer logs land asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.02)
