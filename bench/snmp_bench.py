"""SNMP benchmark driver (run through bench/snmp.sh; not a test).

Same run, same v3-only agent (net-snmp snmpd, SHA-256/AES-128 authPriv user, no communities):
  direct     -v3 to the agent (reference only)
  snmpd      net-snmp snmpd with the `proxy` directive, v2c -> v3
  proxyvm    `proxyvm run -c` (real process, audit on), v2c -> v3
Measures gets/s with N outstanding v2c GETs (bench/snmp_loadgen.py) and the time of a full-tree
`snmpbulkwalk` (numbers of values must match), median of 3 each. Addresses: 127.0.6.30-33.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.labs.proc import Daemon, wait_port  # noqa: E402
from tests.labs.proxy import ProxyVM  # noqa: E402
from tests.labs.snmp_lab import SnmpAgent, V3User, client_env  # noqa: E402

AGENT = ("127.0.6.30", 16130)
NETSNMP_PROXY = ("127.0.6.31", 16131)
PROXYVM = ("127.0.6.32", 16132)
USER = V3User("monitor", "SHA-256", "bench-auth-pass", "AES-128", "bench-priv-pass")
OID = "1.3.6.1.2.1.1.5.0"


def start_netsnmp_proxy(d: Path) -> Daemon:
    """snmpd as a v2c -> v3 proxy: community `benchcomm` maps to context `proxied`, which is
    proxied as a whole to the v3 agent (no local MIB answers in that context)."""
    d.mkdir(parents=True, exist_ok=True)
    persist = d / "persist"
    persist.mkdir(exist_ok=True)
    conf = d / "snmpd.conf"
    conf.write_text(f"""agentAddress udp:{NETSNMP_PROXY[0]}:{NETSNMP_PROXY[1]}
com2sec -Cn proxied benchsec default benchcomm
group benchgroup v2c benchsec
view all included .1
access benchgroup proxied any noauth exact all none none
proxy -Cn proxied -v 3 -l authPriv -u {USER.name} -a SHA-256 -A {USER.auth_pass} -x AES -X {USER.priv_pass} {AGENT[0]}:{AGENT[1]} .1.3
""")
    env = {"SNMP_PERSISTENT_DIR": str(persist), "MIBS": "", "MIBDIRS": str(d)}
    return Daemon(["/usr/sbin/snmpd", "-f", "-C", "-c", str(conf), "-Lf", str(d / "snmpd.log"),
                   "-p", str(d / "snmpd.pid"), "-I", "-smux"],
                  ready=lambda: wait_port(*NETSNMP_PROXY, "udp", timeout=0.2) or True, env=env,
                  log=d / "stdout.log").start()


def start_proxyvm(d: Path) -> ProxyVM:
    d.mkdir(parents=True, exist_ok=True)
    (d / "auth").write_text(USER.auth_pass + "\n")
    (d / "priv").write_text(USER.priv_pass + "\n")
    (d / "rules.yaml").write_text("""mode: enforce
default: deny
rules:
  - id: bench-read
    action: allow
    protocol: snmp
    match: {op: [get, getnext, getbulk], oid: ["1.3"]}
""")
    text = f"""policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "127.0.6.33:19733"}}
state_dir: state
dns: false
http: false
snmp:
  listen: ["{PROXYVM[0]}:{PROXYVM[1]}"]
  max_repetitions: 100
  agents:
    bench:
      address: "{AGENT[0]}:{AGENT[1]}"
      community: benchcomm
      user: {USER.name}
      auth: {{protocol: SHA-256, password_file: auth}}
      priv: {{protocol: AES-128, password_file: priv}}
