"""Metrics worth scraping: the Grafana dashboard in docs/ names only metrics a real `proxyvm run`
exports; every family is documented in docs/metrics.md; the DNS families count what real dig
queries through the DNS service did (cache hits/misses, per-upstream queries and latency, rcodes,
EDE) with the guest label bounded to the config's guests + unknown; the counting helpers of the
other services on the inputs those services give them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

from protocols.http.addon import count_traffic, new_traffic, sum_traffic
from protocols.smtp.queue import tls_failure_kind
from protocols.snmp.service import _outcome
from proxyvm.service_metrics import FAMILIES
from tests.console.lab import ADMIN_IP, GUEST_IP, OTHER_IP, write_lab
from tests.protocols.dns.conftest import lab_ca, lab_dir, needs_peers, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "summary": ("_sum", "_count", "_created", ""),
            "histogram": ("_bucket", "_sum", "_count", "_created"), "info": ("_info",), "unknown": ("",)}


def exported_series(text: str) -> set[str]:
    """Every series name a /metrics page can carry, from its `# TYPE` lines (so a family with no
    samples yet still counts: its service is off in this run)."""
    out: set[str] = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.group(1), m.group(2)
        base = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
        out.update(base + s for s in SUFFIXES.get(kind, ("",)))
    return out


def dashboard_exprs(d: dict) -> list[tuple[str, str]]:
    found = []
    def walk(panels: list) -> None:
        for p in panels:
            for t in p.get("targets", []):
                found.append((p.get("title", ""), t["expr"]))
            walk(p.get("panels", []))
    walk(d["panels"])
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            found.append((f"variable {v['name']}", q["query"]))
    return found


def unknown_names(exprs: list[tuple[str, str]], exported: set[str]) -> list[tuple[str, str]]:
    bad = []
    for title, e in exprs:
        names = re.findall(r"\bproxyvm_[a-z0-9_]+", e)
        if not names:
            bad.append((title, f"names no proxyvm metric: {e}"))
        bad += [(title, n) for n in names if n not in exported]
    return bad


@pytest.fixture(scope="module")
def metrics_page(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("metrics")
    pvm, _, _ = write_lab(d, extra="detect: true\n")  # detectors on: proxyvm_alerts_total exists
    with pvm:
        return pvm.metrics()


def test_grafana_dashboard_names_only_exported_metrics(metrics_page: str) -> None:
    d = json.loads(DASHBOARD.read_text())
    exported = exported_series(metrics_page)
    exprs = dashboard_exprs(d)
    assert len(exprs) >= 30
    assert unknown_names(exprs, exported) == []
    # the check itself finds a misspelt name, a made-up one and a metric-less expression
    bad = unknown_names([("p", "rate(proxyvm_dns_cache_hit_total[5m])"), ("q", "proxyvm_nope"), ("r", "up")], exported)
    assert [b[1] for b in bad] == ["proxyvm_dns_cache_hit_total", "proxyvm_nope", "names no proxyvm metric: up"]
    # every per-service family is on a panel, and in docs/metrics.md
    used = " ".join(e for _, e in exprs)
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for name, (kind, _, _) in FAMILIES.items():
        assert re.search(rf"\b{name}(_total|_sum|_count)?\b", used), f"{name} is on no dashboard panel"
        assert f"`{name}{'_total' if kind == 'counter' else ''}`" in doc, f"{name} is not in docs/metrics.md"
    for m in re.finditer(r"^# TYPE (proxyvm_\S+) (\S+)$", metrics_page, re.M):
        if m.group(1).endswith("_created") or m.group(1).startswith("proxyvm_fleet_"):
            continue  # prometheus_client's creation times; fleet families are in deployment.md
        assert f"`{m.group(1)}`" in doc, f"{m.group(1)} undocumented"
        if m.group(2) == "counter":
            assert m.group(1).endswith("_total")
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^(\S+?)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if got == labels:
            return float(m.group(4))
    return None


@needs_peers
@pytest.mark.lab
async def test_dns_metrics_from_real_queries(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    pvm, _, port = write_lab(tmp_path, ca=lab_ca.ca_pem, upstream=upstream1)
    await asyncio.to_thread(pvm.start)
    try:
        for _ in range(3):
            r = await dig(ADMIN_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
            assert r.status == "NOERROR"
        r = await dig(ADMIN_IP, port, "blocked.lab.test", "A", "-b", GUEST_IP)
        assert r.status == "REFUSED" and [c for c, _ in r.ede] == [15], r.text
        r = await dig(ADMIN_IP, port, "nothing-here.lab.test", "A", "-b", OTHER_IP)
        assert r.status == "NXDOMAIN"
        r = await dig(ADMIN_IP, port, "www.lab.test", "AAAA", "-b", "127.0.0.77")  # not a configured guest
        deadline = time.monotonic() + 10
        while True:  # workers report every 2 s
            text = await asyncio.to_thread(pvm.metrics)
            if (sample(text, "proxyvm_dns_queries_total") or 0) >= 6:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.5)
        up = {"upstream": "dot1.lab.test"}
        assert sample(text, "proxyvm_dns_cache_hits_total") == 2
        assert sample(text, "proxyvm_dns_cache_misses_total") >= 3
        assert sample(text, "proxyvm_dns_cache_evictions_total") == 0
        assert sample(text, "proxyvm_dns_upstream_queries_total", **up) >= 3
        assert sample(text, "proxyvm_dns_upstream_failures_total", **up) == 0
        n = sample(text, "proxyvm_dns_upstream_latency_seconds_count", **up)
        s = sample(text, "proxyvm_dns_upstream_latency_seconds_sum", **up)
        assert n >= 3 and 0 < s / n < 1, (n, s)
        assert sample(text, "proxyvm_dns_upstream_up", **up) == 1
        assert 0 < sample(text, "proxyvm_dns_upstream_srtt_seconds", **up) < 1
        assert sample(text, "proxyvm_dns_responses_total", rcode="NOERROR") == 4
        assert sample(text, "proxyvm_dns_responses_total", rcode="REFUSED") == 1
        assert sample(text, "proxyvm_dns_responses_total", rcode="NXDOMAIN") == 1
        assert sample(text, "proxyvm_dns_ede_total", code="15") == 1
        assert 0 <= sample(text, "proxyvm_audit_writer_lag_seconds") < 5
        assert sample(text, "proxyvm_audit_records_shipped_total") == 0
        guests = set(re.findall(r'proxyvm_decisions_total\{[^}]*guest="([^"]*)"', text))
        assert guests == {"web1", "web2", "unknown"}, guests
    finally:
        await asyncio.to_thread(pvm.stop)


def test_smtp_tls_failure_kinds() -> None:
    # the alarm texts protocols.smtp.client raises
    s, a = "mx.example.net", "192.0.2.25"
    assert tls_failure_kind(f"STARTTLS not offered by {s} [{a}] (stripped?)") == "strip"
    assert tls_failure_kind(f"STARTTLS refused by {s} [{a}]") == "strip"
    assert tls_failure_kind(f"no TLS with {s}") == "strip"
    assert tls_failure_kind(f"certificate verification failed for {s} [{a}]: no TLSA record matches") == "dane_mismatch"
    assert tls_failure_kind(f"TLS handshake or certificate verification failed with {s} [{a}]") == "bad_cert"
    assert tls_failure_kind(f"TLS handshake failed with {s} [{a}]") == "handshake"


def test_http_traffic_counts_bounded() -> None:
    t = new_traffic()
    count_traffic(t, "http", 200, {"bytes_in": 10, "bytes_out": 5000})
    count_traffic(t, "http", 502, {"cause": "untrusted", "bytes_in": 0})
    count_traffic(t, "http", 502, {"cause": "connect_failed"})
    count_traffic(t, "http", None, {"error": "client disconnected"})
    count_traffic(t, "http", 99999, {})
    count_traffic(t, "ws", 101, {})
    assert t["by_status"] == {"200": 1, "502": 2, "none": 2, "101": 1}
    assert t["upstream_tls_failures"] == {"untrusted": 1}
    assert (t["bytes_in"], t["bytes_out"], t["ws_opened"]) == (10, 5000, 1)
    child = new_traffic()
    count_traffic(child, "http", 200, {"bytes_out": 1})
    total = sum_traffic([t, child, {}])
    assert total["by_status"]["200"] == 2 and total["bytes_out"] == 5001


def test_snmp_outcomes_bounded() -> None:
    assert _outcome("allow", "noError") == "ok"
    assert _outcome("deny", "noError") == "denied"
    assert _outcome("allow", "agent timeout") == "timeout"
    assert _outcome("allow", "authorizationError") == "authorizationError"
    assert _outcome("allow", "dropped (rate limited)") == "error"
    assert _outcome("allow", "x" * 100) == "error"
