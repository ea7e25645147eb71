"""The guest side end to end: real dig/kdig guests → DNSService → real Unbound over DoT."""

from __future__ import annotations

import pytest
from conftest import PROXY_IP, needs_peers, up_yaml
from dnsfront_lab import dig

pytestmark = [needs_peers, pytest.mark.lab]


async def test_answer_through_dot_and_audit(make_proxy, upstream1) -> None:
    p = await make_proxy(up_yaml(upstream1))
    r = await dig(PROXY_IP, p.port, "www.lab.test", "A")
    assert r.status == "NOERROR", r.text
    assert [a[3] for a in r.answers] == ["192.0.2.10"]
    assert "ra" in r.flags and "qr" in r.flags
    [rec] = p.records("www.lab.test")
    assert rec["verdict"] == "allow" and rec["rule"] == "default" and rec["protocol"] == "dns"
    assert rec["upstream"]["address"] == f"{upstream1.address}:853"
    assert rec["upstream"]["tls"] in ("TLSv1.2", "TLSv1.3") and rec["upstream"]["verified"] is True
    assert rec["cache"] == "miss" and rec["src"].startswith("127.")
    assert upstream1.queries_logged("www.lab.test")  # it did go to the upstream
