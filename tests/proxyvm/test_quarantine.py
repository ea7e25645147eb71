"""Quarantine through the real `proxyvm run -c CONFIG` (supervisor + DNS worker) in front of the real
Unbound DoT upstream, driven by the real CLI (`proxyvm quarantine` / `release` over the control
socket), with dig as the guest:

* a dig loop runs while the guest is quarantined (honeypot): the next answer is the sinkhole, the
  audit shows the `kind: quarantine` record (who, why) and each query's decision (rule
  `quarantine`); after `release`, real answers again;
* block: REFUSED with EDE 15 naming the quarantine; it survives SIGHUP, a killed DNS worker (the
  restarted one gets the table) and a restart of the whole process (state_dir/quarantine.json);
* bad input: unknown guest, a second quarantine, releasing a guest not quarantined, and a control
  socket that is not ours (wrong mode, wrong owner, stale, not a socket, missing) — each a message
  and its exit code (0 ok, 1 error, 2 usage)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.dns.conftest import PROXY_IP, lab_ca, lab_dir, needs_peers, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig

GUEST_IP = "127.0.0.1"
OTHER_IP = "127.0.0.2"
RULES = "mode: enforce\ndefault: allow\nrules: []\n"


def write_config(d: Path, ca: Path, upstream: Any, port: int, admin: int, extra: str = "") -> Path:
    os.chmod(d, 0o755)  # the worker may drop privileges after binding
    (d / "rules.yaml").write_text(RULES)
    cfg = d / "proxyvm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        guests:
          web1: {{addresses: [{GUEST_IP}]}}
          web2: {{addresses: [{OTHER_IP}]}}
        policy: rules.yaml
        audit: {{path: audit.jsonl}}
        admin: {{listen: "{PROXY_IP}:{admin}"}}
        state_dir: state
        quarantine:
          sinkhole: {{a: 192.0.2.254, aaaa: "2001:db8::254"}}
        dns:
          listen: ["{PROXY_IP}:{port}"]
          ca_file: {ca}
          dnssec: off
          upstreams:
            - {{address: "{upstream.address}:853", name: {upstream.name}}}
        """) + extra)
    return cfg


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyvm", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30)


class DigLoop:
    """dig www.lab.test A as web1, again and again, each answer kept with when it came."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[float, str, list[str]]] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()  # an answer counts from when its query was sent
            r = await dig(PROXY_IP, self.port, "www.lab.test", "A", "-b", GUEST_IP)
            self.answers.append((started, r.status, [a[3] for a in r.answers]))
            await asyncio.sleep(0.05)

    def start(self) -> DigLoop:
        self.task = asyncio.create_task(self._run())
        return self

    async def next_after(self, t: float, timeout: float = 10) -> tuple[float, str, list[str]]:
        """The first answer to a query sent after `t`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for a in self.answers:
                if a[0] > t:
                    return a
            await asyncio.sleep(0.05)
        raise AssertionError(f"no answer to a query sent after {t}: {self.answers[-5:]}")

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def records(pvm: ProxyVM, **match: Any) -> list[dict[str, Any]]:
    return [r for r in pvm.audit_records() if all(r.get(k) == v for k, v in match.items())]


