#!/bin/sh
# HTTP benchmark: proxyvm vs plain mitmdump (reverse) vs nginx proxy_pass https, same run, median of 3.
# Needs root (the lab nginx listens on 127.0.7.110:443), nginx, wrk, mitmdump (same mitmproxy as proxyvm).
# Usage: bench/http.sh [--rounds 3] [--seconds 8] [--ws-mb 1024] [--workers 2]
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
[ -x "$PY" ] || { echo "$0: $PY not found: run ./scripts/bootstrap --test first" >&2; exit 2; }
PATH="$(dirname "$PY"):$PATH" exec "$PY" bench/http_bench.py "$@"
