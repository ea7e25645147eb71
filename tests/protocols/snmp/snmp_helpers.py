"""Shared SNMP test helpers and fixtures (re-exported by conftest.py): one real v3-only snmpd and one v3-only snmptrapd per session (on
127.0.6.x), and a helper that runs the SNMP service in-process with a real policy engine."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.labs

from policy import load_policy
from policy.source import parse_yaml
from protocols.base import MemoryAudit, ServiceContext, StaticGuests
from protocols.snmp import settings as snmp_settings
from protocols.snmp.service import SNMPService
from tests.labs.proc import free_port
from tests.labs.snmp_lab import SnmpAgent, TrapReceiverLab, V3User, client_env, have_netsnmp

AGENT_HOST = "127.0.6.10"
TRAPD_HOST = "127.0.6.11"
PROXY_HOST = "127.0.6.1"
GUEST_IP = "127.0.6.100"  # net-snmp clients bind here (--clientaddr) to be guest "mon1"
PROXY_ENGINE_ID = "8000000001020304"

MONITOR = V3User("monitor", "SHA-256", "authpass-monitor", "AES-128", "privpass-monitor")
SETTER = V3User("setter", "SHA-512", "authpass-setter", "AES-256", "privpass-setter", access="rw")
# one user per remaining auth and priv protocol net-snmp 5.9.3 supports (FIELD-NOTES)
MATRIX = [
    V3User("u-sha224", "SHA-224", "authpass-224", "AES-192", "privpass-224"),
    V3User("u-sha384", "SHA-384", "authpass-384", "AES-256-Cisco", "privpass-384"),
    V3User("u-sha1", "SHA", "authpass-sha1", "AES-192-Cisco", "privpass-sha1"),
    V3User("u-md5", "MD5", "authpass-md5", "AES-256", "privpass-md5"),
    V3User("u-sha512", "SHA-512", "authpass-512", "AES-128", "privpass-512"),
]
TRAPPER = V3User("trapper", "SHA-384", "authpass-trapper", "AES-256-Cisco", "privpass-trapper")
INFORMER = V3User("informer", "SHA-256", "authpass-informer", "AES-192", "privpass-informer")

needs_netsnmp = pytest.mark.skipif(not have_netsnmp(), reason="net-snmp snmpd/snmptrapd/snmp tools not installed")


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("snmplab")


@pytest.fixture(scope="session")
def agent(lab_dir: Path) -> Iterator[SnmpAgent]:
    if not have_netsnmp():
        pytest.skip("net-snmp snmpd not installed")
    with SnmpAgent(lab_dir, AGENT_HOST, free_port(AGENT_HOST, "udp"), [MONITOR, SETTER, *MATRIX]) as a:
        yield a


@pytest.fixture(scope="session")
def trapd(lab_dir: Path) -> Iterator[TrapReceiverLab]:
    if not have_netsnmp():
        pytest.skip("net-snmp snmptrapd not installed")
    with TrapReceiverLab(lab_dir, TRAPD_HOST, free_port(TRAPD_HOST, "udp"), [TRAPPER, INFORMER],
                         sender_engine_id=PROXY_ENGINE_ID) as t:
        yield t


def creds_yaml(d: Path, user: V3User) -> str:
    """A `user/auth/priv` YAML flow mapping body with the pass phrases in 0600 files under `d`."""
    a = d / f"{user.name}.auth"
    p = d / f"{user.name}.priv"
    for f, v in ((a, user.auth_pass), (p, user.priv_pass)):
        f.write_text(v + "\n")
        f.chmod(0o600)
    return (f"user: {user.name}, auth: {{protocol: {user.auth}, password_file: {a}}}, "
            f"priv: {{protocol: {user.priv}, password_file: {p}}}")


def parse_settings(text: str, base: Path) -> snmp_settings.SNMPSettings:
    node = parse_yaml(textwrap.dedent(text), str(base / "proxyvm.yaml"), base)
    return snmp_settings.parse(node, base)


def write_rules(d: Path, text: str) -> Path:
    p = d / "rules.yaml"
    p.write_text(textwrap.dedent(text))
    return p


DEFAULT_RULES = """\
mode: enforce
default: deny
rules:
  - id: snmp-read
    action: allow
    protocol: snmp
    match: {op: [get, getnext, getbulk], oid: ["1.3.6.1.2.1.1", "1.3.6.1.2.1.2"]}
  - id: snmp-set-contact
    action: allow
    protocol: snmp
    guests: [mon1]
    match: {op: [set], oid: ["1.3.6.1.2.1.1.4", "1.3.6.1.2.1.1.6"]}
  - id: traps
    action: allow
    protocol: snmp
    match: {op: [trap, inform]}
