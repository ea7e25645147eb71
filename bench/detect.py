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
slow DGA (one name per 5 s); beaconing: a monitor or CI guest (its benign load from the start, so
a learned baseline) that calls one new domain every 30 s. Detection = a `kind: alert` record of
the expected detector for that guest (beaconing: a new_destination alert naming the beacon's
domain); time to detect = alert ts - first attack query (wall clock, ms).

`--app-minutes N` adds an HTTP + SMTP phase (app_phase: real nginx upstream, SMTP into the spool
with no reachable relay; SSRF probing -> deny_burst, spam -> smtp_burst) and `--snmp-minutes N` an
SNMP phase (real snmpd agents; sweeps -> snmp_sweep), each its own `proxyvm run`.
Not a test: nothing asserts. Usage: python bench/detect.py [--minutes N] [--benign N] [--trials N]
[--app-minutes N] [--snmp-minutes N]
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
BEACON_DOMAINS = [f"{w}.com" for w in ("metrics-cdn", "update-check", "sync-telemetry", "api-status", "cloud-health")]
DNSBL = "zen.spamhaus.org"  # NXDOMAIN = not listed (static zone, no data)

# busy-hour pace (q/s) and a day's queries per role; a guest-day is DAY queries with the idle cut out
PACE = {"desktop": 2.0, "ci": 2.0, "mail": 3.0, "monitor": 1.0}
DAY = {"desktop": 8000, "ci": 4000, "mail": 15000, "monitor": 5000}
ROLES = ["desktop"] * 5 + ["ci"] * 2 + ["mail"] * 2 + ["monitor"]


def base_of(name: str) -> str:
    labels = name.split(".")
    return ".".join(labels[-3:] if len(labels[-1]) == 2 and labels[-2] in ("co", "com") else labels[-2:])


def lab_zones() -> str:
    bases = sorted({base_of(n) for n in POPULAR + THIRD_PARTY + CDNS + MIRRORS + MAIL + MONITOR + TUNNEL_DOMAINS
                    + BEACON_DOMAINS})
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


def beacon_names(domain: str):
    while True:  # a C2 check-in: the same name every time
        yield f"api.{domain}", "A"


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
    warm: str = ""  # a benign role the guest plays from the start (its baseline), the attack on top
    match: str = ""  # the alert's evidence must name this (beaconing: the beacon's domain)
    jitter: float = 0.0  # +- share of the gap between queries


def query(server: str, port: int, src: str, name: str, qtype: str, rcodes: dict) -> None:
    q = dns.message.make_query(name, qtype)
    try:
        r = dns.query.udp(q, server, port=port, source=src, timeout=3)
        k = dns.rcode.to_text(r.rcode())
    except (dns.exception.DNSException, OSError) as e:
        k = type(e).__name__
    rcodes[k] = rcodes.get(k, 0) + 1


def run_trial(t: Trial, send: Callable[[Trial, Any], None], t0: float, stop: threading.Event,
              warm: Callable[[Trial], None] | None = None) -> None:
    if t.warm and warm is not None:
        threading.Thread(target=warm, args=(t,), daemon=True).start()
    if stop.wait(max(0.0, t0 + t.start_at - time.time())):
        return
    t.first_ts = time.time()
    gap = 1.0 / t.qps
    rng = random.Random(t.guest)
    nxt = t.first_ts
    for item in t.names:  # type: ignore[attr-defined]
        if stop.is_set() or time.time() - t.first_ts > t.duration:
            break
        send(t, item)
        t.sent += 1
        nxt += gap * (1 + rng.uniform(-t.jitter, t.jitter))
        if stop.wait(max(0.0, nxt - time.time())):
            break


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


