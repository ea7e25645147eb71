"""Benchmark (not a test): the DNSSEC validator's cost per validated cache miss, against Unbound.

Builds the signed-zone lab (tests/labs/dnssec_lab.py: nsd + iterator Unbound over DoT + validating
Unbound, all on 127.0.4.0/24; needs root for port 53), fetches N distinct answers per workload over DoT,
warms the validator's key cache, then times `Validator.validate` alone (the CPU a validated miss adds
in the proxy; the upstream round trip and parsing are not included). The peer, in the same run, is the
validating Unbound (one thread) answering dnsperf with unique names (every query a validated cache
miss, keys warm, aggressive NSEC off). Prints medians of 3.

    sudo .venv/bin/python bench/dns_dnssec_bench.py [N]
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dns.name  # noqa: E402
import dns.rdatatype  # noqa: E402

from protocols.dns.dnssec import Status, Validator, parse_anchors  # noqa: E402
from tests.labs.dnssec_lab import ORACLE_IP, TLD, DNSSECLab  # noqa: E402

WORKLOADS = {
    "wildcard+NSEC3 (alg13)": lambda i: f"w{i}.wild.nsec3.{TLD}",
    "wildcard+NSEC (alg13)": lambda i: f"w{i}.wild.nsec.{TLD}",
    "NXDOMAIN NSEC3 (alg13)": lambda i: f"nx{i}.nsec3.{TLD}",
}
FIXED = {"positive alg8 RSA-2048": f"www.alg8.{TLD}", "positive alg13 P-256": f"www.alg13.{TLD}",
         "positive alg15 Ed25519": f"www.alg15.{TLD}"}


async def collect(lab: DNSSECLab, n: int):
    fetch = lab.fetch()
    v = Validator(parse_anchors(lab.root_ds), fetch)
    sets = {}
    for name, make in WORKLOADS.items():
        sets[name] = [(dns.name.from_text(make(i)), await fetch.query(make(i), "A")) for i in range(n)]
    for name, q in FIXED.items():
        m = await fetch.query(q, "A")
        sets[name] = [(dns.name.from_text(q), m)] * n
    for items in sets.values():  # warm the key cache; check every answer validates
        for qn, m in items[:3]:
            r = await v.validate(qn, dns.rdatatype.A, m)
            assert r.status == Status.SECURE, (qn, r)
    await fetch.close()
    return v, sets


async def timed(v: Validator, items) -> tuple[float, float]:
    """(validations per wall-clock second, CPU µs per validation): on a shared machine the CPU figure
    is the stable one."""
    t0, c0 = time.perf_counter(), time.process_time()
    for qn, m in items:
        await v.validate(qn, dns.rdatatype.A, m)
    return len(items) / (time.perf_counter() - t0), (time.process_time() - c0) * 1e6 / len(items)


def unbound_miss_qps(workdir: Path, run: int, n: int, server: str = ORACLE_IP, port: int = 53,
                     tag: str = "u") -> float:
    """dnsperf with n never-asked names (answered by the *.wild.nsec3 wildcard): every query a miss."""
    names = workdir / f"names-{tag}{run}.txt"
    names.write_text("".join(f"{tag}{run}x{i}.wild.nsec3.{TLD} A\n" for i in range(n)))
    out = subprocess.run(["dnsperf", "-s", server, "-p", str(port), "-d", str(names), "-n", "1", "-c", "1",
                          "-q", "100", "-t", "5", "-D"], capture_output=True, text=True, timeout=120).stdout
    for line in out.splitlines():
        if "Queries per second" in line:
            return float(line.split()[-1])
    raise RuntimeError(out)


def proxy_miss_qps(lab: DNSSECLab, workdir: Path, n: int, dnssec: str) -> float:
    """The real `proxyvm run` (DoT to the lab's iterator Unbound, validating with the lab anchor)."""
    from tests.labs.proc import free_port
    from tests.labs.proxy import ProxyVM

    ip = "127.0.4.21"
    d = workdir / f"proxy-{dnssec}"
    d.mkdir()
    (d / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules: []\n")
    port, admin = free_port(ip), free_port(ip)
    p = ProxyVM.from_text(d, f"""policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{ip}:{admin}"}}
state_dir: state
dns:
  listen: ["{ip}:{port}"]
  upstreams:
    - {{address: "127.0.4.10:853", name: upstream.dnssec.lab}}
  ca_file: {lab.ca.ca_pem}
  dnssec: {dnssec}
  trust_anchors: {lab.dir / "root.ds"}
""")
    p.start()
    try:
        unbound_miss_qps(workdir, 9, 200, ip, port, tag=f"warm{dnssec}")  # keys, connections
        return statistics.median(unbound_miss_qps(workdir, r, n, ip, port, tag=f"p{dnssec}") for r in range(3))
    finally:
        p.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        lab = DNSSECLab(Path(tmp)).start()
        try:
            v, sets = asyncio.run(collect(lab, n))
            rows = []
            for name, items in sets.items():
                v._keycache._verified_size = 0  # every signature verified: the worst case
                v._keycache.verified.clear()
                cold = [asyncio.run(timed(v, items)) for _ in range(3)]
                v._keycache._verified_size = 20000  # repeated RRsets (SOA, NSEC3, *.wildcard) verified once
                warm = [asyncio.run(timed(v, items)) for _ in range(3)]
                rows.append((name, statistics.median(r for r, _ in cold), statistics.median(c for _, c in cold),
                             statistics.median(r for r, _ in warm), statistics.median(c for _, c in warm)))
            ub = statistics.median(unbound_miss_qps(Path(tmp), r, n) for r in range(3))
            proxy_on = proxy_miss_qps(lab, Path(tmp), n, "validate")
            proxy_off = proxy_miss_qps(lab, Path(tmp), n, "off")
        finally:
            lab.stop()
    print(f"\nDNSSEC validation cost, {n} distinct answers per workload, warm key cache, median of 3")
    print(f"{'workload':26} {'every sig verified/s':>20} {'CPU µs':>7} {'with sig cache/s':>17} {'CPU µs':>7}"
          f" {'ratio to Unbound':>17}")
    for name, cold, cold_cpu, warm, warm_cpu in rows:
        print(f"{name:26} {cold:20.0f} {cold_cpu:7.0f} {warm:17.0f} {warm_cpu:7.0f} "
              f"{cold / ub:7.2f}x..{warm / ub:.2f}x")
    print(f"Unbound 1.17, 1 thread, validated cache miss (dnsperf, unique wildcard names): {ub:.0f} qps")
    print(f"proxyvm run, dnssec: validate, same names via DoT to the lab's iterator:      {proxy_on:.0f} qps"
          f"  ({proxy_on / ub:.2f}x Unbound)")
    print(f"proxyvm run, dnssec: off (reference):                                         {proxy_off:.0f} qps")


if __name__ == "__main__":
    main()
