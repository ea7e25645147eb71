"""bench/dns.sh's engine: proxyvm vs Unbound (forward-tls-upstream, one thread) vs Stubby, all
forwarding over DoT to the same local Unbound upstream (lab CA, wildcard zone), measured by dnsperf.

Rows: `proxyvm` is the product as deployed (`proxyvm run -c CONFIG`: supervisor, DNS worker, audit
written to disk with its chain); `proxyvm-svc` (extra row) is the DNS service alone with an audit
sink that only counts records; `proxyvm-w2` is `proxyvm run` with `dns: workers: 2` (two worker
processes on SO_REUSEPORT sockets, one audit writer) and `unbound-t2` Unbound with `num-threads: 2`
(its own SO_REUSEPORT per thread): the two rows are loaded with dnsperf -c 8 (8 source ports, so
that the kernel's 4-tuple hash has something to spread), the other rows with -c 4.
Workloads: cache-hit (50 names repeated, warmed first), cache-miss (unique names, each asked once,
answered upstream by a wildcard), and latency at a fixed 2,000 qps (p50/p99 from dnsperf -v).
Each figure is the median of 3 runs; ratios are proxyvm / Unbound from the same run.
Not a test: nothing here asserts. Usage: python bench/dns_bench.py [--seconds N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/policy.py shadows
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "protocols" / "dns"))

from dnsfront_lab import pick_ip, start_unbound  # noqa: E402

from tests.labs.pki import LabCA  # noqa: E402
from tests.labs.proc import Daemon, free_port, wait_port  # noqa: E402

PY = sys.executable
PROFILE = os.environ.get("PROXYVM_BENCH_PROFILE", "")


def dnsperf(ip: str, port: int, datafile: Path, *, seconds: float, once: bool = False, qps: int = 0,
            verbose: bool = False, clients: int = 4) -> str:
    argv = ["dnsperf", "-s", ip, "-p", str(port), "-d", str(datafile), "-l", str(seconds), "-c", str(clients),
            "-q", "200", "-t", "2"]
    if once:
        argv += ["-n", "1"]
    if qps:
        argv += ["-Q", str(qps)]
    if verbose:
        argv += ["-v"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout


def _stat(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants (`proxyvm run` is a supervisor
    plus workers): a cost per query that the machine's other load does not distort the way
    wall-clock qps is distorted."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(int(_stat(d.name)[1]), []).append(int(d.name))
            except (OSError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            f = _stat(p)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


def queries_of(out: str) -> int:
    m = re.search(r"Queries completed:\s+(\d+)", out)
    return int(m.group(1)) if m else 0


def rcodes_of(out: str) -> str:
    """dnsperf's "Response codes:" line (a benchmark of SERVFAILs would be no benchmark)."""
    m = re.search(r"Response codes:\s+(.*)", out)
    return m.group(1).strip() if m else "?"


def qps_of(out: str) -> tuple[float, float, int]:
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    avg = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    return qps, float(avg.group(1)) * 1000 if avg else 0.0, int(lost.group(1)) if lost else 0


def latencies(out: str) -> list[float]:
    # dnsperf -v: "> NOERROR h1.wild.test. A 0.000123"
    return [float(m.group(1)) * 1000 for m in re.finditer(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M)]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))]


@dataclass(frozen=True)
class Up:
    """The shared DoT upstream every system forwards to, and the names the workloads ask."""

    ip: str
    name: str
    zone: str  # workload names are <label>.<zone> (a wildcard there answers them all)
    anchors: Path | None = None  # set: DNSSEC validation on in proxyvm and Unbound
    hit_names: tuple[str, ...] = ()  # the cache-hit workload; default h0..h49.<zone>


