"""The detectors (proxyvm.detect) fed with audit records as the supervisor writes them, on an
injected clock: each fires at its threshold and not below, honours its cooldown, ignores records
with a `kind` (its own alerts included), and keeps bounded memory whatever a guest sends. The
`detect:` section's errors are located like every other config error. (Through `proxyvm run`
with real clients: tests/proxyvm/test_detect_process.py.)"""

from __future__ import annotations

import random
import string
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from policy.source import parse_yaml
from proxyvm.config import load_config
from proxyvm.detect import (
    DETECTORS,
    Alert,
    Detectors,
    DetectorSettings,
    base_domain,
    default_detector,
    entropy,
    parse_detect,
)
from proxyvm.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.t = 1_790_000_000.0

    def __call__(self) -> float:
        return self.t


def settings(**over: Any) -> Any:
    """`detect:` text -> DetectSettings, through the real parser."""
    text = "detect:\n" + textwrap.indent(textwrap.dedent(over.pop("text", "")), "  ") if over.get("text") else "detect:\n"
    node = parse_yaml(text, "probe.yaml", Path("."))
    return parse_detect(node.get_map()["detect"])


class Run:
    def __init__(self, text: str = "") -> None:
        self.clock = Clock()
        self.alerts: list[tuple[Alert, DetectorSettings]] = []
        self.det = Detectors(settings(text=text), lambda a, s: self.alerts.append((a, s)), ["web1", "mail1"],
                             clock=self.clock)
        self.seq = 0

    def feed(self, **rec: Any) -> dict[str, Any]:
        self.seq += 1
        r = {"seq": self.seq, "guest": "web1", "src": "198.18.0.10:4000", "verdict": "allow", "rule": "r",
             "at": "rules.yaml:3", "reason": "x", "upstream": None, **rec}
        self.det(r)
        return r

    def dns(self, qname: str, qtype: str = "A", rcode: str = "NOERROR", **kw: Any) -> dict[str, Any]:
        return self.feed(protocol="dns", request={"qname": qname, "qtype": qtype}, rcode=rcode, **kw)

    def of(self, detector: str) -> list[Alert]:
        return [a for a, _ in self.alerts if a.detector == detector]


