"""The HTTP service against real nginx, with curl as the guest."""

from __future__ import annotations

import asyncio
import re
import ssl

import pytest

from policy import load_policy
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP, curl, eventually, raw_exchange

pytestmark = pytest.mark.lab


def proxy(r) -> list[str]:
    return ["-x", f"http://{PROXY_IP}:{r.port('proxy')}"]


def transparent(r, host: str = "www.lab.test") -> list[str]:
    # The guest "thinks" it talks to host:80; --connect-to lands it on the transparent listener.
    return ["--connect-to", f"{host}:80:{PROXY_IP}:{r.port('transparent')}"]


async def test_transparent_request_leaves_as_tls_with_sni(svc) -> None:
    res = await curl(*transparent(svc), "http://www.lab.test/echo?token=s3cret")
    assert res.status == 200, res
    assert "ssl=TLSv1.3 sni=www.lab.test" in res.body
    assert "host=www.lab.test " in res.body  # Host preserved
    line = [x for x in svc.lab.log("main").splitlines() if "/echo?token=s3cret" in x][-1]
    assert "ssl=TLSv1.3 sni=www.lab.test host=www.lab.test" in line
    rec = svc.records(protocol="http", status=200)[-1]
    assert rec["guest"] == "web1" and rec["src"].startswith(GUEST_IP + ":")
    assert rec["verdict"] == "allow" and rec["rule"] == "lab-web" and rec["at"].endswith("rules.yaml:4")
    assert rec["request"] == {"method": "GET", "host": "www.lab.test", "path": "/echo", "port": "80"}
    assert "s3cret" not in repr(rec)  # the query string never reaches the audit
    assert rec["upstream"] == {"address": "127.0.7.10:443", "tls": "TLSv1.3", "verified": True}
    assert rec["bytes_out"] == len(res.body) and rec["bytes_in"] == 0
    assert rec["duration_ms"] >= 0


async def test_explicit_proxy_upgrades_and_strips_hop_by_hop(svc) -> None:
    res = await curl(
        *proxy(svc), "http://www.lab.test/echo",
        "-H", "Proxy-Authorization: Basic Z3Vlc3Q6cGFzcw==", "-H", "X-Forwarded-For: 10.9.9.9",
        "-H", "Keep-Alive: timeout=5", "-H", "TE: trailers",
    )
    assert res.status == 200, res
    assert "ssl=TLSv1.3 sni=www.lab.test" in res.body
    assert "proxyauth= " in res.body  # never forwarded
    assert "xff= " in res.body  # neither ours nor the guest's claim
    assert "keepalive= te= " in res.body
    assert "conn= " in res.body


async def test_absolute_form_host_header_follows_the_uri(svc) -> None:
    # RFC 9112 3.2.2: the request-target's authority wins; the decision and the origin see one host.
    res = await curl(*proxy(svc), "http://www.lab.test/echo", "-H", "Host: other.lab.test")
    assert res.status == 200 and "host=www.lab.test " in res.body, res


async def test_x_forwarded_for_only_when_configured(make_service) -> None:
    r = await make_service(x_forwarded_for=True)
    res = await curl(*proxy(r), "http://www.lab.test/echo", "-H", "X-Forwarded-For: 10.9.9.9")
    assert f"xff={GUEST_IP} " in res.body, res.body


async def test_untrusted_upstream_502_names_cause(svc) -> None:
    before = svc.lab.log("untrusted")
    res = await curl(*proxy(svc), "http://untrusted.lab.test/private")
    assert res.status == 502
    assert "upstream certificate untrusted" in res.body
    assert svc.lab.log("untrusted") == before  # the handshake failed: no request ever reached it
    rec = svc.records(protocol="http", status=502)[-1]
    assert rec["cause"] == "untrusted"


async def test_name_mismatch_502(svc) -> None:
    res = await curl(*proxy(svc), "http://mismatch.lab.test/")
    assert res.status == 502 and "upstream certificate name mismatch" in res.body, res


async def test_plaintext_only_upstream_502_nothing_in_clear(svc) -> None:
    before = len(svc.lab.log("plain"))
    res = await curl(*transparent(svc, "plain.lab.test"), "http://plain.lab.test/secret-path")
    assert res.status == 502
    assert "upstream does not speak TLS" in res.body
    log = await eventually(lambda: svc.lab.log("plain")[before:])
    assert "secret-path" not in log and "GET" not in log  # only the TLS ClientHello arrived
    assert log and all(line.endswith("port=443") for line in log.splitlines())  # nothing ever on port 80


