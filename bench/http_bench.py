"""HTTP benchmark (not a test): proxyvm vs plain mitmdump (reverse mode) vs nginx proxy_pass https,
same run, same nginx origin, median of 3. Run through bench/http.sh.

Figures: wrk req/s and p50/p99 latency for a 1 KB file; MB/s and peak RSS of the proxy process
for a 10 MB file at 4 concurrent connections; RSS growth of the proxy over a WebSocket echo stream.
Addresses: 127.0.7.100-.119 only (the HTTP area's loopback range).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.labs.nginx_lab import NGINX, NginxLab, _nginx_conf  # noqa: E402
from tests.labs.proc import Daemon, free_port, wait_port  # noqa: E402
from tests.labs.proxy import ProxyVM  # noqa: E402

FRONT = "127.0.7.100"
LAB = dict(main_ip="127.0.7.110", untrusted_ip="127.0.7.111", plain_ip="127.0.7.112", legacy_ip=None)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx workers, proxyvm worker, SO_REUSEPORT workers)."""
    parents: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().split(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        x = todo.pop()
        out.append(x)
        todo.extend(parents.get(x, []))
    return out


def children_rss(pid: int) -> int:
    """RSS of a whole process tree (KiB)."""
    total = 0
    for p in tree(pid):
        try:
            total += rss_kib(p)
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """user+system CPU of a process tree so far (live processes only)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().split(") ", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def parse_latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def wrk(url: str, host: str, *, conns: int, seconds: int, threads: int = 1) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    tr = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    mult = {"B": 1 / 1e6, "KB": 1024 / 1e6, "MB": 1024 * 1024 / 1e6, "GB": 1024**3 / 1e6}[tr.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "mbps": float(tr.group(1)) * mult,
        "p50": parse_latency(out, "50"),
        "p99": parse_latency(out, "99"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


class Peak:
    """Sample a process tree's RSS in the background while a load runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, children_rss(self.pid))
            await asyncio.sleep(0.05)


async def _sampled(sampler: Peak, url: str, host: str, seconds: int) -> dict[str, float]:
    t = asyncio.create_task(sampler.run())
    r = await asyncio.to_thread(wrk, url, host, conns=4, seconds=seconds)
    sampler._stop = True
    await t
    return r


@dataclass
class Front:
    name: str
    url: str
    rss_pid: int  # the tree whose peak RSS counts (the proxy process(es))
    cpu_pid: int  # the tree whose CPU counts (for proxyvm: supervisor + workers, audit included)
    small: list[dict[str, float]] = field(default_factory=list)
    big: list[dict[str, float]] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)


def run_small(f: Front, seconds: int) -> None:
    cpu0 = cpu_seconds(f.cpu_pid)
    r = wrk(f.url + "/files/1k.bin", "www.lab.test", conns=32, seconds=seconds)
    r["cpu_ms"] = (cpu_seconds(f.cpu_pid) - cpu0) * 1000 / max(1.0, r["rps"] * seconds)
    f.small.append(r)


def run_big(f: Front, seconds: int) -> None:
    sampler = Peak(f.rss_pid)
    f.big.append(asyncio.run(_sampled(sampler, f.url + "/files/10m.bin", "www.lab.test", seconds)))
    f.peaks.append(sampler.peak)


def summary(f: Front) -> dict[str, float]:
    med = statistics.median
    return {
        "rps": med(r["rps"] for r in f.small),
        "p50": med(r["p50"] for r in f.small),
        "p99": med(r["p99"] for r in f.small),
        "cpu_ms": med(r["cpu_ms"] for r in f.small),
        "mbps": med(r["mbps"] for r in f.big),
        "peak_rss_mib": med(f.peaks) / 1024,
        "errors": sum(r["non2xx"] for r in f.small + f.big),
    }


