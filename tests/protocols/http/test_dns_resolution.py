"""Upstream names resolved through the proxy's own DNS service (DoT to a real Unbound), not the
system resolver, when a `dns:` section is configured."""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from policy import load_policy
from protocols.base import MemoryAudit, ServiceContext, StaticGuests
from protocols.dns.settings import DNSSettings, UpstreamSettings
from protocols.http.service import HTTPService
from protocols.http.settings import HTTPSettings
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP, curl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dns"))
from dnsfront_lab import start_unbound  # noqa: E402  (the DNS area's Unbound-over-DoT helper)

pytestmark = pytest.mark.lab

DOT_IP = "127.0.7.20"  # our own range; the helper takes any address


@dataclass(frozen=True)
class _Config:
    dns: Any


@pytest.fixture(scope="module")
def unbound(lab, tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("unbound") is None:
        pytest.skip("unbound not installed")
    up = start_unbound(
        tmp_path_factory.mktemp("http-dot"), lab.ca, DOT_IP, name="dot.lab.test",
        extra=f'    local-data: "ws.lab.test. 300 IN A {lab.main_ip}"\n',
    )
    yield up
    up.stop()


async def test_host_resolved_over_dot(lab, unbound, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("default: deny\nrules:\n  - {id: named, action: allow, protocol: http, "
                     "match: {host: [ws.lab.test, nx.lab.test]}}\n")
    dns = DNSSettings(upstreams=(UpstreamSettings(DOT_IP, 853, "dot.lab.test"),), ca_file=lab.ca_pem, dnssec="off")
    audit = MemoryAudit()
    ctx = ServiceContext(
        settings=HTTPSettings(proxy_listen=((PROXY_IP, 0),), ca_file=lab.ca_pem),  # no `hosts`: DNS only
        engine=load_policy(rules), audit=audit, guests=StaticGuests({GUEST_IP: "web1"}),
        log=logging.getLogger("test.http.dns"), config=_Config(dns), state_dir=tmp_path / "state",
    )
    svc = HTTPService(ctx)
    await svc.start()
    try:
        assert svc.resolver is not None and svc.resolver.source == "dns"
        port = svc.bound_addresses()["proxy"][0][1]
        res = await curl("-x", f"http://{PROXY_IP}:{port}", "http://ws.lab.test/echo")
        assert res.status == 200 and "sni=ws.lab.test" in res.body, res
        assert unbound.queries_logged("ws.lab.test")  # asked over DoT (the only port the proxy knows)
        res = await curl("-x", f"http://{PROXY_IP}:{port}", "http://nx.lab.test/")
        assert res.status == 502 and "cannot resolve host" in res.body and "NXDOMAIN" in res.body, res
        rec = [r for r in audit.records if r["request"].get("host") == "nx.lab.test"][-1]
        assert rec["verdict"] == "deny" and rec["rule"] == "dns"
    finally:
        await svc.drain(0.2)
