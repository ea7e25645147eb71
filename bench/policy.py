"""Policy engine benchmark: load time, memory and decisions/s at 10 .. 1,000,000 names.

Cases: a DNS blocklist rule whose names come from a `qname_file` (10, 1k, 100k, 1M names, 10% of
them "*.x" lines, hosts-file lines mixed in) next to a few ordinary rules; and 1k mixed
HTTP/SMTP/SNMP rules. Each case runs in a fresh subprocess (so RSS is that case's alone), pinned to
one CPU, three times; the table shows medians. The peer, in the same run, is the naive evaluator:
a first-match linear scan over every rule and pattern (what the engine's indexes replace), timed on
a sample because it is slow at scale.

Goals (issue 2): 1M names load < 5 s and < 500 MB; >= 300,000 decisions/s at every size.

    .venv/bin/python bench/policy.py            # full run (2-3 minutes)
    .venv/bin/python bench/policy.py --quick    # 10 / 1k / 100k only, one run each
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This file is bench/policy.py: with bench/ first on sys.path, "import policy" would import itself.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
GUESTS = ["web1", "mail1", "db1"]


# -- generation (parent) ---------------------------------------------------------------------


def _name(rng: random.Random, i: int) -> str:
    return f"h{i}x{rng.randrange(1 << 30):x}.d{rng.randrange(5000)}.{rng.choice(['com', 'net', 'org', 'test'])}"


def make_names_case(d: Path, n: int) -> None:
    rng = random.Random(n)
    lines = ["# generated blocklist"]
    names = []
    for i in range(n):
        name = _name(rng, i)
        names.append(name)
        r = i % 10
        if r == 0:
            lines.append(f"*.{name}")
        elif r == 1:
            lines.append(f"0.0.0.0 {name}")
        else:
            lines.append(name)
    (d / "block.txt").write_text("\n".join(lines) + "\n")
    (d / "rules.yaml").write_text(
        "mode: enforce\ndefault: deny\nrules:\n"
        "  - {id: corp, action: allow, protocol: dns, guests: [web1, mail1], "
        "match: {qname: [example.com, '*.example.com'], qtype: [A, AAAA, MX, TXT]}}\n"
        "  - {id: blocklist, action: deny, protocol: dns, match: {qname_file: block.txt}}\n"
        "  - {id: private-answers, action: deny, protocol: dns, match: {answer_ip: [10.0.0.0/8, fd00::/8]}}\n"
        "  - {id: rest, action: allow, protocol: dns, match: {qtype: [A, AAAA]}}\n"
    )
    # requests: 1/3 blocklist hits (exact and below "*.x"), 1/3 misses (default), 1/3 other rules
    reqs: list[list[Any]] = []
    for j in range(60_000):
        r = j % 6
        g = GUESTS[j % 3]
        if r == 0:
            i = rng.randrange(n)
            q = names[i] if i % 10 else f"www.{names[i]}"
            reqs.append(["dns", g, {"qname": q, "qtype": "A"}])
        elif r == 1:
            reqs.append(["dns", g, {"qname": names[rng.randrange(n)].upper() + ".", "qtype": "AAAA"}])
        elif r in (2, 3):
            reqs.append(["dns", g, {"qname": _name(rng, n + j), "qtype": "TXT"}])  # miss -> default
        elif r == 4:
            reqs.append(["dns", g, {"qname": f"host{j}.example.com", "qtype": "A"}])
        else:
            reqs.append(["dns", g, {"qname": f"cdn{j}.example.org", "qtype": "A", "answer_ip": f"10.0.{j % 256}.1"}])
    (d / "requests.json").write_text(json.dumps(reqs))


def make_mixed_case(d: Path, n: int = 1000) -> None:
    rng = random.Random(7)
    lines = ["mode: enforce", "default: deny", "rules:"]
    hosts, domains, oids = [], [], []
    for i in range(n):
        kind = i % 3
        action = "deny" if i % 7 == 0 else "allow"
        guests = f", guests: [{GUESTS[i % 3]}]" if i % 4 == 0 else ""
        if kind == 0:
            host = f"api{i}.svc{rng.randrange(100)}.example.com"
            hosts.append(host)
            pat = host if i % 2 else "*." + host.split(".", 1)[1]
            lines.append(f"  - {{id: http{i}, action: {action}, protocol: http{guests}, match: {{host: ['{pat}'], "
                         f"method: [GET, POST], path: ['/v{i % 5}/*', /health]}}}}")
        elif kind == 1:
            dom = f"corp{i}.example.org"
            domains.append(dom)
            lines.append(f"  - {{id: smtp{i}, action: {action}, protocol: smtp{guests}, match: "
                         f"{{mail_from: ['*@example.com'], rcpt_to: ['*@{dom}', 'ops@*.{dom}']}}}}")
        else:
            oid = f"1.3.6.1.4.1.{i}.{rng.randrange(50)}"
            oids.append(oid)
            lines.append(f"  - {{id: snmp{i}, action: {action}, protocol: snmp{guests}, match: "
                         f"{{op: [get, getnext, getbulk], oid: ['{oid}']}}}}")
    (d / "rules.yaml").write_text("\n".join(lines) + "\n")
    reqs: list[list[Any]] = []
    for j in range(60_000):
        g = GUESTS[j % 3]
        hit = j % 2 == 0
        r = j % 3
        if r == 0:
            h = rng.choice(hosts) if hit else f"api{j}.nowhere.net"
            reqs.append(["http", g, {"method": "GET", "host": h, "path": f"/v{j % 5}/items/{j}"}])
        elif r == 1:
            dom = rng.choice(domains) if hit else "elsewhere.net"
            reqs.append(["smtp", g, {"mail_from": "app@example.com", "rcpt_to": f"user{j}@{dom}", "size": 0}])
        else:
            oid = rng.choice(oids) if hit else "1.3.6.1.4.1.99999"
            reqs.append(["snmp", g, {"agent": "r1", "op": "getnext", "oid": f"{oid}.1.{j % 9}"}])
    (d / "requests.json").write_text(json.dumps(reqs))


# -- measurement (child) ---------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _naive_decide(rules: list[Any], guests: set[str], protocol: str, guest: str, req: dict[str, Any],
                  files: dict[str, list[Any]]) -> str:
    """The peer: a first-match linear scan over every rule and every pattern (no indexes)."""
    if guest not in guests:
        guest = "unknown"
    for rule in rules:
        if rule.protocol != protocol or (rule.guests is not None and guest not in rule.guests):
            continue
        ok = True
        for key in rule.constrained_keys():
            value = req.get(key)
            if value is None:
                ok = False
                break
            pats = list(rule.match.get(key, ())) + files.get(rule.id, [])
            if not any(p.matches(value) for p in pats):
                ok = False
                break
        if ok:
            return rule.id
    return "default"


def child(case_dir: Path, naive_budget: float) -> dict[str, Any]:
    from policy import load_policy
    from policy.model import NameKind, NamePattern
    from policy.parser import read_name_file

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    reqs = json.loads((case_dir / "requests.json").read_text())
    gc.collect()
    rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    t0, c0 = time.perf_counter(), time.process_time()
    engine = load_policy(case_dir / "rules.yaml", GUESTS)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    rss1, hwm1 = _status_kb("VmRSS"), _status_kb("VmHWM")

    decide = engine.decide
    for p, g, r in reqs[:2000]:  # warm up
        decide(p, g, r)
    # decisions per CPU-second of this process (the machine is shared; wall time counts other
    # processes' turns) and per wall-second, both reported
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for p, g, r in reqs:
            decide(p, g, r)
        done += len(reqs)
        elapsed = time.perf_counter() - t0
        if elapsed >= 1.5:
            break
    dps = done / (time.process_time() - c0)
    wall_dps = done / elapsed
    verdicts: dict[str, int] = {}
    for p, g, r in reqs[:6000]:
        k = decide(p, g, r).rule
        k = k if k in ("default", "blocklist", "corp", "rest", "private-answers") else k.rstrip("0123456789")
        verdicts[k] = verdicts.get(k, 0) + 1

    # the naive peer, on a time budget; it must agree with the engine on what it decides
    files: dict[str, list[Any]] = {}
    for rule in engine.rules:
        for nf in rule.name_files:
            names = read_name_file(nf)
            files[rule.id] = ([NamePattern(n, NameKind.EXACT, n) for n in names.exact]
                              + [NamePattern.parse("*." + n) for n in names.below])
    rules, guests = list(engine.rules), set(GUESTS)
    ndone, t0 = 0, time.perf_counter()
    for p, g, r in reqs:
        got = _naive_decide(rules, guests, p, g, r, files)
        if got != decide(p, g, r).rule:
            raise SystemExit(f"naive and engine disagree on {p} {g} {r}: {got} vs {decide(p, g, r).rule}")
        ndone += 1
        if time.perf_counter() - t0 >= naive_budget:
            break
    naive_dps = ndone / (time.perf_counter() - t0)
    return {
        "load_s": load_s, "load_cpu": load_cpu, "wall_dps": wall_dps, "rss_mb": (rss1 - rss0) / 1024, "peak_mb": (max(hwm1, hwm0) - rss0) / 1024,
        "dps": dps, "naive_dps": naive_dps, "naive_n": ndone, "mix": verdicts, "stats": engine.stats(),
    }


# -- driver ----------------------------------------------------------------------------------


def run_case(case_dir: Path, runs: int, naive_budget: float) -> list[dict[str, Any]]:
    out = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(runs):
        res = subprocess.run(
            [sys.executable, __file__, "--child", str(case_dir), "--naive-budget", str(naive_budget)],
            capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise SystemExit(f"{case_dir.name} failed:\n{res.stderr}")
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--naive-budget", type=float, default=1.0, help="seconds per run for the naive peer")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the 1M case, one run each")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.naive_budget)))
        return

    sizes = [10, 1_000, 100_000] + ([] if args.quick else [1_000_000])
    runs = 1 if args.quick else args.runs
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        cases: list[tuple[str, str, Path]] = []
        for n in sizes:
            d = Path(tmp) / f"names-{n}"
            d.mkdir()
            make_names_case(d, n)
            cases.append((f"DNS qname_file, {n:,} names", f"{n:,} names + 3 rules", d))
        d = Path(tmp) / "mixed"
        d.mkdir()
        make_mixed_case(d)
        cases.append(("1k mixed HTTP/SMTP/SNMP rules", "1,000 rules", d))
        for label, size, d in cases:
            results = run_case(d, runs, args.naive_budget)
            med = {k: statistics.median(r[k] for r in results) for k in
                   ("load_s", "load_cpu", "rss_mb", "peak_mb", "dps", "wall_dps", "naive_dps")}
            rows.append((label, size, med, results[0]["mix"], sum(r["naive_n"] for r in results)))
            print(f"done: {label}", file=sys.stderr, flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    print(f"\nPolicy engine, median of {runs} fresh processes, one core; {cpu}; "
          f"Python {platform.python_version()}\n")
    print("| case | load s (CPU s) | RSS Δ MB | peak Δ MB | decisions/CPU-s | decisions/wall-s "
          "| peer: naive scan decisions/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, _size, m, _mix, _nn in rows:
        print(f"| {label} | {m['load_s']:.2f} ({m['load_cpu']:.2f}) | {m['rss_mb']:.0f} | {m['peak_mb']:.0f} | "
              f"{m['dps']:,.0f} | {m['wall_dps']:,.0f} | {m['naive_dps']:,.1f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("\nRequest mix (rule -> count of the first 6,000 requests), naive requests timed in total:")
    for label, _size, _m, mix, nn in rows:
        print(f"- {label}: {mix}; naive sample {nn}")
    goal = [r for r in rows if r[0].startswith("DNS") and "1,000,000" in r[0]]
    if goal:
        m = goal[0][2]
        print(f"\nGoal 1M names: load {m['load_s']:.2f} s (< 5 s: {'met' if m['load_s'] < 5 else 'MISSED'}), "
              f"RSS {m['rss_mb']:.0f} MB (< 500 MB: {'met' if m['rss_mb'] < 500 else 'MISSED'})")
    slow = [r[0] for r in rows if r[2]["dps"] < 300_000]
    print("Goal >= 300,000 decisions/s: " + ("met at every size" if not slow else "MISSED for " + "; ".join(slow)))


if __name__ == "__main__":
    main()