def attack_table(trials: list[Trial], by_guest: dict[str, list[dict]], unit: str) -> dict[str, int]:
    """One row per attack class; returns other detectors' alerts on the attack guests."""
    print("| attack | detector | trials | detected ≤ 30 s | rate ≤ 30 s | detected in the run | median / max time to "
          f"detect | {unit} per trial (median) |")
    print("|---|---|---|---|---|---|---|---|")
    other: dict[str, int] = {}
    for cls in dict.fromkeys(t.cls for t in trials):
        ts = [t for t in trials if t.cls == cls and t.first_ts]
        ttd = []
        for t in ts:
            hits = [parse_ts(a["ts"]) - t.first_ts for a in by_guest.get(t.guest, []) if a.get("detector") == t.detector
                    and (not t.match or t.match in json.dumps(a.get("evidence")))]
            for a in by_guest.get(t.guest, []):
                if a.get("detector") != t.detector:
                    other[a["detector"]] = other.get(a["detector"], 0) + 1
            if hits:
                ttd.append(min(hits))
        in30 = sum(1 for x in ttd if x <= 30)
        times = f"{statistics.median(ttd):.1f} s / {max(ttd):.1f} s" if ttd else "-"
        print(f"| {cls} | {ts[0].detector if ts else '?'} | {len(ts)} | {in30} | {100 * in30 / max(1, len(ts)):.0f} % "
              f"| {len(ttd)} | {times} | {statistics.median(t.sent for t in ts) if ts else 0:.0f} |")
    return other


def fp_table(fp: dict[str, int], days: float, detectors: tuple[str, ...]) -> None:
    print("| detector | benign alerts | false positives per guest-day |")
    print("|---|---|---|")
    for det in detectors:
        note = " (first contact with each destination, one alert per guest per 5 min at most: does not grow with " \
               "days)" if det == "new_destination" else ""
        print(f"| {det} | {fp.get(det, 0)} | {fp.get(det, 0) / max(days, 1e-9):.2f}{note} |")


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


# -- HTTP + SMTP (a separate `proxyvm run`: http and smtp) ----------------------------------------
HTTP_DAY, SMTP_DAY = 20000, 1500  # a guest-day: HTTP requests of a busy web client, messages of a mail guest
HTTP_PACE, SMTP_PACE = 1.0, 0.05  # busy-hour pace: requests/s, messages/s
SSRF_TARGETS = ["169.254.169.254/latest/meta-data/", "169.254.169.254/latest/meta-data/iam/security-credentials/",
                "169.254.169.254/computeMetadata/v1/", "127.0.0.1:8080/", "127.0.0.1:2375/containers/json",
                "127.0.0.1:6379/", "127.0.0.1:9200/_cat/indices", "localhost:8500/v1/agent/self", "[::1]:80/",
                "100.100.100.200/latest/meta-data/"]


def ssrf_targets(rng: random.Random):
    while True:  # the metadata endpoints, loopback services, then a sweep of private ranges
        if rng.random() < 0.4:
            yield f"http://{rng.choice(SSRF_TARGETS)}"
        else:
            net = rng.choice(["10.0.0", "10.0.1", "172.16.0", "192.168.0", "192.168.1"])
            yield f"http://{net}.{rng.randint(1, 254)}:{rng.choice([80, 8080, 8000, 8443, 3000])}/"


def spam_messages(rng: random.Random, per_message: int):
    n = 0
    while True:
        n += 1
        rcpts = [f"{rng.choice(WORDS)}{rng.randint(1, 9999)}@{rng.choice(MAIL)}" for _ in range(per_message)]
        yield f"offers{n}@{rng.choice(['deals-now.biz', 'win-prize.top'])}", rcpts


def http_get(listen: str, port: int, src: str, url: str, rcodes: dict) -> None:
    import http.client

    c = http.client.HTTPConnection(listen, port, source_address=(src, 0), timeout=15)
    try:
        c.request("GET", url)
        r = c.getresponse()
        r.read()
        k = str(r.status)
    except (OSError, http.client.HTTPException) as e:
        k = type(e).__name__
    finally:
        c.close()
    rcodes[k] = rcodes.get(k, 0) + 1


def smtp_send(listen: str, port: int, src: str, sender: str, rcpts: list[str], rcodes: dict) -> None:
    import smtplib

    body = f"From: {sender}\r\nTo: {rcpts[0]}\r\nSubject: bench\r\n\r\n" + ("x" * 76 + "\r\n") * 26
    try:
        with smtplib.SMTP(listen, port, source_address=(src, 0), timeout=20) as c:
            refused = c.sendmail(sender, rcpts, body)
            k = "250" if not refused else "partial"
    except smtplib.SMTPRecipientsRefused:
        k = "rcpts_refused"
    except (OSError, smtplib.SMTPException) as e:
        k = type(e).__name__
    rcodes[k] = rcodes.get(k, 0) + 1


