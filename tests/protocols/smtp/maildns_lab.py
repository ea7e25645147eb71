"""A signed-zone lab for mail routing: a fake root and a signed `smtplab.` zone with MX, A and TLSA
records, served by a real nsd on 127.0.5.50; a non-validating Unbound on 127.0.5.51 serves it over
DNS-over-TLS (lab certificate) to our own validating resolver (protocols.dns.resolver), which checks
the chain from the root DS written here. Zones are signed by BIND's dnssec-signzone.

Recipient domains (each with `MX 10 mx.<domain>` and `mx.<domain> A <mx_ip>`):
  dane.smtplab.   TLSA 3 1 1 of the MX certificate's key  → DANE must match → delivered
  bad.smtplab.    TLSA 3 1 1 of a wrong digest            → DANE mismatch → deferred
  plain.smtplab.  no TLSA (securely denied)               → CA verification
  forged.smtplab. TLSA whose RRSIG is corrupted           → bogus → deferred
Stops every daemon by pid. Needs nsd, unbound, dnssec-keygen/-signzone/-dsfromkey.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.labs.pki import LabCA
from tests.labs.proc import Daemon, wait_port

NS_IP, DOT_IP, DOT_NAME = "127.0.5.50", "127.0.5.51", "dot.smtplab.test"
TOOLS = {n: shutil.which(n) or (f"/usr/sbin/{n}" if Path(f"/usr/sbin/{n}").exists() else None)
         for n in ("nsd", "unbound", "dnssec-keygen", "dnssec-signzone", "dnssec-dsfromkey")}
DOMAINS = ("dane.smtplab", "bad.smtplab", "plain.smtplab", "forged.smtplab")


def missing() -> list[str]:
    return [n for n, p in TOOLS.items() if not p]


def _run(argv: list[str], cwd: Path) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p.stdout


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(t))


class MailDNSLab:
    def __init__(self, directory: Path, ca: LabCA, mx_ip: str, dane_spki_sha256: bytes):
        self.dir = Path(directory)
        self.ca = ca
        self.mx_ip = mx_ip
        self.spki = dane_spki_sha256
        self.daemons: list[Daemon] = []
        self.root_ds = self.dir / "root.ds"

    def _key(self, zone: str) -> str:
        return _run([TOOLS["dnssec-keygen"], "-q", "-a", "ECDSAP256SHA256", "-f", "KSK", "-n", "ZONE", zone],
                    self.dir / "keys").strip()

    def _sign(self, zone: str, path: Path, key: str) -> Path:
        with path.open("a") as f:
            f.write(f"$INCLUDE {self.dir / 'keys' / key}.key\n")
        now = time.time()
        out = path.with_suffix(".signed")
        _run([TOOLS["dnssec-signzone"], "-q", "-z", "-O", "full", "-o", zone, "-f", str(out), "-K",
              str(self.dir / "keys"), "-s", _stamp(now - 3600), "-e", _stamp(now + 30 * 86400), str(path), key],
             self.dir)
        return out

    def _ds(self, key: str) -> str:
        return _run([TOOLS["dnssec-dsfromkey"], "-2", f"{key}.key"], self.dir / "keys")

    def build(self) -> None:
        (self.dir / "keys").mkdir(parents=True, exist_ok=True)
        root_key, tld_key = self._key("."), self._key("smtplab.")
        body = []
        for d in DOMAINS:
            label = d.split(".")[0]
            body += [f"{label} MX 10 mx.{label}", f"mx.{label} A {self.mx_ip}"]
        body += [f"_25._tcp.mx.dane TLSA 3 1 1 {self.spki.hex()}",
                 f"_25._tcp.mx.bad TLSA 3 1 1 {'00' * 32}",
                 f"_25._tcp.mx.forged TLSA 3 1 1 {self.spki.hex()}"]
        tld = self.dir / "smtplab.zone"
        tld.write_text("$ORIGIN smtplab.\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\n"
                       f"ns A {NS_IP}\n" + "\n".join(body) + "\n")
        signed = self._sign("smtplab.", tld, tld_key)
        lines = []
        for line in signed.read_text().splitlines():  # forged.smtplab: corrupt the TLSA signature
            f = line.split()
            if len(f) > 5 and f[0] == "_25._tcp.mx.forged.smtplab." and f[3] == "RRSIG" and f[4] == "TLSA":
                sig = f[-1]
                f[-1] = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
                line = " ".join(f)
            lines.append(line)
        signed.write_text("\n".join(lines) + "\n")
        root = self.dir / "root.zone"
        root.write_text(f"$ORIGIN .\n$TTL 300\n@ SOA rootns. hostmaster.rootns. 1 3600 600 86400 300\n"
                        f"@ NS rootns.\nrootns. A {NS_IP}\nsmtplab. NS ns.smtplab.\nns.smtplab. A {NS_IP}\n"
                        f"{self._ds(tld_key)}\n")
        self.root_file = self._sign(".", root, root_key)
        self.root_ds.write_text(self._ds(root_key))
        self.tld_file = signed

    def start(self) -> MailDNSLab:
        self.build()
        d = self.dir / "nsd"
        d.mkdir(exist_ok=True)
        conf = d / "nsd.conf"
        conf.write_text(
            f'server:\n  ip-address: {NS_IP}\n  port: 53\n  username: ""\n  chroot: ""\n  zonesdir: "{d}"\n'
            f'  database: ""\n  pidfile: "{d}/nsd.pid"\n  zonelistfile: "{d}/zone.list"\n'
            f'  xfrdfile: "{d}/xfrd.state"\n  xfrdir: "{d}"\n  server-count: 1\n  verbosity: 1\n  do-ip6: no\n'
            f'  logfile: "{d}/nsd.log"\nremote-control:\n  control-enable: no\n'
            f'zone:\n  name: "."\n  zonefile: "{self.root_file}"\n'
            f'zone:\n  name: "smtplab."\n  zonefile: "{self.tld_file}"\n')
        self.daemons.append(Daemon([TOOLS["nsd"], "-d", "-c", str(conf)], log=d / "stdout.log", timeout=20,
                                   ready=lambda: wait_port(NS_IP, 53, timeout=0.2) or True).start())
        u = self.dir / "unbound"
        u.mkdir(exist_ok=True)
        (u / "root.hints").write_text(f". 3600000 NS rootns.\nrootns. 3600000 A {NS_IP}\n")
        cert, key = self.ca.issue([DOT_NAME, DOT_IP], stem="maildns-dot")
        (u / "unbound.conf").write_text("\n".join([
            "server:", f"  interface: {DOT_IP}@853", "  tls-port: 853", f'  tls-service-key: "{key}"',
            f'  tls-service-pem: "{cert}"', '  username: ""', '  chroot: ""', f'  directory: "{u}"',
            f'  pidfile: "{u}/unbound.pid"', "  use-syslog: no", f'  logfile: "{u}/unbound.log"',
            "  verbosity: 1", "  num-threads: 1", "  do-ip6: no", "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no", f'  root-hints: "{u}/root.hints"', "  qname-minimisation: no",
            "  minimal-responses: no", '  module-config: "iterator"',
            "remote-control:", "  control-enable: no", ""]))
        self.daemons.append(Daemon([TOOLS["unbound"], "-d", "-c", str(u / "unbound.conf")], log=u / "stdout.log",
                                   timeout=20, ready=lambda: wait_port(DOT_IP, 853, timeout=0.2) or True).start())
        return self

    def dns_yaml(self) -> str:
        """The `dns:` section our validating resolver needs for this lab."""
        return (f"dns:\n  listen: ['127.0.5.52:53']\n  ca_file: {self.ca.ca_pem}\n  dnssec: validate\n"
                f"  trust_anchors: {self.root_ds}\n  upstreams:\n    - {{address: '{DOT_IP}:853', name: {DOT_NAME}}}\n")

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()