async def test_plaintext_rule_is_the_only_way_out_in_clear(make_service) -> None:
    rules = """\
default: deny
rules:
  - id: legacy
    action: allow
    protocol: http
    match: {host: [plain.lab.test]}
    plaintext: true
"""
    r = await make_service(rules=rules)
    res = await curl(*proxy(r), "http://plain.lab.test/legacy")
    assert res.status == 200 and res.body == "plain\n", res
    rec = r.records(status=200)[-1]
    assert rec["upstream"]["plaintext"] is True and rec["upstream"]["tls"] is None
    assert rec["upstream"]["address"] == "127.0.7.12:80"


async def test_deny_403_text_names_rule(svc) -> None:
    res = await curl(*transparent(svc), "-i", "http://www.lab.test/echo", "-H", "Host: other.lab.test")
    assert res.status == 403
    assert res.body.endswith("\r\n\r\nblocked by proxyvm rule default\n")
    assert re.search(r"(?i)content-type: text/plain", res.body)
    rec = svc.records(verdict="deny")[-1]
    assert rec["status"] == 403 and rec["request"]["host"] == "other.lab.test"


async def test_rule_guests_other_guest_denied(svc) -> None:
    # curl from an address that is not web1: guest "unknown", not covered by lab-web
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.7.3",
        *proxy(svc), "http://www.lab.test/echo", stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert out == b"403"
    assert svc.records(guest="unknown")[-1]["verdict"] == "deny"


async def test_rate_limit_429(make_service) -> None:
    rules = """\
default: deny
rules:
  - id: slow
    action: allow
    protocol: http
    match: {host: [www.lab.test]}
    rate: 2/minute
"""
    r = await make_service(rules=rules)
    codes = [(await curl(*proxy(r), "http://www.lab.test/echo")).status for _ in range(3)]
    assert codes == [200, 200, 429]
    assert r.records(status=429)[-1]["verdict"] == "deny"


async def test_monitor_mode_audits_would_deny_and_forwards(make_service) -> None:
    rules = """\
mode: monitor
default: deny
rules:
  - id: no-delete
    action: deny
    protocol: http
    match: {method: [DELETE]}
  - id: lab-web
    action: allow
    protocol: http
    match: {host: [www.lab.test]}
"""
    r = await make_service(rules=rules)
    res = await curl(*proxy(r), "-X", "DELETE", "http://www.lab.test/echo")
    assert res.status == 200 and "method=DELETE" in res.body
    rec = r.records(verdict="would_deny")[-1]
    assert rec["rule"] == "no-delete" and rec["status"] == 200
    # the SSRF guard is not policy: it still refuses a loopback host no rule names, even in monitor mode
    assert (await curl(*proxy(r), "http://ws.lab.test/echo")).status == 403


async def test_ssrf_guard_denies_internal_unless_named(make_service) -> None:
    rules = """\
default: deny
rules:
  - id: anything
    action: allow
    protocol: http
    match: {host: ["*"]}
"""
    r = await make_service(rules=rules)
    res = await curl(*proxy(r), "http://www.lab.test/echo")
    assert res.status == 403 and "ssrf_guard" in res.body and "loopback" in res.body, res
    res = await curl(*proxy(r), "http://169.254.169.254/latest/meta-data/")
    assert res.status == 403 and "cloud metadata" in res.body, res
    assert not r.records(status=200)


