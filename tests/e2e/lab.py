"""The namespace lab: guest ⇄ proxy ⇄ outside, joined by veth pairs, as a real deployment would be.

    guest ns                  proxy ns                               outside ns
    eth0 198.18.0.10/24  ⇄  pvm-in 198.18.0.1/24 | pvm-out 198.19.0.1/24  ⇄  eth0 198.19.0.{53,25,80,161,162}/24
    (MAC 52:54:00:00:00:10)    proxyvm + `gateway up`                      unbound DoT, postfix, snmpd, nginx

Only 198.18.0.0/24 and 198.19.0.0/24 are used; nothing is routed anywhere else. Reusable by any
test or benchmark: `OutsideWorld` starts real servers in the outside namespace, `Capture` records
the outside veth so a test can prove what crossed it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

GUEST_IP = "198.18.0.10"
GUEST_MAC = "52:54:00:00:00:10"
PROXY_IN = "198.18.0.1"
PROXY_OUT = "198.19.0.1"
OUTSIDE = {"dns": "198.19.0.53", "smtp": "198.19.0.25", "http": "198.19.0.80", "http_untrusted": "198.19.0.81",
           "http_plain": "198.19.0.82", "snmp": "198.19.0.161", "trap": "198.19.0.162", "ssh": "198.19.0.22",
           "ntp": "198.19.0.123"}


def lab_available() -> str | None:
    """None when the lab can run here, else why not."""
    if os.geteuid() != 0:
        return "the namespace lab needs root"
    for tool in ("ip", "nft", "tcpdump"):
        if shutil.which(tool) is None:
            return f"the namespace lab needs {tool}"
    return None


def sh(argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), text=True, capture_output=True, check=check, **kw)


class NamespaceLab:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.guest, self.proxy, self.outside = f"pvm-g{tag}", f"pvm-p{tag}", f"pvm-o{tag}"
        self.procs: list[subprocess.Popen] = []

    # -- topology -----------------------------------------------------------------------------
    def up(self) -> NamespaceLab:
        for ns in (self.guest, self.proxy, self.outside):
            sh(["ip", "netns", "add", ns])
            self.run(ns, "ip", "link", "set", "lo", "up")
        sh(["ip", "link", "add", "pvm-in", "netns", self.proxy, "type", "veth", "peer", "name", "eth0",
            "address", GUEST_MAC, "netns", self.guest])
        sh(["ip", "link", "add", "pvm-out", "netns", self.proxy, "type", "veth", "peer", "name", "eth0",
            "netns", self.outside])
        self.run(self.guest, "ip", "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
        self.run(self.guest, "ip", "link", "set", "eth0", "up")
        self.run(self.guest, "ip", "route", "add", "default", "via", PROXY_IN)
        self.run(self.proxy, "ip", "addr", "add", f"{PROXY_IN}/24", "dev", "pvm-in")
        self.run(self.proxy, "ip", "addr", "add", f"{PROXY_OUT}/24", "dev", "pvm-out")
        for dev in ("pvm-in", "pvm-out"):
            self.run(self.proxy, "ip", "link", "set", dev, "up")
        # the proxy proxies, it does not route
        self.run(self.proxy, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        for addr in sorted(set(OUTSIDE.values())):
            self.run(self.outside, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        self.run(self.outside, "ip", "link", "set", "eth0", "up")
        return self

    def down(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for ns in (self.guest, self.proxy, self.outside):
            sh(["ip", "netns", "del", ns], check=False)

    # -- running things -----------------------------------------------------------------------
    def run(self, ns: str, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
        return sh(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout, **kw)

    def popen(self, ns: str, argv: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None,
              cwd: Path | str | None = None) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                             env=dict(os.environ, **(env or {})), cwd=cwd, start_new_session=True)
        self.procs.append(p)
        return p

    def wait_tcp(self, ns: str, host: str, port: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        probe = f"import socket; socket.create_connection(('{host}', {port}), timeout=0.5).close()"
        while time.monotonic() < deadline:
            if self.run(ns, "python3", "-c", probe, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"nothing on tcp {host}:{port} in {ns}")

    def __enter__(self) -> NamespaceLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


class Capture:
    """tcpdump on an interface of a namespace, written to a pcap; `.packets()` reads it with scapy."""

    def __init__(self, lab: NamespaceLab, ns: str, iface: str, pcap: Path):
        self.lab, self.ns, self.iface, self.pcap = lab, ns, iface, pcap
        self.proc: subprocess.Popen | None = None

    def start(self) -> Capture:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "tcpdump", "-U", "-n", "-s", "0", "-i", self.iface, "-w", str(self.pcap)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        # tcpdump prints "listening on ..." once the capture is live
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        line = b""
        while time.monotonic() < deadline and b"listening on" not in line:
            line = self.proc.stderr.readline()
        return self

    def stop(self) -> list:
        if self.proc and self.proc.poll() is None:
            time.sleep(0.3)  # let the last packets reach the file
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(5)
        return self.packets()

    def packets(self) -> list:
        from scapy.utils import rdpcap

        if not self.pcap.exists() or self.pcap.stat().st_size == 0:
            return []
        return list(rdpcap(str(self.pcap)))
