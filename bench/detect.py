"""Detector evaluation (issue 14 item 5), DNS: benign guests and attack guests through `proxyvm run`.

Everything stays on loopback. A real Unbound (lab CA, DoT) is the upstream and answers for the
whole lab: a `redirect` zone per benign domain (popular sites, package mirrors, CDNs with hashed
labels, mail domains, monitoring endpoints) and per attacker tunnel domain, and NXDOMAIN for every
other name (`local-zone: "." static`: DGA names do not exist, nothing is ever iterated outward).
`proxyvm run -c CONFIG` has `detect: true` (every detector, defaults) and one `guests:` entry per
loopback source address 127.0.x.y; every guest's load is a dnspython client bound to its address.

Benign guests (roles desktop, ci, mail, monitor) replay their day's query count with the idle time
cut out: a role's day (`DAY` queries) is sent at its busy-hour pace, so every minute of the run is a
busy minute. Window-threshold checks (distinct names, suspicious names, TXT share per minute) see
the worst case of the day, all day: compression inflates them. rate_spike sees a steady rate and
no idle-to-busy step: compression deflates it. Guest-days = queries sent / DAY of the role.

Attack guests, each trial on a fresh guest identity, start at random times inside the benign load:
iodine-style (base32 labels, NULL/TXT) and dnscat-style (hex labels, TXT/CNAME/MX) tunnels at
0.5-20 q/s, a low-and-slow tunnel (0.1 q/s), random-letter DGA bursts (2-50 q/s), wordlist DGA,
slow DGA (one name per 5 s). Detection = a `kind: alert` record of the expected detector for that
guest; time to detect = alert ts - first attack query (wall clock, ms).
Not a test: nothing asserts. Usage: python bench/detect.py [--minutes N] [--benign N] [--trials N]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import random
import statistics
import string
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/policy.py shadows
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "protocols" / "dns"))

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
from dnsfront_lab import pick_ip, start_unbound  # noqa: E402

from tests.labs.pki import LabCA  # noqa: E402
from tests.labs.proc import free_port  # noqa: E402
from tests.labs.proxy import ProxyVM  # noqa: E402

# -- the lab's benign world ----------------------------------------------------------------------
POPULAR = ["google.com", "youtube.com", "facebook.com", "wikipedia.org", "amazon.com", "reddit.com",
           "twitter.com", "instagram.com", "linkedin.com", "netflix.com", "microsoft.com", "apple.com",
           "github.com", "stackoverflow.com", "nytimes.com", "bbc.co.uk", "cnn.com", "yahoo.com",
           "bing.com", "twitch.tv", "spotify.com", "paypal.com", "ebay.com", "imdb.com", "zoom.us",
           "dropbox.com", "salesforce.com", "adobe.com", "office.com", "live.com", "theguardian.com",
           "medium.com", "quora.com", "pinterest.com", "tumblr.com", "booking.com", "airbnb.com",
           "slack.com", "notion.so", "atlassian.net", "gitlab.com", "mozilla.org", "cloudflare.com",
           "whatsapp.net", "etsy.com", "walmart.com", "espn.com", "weather.com", "craigslist.org",
           "duckduckgo.com", "openai.com", "heise.de", "lemonde.fr", "spiegel.de", "rakuten.co.jp"]
THIRD_PARTY = ["fonts.googleapis.com", "fonts.gstatic.com", "www.google-analytics.com", "www.googletagmanager.com",
               "connect.facebook.net", "static.doubleclick.net", "securepubads.g.doubleclick.net",
               "ajax.googleapis.com", "cdn.jsdelivr.net", "cdnjs.cloudflare.com", "js.stripe.com",
               "platform.twitter.com", "s.yimg.com", "assets.adobedtm.com", "cdn.segment.com",
               "browser-intake-datadoghq.com", "o123456.ingest.sentry.io", "api.mixpanel.com"]
CDNS = ["cloudfront.net", "akamaiedge.net", "akamaihd.net", "googlevideo.com", "fastly.net", "azureedge.net",
        "amazonaws.com", "edgekey.net", "fbcdn.net", "licdn.com"]
MIRRORS = ["deb.debian.org", "security.debian.org", "archive.ubuntu.com", "security.ubuntu.com", "pypi.org",
           "files.pythonhosted.org", "registry.npmjs.org", "objects.githubusercontent.com", "codeload.github.com",
           "ghcr.io", "pkg-containers.githubusercontent.com", "registry-1.docker.io", "auth.docker.io",
           "production.cloudflare.docker.com", "proxy.golang.org", "sum.golang.org", "crates.io",
           "static.crates.io", "index.crates.io", "repo.maven.apache.org", "dl.fedoraproject.org",
           "mirrors.kernel.org", "api.github.com", "quay.io", "cdn01.quay.io", "dl-cdn.alpinelinux.org"]
MAIL = ["gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "icloud.com", "proton.me", "gmx.de",
        "web.de", "orange.fr", "mail.ru", "fastmail.com", "zoho.com", "example-corp.com", "partner-co.net",
        "supplier.de", "customer.co.uk", "lists.debian.org", "googlegroups.com", "mailchimp.com",
        "sendgrid.net", "amazonses.com", "mcsv.net", "salesforce.com", "hubspot.com"]
MONITOR = ["api.datadoghq.com", "ntp.ubuntu.com", "time.cloudflare.com", "hc-ping.com", "pool.ntp.org",
           "grafana.net", "api.pagerduty.com", "events.pagerduty.com", "o11y.newrelic.com", "prometheus.io"]
TYPOS = ["gogle.com", "youtub.com", "githbu.com", "amazn.com", "wikpedia.org", "stackoverfow.com", "redit.com"]
TUNNEL_DOMAINS = [f"{w}.net" for w in ("cdn-sync", "updates-srv", "telemetry-hub", "img-cache", "pwnd")]
DNSBL = "zen.spamhaus.org"  # NXDOMAIN = not listed (static zone, no data)

# busy-hour pace (q/s) and a day's queries per role; a guest-day is DAY queries with the idle cut out
PACE = {"desktop": 2.0, "ci": 2.0, "mail": 3.0, "monitor": 1.0}
DAY = {"desktop": 8000, "ci": 4000, "mail": 15000, "monitor": 5000}
ROLES = ["desktop"] * 5 + ["ci"] * 2 + ["mail"] * 2 + ["monitor"]


def base_of(name: str) -> str:
    labels = name.split(".")
    return ".".join(labels[-3:] if len(labels[-1]) == 2 and labels[-2] in ("co", "com") else labels[-2:])


def lab_zones() -> str:
    bases = sorted({base_of(n) for n in POPULAR + THIRD_PARTY + CDNS + MIRRORS + MAIL + MONITOR + TUNNEL_DOMAINS})
    out = ['local-zone: "." static', f'local-zone: "{DNSBL}." static']
    for i, b in enumerate(bases):
        out += [f'local-zone: "{b}." redirect', f'local-data: "{b}. 300 IN A 192.0.2.{1 + i % 250}"',
                f'local-data: "{b}. 300 IN AAAA 2001:db8::{1 + i:x}"', f'local-data: "{b}. 300 IN MX 10 mx.{b}."',
                f'local-data: "{b}. 300 IN TXT \\"v=spf1 include:_spf.{b} -all\\""']
    return "".join(f"    {ln}\n" for ln in out)


def hexlabel(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


class Benign:
    """Per-role name generators (stateful: a guest keeps its own CDN hashes, sites, partners)."""

    def __init__(self, role: str, rng: random.Random):
        self.role, self.rng = role, rng
        r = rng
        self.cdn = [f"d{hexlabel(r, 13)}.cloudfront.net" for _ in range(25)]
        self.cdn += [f"e{r.randint(1000, 99999)}.{r.choice('abcdx')}.akamaiedge.net" for _ in range(10)]
        self.cdn += [f"rr{r.randint(1, 8)}---sn-{hexlabel(r, 8)}.googlevideo.com" for _ in range(10)]
        self.cdn += [f"{r.choice(['web', 'api', 'app'])}-prod-{r.randint(10**9, 10**10)}.{r.choice(['us-east-1', 'eu-west-1'])}"
                     f".elb.amazonaws.com" for _ in range(8)]
        self.cdn += [f"{hexlabel(r, 6)}.azureedge.net" for _ in range(5)]
        self.weights = [1 / (i + 1) for i in range(len(POPULAR))]  # Zipf over sites

    def batch(self) -> list[tuple[str, str]]:
        r, role = self.rng, self.role
        if role == "desktop":  # one page load
            site = r.choices(POPULAR, self.weights)[0]
            names = [f"www.{site}"] + [f"{s}.{site}" for s in r.sample(["static", "api", "img", "cdn", "login",
                                                                       "assets", "m", "media"], r.randint(1, 4))]
            names += r.sample(THIRD_PARTY, r.randint(1, 5)) + r.sample(self.cdn, r.randint(0, 4))
            if r.random() < 0.02:
                names.append(r.choice(TYPOS))
            return [(n, t) for n in names for t in ("A", "AAAA")]
        if role == "ci":  # a build: package mirrors, blob storage behind CDNs
            names = r.sample(MIRRORS, r.randint(2, 6)) + r.sample(self.cdn, r.randint(0, 3))
            region = r.choice(["us-east-1", "eu-central-1"])  # a container pull from ECR: its layer bucket
            names += [f"prod-{region}-starport-layer-bucket.s3.{region}.amazonaws.com"] if r.random() < 0.3 else []
            return [(n, t) for n in names for t in ("A", "AAAA")]
        if role == "mail":  # one message in or out: MX, SPF, DMARC, DKIM, a DNSBL check of the peer
            dom = r.choice(MAIL)
            ip = ".".join(str(r.randint(1, 254)) for _ in range(4))
            out = [(dom, "MX"), (f"mx.{dom}", "A"), (dom, "TXT"), (f"_dmarc.{dom}", "TXT"),
                   (f"{r.choice(['s1', 'google', 'selector1', 'k1'])}._domainkey.{dom}", "TXT"),
                   (f"{ip}.{DNSBL}", "A")]
            return r.sample(out, r.randint(3, 6))
        names = r.sample(MONITOR, r.randint(1, 3))  # monitor: the same few endpoints all day
        return [(n, "A") for n in names]


# -- attacks -----------------------------------------------------------------------------------
def b32(rng: random.Random, n: int) -> str:
    return base64.b32encode(rng.randbytes(n)).decode().rstrip("=").lower()


def tunnel_names(kind: str, rng: random.Random, domain: str):
    seq = 0
    while True:
        seq += 1
        if kind == "iodine":  # iodine: one downstream-encoded label up to 63, a short session prefix
            yield f"{rng.choice('abcdefghijklmnop')}{b32(rng, 36)[:rng.randint(50, 62)]}.t.{domain}", \
                rng.choice(["NULL", "NULL", "TXT"])
        else:  # dnscat2: hex data split into labels, TXT/CNAME/MX
            data = f"{seq:04x}" + hexlabel(rng, rng.randint(40, 110))
            labels = ".".join(data[i:i + 60] for i in range(0, len(data), 60))
            yield f"{labels}.{domain}", rng.choice(["TXT", "CNAME", "MX"])


WORDS = ("clean house river stone green market silver night music paper light field happy bread ocean "
         "winter garden simple orange mountain forest travel planet secret yellow window strong bright").split()


def dga_names(kind: str, rng: random.Random):
    while True:
        tld = rng.choice(["com", "net", "org", "info", "biz", "ru", "top", "xyz"])
        if kind == "words":  # suppobox-style: two dictionary words
            yield f"{rng.choice(WORDS)}{rng.choice(WORDS)}.{tld}", "A"
        else:  # conficker/cryptolocker-style random letters
            yield f"{''.join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(8, 20)))}.{tld}", "A"


@dataclass
class Trial:
    cls: str  # row of the table
    detector: str
    guest: str
    ip: str
    start_at: float  # seconds after the run began
    qps: float
    duration: float
    names: object
    first_ts: float = 0.0
    sent: int = 0
    rcodes: dict = field(default_factory=dict)


def query(server: str, port: int, src: str, name: str, qtype: str, rcodes: dict) -> None:
    q = dns.message.make_query(name, qtype)
    try:
        r = dns.query.udp(q, server, port=port, source=src, timeout=3)
        k = dns.rcode.to_text(r.rcode())
    except (dns.exception.DNSException, OSError) as e:
        k = type(e).__name__
    rcodes[k] = rcodes.get(k, 0) + 1


def run_trial(t: Trial, server: str, port: int, t0: float, stop: threading.Event) -> None:
    if stop.wait(max(0.0, t0 + t.start_at - time.time())):
        return
    t.first_ts = time.time()
    gap = 1.0 / t.qps
    nxt = t.first_ts
    for name, qtype in t.names:  # type: ignore[attr-defined]
        if stop.is_set() or time.time() - t.first_ts > t.duration:
            break
        query(server, port, t.ip, name, qtype, t.rcodes)
        t.sent += 1
        nxt += gap
        time.sleep(max(0.0, nxt - time.time()))


def run_benign(role: str, ip: str, server: str, port: int, rng: random.Random, stop: threading.Event,
               stats: dict) -> None:
    gen = Benign(role, rng)
    pace = PACE[role]
    while not stop.is_set():
        batch = gen.batch()
        for name, qtype in batch:  # a page load / build step / message: fired together
            query(server, port, ip, name, qtype, stats["rcodes"])
            stats["sent"] += 1
            time.sleep(rng.uniform(0.005, 0.05))
        stop.wait(rng.expovariate(pace / len(batch)))  # think time: the busy-hour average pace


def parse_ts(s: str) -> float:
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


# -- SNMP sweep (a separate `proxyvm run`: snmp only) ------------------------------------------
SNMP_USER_ARGS = ("monitor", "SHA-256", "bench-auth-pass", "AES-128", "bench-priv-pass")


def snmp_phase(d: Path, n_agents: int, trials: int, benign: int, minutes: float) -> None:
    """n_agents snmpd agents (v3 authPriv) behind proxyvm's community -> agent map; benign pollers
    walk the interface table of a few agents each at NMS pace (one agent every 20-40 s, real time,
    no compression); sweep trials walk the system subtree of every agent in turn."""
    import subprocess

    from tests.labs.snmp_lab import SnmpAgent, V3User, client_env

    user = V3User(*SNMP_USER_ARGS)
    sd = d / "snmp"
    sd.mkdir()
    agents = [SnmpAgent(sd, "127.0.7.1", 17100 + i, [user]) for i in range(n_agents)]
    listen = "127.0.7.250"
    port = free_port(listen, "udp")
    (sd / "auth").write_text(user.auth_pass + "\n")
    (sd / "priv").write_text(user.priv_pass + "\n")
    (sd / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules: []\n")
    rng = random.Random(5)
    total = minutes * 60
    sweeps = [(f"s{i:02d}", f"127.0.8.{1 + i}", rng.uniform(15, max(16, total - 60)), 0.0 if i % 5 else 8.0)
              for i in range(trials)]  # every 5th sweep is slow: one agent per 8 s
    pollers = [(f"p{i:02d}", f"127.0.8.{101 + i}") for i in range(benign)]
    guests = "".join(f"  {g}: {{addresses: [{ip}]}}\n" for g, ip, *_ in sweeps + pollers)
    ag = "".join(f"    ag{i:02d}:\n      address: \"{a.host}:{a.port}\"\n      community: comm{i:02d}\n"
                 f"      user: {user.name}\n      auth: {{protocol: SHA-256, password_file: auth}}\n"
                 f"      priv: {{protocol: AES-128, password_file: priv}}\n" for i, a in enumerate(agents))
    pvm = ProxyVM.from_text(sd, (
        f"policy: rules.yaml\naudit: {{path: audit.jsonl}}\nadmin: {{listen: \"{listen}:{free_port(listen)}\"}}\n"
        f"state_dir: state\nhttp: false\nsmtp: false\ndns: false\ndetect: true\nguests:\n{guests}"
        f"snmp:\n  listen: [\"{listen}:{port}\"]\n  agents:\n{ag}"), env={"PROXYVM_LOG_LEVEL": "WARNING"})
    env = client_env(sd)
    stop = threading.Event()
    first: dict[str, float] = {}
    polls = {"n": 0}

    def walk(src: str, i: int, oid: str) -> None:
        subprocess.run(["snmpwalk", "-v2c", "-c", f"comm{i:02d}", "-On", "-t", "2", "-r", "0",
                        "--clientaddr=" + src, f"{listen}:{port}", oid], env=env, capture_output=True, timeout=30)

    def sweep(g: str, ip: str, at: float, gap: float) -> None:
        if stop.wait(at):
            return
        first[g] = time.time()
        for i in range(n_agents):
            if stop.is_set():
                return
            walk(ip, i, "1.3.6.1.2.1.1")
            stop.wait(gap)

    def poll(ip: str, mine: list[int], r: random.Random) -> None:
        while not stop.wait(r.uniform(20, 40)):
            walk(ip, r.choice(mine), "1.3.6.1.2.1.2.2.1")
            polls["n"] += 1

    try:
        for a in agents:
            a.start()
        pvm.start()
        t0 = time.time()
        ths = [threading.Thread(target=sweep, args=s, daemon=True) for s in sweeps]
        ths += [threading.Thread(target=poll, args=(ip, rng.sample(range(n_agents), 4), random.Random(rng.random())),
                                 daemon=True) for _, ip in pollers]
        for th in ths:
            th.start()
        while time.time() - t0 < total:
            time.sleep(10)
            print(f"# snmp {time.time() - t0:4.0f}s sweeps started {len(first)}/{trials}, polls {polls['n']}",
                  file=sys.stderr, flush=True)
        stop.set()
        for th in ths:
            th.join(30)
        time.sleep(1.5)
        records = pvm.audit_records()
    finally:
        stop.set()
        pvm.stop()
        for a in agents:
            a.stop()
    alerts = [r for r in records if r.get("kind") == "alert"]
    (sd / "alerts.json").write_text(json.dumps(alerts, indent=1))
    walked = sum(1 for r in records if r.get("protocol") == "snmp" and "kind" not in r)
    print(f"\nSNMP ({minutes:g} min, {n_agents} snmpd agents, {walked} SNMP records)\n")
    print("| attack | detector | trials | detected ≤ 30 s | rate ≤ 30 s | detected ≤ 60 s | median / max time to detect |")
    print("|---|---|---|---|---|---|---|")
    for label, sel in (("SNMP sweep, all agents back to back", lambda s: s[3] == 0),
                       ("SNMP sweep, slow (one agent per 8 s)", lambda s: s[3] > 0)):
        ts = [s for s in sweeps if sel(s) and s[0] in first]
        ttd = []
        for g, *_ in ts:
            hits = [parse_ts(a["ts"]) - first[g] for a in alerts if a.get("guest") == g and a["detector"] == "snmp_sweep"]
            if hits:
                ttd.append(min(hits))
        in30 = sum(1 for x in ttd if x <= 30)
        times = f"{statistics.median(ttd):.1f} s / {max(ttd):.1f} s" if ttd else "-"
        print(f"| {label} | snmp_sweep | {len(ts)} | {in30} | {100 * in30 / max(1, len(ts)):.0f} % | "
              f"{sum(1 for x in ttd if x <= 60)} | {times} |")
    hours = len(pollers) * total / 3600
    fp: dict[str, int] = {}
    for a in alerts:
        if a.get("guest", "").startswith("p"):
            fp[a["detector"]] = fp.get(a["detector"], 0) + 1
    rate = sum(v for k, v in fp.items() if k != "new_destination")
    print(f"\nbenign SNMP pollers: {len(pollers)} guests, {polls['n']} walks, {hours:.2f} guest-hours real time; "
          f"alerts on them: {fp or 'none'}; other than new_destination (first contact, once per agent): "
          f"{rate} = {rate / max(hours, 1e-9) * 24:.2f} per guest-day")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10, help="length of the run (benign load throughout)")
    ap.add_argument("--benign", type=int, default=40, help="benign guests (roles cycle desktop x5, ci x2, mail x2, monitor)")
    ap.add_argument("--trials", type=int, default=24, help="trials per main attack class (tunnel, DGA)")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--snmp-minutes", type=float, default=0, help="also run the SNMP sweep phase this long")
    ap.add_argument("--snmp-only", action="store_true", help="SNMP phase only")
    args = ap.parse_args()
    if args.snmp_only:
        snmp_phase(Path(tempfile.mkdtemp(prefix="detectbench-")), 12, 10, 6, args.snmp_minutes)
        return 0
    rng = random.Random(args.seed)
    d = Path(tempfile.mkdtemp(prefix="detectbench-"))
    ca = LabCA(d / "ca")
    up_ip = pick_ip()
    upstream = start_unbound(d, ca, up_ip, name="dot1.bench.test", extra=lab_zones())
    listen = "127.0.9.1"
    port = free_port(listen)
    total = args.minutes * 60
    trials: list[Trial] = []
    latest = max(30.0, total - 75)

    def add(cls: str, det: str, n: int, qps: list[float], duration: float, gen) -> None:
        for i in range(n):
            k = len(trials)
            trials.append(Trial(cls, det, f"a{k:03d}", f"127.0.{20 + k // 250}.{1 + k % 250}",
                                rng.uniform(20, latest), qps[i % len(qps)], duration, gen(i)))

    add("tunnel (iodine/dnscat, 0.5-20 q/s)", "dns_tunnel", args.trials, [0.5, 1, 2, 5, 20], 60,
        lambda i: tunnel_names("iodine" if i % 2 else "dnscat", random.Random(rng.random()),
                               f"s{i}.{TUNNEL_DOMAINS[i % len(TUNNEL_DOMAINS)]}"))
    add("tunnel low-and-slow (0.1 q/s)", "dns_tunnel", 5, [0.1], 60,
        lambda i: tunnel_names("iodine" if i % 2 else "dnscat", random.Random(rng.random()), TUNNEL_DOMAINS[i % 5]))
    add("DGA random letters (2-50 q/s)", "dns_tunnel", args.trials, [2, 5, 10, 50], 60,
        lambda i: dga_names("random", random.Random(rng.random())))
    add("DGA wordlist (5 q/s)", "dns_tunnel", 5, [5], 60, lambda i: dga_names("words", random.Random(rng.random())))
    add("DGA slow (0.2 q/s)", "dns_tunnel", 5, [0.2], 60, lambda i: dga_names("random", random.Random(rng.random())))

    benign = [(f"b{i:03d}", f"127.0.10.{1 + i}", ROLES[i % len(ROLES)]) for i in range(args.benign)]
    guests = "".join(f"  {g}: {{addresses: [{ip}]}}\n" for g, ip, _ in benign)
    guests += "".join(f"  {t.guest}: {{addresses: [{t.ip}]}}\n" for t in trials)
    run = d / "run"
    run.mkdir()
    (run / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules: []\n")
    pvm = ProxyVM.from_text(run, (
        f"policy: rules.yaml\naudit: {{path: audit.jsonl}}\nadmin: {{listen: \"{listen}:{free_port(listen)}\"}}\n"
        f"state_dir: state\nhttp: false\nsmtp: false\nsnmp: false\ndetect: true\nguests:\n{guests}"
        f"dns:\n  listen: [\"{listen}:{port}\"]\n  ca_file: {ca.ca_pem}\n  dnssec: off\n"
        f"  upstreams:\n    - {{address: \"{up_ip}:853\", name: dot1.bench.test}}\n"),
        env={"PROXYVM_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})
    stop = threading.Event()
    stats = {g: {"sent": 0, "rcodes": {}} for g, _, _ in benign}
    threads = []
    load_before = os.getloadavg()
    try:
        pvm.start()
        t0 = time.time()
        for g, ip, role in benign:
            threads.append(threading.Thread(target=run_benign, daemon=True,
                                            args=(role, ip, listen, port, random.Random(rng.random()), stop, stats[g])))
        for t in trials:
            threads.append(threading.Thread(target=run_trial, args=(t, listen, port, t0, stop), daemon=True))
        for th in threads:
            th.start()
        while time.time() - t0 < total:
            time.sleep(5)
            sent = sum(s["sent"] for s in stats.values())
            print(f"# {time.time() - t0:5.0f}s benign queries {sent}, attack trials started "
                  f"{sum(1 for t in trials if t.first_ts)}/{len(trials)}", file=sys.stderr, flush=True)
        stop.set()
        for th in threads:
            th.join(10)
        time.sleep(1.5)  # the audit writer flushes every ~0.2 s
        records = pvm.audit_records()
    finally:
        stop.set()
        pvm.stop()
        upstream.stop()
    load_after = os.getloadavg()
    alerts = [r for r in records if r.get("kind") == "alert"]
    (d / "alerts.json").write_text(json.dumps(alerts, indent=1))
    by_guest: dict[str, list[dict]] = {}
    for a in alerts:
        by_guest.setdefault(a.get("guest", ""), []).append(a)

    # -- attack table
    print(f"\nDetector evaluation (DNS), {args.minutes:g} min run, `proxyvm run` with `detect: true` (defaults), "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, seed {args.seed}\n")
    print("| attack | detector | trials | detected ≤ 30 s | rate ≤ 30 s | detected ≤ 60 s | median / max time to detect "
          "| queries per trial (median) |")
    print("|---|---|---|---|---|---|---|---|")
    other: dict[str, int] = {}
    for cls in dict.fromkeys(t.cls for t in trials):
        ts = [t for t in trials if t.cls == cls and t.first_ts]
        ttd = []
        for t in ts:
            hits = [parse_ts(a["ts"]) - t.first_ts for a in by_guest.get(t.guest, []) if a.get("detector") == t.detector]
            for a in by_guest.get(t.guest, []):
                if a.get("detector") != t.detector:
                    other[a["detector"]] = other.get(a["detector"], 0) + 1
            if hits:
                ttd.append(min(hits))
        in30 = sum(1 for x in ttd if x <= 30)
        times = f"{statistics.median(ttd):.1f} s / {max(ttd):.1f} s" if ttd else "-"
        print(f"| {cls} | {ts[0].detector if ts else '?'} | {len(ts)} | {in30} | {100 * in30 / max(1, len(ts)):.0f} % "
              f"| {len(ttd)} | {times} | {statistics.median(t.sent for t in ts) if ts else 0:.0f} |")
    print("| beaconing | no detector | - | - | - | - | - | - |")
    rc: dict[str, int] = {}
    for t in trials:
        for k, v in t.rcodes.items():
            rc[k] = rc.get(k, 0) + v
    print(f"\nattack rcodes: {rc}; other detectors' alerts on attack guests: {other or 'none'}")

    # -- benign table
    days = sum(stats[g]["sent"] / DAY[role] for g, _, role in benign)
    hours = len(benign) * total / 3600
    fp: dict[str, int] = {}
    for g, _, _ in benign:
        for a in by_guest.get(g, []):
            fp[a["detector"]] = fp.get(a["detector"], 0) + 1
    sent = sum(s["sent"] for s in stats.values())
    brc: dict[str, int] = {}
    for s in stats.values():
        for k, v in s["rcodes"].items():
            brc[k] = brc.get(k, 0) + v
    print(f"\nbenign: {len(benign)} guests ({', '.join(f'{ROLES.count(r) * len(benign) // len(ROLES)} {r}' for r in PACE)}), "
          f"{sent} queries in {args.minutes:g} min ({hours:.1f} guest-hours of wall time) = {days:.1f} guest-days "
          f"of queries (day: {DAY}; busy-hour pace q/s: {PACE}); rcodes {brc}\n")
    print("| detector | benign alerts | false positives per guest-day |")
    print("|---|---|---|")
    for det in ("dns_tunnel", "deny_burst", "rate_spike", "new_destination"):
        note = " (first contact with each base domain: does not grow with days)" if det == "new_destination" else ""
        print(f"| {det} | {fp.get(det, 0)} | {fp.get(det, 0) / days:.2f}{note} |")
    for g, _, role in benign:
        for a in by_guest.get(g, []):
            if a["detector"] != "new_destination":
                print(f"#   FP {g} ({role}) {a['detector']}: {a.get('reason', '')[:100]} e.g. "
                      f"{(a.get('evidence') or {}).get('examples', [])[:3]}", file=sys.stderr)
    if args.snmp_minutes:
        snmp_phase(d, 12, 10, 6, args.snmp_minutes)
    print(f"\n# work dir {d}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
