"""Shared DNS lab: one lab CA and one real Unbound DoT upstream per session; an in-process
DNSService per test (ServiceContext + MemoryAudit + the real policy engine)."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.labs

from dnsfront_lab import DIG, UNBOUND, Upstream, pick_ip, start_unbound  # noqa: E402

from policy import load_policy  # noqa: E402
from policy.source import parse_yaml  # noqa: E402
from protocols.base import MemoryAudit, ServiceContext, StaticGuests  # noqa: E402
from protocols.dns.service import DNSService  # noqa: E402
from protocols.dns.settings import DNSSettings, parse  # noqa: E402
from tests.labs.pki import LabCA  # noqa: E402
from tests.labs.proc import free_port  # noqa: E402

PROXY_IP = "127.0.3.1"

needs_peers = pytest.mark.skipif(not (UNBOUND and DIG), reason="unbound and dig (dnsutils) are not installed")

DEFAULT_RULES = """
mode: enforce
default: allow
rules:
  - id: block-blocked
    action: deny
    protocol: dns
    match: {qname: ["blocked.lab.test"]}
  - id: rate-lab
    action: allow
    protocol: dns
    match: {qname: ["rate.lab.test"]}
    rate: 2/minute
  - id: named-private
    action: allow
    protocol: dns
    match: {qname: ["named.lab.test"]}
  - id: deny-net-198-51-100
    action: deny
    protocol: dns
    match: {answer_ip: ["198.51.100.0/24"]}
"""


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dnslab")


@pytest.fixture(scope="session")
def lab_ca(lab_dir: Path) -> LabCA:
    return LabCA(lab_dir / "ca")


@pytest.fixture(scope="session")
def upstream1(lab_dir: Path, lab_ca: LabCA) -> Any:
    if not (UNBOUND and DIG):
        pytest.skip("unbound and dig (dnsutils) are not installed")
    up = start_unbound(lab_dir, lab_ca, pick_ip(), name="dot1.lab.test")
    yield up
    up.stop()


def settings_from_yaml(text: str, base: Path) -> DNSSettings:
    node = parse_yaml(textwrap.dedent(text), str(base / "proxyvm.yaml"), base)
    return parse(node.get_map()["dns"], base)


@dataclass
class Proxy:
    svc: DNSService
    audit: MemoryAudit
    ip: str
    port: int
    settings: DNSSettings

    def records(self, qname: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.audit.records if qname is None or r["request"]["qname"] == qname]


@pytest.fixture
async def make_proxy(tmp_path: Path, lab_ca: LabCA) -> AsyncIterator[Callable[..., Any]]:
    """`await make_proxy(upstreams_yaml, extra_yaml="", rules=DEFAULT_RULES, guests={})`."""
    started: list[DNSService] = []

    async def make(upstreams: str, extra: str = "", rules: str = DEFAULT_RULES,
                   guests: dict[str, str] | None = None) -> Proxy:
        port = free_port(PROXY_IP)
        text = (
            "dns:\n"
            f"  listen: [\"{PROXY_IP}:{port}\"]\n"
            + ("" if "ca_file:" in extra else f"  ca_file: {lab_ca.ca_pem}\n")
            + "  upstreams:\n" + textwrap.indent(textwrap.dedent(upstreams).strip() + "\n", "    ")
            + textwrap.indent(textwrap.dedent(extra).strip() + "\n", "  ")
        )
        if "dnssec:" not in text:
            text += "  dnssec: off\n"
        settings = settings_from_yaml(text, tmp_path)
        rules_path = tmp_path / f"rules-{port}.yaml"
        rules_path.write_text(textwrap.dedent(rules))
        table = dict(guests or {})
        engine = load_policy(rules_path, guests=set(table.values()))
        audit = MemoryAudit()
        ctx = ServiceContext(
            settings=settings, engine=engine, audit=audit, guests=StaticGuests(table),
            log=logging.getLogger("test.dns"), state_dir=tmp_path,
        )
        svc = DNSService(ctx)
        await svc.start()
        started.append(svc)
        return Proxy(svc, audit, PROXY_IP, port, settings)

    yield make
    for svc in started:
        await svc.drain(1.0)


def up_yaml(up: Upstream, name: str | None = None, pins: list[str] | None = None) -> str:
    line = f'- {{address: "{up.address}:{up.port}", name: {name or up.name}'
    if pins is not None:
        line += ", pins: [" + ", ".join(f'"{p}"' for p in pins) + "]"
    return line + "}"
