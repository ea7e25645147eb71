"""Micro-benchmark (not a test): the cost of one `Engine.decide` on a rule with `rate:` when the
token buckets live in the process (workers: 1 before issue 18) and when they live in the shared
table every worker of a service uses (policy.shared_rate: mmap + an fcntl range lock per slot).

Rows: µs per decision, median of `--runs` runs of `--n` decisions each, for (a) process-local
buckets, (b) the shared table with one process, (c) the shared table with two processes deciding at
the same time on the same (rule, guest) bucket (the worst case: every take contends for one slot
lock), (d) a rule without `rate:` for scale. 32 guests rotate so the per-(rule, guest) caches are
warm as in a service.

    .venv/bin/python bench/rate_table.py [--n 200000] [--runs 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/policy.py shadows
sys.path.insert(0, str(ROOT))

from policy import load_policy  # noqa: E402
from policy.shared_rate import SharedRates, create  # noqa: E402

GUESTS = [f"g{i}" for i in range(32)]
RULES = """\
mode: enforce
default: deny
rules:
  - {id: limited, action: allow, protocol: dns, match: {qname: ["*.rate.test"]}, rate: 1000000000/second}
  - {id: plain, action: allow, protocol: dns, match: {qname: ["*.plain.test"]}}
"""


def _engine(d: Path, table: Path | None):
    p = d / "rules.yaml"
    p.write_text(RULES)
    engine = load_policy(p, guests=set(GUESTS))
    if table is not None:
        engine.shared_rates = SharedRates(table)
    return engine


def _run(d: Path, table: Path | None, qname: str, n: int, same_guest: bool = False) -> float:
    """µs per decision over n decisions."""
    engine = _engine(d, table)
    req = {"qname": qname, "qtype": "A"}
    decide = engine.decide
    guests = ["g0"] * len(GUESTS) if same_guest else GUESTS
    for g in guests:
        decide("dns", g, req)  # warm the caches
    t0 = time.perf_counter()
    for i in range(n):
        decide("dns", guests[i & 31], req)
    return (time.perf_counter() - t0) * 1e6 / n


def _child(d: str, table: str, n: int, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    q.put(_run(Path(d), Path(table), "a.rate.test", n, same_guest=True))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="ratebench-"))
    table = create(d / "rate-dns.table")
    rows: dict[str, list[float]] = {"no rate (scale)": [], "rate, buckets in the process": [],
                                    "rate, shared table, 1 process": [], "rate, shared table, 2 processes, 1 bucket": []}
    ctx = multiprocessing.get_context("spawn")
    for _ in range(args.runs):
        rows["no rate (scale)"].append(_run(d, None, "a.plain.test", args.n))
        rows["rate, buckets in the process"].append(_run(d, None, "a.rate.test", args.n))
        rows["rate, shared table, 1 process"].append(_run(d, table, "a.rate.test", args.n))
        q = ctx.Queue()
        procs = [ctx.Process(target=_child, args=(str(d), str(table), args.n, q)) for _ in range(2)]
        for p in procs:
            p.start()
        both = [q.get() for _ in procs]
        for p in procs:
            p.join()
        rows["rate, shared table, 2 processes, 1 bucket"].append(max(both))
    print(f"\nEngine.decide, µs per decision, median of {args.runs} runs x {args.n} decisions\n")
    print(f"| {'case':<44} | {'µs':>6} |")
    print(f"|{'-' * 46}|{'-' * 8}|")
    for name, v in rows.items():
        print(f"| {name:<44} | {statistics.median(v):>6.2f} |")
    local = statistics.median(rows["rate, buckets in the process"])
    shared = statistics.median(rows["rate, shared table, 1 process"])
    print(f"\nshared table costs {shared - local:+.2f} µs per rate-limited decision ({shared / local:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
