"""The mitmproxy addon that makes every policy decision of the HTTP service.

Owns: per-connection facts (`ConnInfo`: listener kind, guest, original destination, validated
upstream addresses), the decision for each request (http / ws), each CONNECT and each passthrough
ClientHello (tls), the SSRF guard, upgrading plain requests to verified HTTPS (our own upstream TLS
context: chain + hostname, SNI = host, TLS >= 1.2), header hygiene, answers made locally (403, 429,
405, 413, 502 with short text bodies), and exactly one audit record per request / tunnel.
Must not: bind sockets (the service does), intercept guest TLS (tunnels are spliced untouched; only
a guest in honeypot quarantine has its TLS terminated, by `honeypot.py`), or let a request through
when a hook fails (every hook is wrapped fail-closed).

Hooks are methods named after mitmproxy hooks; `HOOKS` lists them and `verify_hooks()` checks at
start-up that each is a real mitmproxy 11 hook, so a typo cannot silently disable a check.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import connection, hooks, http, tls
from mitmproxy.net import tls as net_tls
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello
from OpenSSL import SSL

from policy.decision import Decision, ReasonCode, Verdict, builtin, make_decision
from protocols import quarantine
from protocols.addr import hostport
from protocols.base import ServiceContext, duration_ms
from protocols.capture import FLOW_MAX, IN, OUT
from protocols.http import core, honeypot, layers
from protocols.http.resolve import UpstreamResolver
from protocols.http.settings import HTTPSettings

MAX_CLIENT_HELLO = 64 * 1024
MAX_PINS = 256
_RESPONSE_HOP = frozenset({b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"upgrade"})
MD_STATE = "proxyvm.state"
MD_HONEYPOT = "proxyvm.honeypot"  # the quarantine entry: answer this request from the local recorder
HONEYPOT_BODY_MAX = 1024 * 1024  # a honeypot request body recorded in full up to this (or limits.body)
HONEYPOT_PAGE = b"<!doctype html>\n<html><head><title>Welcome</title></head><body><h1>It works!</h1></body></html>\n"

HOOKS = (
    "load",
    "next_layer",
    "http_connect",
    "requestheaders",
    "request",
    "responseheaders",
    "response",
    "error",
    "websocket_end",
    "server_connect",
    "server_connected",
    "server_connect_error",
    "tls_start_server",
    "tls_established_server",
    "tls_start_client",  # the three client TLS hooks: honeypot guests only (honeypot.py)
    "tls_established_client",
    "tls_failed_client",
)

# Trust stores tried for "the system store" (the venv's OpenSSL does not know the distro's paths).
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # BSDs, macOS
)


def verify_hooks(addon: object) -> None:
    """Raise if a name in HOOKS is not a mitmproxy hook or the addon lacks it."""
    bad = [h for h in HOOKS if h not in hooks.all_hooks or not callable(getattr(addon, h, None))]
    if bad:
        raise TypeError(f"HTTP addon hook names not known to mitmproxy {hooks.__name__}: {bad}")


def system_ca_file() -> str:
    for p in SYSTEM_CA_FILES:
        if Path(p).is_file():
            return p
    import certifi

    return certifi.where()


_TLS_CAUSES = frozenset({"untrusted", "name_mismatch", "expired", "no_tls", "tls_failed"})


def new_traffic() -> dict[str, Any]:
    return {"by_status": {}, "bytes_in": 0, "bytes_out": 0, "upstream_tls_failures": {},
            "ws_opened": 0, "ws_closed": 0}


def count_traffic(t: dict[str, Any], protocol: str, status: int | None, extra: dict[str, Any]) -> None:
    """One audited request into the counters /metrics shows (bounded: status codes, causes)."""
    key = str(status) if isinstance(status, int) and 100 <= status < 600 else "none"
    by = t["by_status"]
    by[key] = by.get(key, 0) + 1
    t["bytes_in"] += int(extra.get("bytes_in") or 0)
    t["bytes_out"] += int(extra.get("bytes_out") or 0)
    cause = extra.get("cause")
    if cause in _TLS_CAUSES:
        f = t["upstream_tls_failures"]
        f[cause] = f.get(cause, 0) + 1
    if protocol == "ws" and status == 101:
        t["ws_opened"] += 1


def sum_traffic(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = new_traffic()
    for t in parts:
        for k, v in (t or {}).items():
            if isinstance(v, dict):
                d = out.setdefault(k, {})
                for kk, n in v.items():
                    d[kk] = d.get(kk, 0) + int(n)
            elif isinstance(v, int):
                out[k] = out.get(k, 0) + v
    return out


@dataclass(slots=True)
class ConnInfo:
    """What the proxy knows about one guest connection."""

    kind: str  # "transparent" | "proxy" | "passthrough"
    guest: str
    src: str  # "ip:port"
    orig_dst: tuple[str, int] | None = None  # SO_ORIGINAL_DST when the guest was redirected
    pins: dict[tuple[str, int], str] = field(default_factory=dict)  # (host, port) -> validated IP
    tunnel_host: str = ""  # the CONNECT host, once allowed
    restore: dict[str, tuple[str, int]] = field(default_factory=dict)  # server id -> name address
    tunnel: FlowState | None = None  # the allowed CONNECT, for the record written when it ends
    waiting: dict[int, tuple[FlowState, Any]] = field(default_factory=dict)  # answered, body still arriving
    honeypot: honeypot.HoneypotConn | None = None  # TLS terminated for a honeypot guest

    def pin(self, host: str, port: int, ip: str) -> None:
        if len(self.pins) >= MAX_PINS:  # one connection naming endless hosts must not grow forever
            self.pins.pop(next(iter(self.pins)))
        self.pins[(host, port)] = ip


@dataclass(slots=True)
class FlowState:
    """Per-request facts for the audit record."""

    info: ConnInfo
    protocol: str  # "http" | "ws" | "tls"
    request: dict[str, str]
    decision: Decision
    started: float
    plaintext: bool = False
    upstream_ip: str = ""
    close_guest: bool = False
    audited: bool = False
    pending: dict[str, Any] | None = None  # response done while the request body still streams


def _decision(verdict: Verdict, rule: str, detail: str) -> Decision:
    """A decision the HTTP service makes itself (http, ws and tls alike): `at: http`."""
    return builtin("http", rule, detail, verdict)


def _status_text(status: int, text: str) -> http.Response:
    body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
    return http.Response.make(status, body, {"content-type": "text/plain; charset=utf-8"})


def _fail_closed(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a hook: an exception must never let a request through (mitmproxy only logs them)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def inner(self: PolicyAddon, arg: Any) -> None:
            try:
                await fn(self, arg)
            except Exception:
                self.log.exception("HTTP hook %s failed; failing closed", fn.__name__)
                self.failures += 1
                if kind == "flow" and isinstance(arg, http.HTTPFlow):
                    if arg.response is None and not arg.websocket:
                        arg.response = _status_text(500, "500 proxy error: request refused (fail closed)")
                    else:
                        arg.kill()
                elif kind == "layer":
                    arg.layer = layers.Reject(arg.context)
                elif kind == "server":
                    arg.server.error = "internal error (fail closed)"
                elif kind == "tls":
                    arg.ssl_conn = None

        return inner

    return wrap


class PolicyAddon:
    """One instance per service. `conns` is filled by the service for every accepted connection."""

    def __init__(self, ctx: ServiceContext, resolver: UpstreamResolver, listen_addrs: set[tuple[str, int]]):
        self.ctx = ctx
        self.log: logging.Logger = ctx.log
        self.resolver = resolver
        self.listen_addrs = listen_addrs
        self.conns: dict[str, ConnInfo] = {}
        self.failures = 0
        self.traffic = new_traffic()  # counters for /metrics (HTTPService.health sums the children's)
        self.emitted = 0  # records this process wrote (tests see SO_REUSEPORT spreading)
        self._ssl_ctx: SSL.Context | None = None
        self.recorder = quarantine.Recorder(ctx.state_dir)
        self.honeypot = honeypot.Honeypot(self.recorder, self._emit_plain)
        verify_hooks(self)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def settings(self) -> HTTPSettings:
        return self.ctx.settings

    def reset_tls(self) -> None:
        """Rebuild the upstream TLS context (reload with a new ca_file); fails loudly if unreadable."""
        self._ssl_ctx = None
        self.ssl_context()

    def ssl_context(self) -> SSL.Context:
        if self._ssl_ctx is None:
            ca = str(self.settings.ca_file) if self.settings.ca_file else system_ca_file()
            self._ssl_ctx = net_tls.create_proxy_server_context(
                method=net_tls.Method.TLS_CLIENT_METHOD,
                min_version=net_tls.Version.TLS1_2,
                max_version=net_tls.Version.UNBOUNDED,
                cipher_list=None,
                ecdh_curve=None,
                verify=net_tls.Verify.VERIFY_PEER,
                ca_path=None,
                ca_pemfile=ca,
                client_cert=None,
                legacy_server_connect=False,
            )
        return self._ssl_ctx

    def _emit(self, st: FlowState, *, status: int | None, upstream: dict[str, Any] | None, **extra: Any) -> None:
        if st.audited:
            return
        st.audited = True
        count_traffic(self.traffic, st.protocol, status, extra)
        self.ctx.record(st.decision, guest=st.info.guest, src=st.info.src, protocol=st.protocol, request=st.request,
                        upstream=upstream, orig_dst=st.info.orig_dst, elapsed=time.monotonic() - st.started,
                        status=status, fields=extra)
        self.emitted += 1

    def _emit_plain(self, info: ConnInfo, protocol: str, decision: Decision, request: dict[str, str],
                    **extra: Any) -> None:
        st = FlowState(info, protocol, request, decision, time.monotonic())
        self._emit(st, status=extra.pop("status", None), upstream=extra.pop("upstream", None), **extra)

    def audit_refused(self, client: connection.Client, status: int, detail: str) -> None:
        """A guest connection refused before any request parsed (400/408/431 from the layer)."""
        info = self.conns.get(client.id)
        if info is None:
            return
        d = _decision(Verdict.DENY, "bad_request", detail)
        self._emit_plain(info, "http", d, {}, status=status)

    def _upstream(self, flow: http.HTTPFlow, st: FlowState) -> dict[str, Any] | None:
        sc = flow.server_conn
        if not st.upstream_ip and not sc.peername:
            return None
        peer = sc.peername or (st.upstream_ip, flow.request.port)
        address = hostport(peer[0], peer[1])
        if st.plaintext:
            return {"address": address, "tls": None, "verified": False, "plaintext": True}
        return {"address": address, "tls": sc.tls_version, "verified": bool(sc.tls_established)}

    def _guard(self, protocol: str, guest: str, key: str, value: str, ip: str) -> Decision | None:
        """The SSRF guard: a Decision denying `ip` unless a rule names `value` explicitly."""
        if not self.settings.ssrf_guard:
            return None
        cls = core.guarded_address(ip)
        if cls is None:
            return None
        if self.ctx.engine.named_by_rule(protocol, guest, key, value):
            return None
        return _decision(
            Verdict.DENY,
            "ssrf_guard",
            f"{key} {value} resolves to {cls} address {ip}; only a rule naming it may allow it",
        )

    def _is_self(self, ip: str, port: int) -> bool:
        for host, lport in self.listen_addrs:
            if lport == port and (host in (ip, "0.0.0.0", "::", "") or ip == host):
                return True
        return False

    # -- hooks ---------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        loader.add_option("proxyvm_header_size", int, self.settings.limits.header_size, "max request head bytes")
        loader.add_option("proxyvm_header_timeout", float, self.settings.timeouts.header, "request head deadline")
        layers.ON_REFUSED = self.audit_refused

    @_fail_closed("layer")
    async def next_layer(self, nl: mlayer.NextLayer) -> None:
        if nl.layer is not None:
            return
        context = nl.context
        info = self.conns.get(context.client.id)
        if info is None:
            nl.layer = layers.Reject(context)
            return
        data = nl.data_client()
        if info.honeypot is not None and honeypot.Honeypot.inside(context):
            self.honeypot.decrypted_layer(nl, info, data)
            return
        in_tunnel = any(isinstance(x, HttpLayer) for x in context.layers)
        if info.kind == "passthrough" or in_tunnel:
            await self._tunnel_layer(nl, info, data, after_connect=in_tunnel)
            return
        verdict = core.looks_like_http(data)
        if verdict is None:
            return  # wait for more bytes (the idle timeout bounds the wait)
        if verdict:
            nl.layer = layers.GuestHttpLayer(context, HTTPMode.regular)
            return
        what = "a TLS ClientHello" if starts_like_tls_record(data) else "non-HTTP bytes"
        d = _decision(Verdict.DENY, "bad_request", f"{what} on the {info.kind} HTTP listener; connection closed")
        self._emit_plain(info, "http", d, {}, status=None, first_bytes=len(data))
        nl.layer = layers.Reject(context)

    async def _tunnel_layer(self, nl: mlayer.NextLayer, info: ConnInfo, data: bytes, *, after_connect: bool) -> None:
        context = nl.context
        if not data:
            return
        deny_reason = ""
        sni = ""
        hello = None
        if not starts_like_tls_record(data):
            deny_reason = "not TLS: only TLS may pass through"
        else:
            try:
                hello = parse_client_hello(data)
            except ValueError:
                hello, deny_reason = None, "malformed TLS ClientHello"
            if hello is None and not deny_reason:
                if len(data) > MAX_CLIENT_HELLO:
                    deny_reason = "TLS ClientHello too large"
                else:
                    return  # need more
            if hello is not None:
                sni = core.normalize_host(hello.sni or "")
        qe = self._honeypot_entry(info)
        if qe is not None:
            connect = hostport(info.tunnel_host, context.server.address[1]) if after_connect else ""
            self.honeypot.start(nl, info, qe, data, hello, deny_reason, connect)
            return
        if after_connect:
            host = info.tunnel_host
            if not deny_reason and sni and sni != host:
                deny_reason = f"SNI {sni} differs from the CONNECT host {host}"
            if deny_reason:
                d = _decision(Verdict.DENY, "tunnel_check", deny_reason)
                self._emit_plain(info, "tls", d, {"sni": sni, "host": host}, status=None)
                nl.layer = layers.Reject(context)
                return
            st = info.tunnel or FlowState(info, "tls", {"sni": host, "dst": ""}, _decision(Verdict.ALLOW, "connect", ""),
                                          time.monotonic())
            nl.layer = layers.SplicedTunnel(context, functools.partial(self._tunnel_end, st))
            return
        # The passthrough listener: the ClientHello is all we know.
        request = {"sni": sni, "dst": ""}
        if deny_reason:
            d = _decision(Verdict.DENY, "tunnel_check", deny_reason)
            self._emit_plain(info, "tls", d, request, status=None)
            nl.layer = layers.Reject(context)
            return
        qt = self.ctx.quarantine
        if qt and info.guest in qt:  # quarantined (block): closed
            qe = qt[info.guest]
            self._emit_plain(info, "tls", quarantine.decision("http", info.guest, qe, "connection closed"),
                             request, status=None)
            nl.layer = layers.Reject(context)
            return
        port = info.orig_dst[1] if info.orig_dst else 443
        ip = ""
        resolve_error = ""
        if info.orig_dst:
            ip = info.orig_dst[0]
        elif sni:
            res = await self.resolver.resolve(sni)
            if res.error:
                resolve_error = res.error
            else:
                ip = res.addresses[0]
        request["dst"] = ip
        if not ip:
            reason = resolve_error or "no SNI and no original destination: nothing to decide on"
            d = _decision(Verdict.DENY, "tunnel_check", reason)
            self._emit_plain(info, "tls", d, request, status=None)
            nl.layer = layers.Reject(context)
            return
        d = self.ctx.engine.decide("tls", info.guest, request)
        if not sni and d.allowed and d.code is not ReasonCode.RULE:
            d = _decision(Verdict.DENY, "no_sni",
                          "ClientHello without SNI: only a rule allowing the address (dst) may let it pass")
        if d.allowed:
            guard = self._guard("tls", info.guest, "sni" if sni else "dst", sni or ip, ip)
            d = guard or d
        if d.allowed and self._is_self(ip, port):
            d = _decision(Verdict.DENY, "loop", f"{hostport(ip, port)} is this proxy")
        upstream = {"address": hostport(ip, port), "tls": "passthrough", "verified": False}
        st = FlowState(info, "tls", request, d, time.monotonic())
        self._emit(st, status=None, upstream=upstream)
        if not d.allowed:
            nl.layer = layers.Reject(context)
            return
        host = sni or ip
        context.server.address = (host, port)
        info.pin(host, port, ip)
        st.upstream_ip = hostport(ip, port)
        nl.layer = layers.SplicedTunnel(context, functools.partial(self._tunnel_end, st))

    def _tunnel_end(self, st: FlowState, bytes_in: int, bytes_out: int, error: str) -> None:
        """The second record of a spliced tunnel: bytes each way, duration, and why it failed."""
        self.ctx.record(  # a follow-up of the tunnel's decision: its lifetime is no request latency
            st.decision,
            guest=st.info.guest,
            src=st.info.src,
            protocol="tls",
            request=st.request,
            upstream={"address": f"{st.upstream_ip}", "tls": "passthrough", "verified": False},
            status=None,
            event="closed",
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration_ms=duration_ms(time.monotonic() - st.started),
            **({"error": error[:200]} if error else {}),
        )

    @_fail_closed("flow")
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        info = self.conns[flow.client_conn.id]
        host = core.normalize_host(flow.request.host)
        port = flow.request.port
        request = {"sni": host, "dst": ""}
        st = FlowState(info, "tls", request, _decision(Verdict.DENY, "connect", ""), time.monotonic())
        flow.metadata[MD_STATE] = st
        if info.kind != "proxy":
            st.decision = _decision(Verdict.DENY, "bad_request", f"CONNECT on the {info.kind} listener")
            flow.response = _status_text(405, "405 CONNECT is only served on the proxy listener")
            self._emit(st, status=405, upstream=None)
            return
        qt = self.ctx.quarantine
        if qt and info.guest in qt:  # quarantined: block 403; honeypot 200, TLS terminated (honeypot.py)
            qe = qt[info.guest]
            extra = self._record_tls(info, qe, {"connect": hostport(host, port)})
            if extra:
                info.tunnel_host = host  # no pin: nothing can be dialled for this tunnel
                st.decision = quarantine.decision("http", info.guest, qe, honeypot.CONNECT_ANSWER)
                self._emit(st, status=200, upstream=None, connect=hostport(host, port), **extra)
                return
            st.decision = quarantine.decision("http", info.guest, qe)
            flow.response = _status_text(403, f"403 blocked by proxyvm: {quarantine.refusal_text(info.guest, qe)}")
            self._emit(st, status=403, upstream=None, **extra)
            return
        res = await self.resolver.resolve(host)
        if res.error:
            st.decision = _decision(Verdict.DENY, "dns", res.error)
            flow.response = _status_text(502, f"502 {res.error}")
            self._emit(st, status=502, upstream=None)
            return
        ip = res.addresses[0]
        request["dst"] = ip
        d = self.ctx.engine.decide("tls", info.guest, request)
        if d.allowed:
            d = self._guard("tls", info.guest, "sni", host, ip) or d
        if d.allowed and self._is_self(ip, port):
            d = _decision(Verdict.DENY, "loop", f"{hostport(ip, port)} is this proxy")
        st.decision = d
        if not d.allowed:
            flow.response = self._deny_response(d)
            self._emit(st, status=flow.response.status_code, upstream=None)
            return
        info.pin(host, port, ip)
        info.tunnel_host = host
        upstream = {"address": hostport(ip, port), "tls": "passthrough", "verified": False}
        self._emit(st, status=200, upstream=upstream, connect=hostport(host, port))
        st.upstream_ip = hostport(ip, port)
        info.tunnel = st

    def _deny_response(self, d: Decision) -> http.Response:
        if d.code is ReasonCode.RATE_LIMITED:
            return _status_text(429, f"rate limit of proxyvm rule {d.rule} exceeded")
        if d.rule == "ssrf_guard":
            return _status_text(403, f"blocked by proxyvm rule {d.rule}: {d.detail}")
        return _status_text(403, f"blocked by proxyvm rule {d.rule}")

    @_fail_closed("flow")
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        info = self.conns[flow.client_conn.id]
        req = flow.request
        if flow.error is not None:  # mitmproxy found the request invalid; the error hook audits it
            d = _decision(Verdict.DENY, "bad_request", flow.error.msg[:200])
            flow.metadata[MD_STATE] = FlowState(info, "http", {"method": req.method, "host": req.host,
                                                               "path": core.split_path(req.path)}, d, time.monotonic())
            return
        host = core.normalize_host(req.host)
        guest_port = req.port
        path = core.split_path(req.path)
        is_ws = req.headers.get("upgrade", "").lower() == "websocket"
        protocol = "ws" if is_ws else "http"
        request = {"method": req.method, "host": host, "path": path, "port": str(guest_port)}
        qt = self.ctx.quarantine
        qe = qt.get(info.guest) if qt else None
        if qe is None and info.honeypot is not None:
            qe = info.honeypot.entry  # inside terminated TLS: never forwarded, even once released
        if qe is not None:  # quarantined: no rule applies (docs/cli.md#quarantine-and-release)
            self._quarantined(flow, info, protocol, request, qe)
            return
        d = self.ctx.engine.decide(protocol, info.guest, request)
        st = FlowState(info, protocol, request, d, time.monotonic())
        flow.metadata[MD_STATE] = st
        if not d.allowed:
            flow.response = self._deny_response(d)
            return
        if info.kind == "transparent" and info.orig_dst:
            ip = info.orig_dst[0]
        else:
            res = await self.resolver.resolve(host)
            if res.error:
                st.decision = _decision(Verdict.DENY, "dns", res.error)
                flow.response = _status_text(502, f"502 {res.error}")
                return
            ip = res.addresses[0]
        guard = self._guard(protocol, info.guest, "host", host, ip)
        plan = core.plan_upstream(None if guest_port == 80 else guest_port, plaintext=d.plaintext)
        if guard is None and self._is_self(ip, plan.port):
            guard = _decision(Verdict.DENY, "loop", f"{host} ({hostport(ip, plan.port)}) is this proxy")
        if guard is not None:
            st.decision = guard
            flow.response = self._deny_response(guard)
            return
        st.plaintext = plan.scheme == "http"
        st.upstream_ip = ip
        host_header = req.host_header
        req.scheme = plan.scheme
        req.port = plan.port
        if host_header is None or core.host_of_authority(host_header) != host:
            # RFC 9112 3.2.2: an absolute-form target's authority replaces the Host header, so the
            # origin serves exactly the host the policy decided on.
            host_header = core.authority(host, guest_port)
        req.host_header = host_header  # otherwise the guest's Host, exactly
        info.pin(host, plan.port, ip)
        self._hygiene(flow, st, is_ws)
        limit = d.limits.get("max_body") or self.settings.limits.body
        if limit:
            length = req.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                why = f"request body of {length} bytes over the {limit} byte limit"
                st.decision = (make_decision(Verdict.DENY, ReasonCode.RULE, d.rule, d.at, why)  # the rule's max_body
                               if d.limits.get("max_body") else _decision(Verdict.DENY, "limits.body", why))
                flow.response = _status_text(413, f"413 request body over the {limit} byte limit")
                return
            flow.metadata[layers.MD_BODY_LIMIT] = limit
        if is_ws:
            wl = d.limits.get("max_message") or self.settings.limits.ws_message
            flow.metadata[layers.MD_WS_LIMIT] = wl

    def _quarantined(self, flow: http.HTTPFlow, info: ConnInfo, protocol: str, request: dict[str, str],
                     qe: dict[str, Any]) -> None:
        """block: 403 now. honeypot: the body is read (bounded), then the `request` hook records the
        whole request and answers it locally; nothing goes upstream."""
        honeypot = qe.get("profile") == "honeypot"
        d = quarantine.decision("http", info.guest, qe, "answered by the local recorder" if honeypot else "")
        flow.metadata[MD_STATE] = FlowState(info, protocol, request, d, time.monotonic())
        if not honeypot:
            flow.response = _status_text(403, f"403 blocked by proxyvm: {quarantine.refusal_text(info.guest, qe)}")
            return
        flow.metadata[MD_HONEYPOT] = qe
        flow.metadata[layers.MD_BODY_LIMIT] = self.settings.limits.body or HONEYPOT_BODY_MAX
        flow.request.stream = False  # buffered (bounded): a streamed body would want an upstream

    def _honeypot_answer(self, flow: http.HTTPFlow, qe: dict[str, Any]) -> None:
        req = flow.request
        body = req.raw_content or b""
        st: FlowState = flow.metadata[MD_STATE]
        hc = st.info.honeypot
        tls_facts = {"tls": dict(hc.facts)} if hc is not None and flow.client_conn.tls_established else {}
        if tls_facts:
            req.scheme = "https"  # the transparent layer inside our TLS says http: the guest said https
        self.recorder.record(st.info.guest, qe, st.protocol, {
            "src": st.info.src, "method": req.method, "url": req.pretty_url,
            "http_version": req.http_version, "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                                                          for k, v in req.headers.fields],
            "body": body, "body_size": len(body), **tls_facts,
        })
        flow.response = http.Response.make(200, HONEYPOT_PAGE, {"content-type": "text/html; charset=utf-8"})
        self._emit(st, status=200, upstream=None, bytes_in=len(body),
                   bytes_out=len(HONEYPOT_PAGE), quarantine="honeypot", **tls_facts)

    def _honeypot_entry(self, info: ConnInfo) -> dict[str, Any] | None:
        """The quarantine entry of a honeypot guest (TLS is terminated for it), else None."""
        qt = self.ctx.quarantine
        qe = qt.get(info.guest) if qt else None
        return qe if qe is not None and qe.get("profile") == "honeypot" else None

    def _record_tls(self, info: ConnInfo, qe: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        if qe.get("profile") != "honeypot":
            return {}
        self.recorder.record(info.guest, qe, "tls", {"src": info.src, **data})
        return {"quarantine": "honeypot"}

    def _hygiene(self, flow: http.HTTPFlow, st: FlowState, is_ws: bool) -> None:
        """Drop hop-by-hop headers (one pass over the raw fields) and any X-Forwarded-For."""
        h = flow.request.headers
        fields = h.fields
        drop = set(core.HOP_BY_HOP_BYTES)
        drop.add(b"x-forwarded-for")  # never pass on what a guest claims
        close = flow.request.http_version == "HTTP/1.0"
        for k, v in fields:
            if k.lower() == b"connection":
                for token in v.split(b","):
                    token = token.strip().lower()
                    if token:
                        drop.add(token)
                    if token == b"close":
                        close = True
        st.close_guest = close
        if is_ws:
            drop.discard(b"upgrade")
            drop.discard(b"connection")
        kept = tuple((k, v) for k, v in fields if k.lower() not in drop)
        if is_ws:
            kept = tuple((k, v) for k, v in kept if k.lower() != b"connection") + ((b"Connection", b"Upgrade"),)
        if self.settings.x_forwarded_for:
            kept += ((b"X-Forwarded-For", flow.client_conn.peername[0].encode()),)
        if len(kept) != len(fields) or is_ws or self.settings.x_forwarded_for:
            h.fields = kept

    @_fail_closed("flow")
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        st: FlowState | None = flow.metadata.get(MD_STATE)
        resp = flow.response
        if st is None or resp is None:
            return
        if resp.status_code != 101:
            fields = resp.headers.fields
            kept = tuple((k, v) for k, v in fields if k.lower() not in _RESPONSE_HOP)
            if len(kept) != len(fields):
                resp.headers.fields = kept
            if st.close_guest:
                resp.headers["connection"] = "close"
        if resp.stream is True:
            resp.stream = _counter(flow, layers.MD_BYTES_OUT)

    @_fail_closed("flow")
    async def response(self, flow: http.HTTPFlow) -> None:
        st: FlowState | None = flow.metadata.get(MD_STATE)
        if st is None or flow.response is None:
            return
        self._capture(flow, st)  # forensic capture of a denied or quarantined flow (protocols.capture)
        if flow.request.method == "CONNECT":
            return  # audited at http_connect
        resp = flow.response
        bytes_in = flow.metadata.get(layers.MD_BYTES_IN)
        if bytes_in is None:
            bytes_in = len(flow.request.raw_content or b"")
        bytes_out = flow.metadata.get(layers.MD_BYTES_OUT)
        if bytes_out is None:
            bytes_out = len(resp.raw_content or b"")
        upstream = self._upstream(flow, st) if flow.server_conn.timestamp_start else None
        if flow.request.timestamp_end is None and flow.request.stream:
            # The origin answered before the guest finished sending (nginx `return` does): the
            # record waits for the `request` hook so bytes_in is the whole body.
            st.pending = {"status": resp.status_code, "upstream": upstream, "bytes_out": bytes_out}
            st.info.waiting[id(st)] = (st, flow)
            return
        self._emit(st, status=resp.status_code, upstream=upstream, bytes_in=bytes_in, bytes_out=bytes_out)

    def _capture(self, flow: http.HTTPFlow, st: FlowState) -> None:
        """The guest's request (head and bounded body, as received) and the response it got from
        us, for a flow that was denied, would be, or is a quarantined guest's."""
        cap = self.ctx.capture
        if cap is None or not cap.wanted(st.decision.verdict, st.info.guest in self.ctx.quarantine):
            return
        from mitmproxy.net.http.http1 import assemble

        req, resp, client = flow.request, flow.response, flow.client_conn
        if resp is None or not client.peername:
            return
        # the request line as the guest sent it: absolute-form to the explicit proxy listener
        target = req.authority if req.method == "CONNECT" else req.url if st.info.kind == "proxy" else req.path
        head = f"{req.method} {target} {req.http_version}\r\n".encode("latin-1", "replace") + bytes(req.headers) + b"\r\n"
        try:  # a body the proxy never read (denied at the headers) is not there to keep
            sent = head + (req.raw_content or b"")[:FLOW_MAX]
            got = assemble.assemble_response_head(resp) + (resp.raw_content or b"")[:FLOW_MAX]
        except (ValueError, AttributeError):  # streamed bodies are not kept: the heads only
            sent, got = head, assemble.assemble_response_head(resp)
        now = time.time()
        local = st.info.orig_dst or client.sockname
        cap.flow(st.info.guest, st.protocol if st.protocol != "tls" else "http", "tcp", client.peername, local,
                 [(req.timestamp_start or now, IN, sent), (resp.timestamp_start or now, OUT, got)],
                 start=client.timestamp_start)

    @_fail_closed("flow")
    async def request(self, flow: http.HTTPFlow) -> None:
        st: FlowState | None = flow.metadata.get(MD_STATE)
        qe = flow.metadata.get(MD_HONEYPOT)
        if qe is not None and flow.response is None:
            self._honeypot_answer(flow, qe)
            return
        if st is not None and st.pending is not None:
            pending, st.pending = st.pending, None
            st.info.waiting.pop(id(st), None)
            self._emit(st, bytes_in=flow.metadata.get(layers.MD_BYTES_IN, 0), **pending)

    def connection_closed(self, info: ConnInfo) -> None:
        """The guest connection ended: write the records still waiting for a request body that
        never finished (the guest aborted the upload after the origin had answered)."""
        for st, flow in list(info.waiting.values()):
            if st.pending is not None:
                pending, st.pending = st.pending, None
                self._emit(st, bytes_in=flow.metadata.get(layers.MD_BYTES_IN, 0),
                           error="guest aborted the request body", **pending)
        info.waiting.clear()

    @_fail_closed("flow")
    async def error(self, flow: http.HTTPFlow) -> None:
        st: FlowState | None = flow.metadata.get(MD_STATE)
        if st is None or st.audited:
            return
        msg = flow.error.msg if flow.error else "error"
        status = flow.metadata.get(layers.MD_STATUS) or flow.metadata.get(layers.MD_INVALID)
        extra: dict[str, Any] = {}
        if status in (400, 502) and layers.MD_INVALID in flow.metadata:
            extra["error"] = msg[:200]
        elif status is None:
            if flow.response is not None or "client disconnected" in msg.lower() or msg == "killed":
                status = None
                extra["error"] = msg[:200]
            else:
                failure = core.classify_upstream_error(msg)
                status = 502
                extra["error"] = core.cause_text(failure)
                extra["cause"] = str(failure)
        upstream = self._upstream(flow, st) if flow.server_conn.timestamp_start else None
        self._emit(
            st,
            status=status,
            upstream=upstream,
            bytes_in=flow.metadata.get(layers.MD_BYTES_IN, 0),
            bytes_out=flow.metadata.get(layers.MD_BYTES_OUT, 0),
            **extra,
        )

    @_fail_closed("flow")
    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        st: FlowState | None = flow.metadata.get(MD_STATE)
        ws = flow.websocket
        if st is None or ws is None:
            return
        info = st.info
        bytes_in = flow.metadata.get(layers.MD_BYTES_IN, 0)
        bytes_out = flow.metadata.get(layers.MD_BYTES_OUT, 0)
        self.ctx.record(  # a follow-up of the upgrade's decision: its lifetime is no request latency
            st.decision,
            guest=info.guest,
            src=info.src,
            protocol="ws",
            request=st.request,
            upstream=self._upstream(flow, st),
            status=flow.metadata.get(layers.MD_STATUS, 101),
            event="closed",
            close_code=ws.close_code,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration_ms=duration_ms(time.monotonic() - st.started),
        )
        self.traffic["ws_closed"] += 1
        self.traffic["bytes_in"] += int(bytes_in or 0)
        self.traffic["bytes_out"] += int(bytes_out or 0)

    @_fail_closed("server")
    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        info = self.conns.get(data.client.id)
        addr = data.server.address
        if info is None or addr is None:
            data.server.error = "no guest connection"
            return
        host, port = core.normalize_host(str(addr[0])), int(addr[1])
        ip = info.pins.get((host, port))
        if ip is None:
            # Only addresses validated by a decision are ever dialled (no system resolver behind our back).
            data.server.error = f"no validated address for {hostport(host, port)}"
            return
        info.restore[data.server.id] = (str(addr[0]), port)
        data.server.address = (ip, port)

    def _restore_address(self, data: server_hooks.ServerConnectionHookData) -> None:
        info = self.conns.get(data.client.id)
        addr = info.restore.pop(data.server.id, None) if info is not None else None
        if addr is not None:
            # Keep mitmproxy's connection reuse keyed on the host name (so SNI and reuse agree).
            # `Server.__setattr__` refuses address changes on an open connection to stop addons from
            # believing they redirected it; here the socket already goes where the decision said.
            data.server.__dict__["address"] = addr

    @_fail_closed("server")
    async def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore_address(data)

    @_fail_closed("server")
    async def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore_address(data)

    @_fail_closed("tls")
    async def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        assert isinstance(server, connection.Server)
        sni = server.sni
        if not sni:
            tls_start.ssl_conn = None  # no name to verify: refuse (mitmproxy then closes)
            return
        conn = SSL.Connection(self.ssl_context())
        param = SSL._lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
        SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, SSL._lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)  # type: ignore[attr-defined]
        try:
            ip = ipaddress.ip_address(sni).packed
        except ValueError:
            name = sni.encode("idna")
            conn.set_tlsext_host_name(name)
            ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))  # type: ignore[attr-defined]
        else:
            ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))  # type: ignore[attr-defined]
        if ok != 1:
            tls_start.ssl_conn = None
            return
        conn.set_alpn_protos([b"http/1.1"])
        server.alpn_offers = (b"http/1.1",)
        conn.set_connect_state()
        tls_start.ssl_conn = conn

    async def tls_established_server(self, data: tls.TlsData) -> None:
        return None  # tls_version/established are read from the connection at audit time

    # Client TLS is only ever started for a honeypot guest (honeypot.Honeypot.start).
    @_fail_closed("tls")
    async def tls_start_client(self, tls_start: tls.TlsData) -> None:
        info = self.conns.get(tls_start.context.client.id)
        tls_start.ssl_conn = self.honeypot.ssl_conn(info) if info is not None else None

    @_fail_closed("tls")
    async def tls_established_client(self, data: tls.TlsData) -> None:
        info = self.conns.get(data.context.client.id)
        if info is not None:
            self.honeypot.handshake(info, data.context.client)

    @_fail_closed("tls")
    async def tls_failed_client(self, data: tls.TlsData) -> None:
        info = self.conns.get(data.context.client.id)
        if info is not None:
            self.honeypot.handshake(info, data.context.client, data.context.client.error or "handshake failed")


def _counter(flow: http.HTTPFlow, key: str) -> Callable[[bytes], bytes]:
    md = flow.metadata
    md[key] = 0

    def count(chunk: bytes) -> bytes:
        md[key] += len(chunk)
        return chunk

    return count
