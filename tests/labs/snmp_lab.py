"""Real net-snmp peers for tests: a v3-only `snmpd` agent and a v3-only `snmptrapd` receiver.

Reusable by any test area (the gateway/e2e tests start the same agent in a namespace):

    users = [V3User("monitor", "SHA-256", "authpass1", "AES-128", "privpass1")]
    with SnmpAgent(tmp_path, "127.0.6.10", 16110, users) as agent:
        agent.get("1.3.6.1.2.1.1.5.0", users[0])          # direct -v3 query (net-snmp's snmpget)
    with TrapReceiverLab(tmp_path, "127.0.6.11", 16211, users, sender_engine_id="8000000001020304") as r:
        r.wait_for("1.3.6.1.4.1.8072.2.3.0.1")

Neither daemon has any community configured, so a v1/v2c answer that arrives through the proxy
proves the proxy translated it. Both run in the foreground with their own config and persistent
directory, and are stopped by pid. Use only 127.0.0.0/8 or your namespace's addresses.
Must not: touch /etc/snmp or /var/lib/snmp (SNMP_PERSISTENT_DIR and -C keep them out).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.labs.proc import Daemon, wait_port

# proxyvm protocol names -> net-snmp spellings (config files and command-line tools differ)
NETSNMP_AUTH = {"MD5": "MD5", "SHA": "SHA", "SHA-224": "SHA-224", "SHA-256": "SHA-256", "SHA-384": "SHA-384",
                "SHA-512": "SHA-512"}
NETSNMP_PRIV = {"AES-128": "AES", "AES-192": "AES192", "AES-256": "AES256", "AES-192-Cisco": "AES192C",
                "AES-256-Cisco": "AES256C"}
CLI_PRIV = {"AES-128": "AES", "AES-192": "AES-192", "AES-256": "AES-256", "AES-192-Cisco": "AES-192-C",
            "AES-256-Cisco": "AES-256-C"}


def have_netsnmp() -> bool:
    return all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in ("snmpd", "snmptrapd", "snmpget"))


@dataclass(frozen=True)
class V3User:
    name: str
    auth: str  # proxyvm name: SHA-256 ...
    auth_pass: str
    priv: str  # proxyvm name: AES-128, AES-256-Cisco ...
    priv_pass: str
    access: str = "ro"  # ro | rw (snmpd only)

    def create_line(self, engine_id: str | None = None) -> str:
        e = f"-e {engine_id} " if engine_id else ""
        return (f"createUser {e}{self.name} {NETSNMP_AUTH[self.auth]} {self.auth_pass} "
                f"{NETSNMP_PRIV[self.priv]} {self.priv_pass}")

    def cli_args(self) -> list[str]:
        """net-snmp client options for this user at authPriv."""
        return ["-v3", "-l", "authPriv", "-u", self.name, "-a", NETSNMP_AUTH[self.auth], "-A", self.auth_pass,
                "-x", CLI_PRIV[self.priv], "-X", self.priv_pass]


def client_env(workdir: Path) -> dict[str, str]:
    d = Path(workdir) / "snmp-client"
    d.mkdir(parents=True, exist_ok=True)
    (d / "snmp.conf").write_text("")
    return dict(os.environ, SNMP_PERSISTENT_DIR=str(d), SNMPCONFPATH=str(d), MIBS="", MIBDIRS=str(d))


def netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def run_tool(workdir: Path, argv: list[str], timeout: float = 30.0, netns: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    """Run a net-snmp command-line tool (numeric output, no MIBs, private persistent dir),
    optionally inside a network namespace."""
    return subprocess.run(netns_prefix(netns) + argv, env=client_env(workdir), capture_output=True, text=True,
                          timeout=timeout)


class SnmpAgent:
    """A net-snmp `snmpd` that knows only the given SNMPv3 users (authPriv), on host:port/udp."""

    def __init__(self, workdir: Path, host: str, port: int, users: list[V3User], *,
                 engine_id: str | None = "0x80001f8880c0ffee0001", extra_conf: str = "",
                 netns: str | None = None):
        self.dir = Path(workdir) / f"snmpd-{host}-{port}"
        self.netns = netns  # run (and probe) inside this network namespace
        self.host, self.port, self.users, self.engine_id = host, port, users, engine_id
        self.extra_conf = extra_conf
        self.daemon: Daemon | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, keep_state: bool = False) -> SnmpAgent:
        """Start snmpd; `keep_state=True` keeps its persistent directory (engineBoots goes up,
        as after a real reboot of the agent)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        persist = self.dir / "persist"
        if persist.exists() and not keep_state:
            shutil.rmtree(persist)
        persist.mkdir(exist_ok=True)
        # exactEngineID pins the ID but makes snmpd restart engineBoots at 1; engine_id=None lets
        # snmpd keep its own ID and count boots in the persistent directory like a real agent.
        lines = [f"agentAddress udp:{self.host}:{self.port}", "sysServices 72", "sysDescr proxyvm lab agent",
                 "sysLocation lab"]
        if self.engine_id:
            lines.append(f"exactEngineID {self.engine_id}")
        for u in self.users:
            lines.append(u.create_line())
            lines.append(f"{'rwuser' if u.access == 'rw' else 'rouser'} {u.name} priv")
        lines.append(self.extra_conf)
        conf = self.dir / "snmpd.conf"
        conf.write_text("\n".join(lines) + "\n")
        # No -C: that would also skip the persistent file (engineBoots, oldEngineID). SNMPCONFPATH
        # limits the search to our directory and the persistent one, never /etc/snmp.
        env = {"SNMP_PERSISTENT_DIR": str(persist), "SNMPCONFPATH": f"{self.dir}:{persist}", "MIBS": "",
               "MIBDIRS": str(self.dir)}
        self.daemon = Daemon(
            [*netns_prefix(self.netns), "/usr/sbin/snmpd", "-f", "-Lf", str(self.dir / "snmpd.log"),
             "-p", str(self.dir / "snmpd.pid")],
            ready=(lambda: True) if self.netns else (lambda: wait_port(self.host, self.port, "udp", timeout=0.2) or True),
            log=self.dir / "stdout.log", env=env, timeout=20,
        ).start()
        # snmpd binds before it has read its users; wait until a v3 query works
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.get("1.3.6.1.2.1.1.3.0", self.users[0]).returncode == 0:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"snmpd on {self.address} never answered v3: {self.daemon.tail()}")

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()

    def restart(self, *, keep_state: bool = True) -> SnmpAgent:
        """Reboot the agent: with its state (engineBoots + 1 when engine_id=None), or without
        (a new engine ID when engine_id=None)."""
        self.stop()
        return self.start(keep_state=keep_state)

    def __enter__(self) -> SnmpAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tool(self, tool: str, user: V3User, *args: str) -> subprocess.CompletedProcess[str]:
        return run_tool(self.dir, [tool, *user.cli_args(), "-On", "-Oe", "-r", "1", "-t", "2",
                                   self.address, *args], netns=self.netns)

    def get(self, oid: str, user: V3User) -> subprocess.CompletedProcess[str]:
        return self.tool("snmpget", user, oid)


