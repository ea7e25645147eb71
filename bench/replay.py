"""`proxyvm replay` benchmark: 1,000,000 recorded decisions decided again under a new policy.

Generates, in a temporary directory, a 1M-record audit log written by the real `AuditLog` (hash
chained, rotated at 100 MB like the default) with a realistic mix: DNS 60 %, HTTP 20 %, SMTP 8 %,
SNMP 6 %, TLS 6 %, 20 guests, a few thousand distinct names; then times, each in a fresh process
pinned to one CPU:

- peer 1: `proxyvm audit verify` over the same files (reading + hashing, no decisions);
- peer 2: a bare `json.loads` of every line (the floor of any reader of this format);
- `proxyvm replay --policy NEW.yaml -c CONFIG` (verifies the chain first, then decides every record).

Goal (issue 13): replay of 1M records in under 30 s on one core.

    .venv/bin/python bench/replay.py               # 1,000,000 records
    .venv/bin/python bench/replay.py --records 100000
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

GUESTS = [f"vm{i:02d}" for i in range(20)]
RULES = """\
mode: enforce
default: deny
rules:
  - id: dns-corp
    action: allow
    protocol: dns
    match: {qname: ["*.example.com", "example.com"], qtype: [A, AAAA, MX, TXT]}
  - id: dns-cdn
    action: allow
    protocol: dns
    guests: [vm00, vm01, vm02, vm03, vm04, vm05, vm06, vm07, vm08, vm09]
    match: {qname: ["*.cdn.example.net"]}
  - id: web-api
    action: allow
    protocol: http
    match: {host: ["api.example.com"], method: [GET, POST], path: ["/v1/*"]}
  - id: mail
    action: allow
    protocol: smtp
    match: {mail_from: ["*@example.com"], rcpt_to: ["*@example.org", "*@example.com"]}
  - id: snmp-read
    action: allow
    protocol: snmp
    match: {op: [get, getnext, getbulk], oid: ["1.3.6.1.2.1"]}
  - id: tls-pass
    action: allow
    protocol: tls
    match: {sni: ["*.example.com"]}
"""


def generate(d: Path, n: int, seed: int = 13) -> None:
    from proxyvm.audit import AuditLog, now_iso

    rnd = random.Random(seed)
    names = ([f"h{i}.example.com" for i in range(2000)] + [f"n{i}.cdn.example.net" for i in range(2000)]
             + [f"x{i}.other.test" for i in range(1000)])
    log = AuditLog(d / "audit.jsonl")
    t0 = 1_790_000_000.0
    for i in range(n):
        g = GUESTS[i % len(GUESTS)]
        src = f"198.18.0.{10 + i % len(GUESTS)}:{40000 + i % 20000}"
        r = rnd.random()
        ts = t0 + i * 0.01
        base = {"ts": now_iso(ts), "guest": g, "src": src}
        if r < 0.60:
            q = rnd.choice(names)
            rec = {**base, "protocol": "dns", "verdict": "allow", "rule": "learn", "at": "rules.yaml:1",
                   "reason": "learn mode: allowed and recorded", "request": {"qname": q, "qtype": rnd.choice("A AAAA MX".split())},
                   "upstream": {"address": "9.9.9.9:853", "tls": "TLSv1.3", "verified": True}, "rcode": "NOERROR",
                   "duration_ms": 0.2}
        elif r < 0.80:
            rec = {**base, "protocol": "http", "verdict": "allow", "rule": "learn", "at": "rules.yaml:1",
                   "reason": "learn mode", "request": {"method": rnd.choice(["GET", "POST", "PUT"]),
                                                       "host": rnd.choice(["api.example.com", "www.example.org"]),
                                                       "path": f"/v1/items/{rnd.randrange(5000)}", "port": "80"},
                   "upstream": None, "status": 200, "duration_ms": 3.1}
        elif r < 0.88:
            rec = {**base, "protocol": "smtp", "verdict": "allow", "rule": "learn", "at": "rules.yaml:1",
                   "reason": "learn mode", "request": {"mail_from": f"app{rnd.randrange(9)}@example.com",
                                                       "rcpt_to": rnd.choice(["ops@example.org", "x@partner.net"]),
                                                       "size": 2048}, "upstream": None, "event": "rcpt"}
        elif r < 0.94:
            rec = {**base, "protocol": "snmp", "verdict": "allow", "rule": "learn", "at": "rules.yaml:1",
                   "reason": "learn mode", "request": {"agent": "router1", "op": rnd.choice(["get", "set"]),
                                                       "version": "v2c", "oid_count": 1,
                                                       "oids": [f"1.3.6.1.2.1.1.{rnd.randrange(9)}.0"]},
                   "upstream": None, "status": "noError"}
        else:
            rec = {**base, "protocol": "tls", "verdict": "deny", "rule": "default", "at": "rules.yaml:2",
                   "reason": "no rule matched", "request": {"sni": rnd.choice(names), "dst": "203.0.113.9"},
                   "upstream": None}
        log.append(rec)
    log.close()


def timed(argv: list[str]) -> tuple[float, int, str]:
    pin = ["taskset", "-c", "0"] if sys.platform.startswith("linux") and os.path.exists("/usr/bin/taskset") else []
    t = time.perf_counter()
    r = subprocess.run(pin + argv, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t, r.returncode, (r.stdout + r.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory(prefix="proxyvm-bench-replay-") as tmp:
        d = Path(tmp)
        t = time.perf_counter()
        generate(d, n)
        gen_s = time.perf_counter() - t
        files = sorted(d.glob("audit.jsonl*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        files = [p for p in files if not p.name.endswith(".head")]
        size = sum(p.stat().st_size for p in files)
        (d / "rules.yaml").write_text(RULES)
        guests = "\n".join(f"  {g}: {{addresses: [198.18.0.{10 + i}]}}" for i, g in enumerate(GUESTS))
        (d / "proxyvm.yaml").write_text(f"guests:\n{guests}\npolicy: rules.yaml\naudit: {{path: audit.jsonl}}\n")
        print(f"generated {n} records in {len(files)} files ({size / 1e6:.0f} MB) in {gen_s:.1f} s")
        py = sys.executable
        verify_s, rc, out = timed([py, "-m", "proxyvm", "audit", "verify", *map(str, files)])
        assert rc == 0, out
        loads_s, rc, out = timed([py, "-c", "import json,sys\nfor f in sys.argv[1:]:\n"
                                  "    for line in open(f,'rb'): json.loads(line)", *map(str, files)])
        assert rc == 0, out
        replay_s, rc, out = timed([py, "-m", "proxyvm", "replay", "--json", "-c", str(d / "proxyvm.yaml"),
                                   "--policy", str(d / "rules.yaml")])
        assert rc in (0, 3), out
        import json

        report = json.loads(out)
        assert report["replayed"] == n, report["replayed"]
        print(f"{'what':<44} {'seconds':>8} {'records/s':>10}")
        for what, s in (("peer: proxyvm audit verify", verify_s), ("peer: json.loads of every line", loads_s),
                        ("proxyvm replay (verify + decide, one core)", replay_s)):
            print(f"{what:<44} {s:>8.1f} {n / s:>10,.0f}")
        print(f"replay: {report['unchanged']} unchanged, {report['allow_to_deny']} allow->deny, "
              f"{report['deny_to_allow']} deny->allow")
        goal = 30.0 * n / 1_000_000
        print(f"goal: {n} records in < {goal:.0f} s: {'met' if replay_s < goal else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