"""


@dataclass
class Running:
    service: SNMPService
    audit: MemoryAudit
    port: int
    trap_port: int
    ctx: ServiceContext

    @property
    def address(self) -> str:
        return f"{PROXY_HOST}:{self.port}"

    @property
    def trap_address(self) -> str:
        return f"{PROXY_HOST}:{self.trap_port}"

    def records(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.audit.records if all(_get(r, k) == v for k, v in match.items())]


def _get(rec: dict[str, Any], key: str) -> Any:
    cur: Any = rec
    for part in key.split("__"):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def snmp_yaml(d: Path, agent: SnmpAgent | None, port: int, trap_port: int, *, extra: str = "",
              agent_user: V3User = MONITOR, agents_extra: str = "", receivers: str = "",
              timeout: str = "500ms") -> str:
    """An `snmp:` section (not indented) with agents `lab` (community labcomm, read user) and
    `writer` (community writecomm, read-write user) on the lab agent."""
    lines = [f'listen: ["{PROXY_HOST}:{port}"]', f'traps_listen: ["{PROXY_HOST}:{trap_port}"]',
             "communities: [public]", f'engine_id: "0x{PROXY_ENGINE_ID}"', "agents:"]
    if agent is not None:
        lines.append(f'  lab: {{address: "{agent.address}", community: labcomm, {creds_yaml(d, agent_user)}, '
                     f"timeout: {timeout}, retries: 1}}")
        lines.append(f'  writer: {{address: "{agent.address}", community: writecomm, {creds_yaml(d, SETTER)}, '
                     f"timeout: {timeout}, retries: 1}}")
    lines.extend(agents_extra.splitlines())
    if lines[-1] == "agents:":
        lines[-1] = "agents: {}"
    lines.extend(receivers.splitlines())
    lines.extend(extra.splitlines())
    return "\n".join(lines) + "\n"


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[SNMPService] = []

    async def make(settings: Any = None, rules: str = DEFAULT_RULES, **kw: Any) -> Running:
        """`settings`: YAML text, or a callable (port, trap_port) -> YAML text; default: the lab
        agent via `snmp_yaml(..., **kw)` (needs kw["agent"])."""
        port = free_port(PROXY_HOST, "udp")
        trap_port = free_port(PROXY_HOST, "udp")
        if settings is None:
            text = snmp_yaml(tmp_path, kw.pop("agent", None), port, trap_port, **kw)
        elif callable(settings):
            text = settings(port, trap_port)
        else:
            text = settings
        s = parse_settings(text, tmp_path)
        engine = load_policy(write_rules(tmp_path, rules), guests={"mon1"})
        audit = MemoryAudit()
        ctx = ServiceContext(settings=s, engine=engine, audit=audit, guests=StaticGuests({GUEST_IP: "mon1"}),
                             log=logging.getLogger("test.snmp"), state_dir=tmp_path / "state")
        svc = SNMPService(ctx)
        await svc.start()
        started.append(svc)
        return Running(svc, audit, port, trap_port, ctx)

    yield make
    for svc in started:
        await svc.drain(2.0)


async def tool(workdir: Path, *argv: str, timeout: float = 30.0, guest: bool = True) -> tuple[int, str, str]:
    """Run a net-snmp client as a guest (source 127.0.6.100 = guest mon1 unless guest=False)."""
    args = list(argv)
    if guest:
        args.insert(1, f"--clientaddr={GUEST_IP}")
    proc = await asyncio.create_subprocess_exec(*args, env=client_env(workdir), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