def rand(n: int, rng: random.Random, alphabet: str = string.ascii_lowercase + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_helpers() -> None:
    assert base_domain("a.b.www.example.com") == "example.com"
    assert base_domain("www.example.co.uk") == "example.co.uk"
    assert base_domain("example.com.") == "example.com"
    assert entropy("aaaa") == 0.0 and round(entropy("abcd"), 3) == 2.0
    assert entropy("mzxw6ytboi2dcmrtgq3tmnzy") > 3.8 > entropy("wwwmailserverfrontend")


def test_dns_tunnel_long_labels_fire_at_the_threshold() -> None:
    run = Run("dns_tunnel: {suspicious: 5}\ndeny_burst: false\nrate_spike: false\nnew_destination: false")
    rng = random.Random(1)
    for _ in range(4):
        run.dns(f"{rand(45, rng)}.exfil.test", "TXT")
    assert run.of("dns_tunnel") == []
    run.dns(f"{rand(45, rng)}.exfil.test", "TXT")
    (a,) = run.of("dns_tunnel")
    assert a.guest == "web1" and a.key == "exfil.test" and a.records == [1, 2, 3, 4, 5]
    assert a.evidence["odd_names"] == 5 and a.evidence["base_domain"] == "exfil.test"
    assert a.reason == "DNS tunnelling suspected: 5 distinct names with long labels or high entropy under exfil.test within 60s"
    # cooldown: the next ones under the same base domain do not alert again for 5 minutes
    for _ in range(20):
        run.dns(f"{rand(45, rng)}.exfil.test", "TXT")
    assert len(run.of("dns_tunnel")) == 1
    run.clock.t += 301
    for _ in range(5):
        run.dns(f"{rand(45, rng)}.exfil.test", "TXT")
    assert len(run.of("dns_tunnel")) == 2


def test_dns_tunnel_window_slides() -> None:
    run = Run("dns_tunnel: {suspicious: 5}")
    rng = random.Random(2)
    for _ in range(4):
        run.dns(f"{rand(45, rng)}.exfil.test")
        run.clock.t += 20  # 4 in 80 s: never 5 within 60 s
    run.dns(f"{rand(45, rng)}.exfil.test")
    assert run.of("dns_tunnel") == []


def test_dns_tunnel_unique_names_and_txt_share() -> None:
    run = Run("dns_tunnel: {unique_subdomains: 30, suspicious: 1000}")
    for i in range(29):
        run.dns(f"host{i}.cdn.test")
    assert run.of("dns_tunnel") == []
    run.dns("host29.cdn.test")
    (a,) = run.of("dns_tunnel")
    assert a.evidence["unique_names"] == 30 and "30 distinct names under cdn.test" in a.reason
    run2 = Run("dns_tunnel: {min_queries: 20, txt_share: 0.5, suspicious: 1000}")
    for i in range(10):
        run2.dns("a.txt.test", "A")
        run2.dns("b.txt.test", "TXT" if i % 2 else "NULL")
    (b,) = run2.of("dns_tunnel")
    assert b.evidence["txt_null_share"] == 0.5 and "10 of 20 queries under txt.test are TXT/NULL" in b.reason
    # the same traffic with ordinary names and few TXT: nothing
    run3 = Run()
    for i in range(200):
        run3.dns(f"www{i % 5}.example.com", "TXT" if i % 10 == 0 else "A")
    assert run3.of("dns_tunnel") == []


def test_dga_nxdomain_random_domains() -> None:
    run = Run("dns_tunnel: {dga_domains: 10}")
    rng = random.Random(3)
    for _ in range(9):
        run.dns(f"{rand(12, rng)}.com", rcode="NXDOMAIN")
    run.dns("aaaaaaaabbbb.com", rcode="NXDOMAIN")  # 9 random + a low-entropy one: not yet 10 random
    run.dns("sho.com", rcode="NXDOMAIN")  # too short to look random
    assert run.of("dns_tunnel") == []
    run.dns(f"{rand(12, rng)}.net", rcode="NXDOMAIN")
    (a,) = [x for x in run.of("dns_tunnel") if x.key == "dga"]
    assert a.evidence["nxdomain_base_domains"] >= 10 and a.reason.startswith("DGA suspected")


def test_deny_burst_and_quarantined_records_ignored() -> None:
    run = Run("deny_burst: {count: 5, window: 30s}")
    for i in range(4):
        run.feed(protocol="http", verdict="deny", rule="default", request={"host": f"h{i}"})
    run.feed(protocol="http", verdict="allow", request={"host": "ok"})
    assert run.of("deny_burst") == []
    run.feed(protocol="dns", verdict="deny", rule="block-x", request={"qname": "x.test", "qtype": "A"})
    (a,) = run.of("deny_burst")
    assert a.evidence["denials"] == 5 and a.evidence["rules"] == {"default": 4, "block-x": 1}
    assert a.records == [1, 2, 3, 4, 6]
    # a quarantined guest's refusals, and records with a kind (alerts too), are not traffic
    run2 = Run("deny_burst: {count: 2}")
    for _ in range(10):
        run2.feed(protocol="dns", verdict="deny", rule="quarantine", request={"qname": "x.test"})
        run2.feed(kind="alert", protocol="dns", verdict="deny", detector="deny_burst")
    assert run2.alerts == []


def test_rate_spike_against_own_history() -> None:
    run = Run("rate_spike: {window: 60s, factor: 5, min_requests: 50, warmup: 5}")
    for _ in range(10):  # ten minutes of ~10 requests a minute
        for _ in range(10):
            run.dns("www.example.com")
        run.clock.t += 60
    for _ in range(49):
        run.dns("www.example.com")
    assert run.of("rate_spike") == []
    run.dns("www.example.com")  # 50 in this window: >= 5x the usual ~10 and >= min_requests
    (a,) = run.of("rate_spike")
    assert a.key == "dns" and a.evidence["requests"] == 50 and 5 <= a.evidence["factor"] <= 6
    # follow-up records (SMTP accepted, closed tunnels) are not requests
    assert len(run.det.detectors) == len(DETECTORS)


def test_smtp_burst_and_snmp_sweep() -> None:
    run = Run("smtp_burst: {recipients: 10, messages: 3, bytes: 1MB}\nsnmp_sweep: {agents: 4}")
    for i in range(9):
        run.feed(protocol="smtp", event="rcpt", request={"mail_from": "a@x", "rcpt_to": f"u{i}@victim.test"})
    assert run.of("smtp_burst") == []
    run.feed(protocol="smtp", event="rcpt", request={"mail_from": "a@x", "rcpt_to": "u9@other.test"})
    (a,) = run.of("smtp_burst")
    assert a.evidence["recipients"] == 10 and a.evidence["recipient_domains"] == {"victim.test": 9, "other.test": 1}
    for i in range(3):
        run.feed(protocol="snmp", request={"agent": f"a{i}", "op": "getnext", "oids": ["1.3.6"]})
        run.feed(protocol="snmp", request={"agent": f"b{i}", "op": "get", "oids": ["1.3.6"]})  # not walks
    assert run.of("snmp_sweep") == []
    run.feed(protocol="snmp", request={"agent": "a3", "op": "getbulk", "oids": ["1.3.6"]})
    (s,) = run.of("snmp_sweep")
    assert s.evidence["agents"] == ["a0", "a1", "a2", "a3"]


def test_new_destination_learned_and_from_rules(tmp_path: Path) -> None:
    run = Run("new_destination: {min_baseline: 5}")
    for i in range(5):
        run.dns(f"www{i}.example.com")  # one base domain, five records
    assert run.of("new_destination") == []  # the baseline was being learned
    run.dns("mail.example.com")
    assert run.of("new_destination") == []
    run.dns("evil.test")
    (a,) = run.of("new_destination")
    assert a.evidence["destination"] == "dns:evil.test" and a.evidence["baseline"] == "learned"
    run.dns("x.evil.test")  # now known
    assert len(run.of("new_destination")) == 1

    rules = tmp_path / "baseline.yaml"
    rules.write_text("mode: enforce\ndefault: deny\nrules:\n"
                     "  - {id: web, action: allow, protocol: http, guests: [web1], match: {host: [api.example.com]}}\n")
    run2 = Run(f"new_destination: {{baseline: {rules}}}")
    run2.feed(protocol="http", request={"method": "GET", "host": "api.example.com", "path": "/", "port": "80"})
    assert run2.of("new_destination") == []
    run2.feed(protocol="http", request={"method": "GET", "host": "pastebin.test", "path": "/", "port": "80"})
    (b,) = run2.of("new_destination")
    assert b.evidence["destination"] == "http:pastebin.test" and b.evidence["baseline"] == str(rules)


def test_memory_is_bounded_whatever_the_guest_sends() -> None:
    run = Run("dns_tunnel: {unique_subdomains: 60, suspicious: 10, slow_suspicious: 30, dga_domains: 20, "
              "slow_dga_domains: 40}\nnew_destination: {min_baseline: 1, max_destinations: 1000}")
    rng = random.Random(4)
    for i in range(50_000):  # every query a new name under a new base domain
        run.dns(f"{rand(8, rng)}.{rand(10, rng)}.test", rcode="NXDOMAIN")
        if i % 1000 == 0:
            run.clock.t += 1
    for d in run.det.detectors:
        for st in d.guests.values():
            if d.name == "dns_tunnel":
                assert len(st["bases"].items) <= 256
                assert all(len(b.names.seen) <= 60 for b in st["bases"].items.values())
                assert len(st["dga"].seen) <= 20 and len(st["dga_slow"].seen) <= 40
                assert all(len(b.odd.seen) <= 10 and len(b.slow.seen) <= 30 for b in st["bases"].items.values())
            if d.name == "new_destination":
                assert len(st.dests) <= 1000
                assert len(st.pending) <= 50
    assert len(run.det.cooldowns) <= 65536
    (tunnel,) = [d for d in run.det.detectors if d.name == "dns_tunnel"]
    size = sum(sys.getsizeof(b.names.seen) for b in tunnel.guests["web1"]["bases"].items.values())
    assert 0 < size < 5_000_000


def test_config_section(tmp_path: Path) -> None:
    cfg = tmp_path / "proxyvm.yaml"
    cfg.write_text("detect:\n  dns_tunnel: {action: quarantine, profile: honeypot, entropy: 4.2}\n"
                   "  new_destination: false\n")
    c = load_config(cfg, as_root=False)
    assert set(c.detect.detectors) == set(DETECTORS) - {"new_destination"}
    d = c.detect.detectors["dns_tunnel"]
    assert (d.action, d.profile, d["entropy"], d["label_length"]) == ("quarantine", "honeypot", 4.2, 40)
    assert c.detect.detectors["deny_burst"] == default_detector("deny_burst")
    cfg.write_text("detect: false\n")
    assert load_config(cfg, as_root=False).detect.detectors == {}
    cfg.write_text("guests: {}\n")
    assert load_config(cfg, as_root=False).detect is None

    cfg.write_text("detect:\n  dns_tunel: true\n  deny_burst: {count: 0, acton: alert}\n"
                   "  rate_spike: {profile: honeypot}\n  smtp_burst: {txt_share: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, as_root=False)
    text = str(e.value)
    assert f"{cfg}:2:3: unknown key 'dns_tunel' in detect" in text and "did you mean 'dns_tunnel'?" in text
    cfg.write_text("detect:\n  deny_burst: {count: 0}\n  rate_spike: {profile: honeypot}\n"
                   "  dns_tunnel: {txt_share: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, as_root=False)
    text = str(e.value)
    assert f"{cfg}:2:23: deny_burst count must be at least 1, found 0" in text, text
    assert "profile is only used with action: quarantine (detector rate_spike)" in text
    assert "dns_tunnel txt_share is a share: between 0 and 1, found 2" in text


def test_learned_baseline_is_seeded_from_the_audit_log(tmp_path: Path) -> None:
    from proxyvm.audit import AuditLog, now_iso
    from proxyvm.detect import seed_from_log

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    old = now_iso(Clock()() - 30 * 86400)  # older than history: not learned
    for i in range(6):
        log.append({"ts": now_iso(), "guest": "web1", "protocol": "dns", "verdict": "allow", "rule": "r",
                    "request": {"qname": f"h{i}.known.test", "qtype": "A"}})
    log.append({"ts": old, "guest": "web1", "protocol": "dns", "verdict": "allow", "rule": "r",
                "request": {"qname": "ancient.test", "qtype": "A"}})
    log.append({"ts": now_iso(), "guest": "web1", "protocol": "dns", "verdict": "deny", "rule": "r",
                "request": {"qname": "denied.test", "qtype": "A"}})
    log.close()
    run = Run("new_destination: {min_baseline: 5}")
    assert seed_from_log(run.det, path, 7 * 86400) == 6
    run.dns("www.known.test")
    assert run.of("new_destination") == []
    run.dns("ancient.test")
    run.dns("denied.test")
    assert [a.evidence["destination"] for a in run.of("new_destination")] == ["dns:ancient.test"]
    run.clock.t += 301  # the window is over: the next record reports what was gathered
    run.dns("www.known.test")
    assert [a.evidence["destination"] for a in run.of("new_destination")] == ["dns:ancient.test", "dns:denied.test"]


QUIET = "deny_burst: false\nrate_spike: false\nnew_destination: false\n"


def test_mail_guest_spf_dmarc_dkim_txt_does_not_alert() -> None:
    """A mail server's day: per message MX, the MX host, SPF (TXT at the apex and `_spf.`), DMARC,
    DKIM, MTA-STS, TLS-RPT — mostly TXT under one domain, over and over. No alert; the same TXT
    share on ordinary names does alert (the exemption is what keeps it quiet)."""
    run = Run(QUIET)
    rng = random.Random(5)
    for _ in range(3000):
        dom = rng.choice(["gmail.com", "outlook.com", "example-corp.com"])
        for name, qtype in [(dom, "MX"), (f"mx.{dom}", "A"), (dom, "TXT"), (f"_spf.{dom}", "TXT"),
                            (f"_dmarc.{dom}", "TXT"), (f"{rng.choice(['s1', 'google', 'k1'])}._domainkey.{dom}", "TXT"),
                            (f"_mta-sts.{dom}", "TXT"), (f"_smtp._tls.{dom}", "TXT")]:
            run.dns(name, qtype)
        run.clock.t += 0.5
    assert run.of("dns_tunnel") == []
    run2 = Run(QUIET)
    for i in range(20):
        run2.dns("mx.gmail.com", "A")
        run2.dns(f"k{i % 3}.keys.gmail.com", "TXT")  # TXT, but not a mail-auth name
    (a,) = run2.of("dns_tunnel")
    assert "TXT/NULL" in a.reason and a.key == "gmail.com"


def test_repeated_long_cdn_names_do_not_alert() -> None:
    """Long, high-entropy ELB/S3/Kubernetes-ELB names asked again and again (a client without a
    cache, TTL 60 s): each is one name. Ten distinct ones within the window do alert."""
    names = ["web-prod-1234567890.us-east-1.elb.amazonaws.com",
             "prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com",
             *(f"k8s-{i}a9f3c1e7b2d4f6081c3e5a7b9d1f2e4c6-98765432{i}.elb.eu-west-1.amazonaws.com" for i in range(8))]
    run = Run(QUIET)
    for _ in range(2000):  # 10 distinct names (9 suspicious), 20,000 queries over 5 hours
        for n in names:
            run.dns(n, "A")
        run.clock.t += 9
    assert run.of("dns_tunnel") == []
    run.dns("k8s-9f0e1d2c3b4a59687766554433221100-1122334455.elb.eu-west-1.amazonaws.com")
    (a,) = run.of("dns_tunnel")
    assert a.evidence["odd_names"] == 10 and a.key == "amazonaws.com"


def test_slow_tunnel_alerts_within_the_slow_window() -> None:
    """0.1 q/s (one name every 10 s): never 10 within a minute, so only the slow signal can see
    it: slow_suspicious (30) distinct names -> alert at the 30th, 290 s after the first."""
    run = Run(QUIET)
    rng = random.Random(6)
    t0 = run.clock.t
    for _ in range(29):
        run.dns(f"{rand(52, rng)}.t.slow.test", "NULL")
        run.clock.t += 10
    assert run.of("dns_tunnel") == []
    run.dns(f"{rand(52, rng)}.t.slow.test", "NULL")
    (a,) = run.of("dns_tunnel")
    assert run.clock.t - t0 == 290 and a.evidence["slow_odd_names"] == 30 and a.evidence["window_s"] == 1800
    assert "low and slow" in a.reason and a.key == "slow.test"
    # the same 30 names spread over more than slow_window: nothing
    run2 = Run(QUIET)
    for _ in range(60):
        run2.dns(f"{rand(52, rng)}.t.slow.test", "NULL")
        run2.clock.t += 65  # 28 within any 30 minutes
    assert run2.of("dns_tunnel") == []


def test_slow_dga_alerts_within_the_slow_window() -> None:
    run = Run(QUIET)
    rng = random.Random(7)
    for _ in range(39):
        run.dns(f"{''.join(rng.sample(string.ascii_lowercase, 12))}.com", rcode="NXDOMAIN")
        run.clock.t += 5  # 0.2 q/s: at most 12 per minute, under dga_domains (20)
    assert run.of("dns_tunnel") == []
    run.dns(f"{''.join(rng.sample(string.ascii_lowercase, 12))}.com", rcode="NXDOMAIN")
    (a,) = run.of("dns_tunnel")
    assert a.key == "dga" and a.evidence["nxdomain_base_domains"] == 40 and a.evidence["window_s"] == 1800


def test_new_destination_one_alert_per_window_with_the_names() -> None:
    """A DGA-like flood of new names: one alert at once, then nothing within the window, then one
    alert naming what came since (max_listed named, the rest counted, request counts per name)."""
    run = Run("new_destination: {min_baseline: 5, window: 10m, max_listed: 3}\ndns_tunnel: false\n"
              "deny_burst: false\nrate_spike: false")
    for i in range(5):
        run.dns(f"www{i}.known.test")
    run.dns("first.test")
    assert [a.evidence["destination"] for a in run.of("new_destination")] == ["dns:first.test"]
    for i in range(100):
        run.dns(f"n{i}.test")
        run.dns(f"x.n{i % 2}.test")  # n0.test and n1.test asked again
        run.clock.t += 5
    assert len(run.of("new_destination")) == 1  # 500 s: still inside the window
    run.clock.t += 100
    run.dns("www0.known.test")  # a known name after the window: the gathered ones are reported
    first, second = run.of("new_destination")
    ev = second.evidence
    assert ev["new_destinations"] == 100 and ev["not_listed"] == 97
    assert ev["destinations"] == {"dns:n0.test": 51, "dns:n1.test": 51, "dns:n2.test": 1}
    assert second.reason.startswith("100 new destinations not in the guest's baseline")
    run.dns("www1.known.test")
    assert len(run.of("new_destination")) == 2  # nothing pending: no empty alert



def test_new_destination_baseline_view_for_the_console() -> None:
    """The guest page's baseline: learned destinations with the counts that make it active."""
    det = Detectors(settings(text="new_destination: {min_baseline: 3}\n"), lambda a, s: None, ["web1"],
                    clock=lambda: 1000.0)
    b = det.baseline("web1")
    assert b is not None
    assert (b["source"], b["records"], b["min_records"], b["active"], b["named"]) == ("learned", 0, 3, False, [])
    for seq, (verdict, q) in enumerate([("allow", "a.example.com"), ("allow", "b.example.com"),
                                        ("deny", "evil.example.net"), ("allow", "www.example.org")]):
        det({"seq": seq, "guest": "web1", "protocol": "dns", "verdict": verdict, "rule": "r",
             "request": {"qname": q, "qtype": "A"}})
    b = det.baseline("web1")
    assert b is not None
    assert (b["records"], b["active"], b["destinations"], b["named"]) == \
        (3, True, 2, ["dns:example.com", "dns:example.org"])
    off = Detectors(settings(text="new_destination: false\n"), lambda a, s: None, ["web1"], clock=lambda: 1000.0)
    assert off.baseline("web1") is None
