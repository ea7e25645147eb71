"""Transparent gateway mode: the ruleset text, idempotent up/down, and the TPROXY/REDIRECT
mechanics (original destination on UDP and TCP) in real network namespaces."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from proxyvm.config import load_config
from proxyvm.gateway import render, render_nft

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
    reason="needs root, nft and ip (network namespaces)",
)

CONFIG = """\
guests:
  web1: {addresses: [198.18.0.10], mac: "52:54:00:00:00:10"}
  mail1: {addresses: [198.18.0.11]}
audit: {path: audit.jsonl}
gateway: {inside: pvm-in0, outside: pvm-out0}
dns:
  listen: ["198.18.0.1:53"]
  upstreams:
    - {address: "198.19.0.53:853", name: dot.lab.test}
"""


@pytest.fixture
def config(tmp_path: Path):
    p = tmp_path / "proxyvm.yaml"
    p.write_text(CONFIG)
    return load_config(p)


def test_ruleset_steers_and_drops(config) -> None:
    text = render_nft(config)
    assert 'iifname "pvm-in0" ip protocol tcp tcp dport 53 redirect to :53' in text
    assert "udp dport 53 tproxy ip to 198.18.0.1:53 meta mark set 0x7076 accept" in text
    # anti-spoofing only for guests with a MAC
    assert "ip saddr 198.18.0.10 ether saddr != 52:54:00:00:00:10 counter name guest_spoofed drop" in text
    assert "198.18.0.11 ether" not in text
    # nothing forwarded; everything else dropped and counted
    assert 'chain guard_forward' in text and 'iifname "pvm-in0" counter name guest_dropped drop' in text
    # services that are off are not steered
    assert "dport 25" not in text and "dport 80" not in text and "dport 161" not in text
    # replaced atomically: declare, delete, define in one transaction
    assert text.index("delete table inet proxyvm") < text.index("table inet proxyvm {")
    full = render(config)
    assert "# ip rule add fwmark 0x7076 lookup 7076" in full


def test_gateway_rules_cli_without_gateway_section(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(CONFIG.replace("gateway: {inside: pvm-in0, outside: pvm-out0}\n", ""))
    r = subprocess.run([sys.executable, "-m", "proxyvm", "gateway-rules", "-c", str(p)], capture_output=True, text=True)
    assert r.returncode == 1 and "no gateway section" in r.stderr


def _ns(name: str, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], text=True, capture_output=True, check=check, **kw)


@pytest.fixture
def netns_pair():
    """guest ns (198.18.0.10) <-veth-> proxy ns (198.18.0.1 on pvm-in0)."""
    tag = uuid.uuid4().hex[:6]
    guest, proxy = f"pvm-g{tag}", f"pvm-p{tag}"
    for ns in (guest, proxy):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", "pvm-in0", "netns", proxy, "type", "veth", "peer", "name", "eth0",
                        "address", "52:54:00:00:00:10", "netns", guest], check=True)
        _ns(proxy, "ip", "addr", "add", "198.18.0.1/24", "dev", "pvm-in0")
        _ns(proxy, "ip", "link", "set", "pvm-in0", "up")
        _ns(proxy, "ip", "link", "set", "lo", "up")
        _ns(guest, "ip", "addr", "add", "198.18.0.10/24", "dev", "eth0")
        _ns(guest, "ip", "link", "set", "eth0", "up")
        _ns(guest, "ip", "link", "set", "lo", "up")
        _ns(guest, "ip", "route", "add", "default", "via", "198.18.0.1")
        yield guest, proxy
    finally:
        for ns in (guest, proxy):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@needs_root
def test_up_down_idempotent(tmp_path: Path, netns_pair) -> None:
    _, proxy = netns_pair
    p = tmp_path / "proxyvm.yaml"
    p.write_text(CONFIG)
    cmd = [sys.executable, "-m", "proxyvm", "gateway"]
    for _ in range(2):
        r = _ns(proxy, *cmd, "up", "-c", str(p), check=False)
        assert r.returncode == 0, r.stderr
    rules = _ns(proxy, "ip", "rule", "show").stdout
    assert rules.count("fwmark 0x7076 lookup 7076") == 1
    assert "table inet proxyvm" in _ns(proxy, "nft", "list", "tables").stdout
    assert "local default dev lo" in _ns(proxy, "ip", "route", "show", "table", "7076").stdout
    for _ in range(2):
        r = _ns(proxy, *cmd, "down", "-c", str(p), check=False)
        assert r.returncode == 0, r.stderr
    assert "fwmark" not in _ns(proxy, "ip", "rule", "show").stdout
    assert "proxyvm" not in _ns(proxy, "nft", "list", "tables").stdout


ECHO_SERVER = textwrap.dedent(
    """
    import asyncio, socket, sys
    sys.path.insert(0, {root!r})
    from protocols.transparent import TransparentUDP, tcp_original_dst

    async def handler(data, src, orig):
        return b"udp-orig=" + f"{{orig[0]}}:{{orig[1]}}".encode() if orig else b"udp-orig=none"

    async def tcp(reader, writer):
        dst = tcp_original_dst(writer.get_extra_info("socket"))
        writer.write(f"tcp-orig={{dst[0]}}:{{dst[1]}}\\n".encode() if dst else b"tcp-orig=none\\n")
        await writer.drain(); writer.close()

    async def main():
        t = TransparentUDP("198.18.0.1", 53, handler); t.start()
        srv = await asyncio.start_server(tcp, "198.18.0.1", 53)
        # like a worker: drop root after binding; replies must still leave from the original address
        import os
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        print("ready", flush=True)
        await asyncio.sleep(30)
    asyncio.run(main())
    """
)


@needs_root
def test_tproxy_and_redirect_give_original_destination(tmp_path: Path, netns_pair) -> None:
    guest, proxy = netns_pair
    p = tmp_path / "proxyvm.yaml"
    p.write_text(CONFIG)
    r = _ns(proxy, sys.executable, "-m", "proxyvm", "gateway", "up", "-c", str(p), check=False)
    assert r.returncode == 0, r.stderr
    root = str(Path(__file__).resolve().parents[2])
    server = subprocess.Popen(
        ["ip", "netns", "exec", proxy, sys.executable, "-c", ECHO_SERVER.format(root=root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = textwrap.dedent(
            """
            import socket
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
            u.sendto(b"hi", ("198.19.0.53", 53))
            data, frm = u.recvfrom(100)
            print(data.decode(), frm[0], frm[1])
            t = socket.create_connection(("198.19.0.99", 53), timeout=3)
            print(t.recv(100).decode().strip())
            try:
                socket.create_connection(("198.19.0.22", 22), timeout=1)
                print("ssh-open")
            except OSError:
                print("ssh-blocked")
            """
        )
        out = _ns(guest, sys.executable, "-c", client, check=False)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split("\n")
        # UDP: the original destination is reported and the reply comes from it
        assert lines[0] == "udp-orig=198.19.0.53:53 198.19.0.53 53"
        # TCP: REDIRECT + SO_ORIGINAL_DST
        assert lines[1] == "tcp-orig=198.19.0.99:53"
        # anything else is dropped, and counted
        assert lines[2] == "ssh-blocked"
        counters = _ns(proxy, "nft", "list", "counter", "inet", "proxyvm", "guest_dropped").stdout
        packets = int(re.search(r"packets (\d+)", counters).group(1))
        assert packets >= 1
        # web1 has `mac:` in the inventory: the same address from another MAC is dropped and counted
        _ns(guest, "ip", "link", "set", "eth0", "address", "52:54:00:00:00:99")
        spoof = _ns(guest, sys.executable, "-c", client, check=False)
        assert spoof.returncode != 0 and "timed out" in spoof.stderr
        counters = _ns(proxy, "nft", "list", "counter", "inet", "proxyvm", "guest_spoofed").stdout
        assert int(re.search(r"packets (\d+)", counters).group(1)) >= 1
    finally:
        server.kill()
        server.wait()
        time.sleep(0.1)
