"""The signed-zone lab: a fake DNS tree on 127.0.4.0/24, built and signed by the tests themselves.

Keys and signatures come from BIND's `dnssec-keygen`/`dnssec-signzone`/`dnssec-dsfromkey`; zones are
served by real `nsd` instances (root 127.0.4.1, TLD `pvmlab.` 127.0.4.2, one child zone per case on
127.0.4.3, grandchildren on 127.0.4.4); a non-validating Unbound (`module-config: "iterator"`) on
127.0.4.10 is the DoT upstream (lab certificate), and a validating Unbound on 127.0.4.11 with the same
root trust anchor is the oracle. Broken cases are made by editing the signed zone files (corrupted or
removed RRSIGs, stripped NSEC proofs, wrong DS, expired or future signature windows).

Owns: building that lab (`DNSSECLab.start()`), stopping it by pid, the `CASES` table, a small
DNS-over-TLS `fetch` for the validator (`DoTFetch`) and the oracle query (`oracle()` with dig).
Must not: send anything outside 127.0.4.0/24.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import os
import re
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from tests.labs.pki import LabCA
from tests.labs.proc import Daemon, wait_port

NSD = shutil.which("nsd") or ("/usr/sbin/nsd" if Path("/usr/sbin/nsd").exists() else None)
UNBOUND = shutil.which("unbound") or ("/usr/sbin/unbound" if Path("/usr/sbin/unbound").exists() else None)
KEYGEN = shutil.which("dnssec-keygen")
SIGNZONE = shutil.which("dnssec-signzone")
DSFROMKEY = shutil.which("dnssec-dsfromkey")
DIG = shutil.which("dig")
MISSING = [n for n, p in (("nsd", NSD), ("unbound", UNBOUND), ("dnssec-keygen", KEYGEN),
                          ("dnssec-signzone", SIGNZONE), ("dnssec-dsfromkey", DSFROMKEY), ("dig", DIG)) if not p]
if os.geteuid() != 0:  # the fake root/TLD servers must answer on port 53 (Unbound's root hints have no port)
    MISSING.append("root (to bind port 53 on 127.0.4.x)")

ROOT_IP, TLD_IP, CHILD_IP, GRAND_IP = "127.0.4.1", "127.0.4.2", "127.0.4.3", "127.0.4.4"
UPSTREAM_IP, ORACLE_IP = "127.0.4.10", "127.0.4.11"
DOT_PORT = 853
UPSTREAM_NAME = "upstream.dnssec.lab"
TLD = "pvmlab."

ALG_NAMES = {5: "RSASHA1", 7: "NSEC3RSASHA1", 8: "RSASHA256", 10: "RSASHA512", 13: "ECDSAP256SHA256",
             14: "ECDSAP384SHA384", 15: "ED25519", 16: "ED448"}


@dataclass(frozen=True)
class Zone:
    """One child zone of pvmlab. (or grandchild when `parent` is given)."""

    label: str
    alg: int = 13
    nsec3: bool = False
    optout: bool = False
    signed: bool = True
    window: str = "now"  # now | expired | future
    ds: str = "good"  # good | none | mismatch | unsupported-alg | unsupported-digest
    extra: str = ""  # more zone-file lines
    tamper: str = ""  # badsig | nosig | noproof
    parent: str = TLD
    iterations: int = 0  # > 150: NSEC3 chain built and signed here (dnssec-signzone refuses more than 150)
    salt: str = "-"

    @property
    def name(self) -> str:
        return f"{self.label}.{self.parent}"


ZONES: list[Zone] = [
    *(Zone(f"alg{a}", alg=a, nsec3=(a == 7)) for a in (5, 7, 8, 10, 13, 14, 15, 16)),
    Zone("nsec", extra="*.wild A 192.0.2.7\nent.deep A 192.0.2.8"),
    Zone("nsec3", nsec3=True, extra="*.wild A 192.0.2.7\nent.deep A 192.0.2.8"),
    Zone("o3", nsec3=True, optout=True,
         extra=f"unsigned NS ns.unsigned\nns.unsigned A {GRAND_IP}"),
    Zone("iter", alg=15, nsec3=True, iterations=200),
    Zone("salted", alg=14, nsec3=True, iterations=10, salt="aabbccdd"),
    Zone("unsigned", signed=False, ds="none"),
    Zone("unsigned", parent=f"o3.{TLD}", signed=False, ds="none"),
    Zone("badsig", tamper="badsig"),
    Zone("nosig", tamper="nosig"),
    Zone("noproof", tamper="noproof"),
    Zone("expired", window="expired"),
    Zone("future", window="future"),
    Zone("dsbad", ds="mismatch"),
    Zone("unsupp", ds="unsupported-alg"),
    Zone("unsuppdigest", ds="unsupported-digest"),
    Zone("cname", extra="\n".join([
        f"toinsecure CNAME www.unsigned.{TLD}", f"tobogus CNAME www.badsig.{TLD}",
        f"tosecure CNAME www.alg15.{TLD}", f"dn DNAME alg16.{TLD}", f"toexpired CNAME www.expired.{TLD}"])),
]


@dataclass(frozen=True)
class Case:
    """One question: what our validator must conclude, and (via the oracle) what rcode/AD follow."""

    id: str
    qname: str
    qtype: str
    status: str  # secure | insecure | bogus
    ede: int | None = None


CASES: list[Case] = [
    *(Case(f"alg{a}-secure", f"www.alg{a}.{TLD}", "A", "secure") for a in (5, 7, 8, 10, 13, 14, 15, 16)),
    Case("nsec-nxdomain", f"nx.nsec.{TLD}", "A", "secure"),
    Case("nsec-nodata", f"www.nsec.{TLD}", "MX", "secure"),
    Case("nsec-ent-nodata", f"deep.nsec.{TLD}", "A", "secure"),
    Case("nsec-wildcard", f"x.wild.nsec.{TLD}", "A", "secure"),
    Case("nsec-wildcard-nodata", f"x.wild.nsec.{TLD}", "MX", "secure"),
    Case("nsec3-nxdomain", f"nx.nsec3.{TLD}", "A", "secure"),
    Case("nsec3-nodata", f"www.nsec3.{TLD}", "MX", "secure"),
    Case("nsec3-ent-nodata", f"deep.nsec3.{TLD}", "A", "secure"),
    Case("nsec3-wildcard", f"x.wild.nsec3.{TLD}", "A", "secure"),
    Case("nsec3-wildcard-nodata", f"x.wild.nsec3.{TLD}", "MX", "secure"),
    Case("tld-nxdomain", f"nothere.{TLD}", "A", "secure"),
    Case("ds-answer", f"alg13.{TLD}", "DS", "secure"),
    Case("dnskey-answer", f"alg14.{TLD}", "DNSKEY", "secure"),
    Case("unsigned-nsec", f"www.unsigned.{TLD}", "A", "insecure"),
    Case("unsigned-nsec-nxdomain", f"nx.unsigned.{TLD}", "A", "insecure"),
    Case("unsigned-nsec3-optout", f"www.unsigned.o3.{TLD}", "A", "insecure"),
    Case("nsec3-optout-nxdomain", f"nx.o3.{TLD}", "A", "insecure"),
    Case("nsec3-optout-nodata", f"www.o3.{TLD}", "MX", "secure"),
    Case("nsec3-salted-nxdomain", f"nx.salted.{TLD}", "A", "secure"),
    Case("nsec3-salted-nodata", f"www.salted.{TLD}", "MX", "secure"),
    Case("corrupted-rrsig", f"www.badsig.{TLD}", "A", "bogus", 6),
    Case("rrsig-missing", f"www.nosig.{TLD}", "A", "bogus", 10),
    Case("nxdomain-proof-removed", f"nx.noproof.{TLD}", "A", "bogus", 12),
    Case("expired", f"www.expired.{TLD}", "A", "bogus", 7),
    Case("not-yet-valid", f"www.future.{TLD}", "A", "bogus", 8),
    Case("ds-mismatch", f"www.dsbad.{TLD}", "A", "bogus", 9),
    Case("nsec3-iterations-over-cap-nxdomain", f"nx.iter.{TLD}", "A", "insecure", 27),
    Case("nsec3-iterations-over-cap-nodata", f"www.iter.{TLD}", "MX", "insecure", 27),
    Case("nsec3-iterations-over-cap-positive", f"www.iter.{TLD}", "A", "secure"),
    Case("unsupported-algorithm", f"www.unsupp.{TLD}", "A", "insecure", 1),
    Case("unsupported-digest", f"www.unsuppdigest.{TLD}", "A", "insecure", 2),
    Case("cname-secure-to-secure", f"tosecure.cname.{TLD}", "A", "secure"),
    Case("cname-secure-to-insecure", f"toinsecure.cname.{TLD}", "A", "insecure"),
    Case("cname-secure-to-bogus", f"tobogus.cname.{TLD}", "A", "bogus", 6),
    Case("cname-secure-to-expired", f"toexpired.cname.{TLD}", "A", "bogus", 7),
    Case("dname-secure", f"www.dn.cname.{TLD}", "A", "secure"),
]


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y%m%d%H%M%S")


def _run(argv: list[str], cwd: Path) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return p.stdout


def _zone_text(origin: str, ns_ip: str, body: str = "") -> str:
    return (f"$ORIGIN {origin}\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\nns A {ns_ip}\n"
            f"www A 192.0.2.1\nwww TXT \"lab\"\n{body}\n")


class DNSSECLab:
    """Build, sign, serve. `start()` takes a few seconds; `stop()` stops every daemon by pid."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.daemons: list[Daemon] = []
        self.root_ds = ""
        self.ca: LabCA | None = None

    # ---------------------------------------------------------------- keys and zones

    def _keygen(self, zone: str, alg: int, ksk: bool) -> str:
        argv = [KEYGEN, "-q", "-a", ALG_NAMES[alg], "-n", "ZONE"]
        if ksk:
            argv += ["-f", "KSK"]
        if alg in (5, 7, 8, 10):
            argv += ["-b", "1024" if not ksk else "2048"]
        return _run([*argv, zone], self.dir / "keys").strip()

    def _sign(self, zone: str, path: Path, keys: list[str], *, nsec3: bool = False, optout: bool = False,
              window: str = "now", iterations: int = 0, salt: str = "-") -> Path:
        out = path.with_suffix(".signed")
        now = time.time()
        start, end = {"now": (now - 3600, now + 30 * 86400), "expired": (now - 20 * 86400, now - 10 * 86400),
                      "future": (now + 10 * 86400, now + 40 * 86400)}[window]
        argv = [SIGNZONE, "-q", "-O", "full", "-o", zone, "-f", str(out), "-K", str(self.dir / "keys"),
                "-s", _stamp(start), "-e", _stamp(end)]
        if window != "now":
            argv.append("-P")  # its self-check would reject the (deliberately) invalid window
        if len(keys) == 1:
            argv.append("-z")  # one combined signing key signs everything
        if nsec3:
            argv += ["-3", salt, "-H", str(iterations)] + (["-A"] if optout else [])
        with path.open("a") as f:
            for k in keys:
                f.write(f"$INCLUDE {self.dir / 'keys' / k}.key\n")
        _run([*argv, str(path), *keys], self.dir)
        return out

    def _sign_nsec3_high(self, z: Zone, path: Path, key: str) -> Path:
        """Sign `z` (Ed25519 key from dnssec-keygen) with an NSEC3 chain of `z.iterations` iterations,
        which BIND refuses to make: hash, chain and RRSIGs are computed here with dnspython's canonical
        form and `cryptography`."""
        import base64

        import dns.dnssec
        import dns.rdataclass
        import dns.rdtypes.ANY.RRSIG
        import dns.rrset
        import dns.zone
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from protocols.dns.dnssec import crypto
        from protocols.dns.dnssec.denial import nsec3_hash

        origin = dns.name.from_text(z.name)
        keydir = self.dir / "keys"
        priv_b64 = next(line.split(":", 1)[1].strip() for line in (keydir / f"{key}.private").read_text().splitlines()
                        if line.startswith("PrivateKey:"))
        priv = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(priv_b64))
        dnskey_line = next(line for line in (keydir / f"{key}.key").read_text().splitlines()
                           if " DNSKEY " in line and not line.startswith(";"))
        text = path.read_text() + dnskey_line + f"\n@ NSEC3PARAM 1 0 {z.iterations} -\n"
        zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=True)
        dnskey = zone.find_rdataset(origin, "DNSKEY")[0]
        tag = crypto.key_tag(dnskey)
        names = sorted(zone.nodes)
        hashes = {n: nsec3_hash(n, b"", z.iterations) for n in names}
        order = sorted(hashes.values())
        now = time.time()
        inception, expiration = int(now - 3600), int(now + 30 * 86400)
        rrsets = [dns.rrset.from_rdata_list(n, rds.ttl, list(rds)) for n, node in zone.nodes.items()
                  for rds in node.rdatasets]
        for n in names:
            h = hashes[n]
            nxt = order[(order.index(h) + 1) % len(order)]
            types = sorted({dns.rdatatype.to_text(r.rdtype) for r in zone.nodes[n].rdatasets} | {"RRSIG"})
            owner = dns.name.Name((base64.b32hexencode(h).lower(),) + origin.labels)
            rrsets.append(dns.rrset.from_text(owner, 300, "IN", "NSEC3", f"1 0 {z.iterations} - "
                                              f"{base64.b32hexencode(nxt).decode().lower()} {' '.join(types)}"))
        out_lines = []
        for rs in rrsets:
            t = dns.rdtypes.ANY.RRSIG.RRSIG(dns.rdataclass.IN, dns.rdatatype.RRSIG, rs.rdtype, 15, len(rs.name) - 1,
                                            rs.ttl, expiration, inception, tag, origin, b"")
            sig = t.replace(signature=priv.sign(dns.dnssec._make_rrsig_signature_data(rs, t)))
            out_lines += [rs.to_text(), f"{rs.name} {rs.ttl} IN RRSIG {sig.to_text()}"]
        out = path.with_suffix(".signed")
        out.write_text("\n".join(out_lines) + "\n")
        return out

    def _ds(self, key: str) -> list[str]:
        return [line for line in _run([DSFROMKEY, "-2", f"{key}.key"], self.dir / "keys").splitlines() if line]

    def build(self) -> None:
        (self.dir / "keys").mkdir(parents=True, exist_ok=True)
        (self.dir / "zones").mkdir(exist_ok=True)
        # Key generation dominates: run it in parallel (RSA keys take ~0.1-0.5 s each).
        jobs: dict[str, tuple[str, int, bool]] = {
            "root-ksk": (".", 8, True), "root-zsk": (".", 8, False),
            "tld-ksk": (TLD, 8, True), "tld-zsk": (TLD, 8, False),
        }
        for z in ZONES:
            if z.signed:
                jobs[z.name] = (z.name, z.alg, True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futs = {k: pool.submit(self._keygen, *v) for k, v in jobs.items()}
            keys = {k: f.result() for k, f in futs.items()}

        parent_extra: dict[str, list[str]] = {TLD: []}
        grandchildren: dict[str, list[str]] = {}
        signed_files: dict[str, Path] = {}
        # grandchildren first, then children, so every parent knows its children's DS
        for z in sorted(ZONES, key=lambda z: -len(z.name)):
            ip = GRAND_IP if z.parent != TLD else CHILD_IP
            path = self.dir / "zones" / f"{z.name.rstrip('.')}.zone"
            path.write_text(_zone_text(z.name, ip, z.extra + "\n" + "\n".join(grandchildren.get(z.name, []))))
            deleg = [f"{z.name} NS ns.{z.name}", f"ns.{z.name} A {ip}"]
            if z.signed and z.iterations > 150:
                out = self._sign_nsec3_high(z, path, keys[z.name])
            elif z.signed:
                out = self._sign(z.name, path, [keys[z.name]], nsec3=z.nsec3, optout=z.optout, window=z.window,
                                 iterations=z.iterations, salt=z.salt)
            if z.signed:
                self._tamper(out, z)
                signed_files[z.name] = out
                ds = self._ds(keys[z.name])
                if z.ds == "mismatch":
                    ds = [re.sub(r"([0-9A-F])$", lambda m: "0" if m.group(1) != "0" else "1", d) for d in ds]
                elif z.ds == "unsupported-alg":
                    ds = [f"{z.name} IN DS 12345 100 2 {'AB' * 32}"]
                elif z.ds == "unsupported-digest":
                    tag = ds[0].split()[3]
                    ds = [f"{z.name} IN DS {tag} 13 99 {'CD' * 20}"]
                deleg += ds if z.ds != "none" else []
            else:
                signed_files[z.name] = path
            if z.parent == TLD:
                parent_extra[TLD] += deleg
            else:
                grandchildren.setdefault(z.parent, []).extend(
                    d for d in deleg if not d.startswith(f"{z.name} NS") and not d.startswith(f"ns.{z.name}"))
        self.child_files = {n: p for n, p in signed_files.items() if n.count(".") == 2}
        self.grand_files = {n: p for n, p in signed_files.items() if n.count(".") == 3}

        tld = self.dir / "zones" / "pvmlab.zone"
        tld.write_text(_zone_text(TLD, TLD_IP, "\n".join(parent_extra[TLD])))
        self.tld_file = self._sign(TLD, tld, [keys["tld-ksk"], keys["tld-zsk"]])
        root = self.dir / "zones" / "root.zone"
        tld_ds = "\n".join(self._ds(keys["tld-ksk"]))
        root.write_text(f"$ORIGIN .\n$TTL 300\n@ SOA rootns. hostmaster.rootns. 1 3600 600 86400 300\n"
                        f"@ NS rootns.\nrootns. A {ROOT_IP}\n{TLD} NS ns.{TLD}\nns.{TLD} A {TLD_IP}\n{tld_ds}\n")
        self.root_file = self._sign(".", root, [keys["root-ksk"], keys["root-zsk"]])
        self.root_ds = "\n".join(self._ds(keys["root-ksk"])) + "\n"
        (self.dir / "root.ds").write_text(self.root_ds)

    def _tamper(self, path: Path, z: Zone) -> None:
        if not z.tamper:
            return
        lines = path.read_text().splitlines()
        www = f"www.{z.name}"
        out = []
        for line in lines:
            f = line.split()
            is_www_a_sig = len(f) > 5 and f[0] == www and f[3] == "RRSIG" and f[4] == "A"
            if z.tamper == "badsig" and is_www_a_sig:
                sig = f[-1]
                mid = len(sig) // 2
                f[-1] = sig[:mid] + ("A" if sig[mid] != "A" else "B") + sig[mid + 1:]
                line = " ".join(f)
            elif z.tamper == "nosig" and is_www_a_sig:
                continue
            elif z.tamper == "noproof" and len(f) > 4 and (f[3] == "NSEC" or (f[3] == "RRSIG" and f[4] == "NSEC")):
                continue
            out.append(line)
        path.write_text("\n".join(out) + "\n")

    # ---------------------------------------------------------------- daemons

    def _nsd(self, name: str, ip: str, zones: dict[str, Path]) -> None:
        d = self.dir / f"nsd-{name}"
        d.mkdir(exist_ok=True)
        conf = d / "nsd.conf"
        zone_cfg = "".join(f'zone:\n  name: "{z}"\n  zonefile: "{p}"\n' for z, p in zones.items())
        conf.write_text(
            f'server:\n  ip-address: {ip}\n  port: 53\n  username: ""\n  chroot: ""\n  zonesdir: "{d}"\n'
            f'  database: ""\n  pidfile: "{d}/nsd.pid"\n  zonelistfile: "{d}/zone.list"\n  xfrdfile: "{d}/xfrd.state"\n'
            f'  xfrdir: "{d}"\n  server-count: 1\n  verbosity: 1\n  do-ip6: no\n  logfile: "{d}/nsd.log"\n'
            f"remote-control:\n  control-enable: no\n{zone_cfg}"
        )
        dm = Daemon([NSD, "-d", "-c", str(conf)], ready=lambda: wait_port(ip, 53, timeout=0.2) or True,
                    log=d / "stdout.log", timeout=20)
        self.daemons.append(dm.start())

    def _unbound(self, name: str, ip: str, validating: bool) -> None:
        d = self.dir / f"unbound-{name}"
        d.mkdir(exist_ok=True)
        (d / "root.hints").write_text(f". 3600000 NS rootns.\nrootns. 3600000 A {ROOT_IP}\n")
        lines = [
            "server:", f"  interface: {ip}@53", "  port: 53", '  username: ""', '  chroot: ""',
            f'  directory: "{d}"', f'  pidfile: "{d}/unbound.pid"', "  use-syslog: no", f'  logfile: "{d}/unbound.log"',
            "  verbosity: 1", "  num-threads: 1", "  do-ip6: no", "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no", f'  root-hints: "{d}/root.hints"', "  qname-minimisation: no",
            "  minimal-responses: no", "  harden-dnssec-stripped: yes",
        ]
        if validating:
            lines += ['  module-config: "validator iterator"', f'  trust-anchor-file: "{self.dir / "root.ds"}"',
                      "  val-log-level: 2", "  ede: yes", "  aggressive-nsec: no", "  val-bogus-ttl: 1"]
        else:
            assert self.ca is not None
            cert, key = self.ca.issue([UPSTREAM_NAME, ip], stem="dnssec-upstream")
            lines += ['  module-config: "iterator"', f"  interface: {ip}@{DOT_PORT}", f"  tls-port: {DOT_PORT}",
                      f'  tls-service-key: "{key}"', f'  tls-service-pem: "{cert}"']
        lines += ["remote-control:", "  control-enable: no"]
        conf = d / "unbound.conf"
        conf.write_text("\n".join(lines) + "\n")
        port = 53 if validating else DOT_PORT
        dm = Daemon([UNBOUND, "-d", "-c", str(conf)], ready=lambda: wait_port(ip, port, timeout=0.2) or True,
                    log=d / "stdout.log", timeout=20)
        self.daemons.append(dm.start())

    def start(self) -> DNSSECLab:
        t0 = time.monotonic()
        self.ca = LabCA(self.dir / "ca", "dnssec lab CA")
        self.build()
        try:
            self._nsd("root", ROOT_IP, {".": self.root_file})
            self._nsd("tld", TLD_IP, {TLD: self.tld_file})
            self._nsd("child", CHILD_IP, self.child_files)
            self._nsd("grand", GRAND_IP, self.grand_files)
            self._unbound("upstream", UPSTREAM_IP, validating=False)
            self._unbound("oracle", ORACLE_IP, validating=True)
        except BaseException:
            self.stop()
            raise
        self.setup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()

    def fetch(self) -> DoTFetch:
        assert self.ca is not None
        return DoTFetch(UPSTREAM_IP, DOT_PORT, self.ca.ca_pem, UPSTREAM_NAME)


class DoTFetch:
    """The validator's `fetch` for the lab: a DO=1, CD=1 query over DNS-over-TLS to the iterator Unbound,
    certificate verified against the lab CA. One connection per event loop, queries serialised."""

    def __init__(self, host: str, port: int, ca_file: Path, server_name: str) -> None:
        self.host, self.port, self.server_name = host, port, server_name
        self.ctx = ssl.create_default_context(cafile=str(ca_file))
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._conn: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Lock]] = {}
        self.count = 0

    async def _connection(self):
        loop = id(asyncio.get_running_loop())
        c = self._conn.get(loop)
        if c is None or c[1].is_closing():
            r, w = await asyncio.open_connection(self.host, self.port, ssl=self.ctx, server_hostname=self.server_name)
            c = self._conn[loop] = (r, w, asyncio.Lock())
        return c

    async def query(self, name: dns.name.Name | str, rdtype: int | str, *, cd: bool = True) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, want_dnssec=True, payload=4096)
        if cd:
            q.flags |= dns.flags.CD
        wire = q.to_wire()
        for attempt in (0, 1):
            r, w, lock = await self._connection()
            try:
                async with lock:
                    w.write(len(wire).to_bytes(2, "big") + wire)
                    await w.drain()
                    n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 10), "big")
                    data = await asyncio.wait_for(r.readexactly(n), 10)
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                self._conn.pop(id(asyncio.get_running_loop()), None)
                if attempt:
                    raise
        self.count += 1
        return dns.message.from_wire(data)

    async def __call__(self, name: dns.name.Name, rdtype: int) -> dns.message.Message:
        return await self.query(name, rdtype)

    async def close(self) -> None:
        c = self._conn.pop(id(asyncio.get_running_loop()), None)
        if c is not None:
            c[1].close()


@dataclass(frozen=True)
class DigAnswer:
    rcode: str
    ad: bool
    ede: int | None
    text: str = field(repr=False, default="")


def dig(server: str, qname: str, qtype: str, *extra: str, port: int = 53) -> DigAnswer:
    """Ask with the real dig; parse status, AD flag and EDE."""
    p = subprocess.run([DIG, f"@{server}", "-p", str(port), qname, qtype, "+dnssec", "+time=5", "+tries=1", *extra],
                       capture_output=True, text=True, timeout=30)
    m = re.search(r"status: (\w+)", p.stdout)
    flags = re.search(r";; flags: ([a-z ]+);", p.stdout)
    ede = re.search(r"; EDE: (\d+)", p.stdout)
    if not m or not flags:
        raise RuntimeError(f"dig gave no answer: {p.stdout}{p.stderr}")
    return DigAnswer(m.group(1), "ad" in flags.group(1).split(), int(ede.group(1)) if ede else None, p.stdout)


def oracle(qname: str, qtype: str, *extra: str) -> DigAnswer:
    return dig(ORACLE_IP, qname, qtype, *extra)