async def ws_stream(host: str, port: int, pid: int, total: int) -> tuple[float, float, float]:
    from websockets.asyncio.client import connect

    chunk = os.urandom(64 * 1024)
    n = total // len(chunk)
    async with connect("ws://ws.lab.test/ws", host=host, port=port, compression=None, max_size=None,
                       ping_interval=None) as conn:
        for _ in range(50):
            await conn.send(chunk)
            await conn.recv()
        before = children_rss(pid)
        peak = before
        start = time.monotonic()

        async def sender() -> None:
            for _ in range(n):
                await conn.send(chunk)

        t = asyncio.create_task(sender())
        for i in range(n):
            await conn.recv()
            if i % 512 == 0:
                peak = max(peak, children_rss(pid))
        await t
        secs = time.monotonic() - start
    return (peak - before) / 1024, before / 1024, total / secs / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--ws-mb", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2, help="SO_REUSEPORT workers for the second proxyvm row")
    a = ap.parse_args()
    for tool in ("wrk", "mitmdump"):
        if not shutil.which(tool) and not (Path(sys.executable).parent / tool).exists():
            print(f"{tool} not found", file=sys.stderr)
            return 2
    mitmdump = shutil.which("mitmdump") or str(Path(sys.executable).parent / "mitmdump")
    work = Path(tempfile.mkdtemp(prefix="http-bench-"))
    lab = NginxLab(work / "lab", **LAB, workers=1)
    lab.start()
    procs: list = []
    results: dict[str, dict[str, float]] = {}
    try:
        hosts = "\n".join(f"    {k}: {v}" for k, v in lab.hosts().items())
        (work / "rules.yaml").write_text(
            "mode: enforce\ndefault: deny\nrules:\n"
            "  - {id: web, action: allow, protocol: http, match: {host: [www.lab.test]}}\n"
            "  - {id: ws, action: allow, protocol: ws, match: {host: [ws.lab.test]}}\n"
        )

        def start_proxyvm(workers: int) -> tuple[ProxyVM, int, int]:
            port = free_port(FRONT)
            admin = free_port(FRONT)
            cfg = (
                f"policy: rules.yaml\naudit: {{path: audit-{workers}.jsonl}}\nadmin: {{listen: \"{FRONT}:{admin}\"}}\n"
                f"state_dir: state\nhttp:\n  listen: [\"{FRONT}:{port}\"]\n  ca_file: {lab.ca_pem}\n"
                f"  workers: {workers}\n  hosts:\n{hosts}\n"
            )
            pvm = ProxyVM.from_text(work, cfg, name=f"proxyvm-{workers}.yaml")
            pvm.start()
            pid = pvm.worker_pids()["http"]
            return pvm, port, pid

        fronts: list[Front] = []
        pvm, port, pid = start_proxyvm(1)
        procs.append(pvm)
        fronts.append(Front("proxyvm", f"http://{FRONT}:{port}", pid, pvm.proc.pid))
        ws_target = (port, pid)
        if a.workers > 1:
            pvm2, port2, pid2 = start_proxyvm(a.workers)
            procs.append(pvm2)
            fronts.append(Front(f"proxyvm x{a.workers}", f"http://{FRONT}:{port2}", pid2, pvm2.proc.pid))

        mport = free_port(FRONT)
        md = Daemon(
            [mitmdump, "-q", "--mode", f"reverse:https://{LAB['main_ip']}:443@{FRONT}:{mport}",
             "--set", f"confdir={work / 'mitmdump'}", "--set", f"ssl_verify_upstream_trusted_ca={lab.ca_pem}",
             "--set", "connection_strategy=lazy", "--set", "stream_large_bodies=1m", "--set", "keep_host_header=true"],
            ready=lambda: wait_port(FRONT, mport, timeout=0.2) or True, log=work / "mitmdump.log", timeout=30,
        )
        md.start()
        procs.append(md)
        fronts.append(Front("mitmdump reverse", f"http://{FRONT}:{mport}", md.pid, md.pid))

        nport = free_port(FRONT)
        prefix = work / "front"
        for sub in ("tmp/body", "tmp/proxy", "tmp/fcgi", "tmp/uwsgi", "tmp/scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        servers = f"""
  upstream origin {{ server {LAB['main_ip']}:443; keepalive 64; }}
  server {{
    listen {FRONT}:{nport};
    access_log off;
    location / {{
      proxy_pass https://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_ssl_server_name on;
      proxy_ssl_name $host;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {lab.ca_pem};
      proxy_ssl_session_reuse on;
      proxy_buffering off;
    }}
  }}"""
        (prefix / "nginx.conf").write_text(_nginx_conf(prefix, servers, workers=1))
        ng = Daemon([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                    ready=lambda: wait_port(FRONT, nport, timeout=0.2) or True, log=prefix / "out.log")
        ng.start()
        procs.append(ng)
        fronts.append(Front("nginx proxy_pass", f"http://{FRONT}:{nport}", ng.pid, ng.pid))

        # Rounds interleave the fronts, so a busy neighbour on a shared machine hits all of them alike.
        for i in range(a.rounds):
            for f in fronts:
                print(f"round {i + 1}: {f.name} 1 KB", flush=True)
                run_small(f, a.seconds)
            for f in fronts:
                print(f"round {i + 1}: {f.name} 10 MB", flush=True)
                run_big(f, a.seconds)
        results = {f.name: summary(f) for f in fronts}
        ws_growth, ws_base, ws_rate = asyncio.run(ws_stream(FRONT, ws_target[0], ws_target[1],
                                                             a.ws_mb * 1024 * 1024))
    finally:
        for p in procs:
            p.stop()
        lab.stop()

    base = results["mitmdump reverse"]
    print()
    print(f"HTTP benchmark, median of {a.rounds} interleaved rounds x {a.seconds}s, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, origin nginx TLSv1.3")
    print(f"{'front':<20}{'1KB req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>11}{'10MB MB/s':>11}{'peak RSS MiB':>14}"
          f"{'req/s vs mitmdump':>19}{'MB/s vs mitmdump':>18}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<20}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['cpu_ms']:>11.2f}{r['mbps']:>11.1f}"
              f"{r['peak_rss_mib']:>14.1f}{r['rps'] / base['rps']:>18.2f}x{r['mbps'] / base['mbps']:>17.2f}x"
              f"{r['errors']:>8.0f}")
    print()
    print(f"WebSocket echo through proxyvm: {a.ws_mb} MiB each way at {ws_rate:.0f} MB/s, "
          f"worker RSS {ws_base:.1f} MiB at start, growth {ws_growth:.1f} MiB (goal < 50 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