def start_proxyvm_run(d: Path, ca: Path, up: Up, workers: int = 1) -> tuple[Daemon, str, int]:
    """The product as deployed: `proxyvm run -c CONFIG` (supervisor, DNS worker(s), audit written to
    disk with its hash chain, admin endpoint), policy `default: allow`."""
    ip = "127.0.3.2" if workers == 1 else "127.0.3.3"
    port = free_port(ip)
    run = d / ("run" if workers == 1 else f"run-w{workers}")
    run.mkdir(exist_ok=True)
    dnssec = f"validate\n  trust_anchors: {up.anchors}" if up.anchors else "off"
    (run / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules: []\n")
    (run / "proxyvm.yaml").write_text(
        f"policy: rules.yaml\naudit: {{path: audit.jsonl}}\nadmin: {{listen: \"{ip}:{free_port(ip)}\"}}\n"
        f"state_dir: state\nhttp: false\n"
        f"dns:\n  listen: [\"{ip}:{port}\"]\n  workers: {workers}\n  ca_file: {ca}\n  dnssec: {dnssec}\n  cache: {{size: 100000}}\n"
        f"  limits: {{inflight: 100000}}\n"
        f"  upstreams:\n    - {{address: \"{up.ip}:853\", name: {up.name}}}\n"
    )
    daemon = Daemon([PY, "-m", "proxyvm", "run", "-c", str(run / "proxyvm.yaml")],
                    ready=lambda: wait_port(ip, port, timeout=0.2) is None, log=run / "proxyvm.log",
                    env={"PYTHONPATH": str(ROOT), "PROXYVM_LOG_LEVEL": "WARNING"}, timeout=30).start()
    return daemon, ip, port


def start_proxyvm(d: Path, ca: Path, up: Up) -> tuple[Daemon, str, int]:
    """Extra row: the DNS service alone in one process, audit records counted, not written."""
    ip, port = "127.0.3.1", free_port("127.0.3.1")
    dnssec = f"validate\n  trust_anchors: {up.anchors}" if up.anchors else "off"
    (d / "proxyvm.yaml").write_text(
        f"dns:\n  listen: [\"{ip}:{port}\"]\n  ca_file: {ca}\n  dnssec: {dnssec}\n  cache: {{size: 100000}}\n"
        f"  limits: {{inflight: 100000}}\n"
        f"  upstreams:\n    - {{address: \"{up.ip}:853\", name: {up.name}}}\n"
    )
    (d / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules: []\n")
    daemon = Daemon([PY, str(ROOT / "bench" / "dns_serve.py"), str(d / "proxyvm.yaml"), str(d / "rules.yaml")],
                    ready=lambda: wait_port(ip, port, timeout=0.2) is None, log=d / "proxyvm.log",
                    env={"PYTHONPATH": str(ROOT), **({"PROXYVM_BENCH_PROFILE": PROFILE} if PROFILE else {})},
                    ).start()
    return daemon, ip, port


def start_unbound_forwarder(d: Path, ca: Path, up: Up, threads: int = 1) -> tuple[Daemon, str, int]:
    ip = pick_ip((53,))
    port = free_port(ip)
    stem = "unbound-fwd" if threads == 1 else f"unbound-fwd-t{threads}"
    conf = d / f"{stem}.conf"
    conf.write_text(f"""server:
    interface: {ip}@{port}
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{d}"
    pidfile: "{d}/{stem}.pid"
    use-syslog: no
    logfile: "{d}/{stem}.log"
    verbosity: 0
    num-threads: {threads}
    so-reuseport: yes
    access-control: 127.0.0.0/8 allow
    module-config: "{'validator iterator' if up.anchors else 'iterator'}"
    {f'trust-anchor-file: "{up.anchors}"' if up.anchors else ""}
    do-not-query-localhost: no
    tls-cert-bundle: "{ca}"
    msg-cache-size: 64m
    rrset-cache-size: 128m
    outgoing-range: 4096
    num-queries-per-thread: 4096
    local-zone: "test." nodefault
forward-zone:
    name: "."
    forward-tls-upstream: yes
    forward-addr: {up.ip}@853#{up.name}
""")
    daemon = Daemon(["unbound", "-d", "-c", str(conf)], ready=lambda: wait_port(ip, port, timeout=0.2) is None,
                    log=d / f"{stem}.stderr").start()
    return daemon, ip, port


def start_stubby(d: Path, ca: Path, up: Up) -> tuple[Daemon, str, int]:
    ip = pick_ip((53,))
    port = free_port(ip)
    conf = d / "stubby.yml"
    conf.write_text(f"""resolution_type: GETDNS_RESOLUTION_STUB
dns_transport_list: [GETDNS_TRANSPORT_TLS]
tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
tls_query_padding_blocksize: 128
edns_client_subnet_private: 1
idle_timeout: 10000
round_robin_upstreams: 0
tls_ca_file: "{ca}"
listen_addresses:
  - {ip}@{port}
appdata_dir: "{d}/stubby-appdata"
dnssec_return_status: GETDNS_EXTENSION_FALSE
limit_outstanding_queries: 0
upstream_recursive_servers:
  - address_data: {up.ip}
    tls_port: 853
    tls_auth_name: "{up.name}"
""")
    (d / "stubby-appdata").mkdir(exist_ok=True)
    daemon = Daemon(["stubby", "-C", str(conf)], ready=lambda: wait_port(ip, port, timeout=0.2) is None,
                    log=d / "stubby.log").start()
    return daemon, ip, port


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="proxyvm,proxyvm-svc,unbound,stubby,proxyvm-w2,unbound-t2",
                    help="proxyvm = `proxyvm run` as deployed; proxyvm-svc = the service alone, audit counted; "
                         "proxyvm-w2 = `proxyvm run` with dns workers: 2; unbound-t2 = Unbound num-threads: 2")
    ap.add_argument("--latency-rate", type=int, default=2000)
    ap.add_argument("--validate", action="store_true",
                    help="DNSSEC on: proxyvm (dnssec: validate) vs a validating Unbound, signed lab zones")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="dnsbench-"))
    lab = None
    if args.validate:
        # The signed lab of the DNSSEC tests: fake root, TLD and child zones on 127.0.4.x, an
        # iterating Unbound as the DoT upstream; *.wild.nsec.pvmlab. is a signed wildcard.
        from tests.labs.dnssec_lab import TLD, UPSTREAM_IP, UPSTREAM_NAME, DNSSECLab

        lab = DNSSECLab(d / "dnssec").start()
        assert lab.ca is not None
        ca_pem = lab.ca.ca_pem
        # Hits ask real names: a validating Unbound that has learnt the NSEC chain from the miss
        # workload synthesises wildcard answers per query (RFC 8198), which is no cache hit.
        secure = tuple(f"www.{z}.{TLD}".rstrip(".") for z in ("alg8", "alg10", "alg13", "alg14", "alg15", "alg16",
                                                            "nsec", "nsec3", "salted"))
        up = Up(UPSTREAM_IP, UPSTREAM_NAME, f"wild.nsec.{TLD}".rstrip("."), lab.dir / "root.ds", secure)
        upstream_daemons = list(lab.daemons)
        args.only = ",".join(n for n in args.only.split(",") if n != "stubby")  # Stubby does not validate
    else:
        ca = LabCA(d / "ca")
        ca_pem = ca.ca_pem
        up_ip = pick_ip()
        upstream = start_unbound(d, ca, up_ip, name="dot1.bench.test")
        up = Up(up_ip, "dot1.bench.test", "wild.test")
        upstream_daemons = [upstream.daemon]
    systems = {"proxyvm": start_proxyvm_run, "proxyvm-svc": start_proxyvm, "unbound": start_unbound_forwarder,
               "stubby": start_stubby,
               "proxyvm-w2": lambda d, ca, up: start_proxyvm_run(d, ca, up, workers=2),
               "unbound-t2": lambda d, ca, up: start_unbound_forwarder(d, ca, up, threads=2)}
    wide = {"proxyvm-w2", "unbound-t2"}  # two processes/threads: more source ports to spread
    hit_file = d / "hit.txt"
    hit_names = up.hit_names or tuple(f"h{i}.{up.zone}" for i in range(50))
    hit_file.write_text("".join(f"{n} A\n" for n in hit_names))
    results: dict[str, dict[str, float]] = {}
    running: list[Daemon] = []
    load_before = os.getloadavg()
    try:
        endpoints = {}
        pids: dict[str, int] = {}
        for name in args.only.split(","):
            daemon, ip, port = systems[name](d, ca_pem, up)
            running.append(daemon)
            endpoints[name] = (ip, port)
            pids[name] = daemon.pid
        time.sleep(0.3)
        for ip, port in endpoints.values():
            dnsperf(ip, port, hit_file, seconds=2)  # warm the cache and the upstream connection
        raw: dict[str, dict[str, list]] = {
            n: {"hit": [], "miss": [], "hit_lat": [], "miss_lat": [], "hit_cpu": [], "miss_cpu": [],
                "hit_rcodes": [], "miss_rcodes": []} for n in endpoints
        }
        # Rounds interleave the systems, so load from anything else on the machine hits all alike.
        for run in range(args.runs):
            for name, (ip, port) in endpoints.items():
                r = raw[name]
                c = 8 if name in wide else 4
                c0 = cpu_seconds(pids[name])
                out = dnsperf(ip, port, hit_file, seconds=args.seconds, clients=c)
                r["hit_cpu"].append((cpu_seconds(pids[name]) - c0) * 1e6 / max(1, queries_of(out)))
                r["hit"].append(qps_of(out))
                r["hit_rcodes"].append(rcodes_of(out))
                miss_file = d / f"miss-{name}-{run}.txt"
                miss_file.write_text("".join(f"m{run}-{name}-{os.getpid()}-{i}.{up.zone} A\n" for i in range(400_000)))
                c0 = cpu_seconds(pids[name])
                out = dnsperf(ip, port, miss_file, seconds=args.seconds, once=True, clients=c)
                r["miss_cpu"].append((cpu_seconds(pids[name]) - c0) * 1e6 / max(1, queries_of(out)))
                r["miss"].append(qps_of(out))
                r["miss_rcodes"].append(rcodes_of(out))
                lat = latencies(dnsperf(ip, port, hit_file, seconds=4, qps=args.latency_rate, verbose=True, clients=1))
                r["hit_lat"].append((pct(lat, 0.5), pct(lat, 0.99)))
                lat_file = d / f"lat-{name}-{run}.txt"
                lat_file.write_text("".join(f"l{run}-{name}-{os.getpid()}-{i}.{up.zone} A\n" for i in range(12000)))
                lat = latencies(dnsperf(ip, port, lat_file, seconds=4, qps=args.latency_rate, verbose=True, once=True,
                                        clients=1))
                r["miss_lat"].append((pct(lat, 0.5), pct(lat, 0.99)))
                print(f"# round {run + 1} {name}: hit {r['hit'][-1][0]:.0f} miss {r['miss'][-1][0]:.0f} qps; "
                      f"rcodes hit {r['hit_rcodes'][-1]} miss {r['miss_rcodes'][-1]}", file=sys.stderr, flush=True)
        for name, r in raw.items():
            results[name] = {
                "hit_qps": statistics.median(h[0] for h in r["hit"]),
                "miss_qps": statistics.median(m[0] for m in r["miss"]),
                "hit_cpu": statistics.median(r["hit_cpu"]),
                "miss_cpu": statistics.median(r["miss_cpu"]),
                "hit_p50": statistics.median(x[0] for x in r["hit_lat"]),
                "hit_p99": statistics.median(x[1] for x in r["hit_lat"]),
                "miss_p50": statistics.median(x[0] for x in r["miss_lat"]),
                "miss_p99": statistics.median(x[1] for x in r["miss_lat"]),
            }
    finally:
        for dmn in running:
            dmn.stop()
        if lab is not None:
            lab.stop()
        else:
            for dmn in upstream_daemons:
                dmn.stop()
    load_after = os.getloadavg()
    mode = "DNSSEC-validated " if args.validate else ""
    print(f"\n{mode}DNS benchmark, median of {args.runs} interleaved rounds ({args.seconds:g} s each), dnsperf -c 4 -q 200, "
          f"{os.cpu_count()} CPUs, loopback, one shared Unbound DoT upstream; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    rate = args.latency_rate
    print(f"| {'system':<11} | {'hit qps':>9} | {'miss qps':>9} | {'hit CPU us/q':>12} | {'miss CPU us/q':>13} | "
          f"{f'hit p50/p99 ms @{rate}':>21} | {f'miss p50/p99 ms @{rate}':>22} |")
    print(f"|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 14}|{'-' * 15}|{'-' * 23}|{'-' * 24}|")
    for name, r in results.items():
        print(f"| {name:<11} | {r['hit_qps']:>9.0f} | {r['miss_qps']:>9.0f} | {r['hit_cpu']:>12.1f} | "
              f"{r['miss_cpu']:>13.1f} | {r['hit_p50']:>9.3f} / {r['hit_p99']:>9.3f} | "
              f"{r['miss_p50']:>9.3f} / {r['miss_p99']:>10.3f} |")
    if "proxyvm" in results and "unbound" in results:
        p, u = results["proxyvm"], results["unbound"]
        miss_goal = "0.3" if args.validate else "1.0"  # issue 4 (validated) / issue 3 goals
        print(f"\nproxyvm / unbound: cache-hit {p['hit_qps'] / u['hit_qps']:.2f}x (goal >= 0.8), "
              f"cache-miss {p['miss_qps'] / u['miss_qps']:.2f}x (goal >= {miss_goal}); CPU per query "
              f"{p['hit_cpu'] / u['hit_cpu']:.1f}x (hits), {p['miss_cpu'] / u['miss_cpu']:.1f}x (misses)")
    if "proxyvm-w2" in results and "unbound-t2" in results:
        p, u = results["proxyvm-w2"], results["unbound-t2"]
        print(f"workers: 2 / num-threads: 2 (proxyvm-w2 / unbound-t2): cache-hit {p['hit_qps'] / u['hit_qps']:.2f}x, "
              f"cache-miss {p['miss_qps'] / u['miss_qps']:.2f}x; CPU per query {p['hit_cpu'] / u['hit_cpu']:.1f}x (hits), "
              f"{p['miss_cpu'] / u['miss_cpu']:.1f}x (misses)")
    if "proxyvm" in results and "proxyvm-w2" in results:
        p, w = results["proxyvm"], results["proxyvm-w2"]
        print(f"proxyvm workers: 2 / workers: 1: cache-hit {w['hit_qps'] / p['hit_qps']:.2f}x, "
              f"cache-miss {w['miss_qps'] / p['miss_qps']:.2f}x")
    if "proxyvm" in results and "proxyvm-svc" in results:
        p, s = results["proxyvm"], results["proxyvm-svc"]
        print(f"proxyvm run / service alone (audit counted, not written): cache-hit {p['hit_qps'] / s['hit_qps']:.2f}x, "
              f"cache-miss {p['miss_qps'] / s['miss_qps']:.2f}x (goal >= 0.85)")
    if "proxyvm" in results and "stubby" in results:
        p, s = results["proxyvm"], results["stubby"]
        print(f"proxyvm / stubby:  cache-hit {p['hit_qps'] / s['hit_qps']:.2f}x, "
              f"cache-miss {p['miss_qps'] / s['miss_qps']:.2f}x")
    print(f"(work dir {d})")
    print("goals at a fixed 2,000 qps: p99 <= 1 ms for hits, <= 5 ms for misses")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
