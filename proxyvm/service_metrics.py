"""Per-service Prometheus metrics, rendered in the supervisor from each service's health dict
(`ServiceState.health`, sent by every worker every 2 s) on scrape (docs/metrics.md,
docs/grafana-dashboard.json).

Owns: the families below (`FAMILIES`: every name, type and help text; each is exported on every
scrape, with no samples when its service is off, so a dashboard's expressions always name a
metric that exists), and the audit writer's lag (sampled from the lines it writes).
Must not: put a guest-controlled value in a label: labels are upstream names from the config,
rcodes, EDE codes, DNSSEC outcomes, HTTP status codes, SNMP ops and error names (each bounded by
the service that counts them).

Counters come from the workers' own counts: a restarted worker starts from 0 again (a counter
reset, which `rate()` handles). A service with `workers: N` is rendered once, from its workers'
health dicts merged by `merge_health` (counts summed).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

LAG_SAMPLE_EVERY = 0.5  # seconds between two samples of the audit writer's lag

# name (without _total) -> (type, help, labels)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # dns
    "proxyvm_dns_queries": ("counter", "Guest queries received by the DNS service", ()),
    "proxyvm_dns_cache_hits": ("counter", "DNS answers served from the cache", ()),
    "proxyvm_dns_cache_misses": ("counter", "DNS cache lookups that found nothing usable", ()),
    "proxyvm_dns_cache_evictions": ("counter", "DNS cache entries evicted to stay within its size", ()),
    "proxyvm_dns_cache_entries": ("gauge", "Entries in the DNS cache", ()),
    "proxyvm_dns_cache_bytes": ("gauge", "Bytes held by the DNS cache", ()),
    "proxyvm_dns_upstream_queries": ("counter", "Queries sent to each DNS-over-TLS upstream (answers + failures)",
                                     ("upstream",)),
    "proxyvm_dns_upstream_failures": ("counter", "Failed queries per DNS upstream", ("upstream",)),
    "proxyvm_dns_upstream_latency_seconds": ("summary", "Time to an answer per DNS upstream", ("upstream",)),
    "proxyvm_dns_upstream_srtt_seconds": ("gauge", "Smoothed round-trip time per DNS upstream", ("upstream",)),
    "proxyvm_dns_upstream_up": ("gauge", "1 while the DNS upstream is in rotation", ("upstream",)),
    "proxyvm_dns_dnssec_outcomes": ("counter", "Answers by DNSSEC outcome (secure, insecure, bogus, "
                                    "indeterminate)", ("outcome",)),
    "proxyvm_dns_responses": ("counter", "Audited DNS responses by rcode", ("rcode",)),
    "proxyvm_dns_ede": ("counter", "Audited DNS responses by Extended DNS Error code (RFC 8914)", ("code",)),
    # smtp
    "proxyvm_smtp_accepted": ("counter", "Messages accepted from guests into the spool", ()),
    "proxyvm_smtp_spool_messages": ("gauge", "Messages in the spool waiting for delivery", ()),
    "proxyvm_smtp_spool_oldest_age_seconds": ("gauge", "Age of the oldest message in the spool", ()),
    "proxyvm_smtp_delivery_attempts": ("counter", "Delivery attempts by outcome (delivered, deferred, failed)",
                                       ("outcome",)),
    "proxyvm_smtp_deliveries": ("counter", "Messages done, by outcome (delivered, partial, failed, expired)",
                                ("outcome",)),
    "proxyvm_smtp_bounces": ("counter", "Bounces (DSNs) sent to guests", ()),
    "proxyvm_smtp_tls_failures": ("counter", "Delivery attempts stopped by TLS, by kind (strip, bad_cert, "
                                  "dane_mismatch, handshake)", ("kind",)),
    # snmp
    "proxyvm_snmp_requests": ("counter", "Audited SNMP requests by op and outcome", ("op", "outcome")),
    "proxyvm_snmp_agent_timeouts": ("counter", "SNMP requests the agent did not answer in time", ()),
    "proxyvm_snmp_agent_errors": ("counter", "SNMP requests that failed at the agent (not a timeout)", ()),
    "proxyvm_snmp_traps_received": ("counter", "Traps and informs received from guests", ()),
    "proxyvm_snmp_traps_sent": ("counter", "Traps and informs forwarded to the receivers", ()),
    "proxyvm_snmp_traps_dropped": ("counter", "Traps and informs dropped", ()),
    "proxyvm_snmp_informs_acked": ("counter", "Informs acknowledged to guests after every receiver acknowledged",
                                   ()),
    # http
    "proxyvm_http_requests": ("counter", "Audited HTTP requests by response status (none: no response)",
                              ("status",)),
    "proxyvm_http_upstream_tls_failures": ("counter", "HTTP upstream TLS failures by cause", ("cause",)),
    "proxyvm_http_bytes": ("counter", "HTTP body bytes (in: from guests, out: to guests)", ("direction",)),
    "proxyvm_http_open_connections": ("gauge", "Open guest connections to the HTTP service", ()),
    "proxyvm_http_websocket_sessions": ("counter", "WebSocket sessions opened", ()),
    "proxyvm_http_websocket_sessions_open": ("gauge", "WebSocket sessions open now", ()),
    # forensic capture (protocols.capture), per service process
    "proxyvm_forensics_flows": ("counter", "Denied or quarantined flows written to the guests' pcap files",
                                ("service",)),
    "proxyvm_forensics_packets": ("counter", "Packets written to the guests' pcap files", ("service",)),
    "proxyvm_forensics_bytes": ("counter", "Bytes written to the guests' pcap files", ("service",)),
    "proxyvm_forensics_dropped": ("counter", "Flows not captured (queue full, or capture stopped after a "
                                  "disk error)", ("service",)),
    "proxyvm_forensics_disk_errors": ("counter", "Writes of pcap files that failed (full disk, quota, I/O "
                                      "error); capture stops for 30 s after each", ("service",)),
    "proxyvm_forensics_stopped": ("gauge", "1 while capture is stopped after a disk error", ("service",)),
    # audit
    "proxyvm_audit_records_shipped": ("counter", "Audit records the fleet stream acknowledged (0 outside a fleet)",
                                      ()),
    "proxyvm_audit_writer_lag_seconds": ("gauge", "Time from a record's timestamp (set where it was made) to "
                                         "its write in the log, last sampled", ()),
}


# Keys whose values are not additive across the workers of one service: the largest one wins.
_MAX_KEYS = frozenset({"oldest_age", "srtt_ms"})
_FIRST_KEYS = frozenset({"pid", "index", "listeners", "listening"})  # worker 0's
# Lists of dicts merged by this key (e.g. DNS upstreams by name): each worker has its own view.
_LIST_KEYS = ("name", "address")


def merge_health(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One service's health from its workers' health dicts: numbers summed (gauges such as open
    connections and spool depth too: each worker has its own), except `_MAX_KEYS` (maximum);
    nested dicts merged the same way; lists of dicts merged item by item on their name; a `state`
    is "ok" only when every worker's is; other values are the first worker's."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if k not in out:
                out[k] = _copy(v)
                continue
            out[k] = _merge_value(k, out[k], v)
    return out


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return merge_health([v])
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _merge_value(key: str, a: Any, b: Any) -> Any:
    if key == "state":
        return a if a == b else ("degraded" if "ok" in (a, b) else a)
    if key in _FIRST_KEYS or isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, int | float) and isinstance(b, int | float):
        return max(a, b) if key in _MAX_KEYS else a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return merge_health([a, b])
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) for x in a + b):
        def name(x: dict[str, Any]) -> Any:
            return next((x[k] for k in _LIST_KEYS if k in x), None)
        merged: dict[Any, dict[str, Any]] = {}
        for x in a + b:
            n = name(x)
            merged[n] = merge_health([merged[n], x]) if n in merged else _copy(x)
        return list(merged.values())
    return a


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


class ServiceMetrics(Collector):
    """Registered by the supervisor; `sup.services[name].health` are the dicts it renders."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self.lag = 0.0
        self._next_sample = 0.0
        sup.line_observers.append(self.on_line)

    # -- the writer's lag -----------------------------------------------------------------------
    def on_line(self, seq: int, line: bytes) -> None:
        now = time.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + LAG_SAMPLE_EVERY
        i = line.find(b'"ts":"')
        if i < 0:
            return
        try:
            ts = dt.datetime.strptime(line[i + 6:i + 30].decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        except ValueError:
            return
        self.lag = max(0.0, time.time() - ts.timestamp())

    # -- families -------------------------------------------------------------------------------
    def _health(self, name: str) -> dict[str, Any]:
        h = self.sup.service_health(name) if name in self.sup.services else {}
        return h if isinstance(h, dict) else {}

    def collect(self) -> Any:
        fams: dict[str, Any] = {}
        for name, (kind, text, labels) in FAMILIES.items():
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "summary": SummaryMetricFamily}[kind]
            fams[name] = cls(name, text, labels=list(labels))

        def add(name: str, labels: list[str], value: Any) -> None:
            fams[name].add_metric(labels, _num(value))

        dns = self._health("dns")
        if dns:
            for key, fam in (("queries", "proxyvm_dns_queries"), ("cache_hits", "proxyvm_dns_cache_hits"),
                             ("cache_misses", "proxyvm_dns_cache_misses"),
                             ("cache_evictions", "proxyvm_dns_cache_evictions"),
                             ("cache_entries", "proxyvm_dns_cache_entries"), ("cache_bytes", "proxyvm_dns_cache_bytes")):
                add(fam, [], dns.get(key, 0))
            for u in dns.get("upstreams") or []:
                if not isinstance(u, dict):
                    continue
                label = [str(u.get("name") or u.get("address"))]
                answers, failures = _num(u.get("answers")), _num(u.get("failures"))
                add("proxyvm_dns_upstream_queries", label, answers + failures)
                add("proxyvm_dns_upstream_failures", label, failures)
                fams["proxyvm_dns_upstream_latency_seconds"].add_metric(label, count_value=answers,
                                                                        sum_value=_num(u.get("latency_sum")))
                add("proxyvm_dns_upstream_srtt_seconds", label, _num(u.get("srtt_ms")) / 1000)
                add("proxyvm_dns_upstream_up", label, 1 if u.get("state") == "up" else 0)
            for fam, key in (("proxyvm_dns_dnssec_outcomes", "dnssec_outcomes"), ("proxyvm_dns_responses", "rcodes"),
                             ("proxyvm_dns_ede", "ede")):
                for k, v in sorted((dns.get(key) or {}).items()):
                    add(fam, [str(k)], v)

        smtp = self._health("smtp")
        if smtp:
            add("proxyvm_smtp_accepted", [], smtp.get("accepted", 0))
            add("proxyvm_smtp_spool_messages", [], smtp.get("queued", 0))
            add("proxyvm_smtp_spool_oldest_age_seconds", [], smtp.get("oldest_age", 0))
            add("proxyvm_smtp_bounces", [], smtp.get("bounced", 0))
            for fam, key in (("proxyvm_smtp_delivery_attempts", "attempts"), ("proxyvm_smtp_deliveries", "finals"),
                             ("proxyvm_smtp_tls_failures", "tls_failures")):
                for k, v in sorted((smtp.get(key) or {}).items()):
                    add(fam, [str(k)], v)

        snmp = self._health("snmp")
        if snmp:
            for k, v in sorted((snmp.get("by_op") or {}).items()):
                op, _, outcome = str(k).partition("/")
                add("proxyvm_snmp_requests", [op, outcome], v)
            for key, fam in (("agent_timeouts", "proxyvm_snmp_agent_timeouts"),
                             ("agent_errors", "proxyvm_snmp_agent_errors"),
                             ("traps_in", "proxyvm_snmp_traps_received"), ("traps_forwarded", "proxyvm_snmp_traps_sent"),
                             ("traps_dropped", "proxyvm_snmp_traps_dropped"),
                             ("informs_acked", "proxyvm_snmp_informs_acked")):
                add(fam, [], snmp.get(key, 0))

        http = self._health("http")
        if http:
            t = http.get("traffic") or {}
            for k, v in sorted((t.get("by_status") or {}).items()):
                add("proxyvm_http_requests", [str(k)], v)
            for k, v in sorted((t.get("upstream_tls_failures") or {}).items()):
                add("proxyvm_http_upstream_tls_failures", [str(k)], v)
            add("proxyvm_http_bytes", ["in"], t.get("bytes_in", 0))
            add("proxyvm_http_bytes", ["out"], t.get("bytes_out", 0))
            add("proxyvm_http_open_connections", [], http.get("connections", 0))
            add("proxyvm_http_websocket_sessions", [], t.get("ws_opened", 0))
            add("proxyvm_http_websocket_sessions_open", [], max(0.0, _num(t.get("ws_opened")) - _num(t.get("ws_closed"))))

        for name in sorted(getattr(self.sup, "services", {}) or {}):
            cap = self._health(name).get("capture")
            if not isinstance(cap, dict):
                continue
            for key in ("flows", "packets", "bytes", "dropped", "disk_errors"):
                add(f"proxyvm_forensics_{key}", [name], cap.get(key, 0))
            add("proxyvm_forensics_stopped", [name], 1 if cap.get("stopped") else 0)

        fleet = getattr(self.sup, "fleet", None)
        shipper = getattr(fleet, "shipper", None)
        add("proxyvm_audit_records_shipped", [], getattr(shipper, "shipped", 0))
        add("proxyvm_audit_writer_lag_seconds", [], self.lag)
        yield from fams.values()