"""
    pv = ProxyVM.from_text(d, text)
    return pv.start()


def loadgen(target: tuple[str, int], n: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "snmp_loadgen.py"), "--target",
                          f"{target[0]}:{target[1]}", "--community", "benchcomm", "-n", str(n), "-d", str(seconds),
                          OID], capture_output=True, text=True, check=True, timeout=seconds + 30)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bulkwalk(workdir: Path, target: tuple[str, int], v3: bool, reps: int) -> tuple[float, int]:
    auth = USER.cli_args() if v3 else ["-v2c", "-c", "benchcomm"]
    argv = ["snmpbulkwalk", *auth, "-On", "-t", "5", "-r", "1", f"-Cr{reps}", f"{target[0]}:{target[1]}", "1.3"]
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=client_env(workdir), capture_output=True, text=True, timeout=120)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {r.stderr[-500:]}")
    return dt, len(r.stdout.splitlines())


def direct_gets(n: int, seconds: float) -> float:
    """v3 authPriv gets/s straight to the agent (reference), with the proxy's own v3 client code."""
    code = f"""
import asyncio, sys, time
sys.path.insert(0, {str(ROOT)!r})
from policy.source import Secret
from protocols.snmp import ber
from protocols.snmp.peer import V3Peer
from protocols.snmp.settings import Credentials
async def main():
    c = Credentials({USER.name!r}, "SHA-256", Secret({USER.auth_pass!r}), "AES-128", Secret({USER.priv_pass!r}))
    p = V3Peer({AGENT!r}, c, timeout=1, retries=1)
    vb = [ber.varbind(ber.oid_parse({OID!r}))]
    await p.request(ber.GET, vb)
    done = 0
    end = time.perf_counter() + {seconds}
    async def w():
        nonlocal done
        while time.perf_counter() < end:
            await p.request(ber.GET, vb)
            done += 1
    t0 = time.perf_counter()
    await asyncio.gather(*[w() for _ in range({n})])
    print(done / (time.perf_counter() - t0))
asyncio.run(main())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=seconds + 30)
    return float(r.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=32, help="outstanding GETs")
    ap.add_argument("-d", type=float, default=5.0, help="seconds per gets/s run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50, help="snmpbulkwalk -Cr (max-repetitions)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snmp-bench-"))
    agent = SnmpAgent(work, *AGENT, [USER]).start()
    nproxy = pv = None
    try:
        nproxy = start_netsnmp_proxy(work / "netsnmp-proxy")
        pv = start_proxyvm(work / "proxyvm")
        # warm up (engine discovery on both proxies) and check both answer
        loadgen(NETSNMP_PROXY, 4, 0.5)
        loadgen(PROXYVM, 4, 0.5)
        gets: dict[str, list[float]] = {"direct v3": [], "snmpd proxy": [], "proxyvm": []}
        walks: dict[str, list[float]] = {"direct v3": [], "snmpd proxy": [], "proxyvm": []}
        counts: dict[str, set[int]] = {k: set() for k in walks}
        for _ in range(a.runs):
            gets["direct v3"].append(direct_gets(a.n, a.d))
            for name, target in (("snmpd proxy", NETSNMP_PROXY), ("proxyvm", PROXYVM)):
                r = loadgen(target, a.n, a.d)
                if r["errors"] or r["timeouts"]:
                    print(f"warning: {name}: {r}", file=sys.stderr)
                gets[name].append(r["gets_per_s"])
            for name, target, v3 in (("direct v3", AGENT, True), ("snmpd proxy", NETSNMP_PROXY, False),
                                     ("proxyvm", PROXYVM, False)):
                dt, count = bulkwalk(work, target, v3, a.reps)
                walks[name].append(dt)
                counts[name].add(count)
        g = {k: statistics.median(v) for k, v in gets.items()}
        w = {k: statistics.median(v) for k, v in walks.items()}
        print(f"SNMP benchmark: {a.n} outstanding v2c GETs for {a.d:.0f} s; full-tree snmpbulkwalk -Cr{a.reps}; "
              f"median of {a.runs}; load average {os.getloadavg()[0]:.2f}")
        print(f"{'path':<14}{'gets/s':>10}{'bulkwalk s':>12}  values walked")
        for k in gets:
            print(f"{k:<14}{g[k]:>10.0f}{w[k]:>12.3f}  {'/'.join(map(str, sorted(counts[k])))}")
        print(f"proxyvm / snmpd proxy: gets/s {g['proxyvm'] / g['snmpd proxy']:.2f}x (goal >= 0.7x), "
              f"bulkwalk time {w['proxyvm'] / w['snmpd proxy']:.2f}x (goal <= 0.5x)")
        print("raw:", json.dumps({"gets": gets, "walks": walks}))
    finally:
        if pv is not None:
            pv.stop()
        if nproxy is not None:
            nproxy.stop()
        agent.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