class TrapReceiverLab:
    """A net-snmp `snmptrapd` accepting only SNMPv3 authPriv from the given users.
    `sender_engine_id` (hex, no 0x) is the trap sender's engine ID (v3 TRAPs need it; INFORMs don't)."""

    def __init__(self, workdir: Path, host: str, port: int, users: list[V3User], *, sender_engine_id: str,
                 netns: str | None = None):
        self.dir = Path(workdir) / f"snmptrapd-{host}-{port}"
        self.netns = netns
        self.host, self.port, self.users = host, port, users
        self.sender_engine_id = sender_engine_id
        self.daemon: Daemon | None = None
        self.log = self.dir / "traps.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> TrapReceiverLab:
        self.dir.mkdir(parents=True, exist_ok=True)
        persist = self.dir / "persist"
        if persist.exists():
            shutil.rmtree(persist)
        persist.mkdir()
        lines = []
        for u in self.users:
            lines.append(u.create_line("0x" + self.sender_engine_id))  # for TRAPs (sender authoritative)
            lines.append(u.create_line())  # for INFORMs (snmptrapd authoritative)
            lines.append(f"authUser log {u.name} priv")
        conf = self.dir / "snmptrapd.conf"
        conf.write_text("\n".join(lines) + "\n")
        env = {"SNMP_PERSISTENT_DIR": str(persist), "MIBS": "", "MIBDIRS": str(self.dir)}
        self.daemon = Daemon(
            [*netns_prefix(self.netns), "/usr/sbin/snmptrapd", "-f", "-C", "-c", str(conf), "-On", "-Lf", str(self.log),
             "-F", "TRAP %P|%b|%V~%v\n", "-p", str(self.dir / "snmptrapd.pid"), f"udp:{self.host}:{self.port}"],
            ready=(lambda: True) if self.netns else (lambda: wait_port(self.host, self.port, "udp", timeout=0.2) or True),
            log=self.dir / "stdout.log", env=env, timeout=20,
        ).start()
        time.sleep(0.3)  # it binds before reading users
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()

    def __enter__(self) -> TrapReceiverLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def traps(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.startswith("TRAP ")]

    def wait_for(self, needle: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            hits = [t for t in self.traps() if needle in t]
            if len(hits) >= count:
                return hits
            if time.monotonic() > deadline:
                raise TimeoutError(f"no trap with {needle!r} after {timeout}s; log: {self.text()[-2000:]}")
            time.sleep(0.05)
