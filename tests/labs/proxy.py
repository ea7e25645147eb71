"""Run the real `proxyvm run -c CONFIG` process in tests (supervisor + one worker per service)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML


class ProxyVM:
    """`ProxyVM(config_path)` or `ProxyVM.from_text(tmpdir, yaml_text)`.
    The config must set `admin.listen` and `audit.path` (readiness and records come from them)."""

    def __init__(self, config: Path | str, *, log: Path | str | None = None, env: dict[str, str] | None = None):
        self.config = Path(config)
        data = YAML(typ="safe").load(self.config.read_text())
        host, _, port = str(data["admin"]["listen"]).rpartition(":")
        self.admin = f"http://{host.strip('[]')}:{port}"
        audit = Path(data["audit"]["path"])
        self.audit_path = audit if audit.is_absolute() else self.config.parent / audit
        self.log = Path(log) if log else self.config.with_suffix(".log")
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_text(cls, directory: Path, text: str, name: str = "proxyvm.yaml", **kw: Any) -> ProxyVM:
        p = Path(directory) / name
        p.write_text(text)
        return cls(p, **kw)

    def start(self, timeout: float = 30.0, expect_ready: bool = True) -> ProxyVM:
        env = {**os.environ, "PROXYVM_LOG_LEVEL": "DEBUG", **(self.env or {})}
        self._logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxyvm", "run", "-c", str(self.config)],
            stdout=self._logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        if expect_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"proxyvm exited {self.proc.returncode}:\n{self.tail()}")
            try:
                code, body = self.healthz()
                last = body
                if code == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"proxyvm not healthy after {timeout}s: {last}\n{self.tail()}")

    def healthz(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.admin + "/healthz", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def workers(self, service: str) -> list[dict[str, Any]]:
        """/healthz's workers of `service` (`workers: N`): index, pid, state, restarts, detail."""
        return list(self.healthz()[1]["services"][service]["workers"])

    def wait_workers(self, service: str, pred: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll /healthz until pred(workers) holds (health arrives every 2 s); the last list."""
        deadline = time.monotonic() + timeout
        while True:
            ws = self.workers(service)
            if pred(ws) or time.monotonic() > deadline:
                return ws
            time.sleep(0.2)

    @staticmethod
    def kill_worker(pid: int, timeout: float = 10.0) -> None:
        """SIGKILL one worker and wait until it has exited (its sockets closed: a zombie until
        the supervisor reaps it), so that what a test sends next cannot reach the dead one."""
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        return
            except FileNotFoundError:
                return
            time.sleep(0.02)
        raise TimeoutError(f"worker {pid} still running after SIGKILL")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.admin + "/metrics", timeout=2) as r:
            return r.read().decode()

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def wait_audit(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for an audit record matching pred(record) (records are flushed every ~0.2 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.audit_records():
                if pred(r):
                    return r
            time.sleep(0.1)
        raise TimeoutError(f"no matching audit record; last: {self.audit_records()[-3:]}")

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`proxyvm ARGS -c CONFIG` against this instance (quarantine, release, ...)."""
        return subprocess.run([sys.executable, "-m", "proxyvm", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **(self.env or {})})

    def reload(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def worker_pids(self) -> dict[str, int]:
        _, body = self.healthz()
        return {k: v["pid"] for k, v in body["services"].items() if v.get("pid")}

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode

    def __enter__(self) -> ProxyVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
