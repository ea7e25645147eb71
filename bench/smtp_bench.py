"""SMTP benchmark (issue 5): proxyvm vs a Postfix relay (smtp_tls_security_level = verify), both
delivering to the same Postfix STARTTLS sink, load from postfix's `smtp-source`.

Measures per message size (2 KB, 10 KB) and per contender, median of 3 runs:
  accepted/s  — messages answered 250 by the contender (proxyvm fsyncs each before its 250)
  delivered/s — messages counted at the sink (end to end over verified TLS), from the first
                submission to the last arrival
and checks that the sink saw exactly as many messages as were submitted (none lost, none duplicated).

Not a test: run as root with `bench/smtp.sh`. Uses only 127.0.5.40-43.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.labs.pki import LabCA  # noqa: E402
from tests.labs.postfix import PostfixLab  # noqa: E402
from tests.labs.proc import free_port  # noqa: E402
from tests.labs.proxy import ProxyVM  # noqa: E402

SINK_IP, RELAY_IP, PROXY_IP, ADMIN_IP = "127.0.5.40", "127.0.5.41", "127.0.5.42", "127.0.5.43"


class Sink:
    """The Postfix STARTTLS sink: accepts for example.org and discards; counts from its log."""

    def __init__(self, d: Path, ca: LabCA):
        cert, key = ca.issue(["sink.lab.test", SINK_IP], stem="sink")
        self.lab = PostfixLab(d / "sink", SINK_IP, 25, cert=cert, key=key, hostname="sink.lab.test",
                              extra={"virtual_transport": "discard:", "smtpd_tls_received_header": "no"})

    def count(self) -> int:
        try:
            text = self.lab.log.read_text(errors="replace")
        except OSError:
            return 0
        return len(re.findall(r"postfix/discard\[\d+\]: .* status=sent", text))


def smtp_source(target: str, n: int, size: int, sessions: int) -> float:
    t0 = time.monotonic()
    r = subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size), "-M", "client.lab.test",
                        "-f", "bench@example.com", "-t", "sink@example.org", target],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {r.stdout}{r.stderr}")
    return time.monotonic() - t0


def wait_count(sink: Sink, target: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while sink.count() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"sink has {sink.count()} of {target} after {timeout}s")
        time.sleep(0.05)
    return time.monotonic()


def run_one(sink: Sink, target: str, n: int, size: int, sessions: int) -> tuple[float, float]:
    before = sink.count()
    t0 = time.monotonic()
    accept_s = smtp_source(target, n, size, sessions)
    t_end = wait_count(sink, before + n, 300)
    time.sleep(1.0)
    extra = sink.count() - before - n
    if extra:
        raise RuntimeError(f"sink counted {extra} messages more than submitted (duplicates)")
    return n / accept_s, n / (t_end - t0)


def proxy_config(d: Path, ca: Path, port: int, admin: int) -> str:
    (d / "rules.yaml").write_text("mode: enforce\ndefault: deny\nrules:\n"
                                  "  - {id: bench, action: allow, protocol: smtp, match: {mail_from: ['*@example.com']}}\n")
    return f"""\
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{ADMIN_IP}:{admin}"}}
state_dir: state
smtp:
  listen: ["{PROXY_IP}:{port}"]
  spool: spool
  relay: {{host: sink.lab.test, port: 25, address: "{SINK_IP}"}}
  tls: verify
  ca_file: {ca}
  hostname: proxyvm.lab.test
  max_connections: 20
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000, help="messages per run")
    ap.add_argument("-s", type=int, default=20, help="concurrent sessions")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="2048,10240")
    ap.add_argument("--only", choices=["postfix", "proxyvm"], help="measure one contender (profiling)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    d = Path(tempfile.mkdtemp(prefix="pvm-smtp-bench-", dir="/tmp"))
    d.chmod(0o755)
    ca = LabCA(d / "ca", "bench CA")
    sink = Sink(d, ca)
    relay_cert, relay_key = ca.issue(["relay.lab.test"], stem="relay")
    relay = PostfixLab(d / "relay", RELAY_IP, 25, cert=relay_cert, key=relay_key, hostname="relay.lab.test",
                       domains=["example.org"], relay_to=f"[{SINK_IP}]:25", relay_name="sink.lab.test",
                       relay_ca=ca.ca_pem)
    port, admin = free_port(PROXY_IP), free_port(ADMIN_IP)
    pdir = d / "proxy"
    pdir.mkdir()
    pvm = ProxyVM.from_text(pdir, proxy_config(pdir, ca.ca_pem, port, admin))
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    sink.lab.start()
    relay.start()
    pvm.start()
    try:
        for size in sizes:
            contenders = [("postfix relay (verify)", f"{RELAY_IP}:25"), ("proxyvm", f"{PROXY_IP}:{port}")]
            if args.only:
                contenders = [c for c in contenders if c[0].startswith(args.only)]
            # interleaved (A B A B ...): on a shared machine the load drifts during a bench
            for i in range(args.runs):
                for name, target in contenders:
                    acc, dlv = run_one(sink, target, args.n, size, args.s)
                    results.setdefault((name, size), []).append((acc, dlv))
                    print(f"  {name:<24} {size:>6} B run {i + 1}: accepted {acc:7.1f}/s  delivered {dlv:7.1f}/s",
                          flush=True)
    finally:
        pvm.stop()
        relay.stop()
        sink.lab.stop()
    print()
    print(f"{args.n} messages x {args.runs} runs, {args.s} concurrent sessions, medians (msgs/s)")
    print(f"{'size':>6}  {'contender':<24} {'accepted':>9} {'delivered':>10}")
    if args.only:
        return 0
    for size in sizes:
        med = {}
        for name in ("postfix relay (verify)", "proxyvm"):
            runs = results[(name, size)]
            med[name] = (statistics.median(a for a, _ in runs), statistics.median(b for _, b in runs))
            print(f"{size:>6}  {name:<24} {med[name][0]:>9.1f} {med[name][1]:>10.1f}")
        pf, px = med["postfix relay (verify)"], med["proxyvm"]
        print(f"{size:>6}  {'ratio proxyvm/postfix':<24} {px[0] / pf[0]:>8.2f}x {px[1] / pf[1]:>9.2f}x")
    print(f"(lab left in {d} for inspection)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
