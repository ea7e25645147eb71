"""Bad input from guests: a protocol-correct answer (or a close), an audit record, and the listener
stays up. Each case is sent with a raw socket; the follow-up curl proves the listener survived."""

from __future__ import annotations

import asyncio

import pytest

from protocols.http.settings import LimitSettings, TimeoutSettings
from tests.protocols.http.conftest import PROXY_IP, curl, raw_exchange

pytestmark = pytest.mark.lab


async def still_serving(r, kind: str = "transparent") -> None:
    port = r.port(kind)
    if kind == "transparent":
        res = await curl("--connect-to", f"www.lab.test:80:{PROXY_IP}:{port}", "http://www.lab.test/echo")
    else:
        res = await curl("-x", f"http://{PROXY_IP}:{port}", "http://www.lab.test/echo")
    assert res.status == 200, res


def status_of(raw: bytes) -> int:
    line = raw.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"GET /\r\n\r\n", id="no-http-version"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: www.lab.test\r\nBad Header\r\n\r\n", id="header-without-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: www.lab.test\r\nContent-Length: x\r\n\r\n", id="bad-content-length"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: www.lab.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            id="smuggling-cl-te",
        ),
        pytest.param(b"GET /\x00 HTTP/1.1\r\nHost: www.lab.test\r\n\r\n", id="nul-in-target"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n", id="undecodable-host"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-prior-knowledge"),
    ],
)
@pytest.mark.parametrize("kind", ["transparent", "proxy"])
async def test_malformed_request_400(svc, payload: bytes, kind: str) -> None:
    before = len(svc.lab.log("main"))
    out = await raw_exchange(svc.addr(kind), payload)
    assert status_of(out) == 400, out[:300]
    assert b"content-type: text/plain" in out.lower()
    assert len(svc.lab.log("main")) == before  # nothing reached the origin
    rec = svc.records(status=400)[-1]  # and every refusal is audited
    assert rec["verdict"] == "deny" and rec["rule"] == "bad_request", rec
    await still_serving(svc, kind)


async def test_malformed_request_is_audited(svc) -> None:
    await raw_exchange(svc.addr("transparent"), b"GET /\r\n\r\n")
    rec = svc.records(status=400)[-1]
    assert rec["verdict"] == "deny" and rec["rule"] == "bad_request" and rec["guest"] == "web1"


async def test_oversize_headers_431(make_service) -> None:
    r = await make_service(limits=LimitSettings(header_size=4096))
    big = b"GET /echo HTTP/1.1\r\nHost: www.lab.test\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    out = await raw_exchange(r.addr("transparent"), big)
    assert status_of(out) == 431, out[:200]
    # an endless head that never ends also stops at the limit (not buffered forever)
    out = await raw_exchange(r.addr("proxy"), b"GET http://www.lab.test/ HTTP/1.1\r\nX: " + b"b" * 10000)
    assert status_of(out) == 431
    assert len(r.records(status=431)) == 2
    await still_serving(r)


async def test_slowloris_headers_408(make_service) -> None:
    r = await make_service(timeouts=TimeoutSettings(header=0.5, idle=5.0))
    reader, writer = await asyncio.open_connection(*r.addr("transparent"), local_addr=("127.0.7.2", 0))
    writer.write(b"GET /echo HTTP/1.1\r\nHost: www.lab.test\r\n")
    answer = asyncio.create_task(reader.read(65536))
    for _ in range(30):  # one header byte every 0.1 s: never idle, never finished
        if answer.done():
            break
        writer.write(b"X")
        await writer.drain()
        await asyncio.sleep(0.1)
    async with asyncio.timeout(3):
        out = await answer
    writer.close()
    assert status_of(out) == 408, out
    await still_serving(r)


async def test_idle_client_closed(make_service) -> None:
    r = await make_service(timeouts=TimeoutSettings(header=5.0, idle=0.5))
    reader, writer = await asyncio.open_connection(*r.addr("proxy"), local_addr=("127.0.7.2", 0))
    async with asyncio.timeout(5):
        assert await reader.read(100) == b""  # closed by the proxy, not by us
    writer.close()
    await still_serving(r, "proxy")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00\x01\x02\x03garbage\r\n\r\n", id="binary"),
        pytest.param(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", id="tls-hello-on-80"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", id="ssh-banner"),
    ],
)
async def test_non_http_bytes_on_port_80_closed_and_audited(svc, payload: bytes) -> None:
    out = await raw_exchange(svc.addr("transparent"), payload)
    assert out == b""
    rec = svc.records(rule="bad_request")[-1]
    assert "connection closed" in rec["reason"] and rec["guest"] == "web1"
    await still_serving(svc)


async def test_connect_on_transparent_listener_405(svc) -> None:
    out = await raw_exchange(svc.addr("transparent"), b"CONNECT www.lab.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(out) == 405
    await still_serving(svc)


async def test_missing_host_400(svc) -> None:
    out = await raw_exchange(svc.addr("transparent"), b"GET /echo HTTP/1.1\r\n\r\n")
    assert status_of(out) == 400
    await still_serving(svc)


async def test_connection_limit(make_service) -> None:
    r = await make_service(limits=LimitSettings(connections=2))
    held = [await asyncio.open_connection(*r.addr("proxy")) for _ in range(2)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(*r.addr("proxy"))
    async with asyncio.timeout(3):
        assert await reader.read(10) == b""
    writer.close()
    assert r.service.refused >= 1
    for _, w in held:
        w.close()
    await asyncio.sleep(0.2)
    await still_serving(r, "proxy")


async def test_header_clock_starts_at_the_first_byte_of_each_head(make_service) -> None:
    r = await make_service(timeouts=TimeoutSettings(header=0.5, idle=5.0))
    reader, writer = await asyncio.open_connection(*r.addr("transparent"), local_addr=("127.0.7.2", 0))
    req = b"GET /echo HTTP/1.1\r\nHost: www.lab.test\r\n\r\n"
    for _ in range(2):  # idle keep-alive pauses longer than the header timeout are not slowloris
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        await asyncio.sleep(1.0)
    writer.close()


async def test_endless_upstream_response_head_is_cut_off(make_service, lab, tmp_path) -> None:
    """A fake upstream (nginx cannot send an endless header block): the proxy answers 502 once
    the head passes its limit instead of buffering it forever."""
    import ssl

    cert, key = lab.ca.issue(["huge.lab.test"], stem="huge")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            while sent < 50_000_000:
                line = b"X-Pad: " + b"a" * 8000 + b"\r\n"
                writer.write(line)
                sent += len(line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    server = await asyncio.start_server(endless, "127.0.7.14", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    rules = "default: deny\nrules:\n  - {id: huge, action: allow, protocol: http, match: {host: [huge.lab.test]}}\n"
    r = await make_service(rules=rules, hosts=(("huge.lab.test", ("127.0.7.14",)),),
                           limits=LimitSettings(header_size=16 * 1024))
    try:
        res = await curl("-x", f"http://{PROXY_IP}:{r.port('proxy')}", f"http://huge.lab.test:{port}/")
        assert res.status == 502 and "response head over" in res.body, res
        assert sent < 5_000_000  # cut off early, not after buffering tens of MB
    finally:
        server.close()


async def test_refusal_audit_never_quotes_the_request(svc) -> None:
    out = await raw_exchange(svc.addr("transparent"), b"GET /x?token=s3cret HTTP/1.1 junk\r\nHost: a\r\n\r\n")
    assert status_of(out) == 400
    rec = svc.records(status=400)[-1]
    assert "s3cret" not in repr(rec) and rec["reason"] == "malformed request: bad request line"
