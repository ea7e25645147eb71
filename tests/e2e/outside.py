"""Real servers in the lab's outside namespace (198.19.0.0/24), reusable by tests and benchmarks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.e2e.lab import OUTSIDE, NamespaceLab
from tests.labs.pki import LabCA

DOT_NAME = "dot.lab.test"

LAB_ZONE = """\
    local-zone: "lab.test." static
    local-data: "lab.test. 3600 IN SOA ns.lab.test. hostmaster.lab.test. 1 3600 600 86400 60"
    local-data: "www.lab.test. 300 IN A 198.19.0.80"
    local-data: "mail.lab.test. 300 IN A 198.19.0.25"
    local-data: "lab.test. 300 IN MX 10 mail.lab.test."
"""


def start_unbound_dot(lab: NamespaceLab, workdir: Path, ca: LabCA) -> Path:
    """Unbound in the outside namespace: DoT on 198.19.0.53:853 (certificate for dot.lab.test) and
    plaintext on :53 with query logging, so a test can see whether anything arrived in clear."""
    addr = OUTSIDE["dns"]
    d = workdir / "unbound-outside"
    d.mkdir(parents=True, exist_ok=True)
    cert, key = ca.issue([DOT_NAME], stem="dot-outside")
    log = d / "unbound.log"
    conf = d / "unbound.conf"
    conf.write_text(
        "server:\n"
        f"    interface: {addr}@853\n    interface: {addr}@53\n    tls-port: 853\n"
        f'    tls-service-key: "{key}"\n    tls-service-pem: "{cert}"\n'
        f'    do-daemonize: no\n    chroot: ""\n    username: ""\n    directory: "{d}"\n'
        f'    pidfile: "{d}/unbound.pid"\n    use-syslog: no\n    logfile: "{log}"\n'
        "    verbosity: 1\n    log-queries: yes\n    access-control: 198.19.0.0/24 allow\n"
        '    module-config: "iterator"\n    num-threads: 1\n    local-zone: "test." nodefault\n' + LAB_ZONE
    )
    chk = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    if chk.returncode:
        raise RuntimeError(chk.stdout + chk.stderr)
    lab.popen(lab.outside, [shutil.which("unbound") or "unbound", "-d", "-c", str(conf)], log=d / "stderr.log")
    lab.wait_tcp(lab.outside, addr, 853)
    return log
