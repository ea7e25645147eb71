"""The DNS test lab: real Unbound instances as DoT upstreams on 127.0.3.x, and guest clients.

Upstream zone data (served by Unbound's local-data, so no internet is needed):
  www.lab.test      A 192.0.2.10 (TTL 300)        short.lab.test A 192.0.2.20 (TTL 3)
  blocked.lab.test  A 192.0.2.66                   private.lab.test A 10.0.0.5 (rebinding)
  named.lab.test    A 192.168.1.5 (rule names it)  big.lab.test TXT (~3 KB: truncation)
  *.wild.test       A 192.0.2.1 (redirect zone: unique names for cache-miss workloads)
  anything else under lab.test: NXDOMAIN with SOA minimum 60 (negative caching)
Each Unbound also listens in plaintext on port 53 of the same address with log-queries on, so a
test can prove the proxy never sent it a plaintext query.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.labs.pki import LabCA
from tests.labs.proc import Daemon, wait_port

UNBOUND = shutil.which("unbound")
DIG = shutil.which("dig")
KDIG = shutil.which("kdig")

ZONE = """
    local-zone: "lab.test." static
    local-data: "lab.test. 3600 IN SOA ns.lab.test. hostmaster.lab.test. 1 3600 600 86400 60"
    local-data: "www.lab.test. 300 IN A 192.0.2.10"
    local-data: "www.lab.test. 300 IN AAAA 2001:db8::10"
    local-data: "short.lab.test. 3 IN A 192.0.2.20"
    local-data: "blocked.lab.test. 300 IN A 192.0.2.66"
    local-data: "private.lab.test. 300 IN A 10.0.0.5"
    local-data: "named.lab.test. 300 IN A 192.168.1.5"
    local-data: "mixed.lab.test. 300 IN A 192.0.2.30"
    local-data: "mixed.lab.test. 300 IN A 198.51.100.7"
    local-data: "alias.lab.test. 300 IN CNAME www.lab.test."
    local-data: "mx.lab.test. 300 IN MX 10 mail.lab.test."
    local-zone: "wild.test." redirect
    local-data: "wild.test. 300 IN A 192.0.2.1"
"""


def _big_txt() -> str:
    lines = []
    for i in range(12):
        lines.append(f'    local-data: "big.lab.test. 300 IN TXT \\"{i:02d}-{"x" * 240}\\""')
    return "\n".join(lines) + "\n"


@dataclass
class Upstream:
    address: str  # "127.0.3.2"
    port: int  # DoT (or plaintext for a plain-only instance)
    name: str  # certificate name
    log: Path
    daemon: Daemon
    cert: Path | None

    def stop(self) -> None:
        self.daemon.stop()

    def queries_logged(self, qname: str) -> list[str]:
        """Log lines of queries for `qname` that reached this Unbound (over any transport)."""
        if not self.log.exists():
            return []
        return [ln for ln in self.log.read_text(errors="replace").splitlines()
                if "info:" in ln and qname.lower() in ln.lower()]


def start_unbound(
    workdir: Path, ca: LabCA | None, address: str, *, name: str = "", dot_port: int = 853, plain_only: bool = False,
    extra: str = "", expired: bool = False,
) -> Upstream:
    """A real Unbound on `address`: DoT on `dot_port` with a lab certificate for `name` (or, with
    plain_only, plaintext DNS on `dot_port`), plus plaintext port 53, all logging queries."""
    d = workdir / f"unbound-{address}-{dot_port}"
    d.mkdir(parents=True, exist_ok=True)
    log = d / "unbound.log"
    cert = key = None
    if plain_only:
        ifaces = f"    interface: {address}@{dot_port}\n"
        tls = ""
    else:
        assert ca is not None
        cert, key = ca.issue([name], stem=f"dot-{address}-{dot_port}", expired=expired)
        ifaces = f"    interface: {address}@{dot_port}\n    interface: {address}@53\n"
        tls = f"""    tls-port: {dot_port}
    tls-service-key: "{key}"
    tls-service-pem: "{cert}"
