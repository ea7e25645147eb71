"""Shared SMTP labs: a lab CA, a real Postfix STARTTLS MX/relay (Maildir), and an in-process service.

Addresses (127.0.5.0/24, the SMTP area): proxy listeners 127.0.5.1, Postfix MX 127.0.5.10:25
(cert mx.lab.test, SASL user "relayuser"), Postfix with an untrusted cert 127.0.5.12:25.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from policy import load_policy
from policy.source import Secret
from protocols.base import MemoryAudit, ServiceContext, StaticGuests
from protocols.smtp.resolver import MailResolver
from protocols.smtp.service import SMTPService
from protocols.smtp.settings import RelayAuth, RelaySettings, SMTPSettings, TimeoutSettings
from tests.labs import postfix as pflab
from tests.labs.pki import LabCA
from tests.labs.proc import free_port

PROXY_IP = "127.0.5.1"
MX_IP = "127.0.5.10"
UNTRUSTED_IP = "127.0.5.12"
GUEST_IP = "127.0.0.1"  # loopback clients appear as 127.0.0.1 unless they bind; swaks binds 127.0.5.x
RELAY_USER, RELAY_PASSWORD = "relayuser", "s3cret-Relay-pw"

ALLOW_ALL = """\
mode: enforce
default: deny
rules:
  - id: mail-out
    action: allow
    protocol: smtp
