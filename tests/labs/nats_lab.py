"""A real NATS JetStream cluster for tests: three `nats-server` processes, clustered (routes on
loopback only), JetStream R3, client TLS from a lab CA, one nkey user per proxyvm node (it may
publish only its own audit subjects and status key) and an admin user. Their own configs and
store directories in a tmp dir; stopped by pid."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import nkeys

from tests.labs.pki import LabCA
from tests.labs.proc import Daemon, free_port, wait_port

NATS_SERVER = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)
HOST = "127.0.0.1"


def make_user(directory: Path, name: str) -> tuple[Path, str]:
    """An nkey user: (seed file, public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    kp = nkeys.from_seed(bytearray(seed))
    path = directory / f"{name}.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return path, kp.public_key.decode()


def _node_permissions(node: str) -> str:
    # The JetStream API stays open to nodes here (consumers for the KV watches, stream info); the
    # audit subjects and the status key are each node's own.
    return (
        "{ publish: { allow: [\"proxyvm.audit." + node + ".>\", \"$KV.PROXYVM_NODES." + node + "\", "
        "\"$JS.API.>\", \"$JS.FC.>\", \"$JS.ACK.>\", \"_INBOX.>\"] }, subscribe: { allow: [\"_INBOX.>\"] } }"
    )


class NatsCluster:
    def __init__(self, directory: Path, ca: LabCA, nodes: list[str], size: int = 3, tls: bool = True):
        if not NATS_SERVER:
            raise RuntimeError("nats-server is not installed (Debian package nats-server)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.size = size
        self.tls = tls
        self.client_ports = [free_port(HOST) for _ in range(size)]
        self.cluster_ports = [free_port(HOST) for _ in range(size)]
        self.cert, self.key = ca.issue([HOST, "localhost"], stem="nats-server")
        self.users: dict[str, Path] = {}
        self.publics: dict[str, str] = {}
        for name in ["admin", *nodes]:
            self.users[name], self.publics[name] = make_user(self.dir, name)
        self.daemons: list[Daemon | None] = [None] * size

    @property
    def urls(self) -> list[str]:
        scheme = "tls" if self.tls else "nats"
        return [f"{scheme}://{HOST}:{p}" for p in self.client_ports]

    def _config(self, i: int) -> Path:
        users = [f"    {{ nkey: {self.publics['admin']} }}"]
        for name, pub in self.publics.items():
            if name != "admin":
                users.append(f"    {{ nkey: {pub}, permissions: {_node_permissions(name)} }}")
        routes = ", ".join(f"nats-route://{HOST}:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
        store = self.dir / f"store{i}"
        tls = (f"tls {{ cert_file: \"{self.cert}\", key_file: \"{self.key}\", timeout: 2 }}\n" if self.tls else "")
        text = (
            f"server_name: lab{i}\n"
            f"listen: {HOST}:{self.client_ports[i]}\n"
            + tls +
            f"jetstream {{ store_dir: \"{store}\", max_memory_store: 64MB, max_file_store: 2GB }}\n"
            + (f"cluster {{ name: proxyvm-lab, listen: {HOST}:{self.cluster_ports[i]}, routes: [{routes}] }}\n"
               if self.size > 1 else "")
            + "authorization {\n  users: [\n" + ",\n".join(users) + "\n  ]\n}\n"
        )
        p = self.dir / f"nats{i}.conf"
        p.write_text(text)
        return p

    def start_server(self, i: int) -> None:
        conf = self._config(i)
        d = Daemon([NATS_SERVER, "-c", str(conf)], log=self.dir / f"nats{i}.log",
                   ready=lambda i=i: wait_port(HOST, self.client_ports[i], timeout=0.2) or True, timeout=15)
        self.daemons[i] = d.start()

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for i in range(self.size):
            self.start_server(i)
        self.wait_jetstream(timeout)
        return self

    def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Until the cluster has a JetStream meta leader (an account info request answers)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                asyncio.run(self._js_info())
                return
            except Exception as e:  # noqa: BLE001 - not yet
                last = e
                time.sleep(0.3)
        raise TimeoutError(f"JetStream not ready after {timeout}s: {last!r}\n{self.tail()}")

    async def _js_info(self) -> None:
        nc = await self.connect("admin")
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()

    async def connect(self, user: str = "admin", **kw: Any) -> Any:
        from proxyvm.fleet.conn import connect

        urls = self.urls if self.tls else [u.replace("nats://", "tls://") for u in self.urls]
        return await connect(urls, ca_file=self.ca.ca_pem, credentials_file=self.users[user],
                             name=f"lab {user}", attempts=2, **kw)

    def stop_server(self, i: int, sig: int = signal.SIGTERM) -> None:
        d = self.daemons[i]
        if d is not None:
            d.stop(sig)
            self.daemons[i] = None

    def kill_server(self, i: int) -> None:
        self.stop_server(i, signal.SIGKILL)

    def stop(self) -> None:
        for i in range(self.size):
            self.stop_server(i)

    def tail(self) -> str:
        out = []
        for i in range(self.size):
            p = self.dir / f"nats{i}.log"
            if p.exists():
                out.append(f"--- nats{i}\n" + p.read_text(errors="replace")[-1500:])
        return "\n".join(out)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.3):
            return True
    except OSError:
        return False
