#!/usr/bin/env bash
# DNS benchmark (not a test): proxyvm vs Unbound (forward-tls-upstream, num-threads 1) vs Stubby,
# and proxyvm `dns: workers: 2` vs Unbound `num-threads: 2` (rows proxyvm-w2, unbound-t2),
# all forwarding over DoT to one local Unbound upstream; dnsperf cache-hit / cache-miss qps and
# p50/p99 latency at a fixed rate; median of 3 interleaved rounds, ratios from the same run.
# Needs: unbound, stubby, dnsperf (Debian packages; see .ci/packages-dns.txt). Run as root.
#   bench/dns.sh [--seconds 8] [--runs 3] [--only proxyvm,unbound,stubby] [--latency-rate 2000]
#   bench/dns.sh --validate    # DNSSEC on: proxyvm vs a validating Unbound over the signed test lab
#                              # (tests/labs/dnssec_lab.py on 127.0.4.x; needs nsd and bind9-utils too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
[ -x "$PY" ] || { echo "$0: $PY not found: run ./scripts/bootstrap --test first" >&2; exit 2; }
for bin in unbound stubby dnsperf; do
    command -v "$bin" >/dev/null || { echo "bench/dns.sh: $bin is not installed" >&2; exit 2; }
done
exec "$PY" bench/dns_bench.py "$@"
