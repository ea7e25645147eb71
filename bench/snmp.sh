#!/usr/bin/env bash
# SNMP benchmark (not a test): proxyvm vs net-snmp snmpd's `proxy` directive (v2c -> v3 authPriv),
# same run, same v3-only agent; gets/s with N outstanding v2c GETs and full-tree snmpbulkwalk time,
# median of 3. Uses 127.0.6.30-33. Needs snmpd + snmp tools (see .ci/packages-snmp.txt).
#   bench/snmp.sh [-n OUTSTANDING] [-d SECONDS] [--runs 3] [--reps 50]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
[ -x "$PY" ] || { echo "$0: $PY not found: run ./scripts/bootstrap --test first" >&2; exit 2; }
exec "$PY" bench/snmp_bench.py "$@"