"""


def need_postfix() -> None:
    reason = pflab.available()
    if reason:
        pytest.skip(reason)
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed (apt-get install swaks)")


@pytest.fixture(scope="session")
def lab_ca(lab_dir: Path) -> LabCA:
    return LabCA(lab_dir / "ca", "smtp lab CA")


@pytest.fixture(scope="session")
def other_ca(lab_dir: Path) -> LabCA:
    return LabCA(lab_dir / "other-ca", "untrusted CA")


@pytest.fixture(scope="session")
def mx_cert(lab_ca: LabCA) -> tuple[Path, Path]:
    return lab_ca.issue(["mx.lab.test", "relay.lab.test", "mx.plain.smtplab", MX_IP], stem="mx")


@pytest.fixture(scope="session")
def lab_dir() -> Any:
    """Postfix labs live outside pytest's basetemp: parallel pytest runs on this machine prune old
    basetemps (keeping 3), which would delete a running Postfix's queue and Maildir."""
    d = Path(tempfile.mkdtemp(prefix="pvm-smtp-lab-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix_mx(lab_dir: Path, mx_cert: tuple[Path, Path]) -> Any:
    need_postfix()
    d = lab_dir / "postfix-mx"
    lab = pflab.PostfixLab(d, MX_IP, 25, cert=mx_cert[0], key=mx_cert[1],
                           domains=("example.org", "lab.test", "dane.smtplab", "bad.smtplab", "plain.smtplab",
                                    "forged.smtplab"),
                           sasl_users={RELAY_USER: RELAY_PASSWORD}, smtps_port=465,
                           extra={"smtpd_recipient_restrictions":
                                  "check_recipient_access inline:{ {nosuchuser@example.org=550 5.1.1 no such user} }"})
    lab.start()
    yield lab
    lab.stop()


@pytest.fixture(scope="session")
def postfix_untrusted(lab_dir: Path, other_ca: LabCA) -> Any:
    need_postfix()
    d = lab_dir / "postfix-untrusted"
    cert, key = other_ca.issue(["mx.lab.test", "relay.lab.test"], stem="untrusted")
    lab = pflab.PostfixLab(d, UNTRUSTED_IP, 25, cert=cert, key=key)
    lab.start()
    yield lab
    lab.stop()


def make_engine(tmp: Path, text: str = ALLOW_ALL, guests: tuple[str, ...] = ("mail1",)) -> Any:
    p = tmp / "rules.yaml"
    p.write_text(textwrap.dedent(text))
    return load_policy(p, guests=set(guests))


class Clock:
    """An injectable wall clock; `advance()` moves it forward."""

    def __init__(self) -> None:
        import time

        self.offset = 0.0
        self._time = time.time

    def __call__(self) -> float:
        return self._time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Running:
    def __init__(self, service: SMTPService, audit: MemoryAudit, port: int, settings: SMTPSettings, clock: Clock):
        self.service, self.audit, self.port, self.settings, self.clock = service, audit, port, settings, clock

    @property
    def server(self) -> str:
        return f"{PROXY_IP}:{self.port}"

    def records(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.audit.records if all(r.get(k) == v for k, v in match.items())]

    async def wait_records(self, timeout: float = 20.0, **match: Any) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.records(**match):
            if loop.time() > deadline:
                raise TimeoutError(f"no audit record {match}; have {[r.get('event') for r in self.audit.records]}")
            await asyncio.sleep(0.05)
        return self.records(**match)

    async def wait_spool_empty(self, timeout: float = 10.0) -> None:
        """Delivered entries leave the disk in batches just after their final audit record."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.spool_ids():
            if loop.time() > deadline:
                raise TimeoutError(f"spool still holds {self.spool_ids()}")
            await asyncio.sleep(0.05)

    def spool_ids(self) -> list[str]:
        q = self.settings.spool / "queue"
        return sorted(p.stem for p in q.glob("*.msg")) if q.exists() else []


def relay_settings(spool: Path, ca: Path | None, *, ip: str = MX_IP, port: int = 25, auth: bool = True,
                   **kw: Any) -> SMTPSettings:
    relay = RelaySettings(host="relay.lab.test", port=port, address=ip,
                          auth=RelayAuth(RELAY_USER, Secret(RELAY_PASSWORD, "test")) if auth else None)
    base = SMTPSettings(listen=((PROXY_IP, 0),), spool=spool, relay=relay, ca_file=ca, hostname="proxyvm.lab.test",
                        timeouts=TimeoutSettings(connect=5, reply=10, idle=5, command=30, data=10))
    return replace(base, **kw)


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`running = await start_service(settings, rules=..., resolver=...)`; drained at teardown."""
    started: list[SMTPService] = []

    async def _start(settings: SMTPSettings, *, rules: str = ALLOW_ALL, resolver: MailResolver | None = None,
                     clock: Clock | None = None, guests: dict[str, str] | None = None, config: Any = None,
                     **kw: Any) -> Running:
        port = settings.listen[0][1] or free_port(PROXY_IP)
        settings = replace(settings, listen=((PROXY_IP, port),))
        audit = MemoryAudit()
        clock = clock or Clock()
        ctx = ServiceContext(
            settings=settings, engine=make_engine(tmp_path, rules), audit=audit,
            guests=StaticGuests(guests or {"127.0.5.2": "mail1"}), log=logging.getLogger("test.smtp"),
            state_dir=tmp_path / "state", clock=clock, config=config,
        )
        svc = SMTPService(ctx, resolver=resolver, **kw)
        await svc.start()
        started.append(svc)
        return Running(svc, audit, port, settings, clock)

    yield _start
    for svc in started:
        with contextlib.suppress(Exception):
            await svc.drain(1.0)


async def swaks(server: str, *args: str, src: str = "127.0.5.2", timeout: float = 30) -> tuple[int, str]:
    """Run swaks as the guest (bound to `src`); returns (exit code, transcript)."""
    host, port = server.rsplit(":", 1)
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", host, "--port", port, "--local-interface", src, "--helo", "guest.lab.test",
        "--timeout", "20", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode("utf-8", "replace")


async def raw_session(server: str, src: str = "127.0.5.2") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(src, 0))
    return reader, writer


async def read_reply(reader: asyncio.StreamReader, timeout: float = 10) -> str:
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), timeout)).decode("utf-8", "replace")
        if not line:
            break
        lines.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] == " ":
            break
    return "\n".join(lines)


async def chat(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> str:
    writer.write(data)
    await writer.drain()
    return await read_reply(reader)


class StripRelay:
    """A STARTTLS-stripping man in the middle (test code: the attack a real network could mount).
    Forwards TCP to `upstream`; while `strip` is on, rewrites STARTTLS in the server's EHLO reply to
    XXXXXXXA (the classic downgrade). Everything the client sends is kept in `from_client`."""

    def __init__(self, listen_ip: str, upstream: tuple[str, int]):
        self.listen_ip = listen_ip
        self.upstream = upstream
        self.strip = True
        self.from_client = bytearray()
        self.connections = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> StripRelay:
        self._server = await asyncio.start_server(self._handle, self.listen_ip, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            cw.close()
            return
        strip = self.strip

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, client_side: bool) -> None:
            try:
                while data := await src.read(65536):
                    if client_side:
                        self.from_client += data
                    elif strip:
                        data = data.replace(b"STARTTLS", b"XXXXXXXA")
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(cr, uw, True), pump(ur, cw, False))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