@needs_peers
@pytest.mark.lab
async def test_honeypot_while_dig_loops_then_release(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    cfg = write_config(tmp_path, lab_ca.ca_pem, upstream1, port, admin)
    pvm = ProxyVM(cfg)
    await asyncio.to_thread(pvm.start)
    loop = DigLoop(port).start()
    try:
        first = await loop.next_after(0)
        assert first[1:] == ("NOERROR", ["192.0.2.10"]), first
        sock = tmp_path / "state" / "control.sock"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"

        r = await asyncio.to_thread(cli, cfg, "quarantine", "web1", "--profile", "honeypot",
                                    "--reason", "beaconing to a C2 name (ticket 7)")
        done = time.monotonic()
        assert r.returncode == 0, r.stderr
        assert "guest web1 quarantined (honeypot)" in r.stdout
        # The next query after the command returned gets the sinkhole: no restart, no reload.
        nxt = await loop.next_after(done)
        assert nxt[1:] == ("NOERROR", ["192.0.2.254"]), loop.answers[-5:]
        # another guest is untouched
        other = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", OTHER_IP)
        assert other.status == "NOERROR" and other.answers[0][3] == "192.0.2.10"
        six = await dig(PROXY_IP, port, "www.lab.test", "AAAA", "-b", GUEST_IP)
        assert six.status == "NOERROR" and [a[3] for a in six.answers] == ["2001:db8::254"], six.text
        mx = await dig(PROXY_IP, port, "www.lab.test", "MX", "-b", GUEST_IP)
        assert mx.status == "NOERROR" and mx.answers == [], mx.text

        q = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("kind") == "quarantine")
        assert q["guest"] == "web1" and q["profile"] == "honeypot" and q["by"] == "cli" and q["user"] == "root", q
        assert q["reason"] == "guest web1 quarantined by cli: beaconing to a C2 name (ticket 7)", q
        hp = await asyncio.to_thread(
            pvm.wait_audit, lambda x: x.get("rule") == "quarantine" and x.get("request", {}).get("qtype") == "A")
        assert hp["seq"] > q["seq"] and hp["verdict"] == "deny" and hp["quarantine"] == "honeypot"
        assert hp["answer"] == ["192.0.2.254"] and hp["at"] == "dns.quarantine"
        assert "quarantined (honeypot, by cli): beaconing to a C2 name (ticket 7)" in hp["reason"], hp
        # recorded in full, beside the audit
        rec_file = tmp_path / "state" / "quarantine" / "web1" / "requests.jsonl"
        lines = [json.loads(x) for x in rec_file.read_text().splitlines()]
        assert {x["qname"] for x in lines} == {"www.lab.test"} and "base64" in lines[0]["query"]
        assert {x["qtype"] for x in lines} >= {"A", "AAAA", "MX"}

        lst = await asyncio.to_thread(cli, cfg, "quarantine", "--list")
        assert lst.returncode == 0 and lst.stdout.startswith("web1\thoneypot\tsince "), lst.stdout
        assert "beaconing" in lst.stdout

        r = await asyncio.to_thread(cli, cfg, "release", "web1", "--reason", "reimaged")
        done = time.monotonic()
        assert r.returncode == 0 and "guest web1 released (was honeypot" in r.stdout, r.stderr
        nxt = await loop.next_after(done)
        assert nxt[1:] == ("NOERROR", ["192.0.2.10"]), loop.answers[-5:]
        rel = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("kind") == "release")
        assert rel["guest"] == "web1" and rel["by"] == "cli" and rel["profile"] == "honeypot"
        assert rel["reason"] == "guest web1 released by cli: reimaged"
        assert rel["quarantined"]["reason"] == "beaconing to a C2 name (ticket 7)"
        assert json.loads((tmp_path / "state" / "quarantine.json").read_text())["guests"] == {}
        lst = await asyncio.to_thread(cli, cfg, "quarantine", "--list")
        assert lst.returncode == 0 and lst.stdout.strip() == "no guest is quarantined"
        metrics = await asyncio.to_thread(pvm.metrics)
        assert 'proxyvm_quarantined_guests{profile="honeypot"} 0.0' in metrics
    finally:
        await loop.stop()
        rc = await asyncio.to_thread(pvm.stop)
    assert rc == 0, pvm.tail()
    ver = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxyvm", "audit", "verify",
                                                   str(tmp_path / "audit.jsonl")], capture_output=True, text=True)
    assert ver.returncode == 0, ver.stdout + ver.stderr


def _assert_blocked(r: Any, reason: str) -> None:
    assert r.status == "REFUSED", r.text
    assert r.ede == [(15, f"guest web1 quarantined: {reason}")], r.text