def app_phase(d: Path, minutes: float, n_trials: int, rng: random.Random) -> None:
    """HTTP and SMTP through one `proxyvm run` (http + smtp, `detect: true`). Benign web guests
    fetch pages from a real nginx (the lab's, HTTPS with the lab CA, via the explicit proxy
    listener); benign mail guests send 1-4 recipient messages (now and then a 10-recipient one).
    Attacks: SSRF probing (metadata endpoints, loopback services, private ranges: the SSRF guard
    denies them -> deny_burst) and spam (many recipients -> smtp_burst). SMTP has no real peer:
    mail is accepted into proxyvm's spool and the relay address refuses connections, so nothing
    leaves; the detectors see the guest side (RCPT and accepted records) exactly as with a relay."""
    from tests.labs.nginx_lab import NginxLab

    d.mkdir(parents=True)
    lab = NginxLab(d / "nginx", legacy_ip=None)
    listen = "127.0.9.1"
    ports = {k: free_port(listen) for k in ("admin", "proxy", "smtp", "relay")}
    total = minutes * 60
    latest = max(30.0, total - 75)
    trials: list[Trial] = []

    def add(cls: str, det: str, n: int, qps: float, duration: float, gen, start: tuple[float, float]) -> None:
        for _ in range(n):
            k = len(trials)
            trials.append(Trial(cls, det, f"x{k:03d}", f"127.0.13.{1 + k}", rng.uniform(*start), qps, duration,
                                gen(random.Random(rng.random()))))

    slow_start = (15, max(16.0, total - 260))
    add("SSRF probing over HTTP (2 requests/s)", "deny_burst", n_trials, 2.0, 60, ssrf_targets, (15, latest))
    add("SSRF probing, slow (one request per 5 s)", "deny_burst", 5, 0.2, 240, ssrf_targets, slow_start)
    add("spam burst (10 recipients per message, 1 message/s)", "smtp_burst", n_trials, 1.0, 60,
        lambda r: spam_messages(r, 10), (15, latest))
    add("spam, slow (5 recipients per message every 10 s)", "smtp_burst", 5, 0.1, 240,
        lambda r: spam_messages(r, 5), slow_start)
    web = [(f"w{i:02d}", f"127.0.11.{1 + i}") for i in range(16)]
    mail = [(f"m{i:02d}", f"127.0.12.{1 + i}") for i in range(10)]
    guests = "".join(f"  {g}: {{addresses: [{ip}]}}\n" for g, ip in web + mail)
    guests += "".join(f"  {t.guest}: {{addresses: [{t.ip}]}}\n" for t in trials)
    (d / "rules.yaml").write_text("mode: enforce\ndefault: allow\nrules:\n"
                                  "  - {id: lab-web, action: allow, protocol: http, match: {host: [www.lab.test]}}\n")
    stop = threading.Event()
    stats = {g: {"sent": 0, "rcodes": {}} for g, _ in web + mail}
    proxy_url = ""
    pvm: ProxyVM | None = None
    try:
        lab.start()
        hosts = "".join(f"    {k}: {v}\n" for k, v in lab.hosts().items())
        pvm = ProxyVM.from_text(d, (
            f"policy: rules.yaml\naudit: {{path: audit.jsonl}}\nadmin: {{listen: \"{listen}:{ports['admin']}\"}}\n"
            f"state_dir: state\ndns: false\nsnmp: false\ndetect: true\nguests:\n{guests}"
            f"http:\n  proxy_listen: [\"{listen}:{ports['proxy']}\"]\n  ca_file: {lab.ca_pem}\n  hosts:\n{hosts}"
            f"smtp:\n  listen: [\"{listen}:{ports['smtp']}\"]\n  spool: spool\n  hostname: proxyvm.bench.test\n"
            f"  relay: {{host: relay.bench.test, port: {ports['relay']}, address: \"{listen}\"}}\n"
            f"  retry: {{first: 1h, max_age: 2h}}\n  timeouts: {{connect: 2s}}\n"),
            env={"PROXYVM_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})
        pvm.start()
        proxy_url = f"{listen}:{ports['proxy']}"
        t0 = time.time()

        def send(t: Trial, item: Any) -> None:
            if t.detector == "deny_burst":
                http_get(listen, ports["proxy"], t.ip, item, t.rcodes)
            else:
                smtp_send(listen, ports["smtp"], t.ip, item[0], item[1], t.rcodes)

        def browse(ip: str, r: random.Random, st: dict) -> None:
            while not stop.is_set():
                for _ in range(r.randint(1, 6)):  # a page and its assets
                    http_get(listen, ports["proxy"], ip, r.choice(["http://www.lab.test/echo",
                                                                   "http://www.lab.test/files/1k.bin"]), st["rcodes"])
                    st["sent"] += 1
                stop.wait(r.expovariate(HTTP_PACE / 3.5))

        def post(ip: str, r: random.Random, st: dict) -> None:
            while not stop.wait(r.expovariate(SMTP_PACE)):
                n = 10 if r.random() < 0.05 else r.randint(1, 4)
                smtp_send(listen, ports["smtp"], ip, f"staff{r.randint(1, 50)}@example-corp.com",
                          [f"user{r.randint(1, 999)}@{r.choice(MAIL)}" for _ in range(n)], st["rcodes"])
                st["sent"] += 1

        threads = [threading.Thread(target=browse, args=(ip, random.Random(rng.random()), stats[g]), daemon=True)
                   for g, ip in web]
        threads += [threading.Thread(target=post, args=(ip, random.Random(rng.random()), stats[g]), daemon=True)
                    for g, ip in mail]
        threads += [threading.Thread(target=run_trial, args=(t, send, t0, stop), daemon=True) for t in trials]
        for th in threads:
            th.start()
        while time.time() - t0 < total:
            time.sleep(10)
            print(f"# app {time.time() - t0:4.0f}s benign requests/messages "
                  f"{sum(s['sent'] for s in stats.values())}, attack trials started "
                  f"{sum(1 for t in trials if t.first_ts)}/{len(trials)}", file=sys.stderr, flush=True)
        stop.set()
        for th in threads:
            th.join(20)
        time.sleep(1.5)
        records = pvm.audit_records()
    finally:
        stop.set()
        if pvm is not None:
            pvm.stop()
        lab.stop()
    alerts = [r for r in records if r.get("kind") == "alert"]
    (d / "alerts.json").write_text(json.dumps(alerts, indent=1))
    by_guest: dict[str, list[dict]] = {}
    for a in alerts:
        by_guest.setdefault(a.get("guest", ""), []).append(a)
    n_http = sum(1 for r in records if r.get("protocol") == "http" and "kind" not in r)
    n_smtp = sum(1 for r in records if r.get("protocol") == "smtp" and r.get("event") == "rcpt")
    print(f"\nHTTP + SMTP ({minutes:g} min, explicit proxy {proxy_url} -> real nginx over verified TLS; SMTP into "
          f"the spool, relay unreachable: nothing delivered; {n_http} HTTP records, {n_smtp} RCPT records)\n")
    other = attack_table(trials, by_guest, "requests/messages")
    rc: dict[str, int] = {}
    for t in trials:
        for k, v in t.rcodes.items():
            rc[k] = rc.get(k, 0) + v
    print(f"\nattack outcomes: {rc}; other detectors' alerts on attack guests: {other or 'none'}")
    days = sum(stats[g]["sent"] / HTTP_DAY for g, _ in web) + sum(stats[g]["sent"] / SMTP_DAY for g, _ in mail)
    fp: dict[str, int] = {}
    for g, _ in web + mail:
        for a in by_guest.get(g, []):
            fp[a["detector"]] = fp.get(a["detector"], 0) + 1
            if a["detector"] != "new_destination":
                print(f"#   FP {g} {a['detector']}: {a.get('reason', '')[:100]}", file=sys.stderr)
    brc: dict[str, int] = {}
    for st in stats.values():
        for k, v in st["rcodes"].items():
            brc[k] = brc.get(k, 0) + v
    print(f"\nbenign: {len(web)} web guests ({sum(stats[g]['sent'] for g, _ in web)} requests; a day: {HTTP_DAY}, "
          f"busy pace {HTTP_PACE}/s), {len(mail)} mail guests ({sum(stats[g]['sent'] for g, _ in mail)} messages; "
          f"a day: {SMTP_DAY}, busy pace {SMTP_PACE}/s) = {days:.1f} guest-days; outcomes {brc}\n")
    fp_table(fp, days, ("deny_burst", "smtp_burst", "rate_spike", "new_destination"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10, help="length of the run (benign load throughout)")
    ap.add_argument("--benign", type=int, default=40, help="benign guests (roles cycle desktop x5, ci x2, mail x2, monitor)")
    ap.add_argument("--trials", type=int, default=24, help="trials per main attack class (tunnel, DGA)")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--snmp-minutes", type=float, default=0, help="also run the SNMP sweep phase this long")
    ap.add_argument("--snmp-only", action="store_true", help="SNMP phase only")
    ap.add_argument("--app-minutes", type=float, default=0,
                    help="also run the HTTP + SMTP phase (SSRF probing, spam burst) this long")
    ap.add_argument("--app-only", action="store_true", help="HTTP + SMTP phase only")
    args = ap.parse_args()
    if args.snmp_only:
        snmp_phase(Path(tempfile.mkdtemp(prefix="detectbench-")), 12, 10, 6, args.snmp_minutes)
        return 0
    if args.app_only:
        app_phase(Path(tempfile.mkdtemp(prefix="detectbench-")) / "app", args.app_minutes, args.trials,
                  random.Random(args.seed + 1))
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

    def add(cls: str, det: str, n: int, qps: list[float], duration: float, gen, start: tuple[float, float] = (20, 0),
            **kw) -> None:
        for i in range(n):
            k = len(trials)
            extra = {key: (v(i) if callable(v) else v) for key, v in kw.items()}
            trials.append(Trial(cls, det, f"a{k:03d}", f"127.0.{20 + k // 250}.{1 + k % 250}",
                                rng.uniform(start[0], start[1] or latest), qps[i % len(qps)], duration, gen(i),
                                **extra))

    add("tunnel (iodine/dnscat, 0.5-20 q/s)", "dns_tunnel", args.trials, [0.5, 1, 2, 5, 20], 60,
        lambda i: tunnel_names("iodine" if i % 2 else "dnscat", random.Random(rng.random()),
                               f"s{i}.{TUNNEL_DOMAINS[i % len(TUNNEL_DOMAINS)]}"))
    slow_start = (20, max(21.0, min(90.0, total - 400)))  # early: the slow signals need minutes
    add("tunnel low-and-slow (0.1 q/s, runs to the end)", "dns_tunnel", 5, [0.1], total,
        lambda i: tunnel_names("iodine" if i % 2 else "dnscat", random.Random(rng.random()), TUNNEL_DOMAINS[i % 5]),
        slow_start)
    add("DGA random letters (2-50 q/s)", "dns_tunnel", args.trials, [2, 5, 10, 50], 60,
        lambda i: dga_names("random", random.Random(rng.random())))
    add("DGA wordlist (5 q/s)", "dns_tunnel", 5, [5], 60, lambda i: dga_names("words", random.Random(rng.random())))
    add("DGA slow (0.2 q/s, runs to the end)", "dns_tunnel", 5, [0.2], total,
        lambda i: dga_names("random", random.Random(rng.random())), slow_start)
    add("beaconing: one new domain every 30 s ± 20 % (monitor/CI guest, baseline learned from its start)",
        "new_destination", max(5, args.trials // 2), [1 / 30], total, lambda i: beacon_names(BEACON_DOMAINS[i % 5]),
        (min(150.0, total / 2), 0), warm=lambda i: ("monitor", "ci")[i % 2],
        match=lambda i: f"dns:{BEACON_DOMAINS[i % 5]}", jitter=0.2)

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
        def send(t: Trial, item: tuple[str, str]) -> None:
            query(listen, port, t.ip, item[0], item[1], t.rcodes)

        def warm(t: Trial) -> None:
            run_benign(t.warm, t.ip, listen, port, random.Random(t.ip), stop, {"sent": 0, "rcodes": {}})

        for t in trials:
            threads.append(threading.Thread(target=run_trial, args=(t, send, t0, stop, warm), daemon=True))
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
    other = attack_table(trials, by_guest, "queries")
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
    fp_table(fp, days, ("dns_tunnel", "deny_burst", "rate_spike", "new_destination"))
    for g, _, role in benign:
        for a in by_guest.get(g, []):
            if a["detector"] != "new_destination":
                print(f"#   FP {g} ({role}) {a['detector']}: {a.get('reason', '')[:100]} e.g. "
                      f"{(a.get('evidence') or {}).get('examples', [])[:3]}", file=sys.stderr)
    if args.app_minutes:
        app_phase(d / "app", args.app_minutes, args.trials, random.Random(args.seed + 1))
    if args.snmp_minutes:
        snmp_phase(d, 12, max(10, args.trials), 6, args.snmp_minutes)
    print(f"\n# work dir {d}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
