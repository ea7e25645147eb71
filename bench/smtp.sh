#!/usr/bin/env bash
# SMTP benchmark (issue 5): proxyvm vs a Postfix relay with smtp_tls_security_level = verify, both
# delivering to the same Postfix STARTTLS sink; load from smtp-source; 2 KB and 10 KB; median of 3.
# Needs root (Postfix labs, port 25 on 127.0.5.40-43). Not a test; not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
[ -x "$PY" ] || { echo "$0: $PY not found: run ./scripts/bootstrap --test first" >&2; exit 2; }
exec "$PY" bench/smtp_bench.py "$@"