@needs_peers
@pytest.mark.lab
async def test_block_survives_reload_worker_crash_and_restart(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    cfg = write_config(tmp_path, lab_ca.ca_pem, upstream1, port, admin)
    pvm = ProxyVM(cfg)
    await asyncio.to_thread(pvm.start)
    try:
        r = await asyncio.to_thread(cli, cfg, "quarantine", "web1", "--reason", "ransomware note")
        assert r.returncode == 0 and "(block)" in r.stdout, r.stderr
        _assert_blocked(await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP), "ransomware note")
        rec = await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("rule") == "quarantine")
        assert rec["verdict"] == "deny" and rec["rcode"] == "REFUSED" and rec["ede"] == 15, rec
        assert rec["reason"] == "guest web1 is quarantined (block, by cli): ransomware note"

        last = max(x["seq"] for x in pvm.audit_records())
        await asyncio.to_thread(pvm.reload)
        await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("request", {}).get("event") == "reload"
                                and x["seq"] > last, 20)
        _assert_blocked(await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP), "ransomware note")

        old = pvm.worker_pids()["dns"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = pvm.worker_pids()
            if pids.get("dns") not in (None, old) and pvm.healthz()[0] == 200:
                break
            await asyncio.sleep(0.1)
        assert pvm.worker_pids()["dns"] != old
        _assert_blocked(await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP), "ransomware note")
        ok = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", OTHER_IP)
        assert ok.status == "NOERROR" and ok.answers[0][3] == "192.0.2.10"
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()

    pvm = ProxyVM(cfg)  # the whole appliance restarts: the table comes back from state_dir
    await asyncio.to_thread(pvm.start)
    try:
        _assert_blocked(await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP), "ransomware note")
        assert "quarantine: guest web1 is quarantined (block, by cli since" in pvm.tail(20000)
        r = await asyncio.to_thread(cli, cfg, "release", "web1")
        assert r.returncode == 0, r.stderr
        ok = await dig(PROXY_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        assert ok.status == "NOERROR" and ok.answers[0][3] == "192.0.2.10", ok.text
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()


@needs_peers
@pytest.mark.lab
async def test_bad_input(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    cfg = write_config(tmp_path, lab_ca.ca_pem, upstream1, port, admin)
    sock = tmp_path / "state" / "control.sock"

    # nothing running yet: no socket
    r = await asyncio.to_thread(cli, cfg, "quarantine", "web1")
    assert r.returncode == 1 and f"no control socket at {sock}" in r.stderr, r.stderr
    # a stale socket file (bound, then its owner went away)
    (tmp_path / "state").mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    os.chmod(sock, 0o600)
    r = await asyncio.to_thread(cli, cfg, "release", "web1")
    assert r.returncode == 1 and f"{sock} is stale: no proxyvm is running" in r.stderr, r.stderr

    pvm = ProxyVM(cfg)  # replaces the stale socket with its own
    await asyncio.to_thread(pvm.start)
    try:
        r = await asyncio.to_thread(cli, cfg, "quarantine", "nosuch")
        assert r.returncode == 2 and "no guest named 'nosuch'" in r.stderr and "web1, web2" in r.stderr, r.stderr
        r = await asyncio.to_thread(cli, cfg, "quarantine")
        assert r.returncode == 2 and "name a GUEST (or --list)" in r.stderr
        r = await asyncio.to_thread(cli, cfg, "quarantine", "web1", "--profile", "jail")
        assert r.returncode == 2 and "invalid choice: 'jail'" in r.stderr
        r = await asyncio.to_thread(cli, cfg, "quarantine", "web1", "--list")
        assert r.returncode == 2
        r = await asyncio.to_thread(cli, cfg, "release", "web1")
        assert r.returncode == 1 and "guest web1 is not quarantined" in r.stderr, r.stderr

        r = await asyncio.to_thread(cli, cfg, "quarantine", "web1", "--reason", "first")
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(cli, cfg, "quarantine", "web1", "--profile", "honeypot")
        assert r.returncode == 1 and "guest web1 is already quarantined (block, by cli since" in r.stderr
        assert "release it first" in r.stderr
        # the first one is still in force and nothing else was recorded
        assert [x["profile"] for x in records(pvm, kind="quarantine")] == ["block"]

        # a control socket that is not ours
        os.chmod(sock, 0o666)
        r = await asyncio.to_thread(cli, cfg, "quarantine", "--list")
        assert r.returncode == 1 and "has mode 0666, not 0600" in r.stderr, r.stderr
        os.chmod(sock, 0o600)
        os.chown(sock, 65534, -1)  # nobody
        r = await asyncio.to_thread(cli, cfg, "quarantine", "--list")
        assert r.returncode == 1 and "(uid 65534), not root" in r.stderr, r.stderr
        os.chown(sock, 0, -1)
        r = await asyncio.to_thread(cli, cfg, "quarantine", "--list")
        assert r.returncode == 0 and r.stdout.startswith("web1\tblock"), r.stderr
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()
    assert not sock.exists()  # removed at shutdown
    sock.write_text("not a socket\n")
    r = await asyncio.to_thread(cli, cfg, "quarantine", "--list")
    assert r.returncode == 1 and "is not a socket" in r.stderr, r.stderr


def test_peer_that_is_not_root_is_refused() -> None:
    """The server side of SO_PEERCRED: a client running as another uid gets an error answer."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    import shutil
    import tempfile

    from proxyvm.quarantine import Quarantine

    tmp_path = Path(tempfile.mkdtemp(prefix="pvm-quarantine-"))  # pytest's tmp dirs are root-only (0700)

    class _Sup:  # the parts of a Supervisor that Quarantine uses: a real one needs workers
        class config:  # noqa: N801
            state_dir = tmp_path
            guests = {"web1": None}
            source = "test"
        services: dict[str, Any] = {}
        metrics = None

    async def run() -> str:
        q = Quarantine(_Sup())
        await q.start()
        try:
            os.chmod(tmp_path, 0o755)
            os.chmod(tmp_path / "control.sock", 0o666)  # let the other uid reach it at all
            return await asyncio.to_thread(_client_as, 65534, tmp_path / "control.sock")
        finally:
            await q.close()

    try:
        out = asyncio.run(run())
    finally:
        shutil.rmtree(tmp_path)
    assert json.loads(out) == {"ok": False, "exit": 1, "error": "uid 65534 may not use the control socket (root only)"}


def _client_as(uid: int, path: Path) -> str:
    """A control client running as `uid` (a forked child: the interpreter may not be executable by
    that uid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setuid(uid)
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(path))
            c.sendall(b'{"op": "list"}\n')
            os.write(w, c.recv(4096))
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()