"""
    conf = d / "unbound.conf"
    opts = [
        "do-daemonize: no", 'chroot: ""', 'username: ""', f'directory: "{d}"', f'pidfile: "{d}/unbound.pid"',
        "use-syslog: no", f'logfile: "{log}"', "verbosity: 1", "log-queries: yes", "log-replies: no",
        "access-control: 127.0.0.0/8 allow", 'module-config: "iterator"', "do-not-query-localhost: no",
        "num-threads: 1", "incoming-num-tcp: 256", "edns-tcp-keepalive: yes",
        "edns-tcp-keepalive-timeout: 20000", "tcp-idle-timeout: 20000", "msg-cache-size: 4m",
        "rrset-cache-size: 4m", 'local-zone: "test." nodefault',
    ]
    body = ifaces + tls + "".join(f"    {o}\n" for o in opts)
    body += "".join(f"    {ln.strip()}\n" for ln in ZONE.strip().splitlines()) + _big_txt() + extra
    conf.write_text("server:\n" + body)
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"bad unbound.conf: {check.stdout}{check.stderr}\n{conf.read_text()}")
    starts = log.read_text(errors="replace").count("start of service") if log.exists() else 0

    def ready() -> bool:
        # Our own instance said it serves (a port test alone could be answered by a stranger's
        # daemon on the same address: another engineer's test run on this machine).
        return log.exists() and log.read_text(errors="replace").count("start of service") > starts

    daemon = Daemon([UNBOUND, "-d", "-c", str(conf)], ready=ready, log=d / "stderr.log", timeout=20).start()
    wait_port(address, dot_port, "tcp", timeout=5)
    return Upstream(address, dot_port, name, log, daemon, cert)


_taken: set[str] = set()


def pick_ip(ports: tuple[int, ...] = (853, 53)) -> str:
    """A 127.0.3.x address whose ports are free right now. Random, so that two test runs on one
    machine (engineers running the suite side by side) do not meet each other's Unbound."""
    candidates = [f"127.0.3.{i}" for i in range(16, 255)]
    random.shuffle(candidates)
    for ip in candidates:
        if ip in _taken:
            continue
        socks = []
        try:
            for port in ports:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind((ip, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        _taken.add(ip)
        return ip
    raise RuntimeError("no free 127.0.3.x address")


# -- guest clients -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DigResult:
    text: str
    status: str
    flags: frozenset[str]
    answers: list[tuple[str, int, str, str]]  # (name, ttl, type, rdata)
    ede: list[tuple[int, str]]  # (info-code, extra text)


_STATUS = re.compile(r"status: (\w+)")
_FLAGS = re.compile(r";; flags: ([a-z ]+);")
_EDE = re.compile(r"; EDE: (\d+)(?: \([^)]*\))?(?:: \((.*)\))?")


def parse_dig(text: str) -> DigResult:
    status = m.group(1) if (m := _STATUS.search(text)) else ""
    flags = frozenset(m.group(1).split()) if (m := _FLAGS.search(text)) else frozenset()
    answers = []
    section = ""
    for line in text.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            section = "answer"
            continue
        if line.startswith(";;") or not line.strip():
            if section and not line.strip():
                section = ""
            continue
        if section == "answer" and not line.startswith(";"):
            parts = line.split(None, 4)
            if len(parts) == 5:
                answers.append((parts[0], int(parts[1]), parts[3], parts[4]))
    ede = [(int(m.group(1)), m.group(2) or "") for m in _EDE.finditer(text)]
    return DigResult(text, status, flags, answers, ede)


async def dig(server: str, port: int, *args: str, timeout: float = 20) -> DigResult:
    """Run the real `dig` against the proxy without blocking the event loop it runs in."""
    proc = await asyncio.create_subprocess_exec(
        DIG, f"@{server}", "-p", str(port), "+tries=1", "+time=5", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return parse_dig(out.decode(errors="replace"))


async def kdig(server: str, port: int, *args: str, timeout: float = 20) -> str:
    proc = await asyncio.create_subprocess_exec(
        KDIG, f"@{server}", "-p", str(port), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return out.decode(errors="replace")