async def test_connect_passthrough_guest_sees_nginx_certificate(svc) -> None:
    # Only the lab CA is trusted by curl: success proves the certificate is nginx's own, untouched.
    res = await curl(*proxy(svc), "--cacert", str(svc.lab.ca_pem), "https://www.lab.test/echo")
    assert res.status == 200 and "ssl=TLSv1.3 sni=www.lab.test" in res.body
    ctx = ssl.create_default_context(cafile=str(svc.lab.ca_pem))
    reader, writer = await asyncio.open_connection(PROXY_IP, svc.port("proxy"), local_addr=(GUEST_IP, 0))
    writer.write(b"CONNECT www.lab.test:443 HTTP/1.1\r\nHost: www.lab.test:443\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await writer.start_tls(ctx, server_hostname="www.lab.test")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    lab_cert = ssl.PEM_cert_to_DER_cert((svc.lab.dir / "ca" / "main.crt").read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    assert der == lab_cert
    rec = svc.records(protocol="tls", status=200)[-1]
    assert rec["request"] == {"sni": "www.lab.test", "dst": "127.0.7.10"} and rec["rule"] == "lab-tls"
    closed = await eventually(lambda: len(svc.records(protocol="tls", event="closed")) >= 2
                              and svc.records(protocol="tls", event="closed"))
    assert all(c["bytes_in"] > 200 and c["bytes_out"] > 500 for c in closed)  # ClientHello / certificate
    assert closed[-1]["upstream"]["address"] == "127.0.7.10:443"


async def test_connect_denied_403_and_sni_mismatch_closed(svc) -> None:
    res = await curl(*proxy(svc), "--cacert", str(svc.lab.ca_pem), "https://untrusted.lab.test/")
    assert res.rc != 0 and "403" in res.stderr, res
    # CONNECT to an allowed host but a ClientHello for another name: closed, audited.
    ctx = ssl.create_default_context(cafile=str(svc.lab.ca_pem))
    ctx.check_hostname = False
    reader, writer = await asyncio.open_connection(PROXY_IP, svc.port("proxy"), local_addr=(GUEST_IP, 0))
    writer.write(b"CONNECT www.lab.test:443 HTTP/1.1\r\nHost: www.lab.test:443\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await writer.start_tls(ctx, server_hostname="evil.example")
    writer.close()
    assert "differs from the CONNECT host" in svc.records(rule="tunnel_check")[-1]["reason"]


async def test_passthrough_by_sni_spliced(svc) -> None:
    res = await curl(
        "--connect-to", f"www.lab.test:443:{PROXY_IP}:{svc.port('passthrough')}",
        "--cacert", str(svc.lab.ca_pem), "https://www.lab.test/echo",
    )
    assert res.status == 200 and "sni=www.lab.test" in res.body
    res = await curl(
        "--connect-to", f"ws.lab.test:443:{PROXY_IP}:{svc.port('passthrough')}",
        "--cacert", str(svc.lab.ca_pem), "https://ws.lab.test/echo",
    )
    assert res.rc != 0  # no tls rule names ws.lab.test: closed before any byte reaches nginx
    assert svc.records(protocol="tls", verdict="deny")[-1]["request"]["sni"] == "ws.lab.test"


async def test_passthrough_client_hello_without_sni_denied(svc) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        reader, writer = await asyncio.open_connection(
            PROXY_IP, svc.port("passthrough"), ssl=ctx, server_hostname=None, local_addr=(GUEST_IP, 0)
        )
        writer.close()
    rec = svc.records(protocol="tls")[-1]
    assert rec["verdict"] == "deny" and rec["request"]["sni"] == ""
    # the listener is still up
    res = await curl("--connect-to", f"www.lab.test:443:{PROXY_IP}:{svc.port('passthrough')}",
                     "--cacert", str(svc.lab.ca_pem), "https://www.lab.test/echo")
    assert res.status == 200


async def test_passthrough_non_tls_closed(svc) -> None:
    out = await raw_exchange(svc.addr("passthrough"), b"GET / HTTP/1.1\r\nHost: www.lab.test\r\n\r\n")
    assert out == b""
    assert "not TLS" in svc.records(protocol="tls")[-1]["reason"]


async def test_body_limit_413(make_service) -> None:
    rules = """\
default: deny
rules:
  - id: small
    action: allow
    protocol: http
    match: {host: [www.lab.test], max_body: 1000}
"""
    r = await make_service(rules=rules)
    res = await curl(*proxy(r), "http://www.lab.test/upload", "--data-binary", "x" * 500)
    assert res.status == 200 and res.body == "got 500\n"
    res = await curl(*proxy(r), "http://www.lab.test/upload", "--data-binary", "x" * 5000)
    assert res.status == 413 and "limit" in res.body
    res = await curl(*proxy(r), "http://www.lab.test/upload", "-H", "Transfer-Encoding: chunked",
                     "--data-binary", "x" * 5000)
    assert res.status == 413
    assert len(r.records(status=413)) == 2


async def test_large_body_streamed_both_ways(svc) -> None:
    res = await curl(*proxy(svc), "http://www.lab.test/files/10m.bin", "-o", "/dev/null")
    assert res.status == 200
    rec = svc.records(status=200)[-1]
    assert rec["bytes_out"] == 10 * 1024 * 1024
    res = await curl(*proxy(svc), "http://www.lab.test/upload", "--data-binary", "@" + str(svc.lab.dir / "files" / "10m.bin"))
    assert res.body == f"got {10 * 1024 * 1024}\n"
    # nginx answers before reading the body; the record is written once the guest's body has ended
    recs = await eventually(
        lambda: svc.records(status=200, request={"method": "POST", "host": "www.lab.test", "path": "/upload", "port": "80"})
    )
    assert recs[-1]["bytes_in"] == 10 * 1024 * 1024


async def test_tls_below_1_2_refused(svc) -> None:
    # the legacy peer really speaks TLS 1.1 (checked with openssl), yet the proxy will not
    hello = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", "127.0.7.13:443", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0",
        "-servername", "legacy.lab.test", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await hello.communicate()
    assert b"Protocol  : TLSv1.1" in out or b"TLSv1.1" in out
    res = await curl(*proxy(svc), "http://legacy.lab.test/")
    assert res.status == 502 and "upstream TLS handshake failed" in res.body, res
    assert "legacy.lab.test" not in svc.lab.log("legacy")


async def test_drain_finishes_in_flight_and_refuses_new(svc) -> None:
    via = proxy(svc)
    download = asyncio.create_task(curl(*via, "--limit-rate", "4M", "http://www.lab.test/files/10m.bin",
                                        "-o", "/dev/null"))
    await asyncio.sleep(0.5)
    await svc.service.drain(10.0)
    res = await download
    assert res.status == 200 and res.rc == 0  # the in-flight body arrived whole
    late = await curl(*via, "http://www.lab.test/echo")
    assert late.status == 0  # nothing accepts any more
    assert svc.records(status=200, request={"method": "GET", "host": "www.lab.test", "path": "/files/10m.bin",
                                            "port": "80"})[-1]["bytes_out"] == 10 * 1024 * 1024


async def test_reload_keeps_open_connections(svc, tmp_path) -> None:
    from websockets.asyncio.client import connect

    host, port = svc.addr("transparent")
    async with connect("ws://ws.lab.test/ws", host=host, port=port, local_addr=(GUEST_IP, 0),
                       compression=None) as conn:
        await conn.send("before")
        assert await conn.recv() == "before"
        p = tmp_path / "strict.yaml"
        p.write_text("default: deny\nrules: []\n")
        await svc.service.reload(svc.settings, load_policy(p))
        await conn.send("after")
        assert await conn.recv() == "after"  # the established WebSocket survives the reload
    assert (await curl(*proxy(svc), "http://www.lab.test/echo")).status == 403  # new requests: new policy


async def test_hook_failure_fails_closed(svc) -> None:
    class BrokenEngine:
        """A fake: the real Engine never raises for a request; this stands in for a bug in a hook."""

        def decide(self, *args: object) -> None:
            raise RuntimeError("boom")

    svc.service.ctx.engine = BrokenEngine()
    before = len(svc.lab.log("main"))
    res = await curl(*proxy(svc), "http://www.lab.test/echo")
    assert res.status == 500 and "fail closed" in res.body
    res = await curl(*proxy(svc), "--cacert", str(svc.lab.ca_pem), "https://www.lab.test/echo")
    assert res.rc != 0  # CONNECT refused as well
    assert len(svc.lab.log("main")) == before  # nothing left the proxy
    assert svc.service.health()["hook_failures"] == 2


async def test_aborted_upload_after_early_answer_is_still_audited(svc) -> None:
    # nginx answers /upload before reading the body; the guest then gives up half-way
    reader, writer = await asyncio.open_connection(PROXY_IP, svc.port("proxy"), local_addr=(GUEST_IP, 0))
    writer.write(b"POST http://www.lab.test/upload HTTP/1.1\r\nHost: www.lab.test\r\n"
                 b"Content-Length: 10000000\r\n\r\n" + b"x" * 3_000_000)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    rec = await eventually(lambda: svc.records(error="guest aborted the request body"), timeout=5)
    assert rec[-1]["status"] == 200 and 0 < rec[-1]["bytes_in"] <= 3_000_000


async def test_http10_and_connection_close_guests(svc) -> None:
    res = await curl(*transparent(svc), "--http1.0", "http://www.lab.test/echo")
    assert res.status == 200 and "sni=www.lab.test" in res.body
    started = asyncio.get_running_loop().time()
    out = await raw_exchange(svc.addr("transparent"),
                             b"GET /echo HTTP/1.1\r\nHost: www.lab.test\r\nConnection: close\r\n\r\n", wait=5)
    assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out.lower()
    assert asyncio.get_running_loop().time() - started < 3  # the proxy closed it, as the guest asked


async def test_closed_upstream_port_502(svc) -> None:
    res = await curl(*proxy(svc), "http://www.lab.test:8444/echo")  # explicit port: https://www.lab.test:8444
    assert res.status == 502 and "cannot connect to upstream" in res.body, res
    rec = svc.records(status=502)[-1]
    assert rec["cause"] == "connect_failed" and rec["request"]["port"] == "8444"
