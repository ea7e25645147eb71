"""A web lab of real peers for HTTP tests, parametrised by address (loopback or a namespace).

`NginxLab(tmpdir, main_ip=..., untrusted_ip=..., plain_ip=...)` starts:
  * the main nginx on main_ip:443 with TLS from a lab CA (names www.lab.test, ws.lab.test and the
    IP), serving /files/1k.bin and /files/10m.bin, /echo (request facts as text) and /ws
    (proxy_pass with Upgrade to a Python `websockets` echo server on main_ip:ws_port);
  * a second nginx on untrusted_ip:443 whose certificate comes from a CA the proxy does not trust
    (names untrusted.lab.test and mismatch.lab.test for the name-mismatch case is on the main one);
  * a plain-HTTP-only nginx on plain_ip:80 and plain_ip:443 (no TLS anywhere), to prove that
    nothing is ever sent to it in clear;
  * (legacy_ip, optional) an nginx offering only TLS 1.1 (legacy.lab.test), below the TLS 1.2 floor.
Every access log line carries `$ssl_protocol $ssl_server_name` so a test can prove TLS and SNI.
Stops everything by pid. Needs root (port 443) and the `nginx` binary. With `netns=NAME` every
peer runs inside that (existing) network namespace; `run_in_netns(NAME, fn)` probes it from here.

Also runnable as `python -m tests.labs.nginx_lab --ws-echo HOST:PORT` (the echo server itself).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.labs.pki import LabCA
from tests.labs.proc import Daemon, free_port, wait_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LOG_FORMAT = (
    "log_format lab '$remote_addr \"$request\" $status $body_bytes_sent "
    "ssl=$ssl_protocol sni=$ssl_server_name host=$http_host port=$server_port';"
)


_CLONE_NEWNET = 0x40000000


def run_in_netns(netns: str | None, fn: Callable[[], Any]) -> Any:
    """Call fn() in network namespace `netns` (None: here). Runs in a throwaway thread that
    setns()es itself, so the caller's namespace never changes."""
    if netns is None:
        return fn()
    out: dict[str, Any] = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                out["e"] = OSError(ctypes.get_errno(), f"setns({netns})")
                return
        finally:
            os.close(fd)
        try:
            out["v"] = fn()
        except BaseException as e:  # handed to the caller
            out["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out.get("v")


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def available() -> bool:
    return Path(NGINX).exists() and os.access(NGINX, os.X_OK)


@dataclass(frozen=True, slots=True)
class LabNames:
    www: str = "www.lab.test"
    ws: str = "ws.lab.test"
    untrusted: str = "untrusted.lab.test"
    plain: str = "plain.lab.test"
    mismatch: str = "mismatch.lab.test"  # resolves to the main nginx, whose cert does not name it
    legacy: str = "legacy.lab.test"  # TLS 1.1 only: below the proxy's TLS 1.2 floor


def _nginx_conf(prefix: Path, servers: str, workers: int = 1) -> str:
    return f"""
daemon off;
master_process on;
user root;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  {LOG_FORMAT}
  access_log {prefix}/access.log lab;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 100000;
  client_max_body_size 0;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
{servers}
}}
"""


class NginxLab:
    def __init__(
        self,
        directory: Path | str,
        *,
        main_ip: str = "127.0.7.10",
        untrusted_ip: str = "127.0.7.11",
        plain_ip: str = "127.0.7.12",
        legacy_ip: str | None = "127.0.7.13",
        ws_port: int | None = None,
        workers: int = 1,
        names: LabNames = LabNames(),
        netns: str | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.main_ip, self.untrusted_ip, self.plain_ip = main_ip, untrusted_ip, plain_ip
        self.legacy_ip = legacy_ip  # TLS 1.1 only (None: not started)
        self.netns = netns  # run every peer inside this network namespace (gateway/e2e labs)
        self.ws_port = ws_port or run_in_netns(netns, lambda: free_port(main_ip))
        self.workers = workers
        self.names = names
        self.ca = LabCA(self.dir / "ca", "proxyvm lab CA")
        self.rogue_ca = LabCA(self.dir / "rogue-ca", "rogue lab CA")
        self.daemons: list[Daemon] = []

    # -- facts for tests --------------------------------------------------------------------------
    @property
    def ca_pem(self) -> Path:
        return self.ca.ca_pem

    def hosts(self) -> dict[str, str]:
        """Name -> address, for the proxy's `http.hosts` table (or curl --resolve)."""
        n = self.names
        return {
            n.www: self.main_ip,
            n.ws: self.main_ip,
            n.mismatch: self.main_ip,
            n.untrusted: self.untrusted_ip,
            n.plain: self.plain_ip,
            **({n.legacy: self.legacy_ip} if self.legacy_ip else {}),
        }

    def log(self, which: str) -> str:
        p = self.dir / which / "access.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # -- lifecycle -------------------------------------------------------------------------------
    def _prefix(self, which: str) -> Path:
        p = self.dir / which
        for sub in ("tmp/body", "tmp/proxy", "tmp/fcgi", "tmp/uwsgi", "tmp/scgi"):
            (p / sub).mkdir(parents=True, exist_ok=True)
        return p

    def _start_nginx(self, which: str, servers: str, probe: tuple[str, int]) -> None:
        prefix = self._prefix(which)
        conf = prefix / "nginx.conf"
        conf.write_text(_nginx_conf(prefix, servers, self.workers))
        d = Daemon(
            in_netns(self.netns, [NGINX, "-p", str(prefix), "-c", str(conf)]),
            ready=lambda: run_in_netns(self.netns, lambda: wait_port(*probe, timeout=0.2)) or True,
            log=prefix / "stdout.log",
        )
        d.start()
        self.daemons.append(d)

    def start(self) -> NginxLab:
        n = self.names
        files = self.dir / "files"
        files.mkdir(parents=True, exist_ok=True)
        (files / "1k.bin").write_bytes(os.urandom(1024))
        with open(files / "10m.bin", "wb") as f:
            f.write(os.urandom(10 * 1024 * 1024))
        main_cert, main_key = self.ca.issue([n.www, n.ws, self.main_ip], stem="main")
        rogue_cert, rogue_key = self.rogue_ca.issue([n.untrusted], stem="rogue")
        legacy_cert, legacy_key = self.ca.issue([n.legacy], key="rsa", stem="legacy")
        try:
            ws = Daemon(
                in_netns(self.netns, [sys.executable, "-m", "tests.labs.nginx_lab", "--ws-echo",
                                      f"{self.main_ip}:{self.ws_port}"]),
                ready=lambda: run_in_netns(self.netns, lambda: wait_port(self.main_ip, self.ws_port, timeout=0.2))
                or True,
                log=self.dir / "ws-echo.log",
                cwd=Path(__file__).resolve().parents[2],
            )
            ws.start()
            self.daemons.append(ws)
            echo = (
                'return 200 "method=$request_method uri=$uri host=$http_host '
                "xff=$http_x_forwarded_for conn=$http_connection proxyauth=$http_proxy_authorization "
                'keepalive=$http_keep_alive te=$http_te ssl=$ssl_protocol sni=$ssl_server_name\\n";'
            )
            self._start_nginx(
                "main",
                f"""
  server {{
    listen {self.main_ip}:443 ssl;
    server_name {n.www} {n.ws};
    ssl_certificate {main_cert};
    ssl_certificate_key {main_key};
    ssl_protocols TLSv1.2 TLSv1.3;
    root {files.parent};
    location /files/ {{ }}
    location /echo {{ default_type text/plain; {echo} }}
    location /upload {{ default_type text/plain; return 200 "got $content_length\\n"; }}
    location /ws {{
      proxy_pass http://{self.main_ip}:{self.ws_port};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 600s;
      proxy_buffering off;
    }}
  }}""",
                (self.main_ip, 443),
            )
            self._start_nginx(
                "untrusted",
                f"""
  server {{
    listen {self.untrusted_ip}:443 ssl;
    ssl_certificate {rogue_cert};
    ssl_certificate_key {rogue_key};
    location / {{ default_type text/plain; return 200 "untrusted\\n"; }}
  }}""",
                (self.untrusted_ip, 443),
            )
            self._start_nginx(
                "plain",
                f"""
  server {{
    listen {self.plain_ip}:80;
    listen {self.plain_ip}:443;
    location / {{ default_type text/plain; return 200 "plain\\n"; }}
  }}""",
                (self.plain_ip, 80),
            )
            if self.legacy_ip:
                self._start_nginx(
                    "legacy",
                    f"""
  server {{
    listen {self.legacy_ip}:443 ssl;
    ssl_certificate {legacy_cert};
    ssl_certificate_key {legacy_key};
    ssl_protocols TLSv1.1;
    ssl_ciphers DEFAULT@SECLEVEL=0;
    location / {{ default_type text/plain; return 200 "legacy $ssl_protocol\\n"; }}
  }}""",
                    (self.legacy_ip, 443),
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()

    def __enter__(self) -> NginxLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _ws_echo(host: str, port: int) -> None:
    from websockets.asyncio.server import serve

    async def echo(conn) -> None:  # type: ignore[no-untyped-def]
        async for message in conn:
            await conn.send(message)

    async with serve(echo, host, port, max_size=None, compression=None, ping_interval=None):
        await asyncio.Future()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws-echo", required=True, help="HOST:PORT")
    a = ap.parse_args()
    host, _, port = a.ws_echo.rpartition(":")
    asyncio.run(_ws_echo(host, int(port)))


if __name__ == "__main__":
    main()
