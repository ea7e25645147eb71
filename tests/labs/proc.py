"""Start real peer daemons for tests and stop them by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def wait_port(host: str, port: int, proto: str = "tcp", timeout: float = 10.0) -> None:
    """Wait until something accepts TCP on host:port (for UDP: until a bind there fails)."""
    deadline = time.monotonic() + timeout
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        if proto == "tcp":
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                pass
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                s.bind((host, port))
            except OSError:
                return  # taken: the daemon has bound it
            finally:
                s.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {proto} {host}:{port} after {timeout}s")
        time.sleep(0.05)


def free_port(host: str = "127.0.0.1", proto: str = "tcp") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(fam, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Daemon:
    """A real peer process. `ready` is polled until it returns truthy (or raises TimeoutError).
    Output goes to `log` (a path) so a failing test can show it."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready: Callable[[], object] | None = None,
        timeout: float = 15.0,
        log: Path | str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | str | None = None,
    ):
        self.argv = list(argv)
        self.ready = ready
        self.timeout = timeout
        self.log = Path(log) if log else None
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.cwd, start_new_session=True
        )
        if self.ready is not None:
            deadline = time.monotonic() + self.timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {self.tail()}")
                try:
                    if self.ready():
                        break
                except (OSError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self.argv[0]} not ready after {self.timeout}s: {self.tail()}")
                time.sleep(0.05)
        return self

    def tail(self, n: int = 2000) -> str:
        if self.log and self.log.exists():
            return self.log.read_text(errors="replace")[-n:]
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def daemon_from_pidfile(pidfile: Path, timeout: float = 10.0) -> int:
    """For daemons that fork (postfix, nsd): wait for the pid file and return the pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            time.sleep(0.05)
    raise TimeoutError(f"no pid in {pidfile}")
