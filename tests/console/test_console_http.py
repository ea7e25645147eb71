"""The console over real HTTP against a real `proxyvm run -c CONFIG`: what answers without the
token (only /healthz, /metrics and the login form), login (wrong/missing token, the limiter, the
session cookie's attributes, the `kind: console` records), CSRF on every POST (missing, forged,
another session's, another origin), quarantine/release audited with who, oversized query
strings, filters with regex metacharacters, a guest name with HTML in it, and the config rules
(a non-loopback admin listener needs a token; the console needs a token file, 0600, 16+ chars).
The DNS part (dig through the DNS service while 1,000 event streams are opened) needs the DNS lab."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.console.lab import ADMIN_IP, GUEST_IP, Client, write_lab
from tests.protocols.dns.conftest import lab_ca, lab_dir, needs_peers, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig

HTML_GUEST = '<img src=x onerror="alert(1)">'


@pytest.fixture
def console(tmp_path: Path):
    (tmp_path / "state").mkdir()
    # a quarantine table naming a guest with HTML in it (kept by the supervisor; shown as text)
    (tmp_path / "state" / "quarantine.json").write_text(json.dumps({"version": 1, "guests": {
        HTML_GUEST: {"profile": "block", "reason": "<script>alert(2)</script>", "by": "cli", "since": "x"}}}))
    pvm, token, _ = write_lab(tmp_path)
    pvm.start()
    try:
        yield pvm, token
    finally:
        pvm.stop()


def test_without_token_only_healthz_and_metrics(console) -> None:
    pvm, token = console
    c = Client(pvm.admin)
    assert c.get("/healthz")[0] == 200
    assert c.get("/metrics")[0] == 200
    for path in ("/console/", "/console/audit", "/console/guest?name=web1", "/console/health",
                 "/console/static/app.js"):
        status, h, _ = c.get(path)
        assert status == 303 and h["location"] == "/console/login", (path, status)
    for path in ("/console/api/overview", "/console/api/audit", "/console/api/guest?name=web1",
                 "/console/api/health", "/console/api/session", "/console/api/events"):
        assert c.get(path)[0] == 401, path
    assert c.request("POST", "/console/api/quarantine", {"guest": "web1"})[0] == 401
    assert c.get("/console/api/overview", headers={"Authorization": "Bearer " + "0" * 64})[0] == 401
    assert c.get("/console/api/overview", headers={"Authorization": "Basic " + token})[0] == 401
    # the login form and its stylesheet are public; neither carries the token
    status, h, page = c.get("/console/login")
    assert status == 200 and token.encode() not in page
    assert "frame-ancestors 'none'" in h["content-security-policy"] and h["x-content-type-options"] == "nosniff"
    assert c.get("/console/static/style.css")[0] == 200
    assert c.get("/console/api/overview", headers={"Authorization": "Bearer " + token})[0] == 200


def test_login_session_and_logout(console) -> None:
    pvm, token = console
    c = Client(pvm.admin)
    status, h, _ = c.login("wrong-" + token)
    assert status == 401 and "pvm_session" not in c.cookies
    status, _, _ = c.login("", name="alice")
    assert status == 401
    status, h, _ = c.login(token, name="<b>alice</b>")  # a name is letters, digits, . _ @ -
    assert status == 400 and "pvm_session" not in c.cookies
    status, h, _ = c.login(token, name="alice")
    assert status == 303 and h["location"] == "/console/"
    cookie = [x for x in h["set-cookie"].split("\n") if x.startswith("pvm_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    s = c.json("/console/api/session")
    assert s["who"] == "alice@127.0.0.1" and len(s["csrf"]) >= 40
    for path in ("/console/", "/console/api/overview", "/console/api/health", "/console/api/audit"):
        status, _, body = c.get(path)
        assert status == 200 and token.encode() not in body, path
    # logout needs the CSRF token too, then the session is gone
    assert c.request("POST", "/console/logout", {"csrf": "forged"})[0] == 403
    assert c.request("POST", "/console/logout", {"csrf": s["csrf"]})[0] == 303
    assert c.get("/console/api/overview")[0] == 401

    recs = pvm.wait_audit(lambda r: r.get("kind") == "console" and r["request"]["event"] == "logout")
    kinds = [(r["request"]["event"], r.get("user")) for r in pvm.audit_records() if r.get("kind") == "console"]
    assert kinds == [("login_refused", "alice@127.0.0.1"), ("login_refused", "alice@127.0.0.1"),
                     ("login", "alice@127.0.0.1"), ("logout", "alice@127.0.0.1")], kinds
    assert recs["by"] == "console"
    assert token not in pvm.audit_path.read_text()  # a refused token is never recorded either
    assert 'proxyvm_console_logins_total{result="refused"} 2.0' in pvm.metrics()


def test_login_limiter_and_login_csrf(console) -> None:
    pvm, token = console
    c = Client(pvm.admin)
    # the login form's own CSRF: no pvm_login cookie (a form posted from another site) -> 403
    status, _, _ = c.request("POST", "/console/login", {"csrf": "x", "name": "mallory", "token": token}, cookies=False)
    assert status == 403
    for _ in range(5):
        assert c.login("nope" * 8, name="mallory")[0] == 401
    status, _, page = c.login(token, name="mallory")  # even the right token: wait a minute
    assert status == 429 and b"Too many" in page
    assert c.get("/healthz")[0] == 200


def test_csrf_on_every_post_and_actions_audited(console) -> None:
    pvm, token = console
    a, b = Client(pvm.admin), Client(pvm.admin)
    assert a.login(token, "alice")[0] == 303 and b.login(token, "bob")[0] == 303
    csrf_a, csrf_b = a.csrf(), b.csrf()
    form = {"guest": "web1", "profile": "block", "reason": "beacon"}
    assert a.request("POST", "/console/api/quarantine", form)[0] == 403  # none
    assert a.request("POST", "/console/api/quarantine", {**form, "csrf": "A" * 43})[0] == 403  # forged
    assert a.request("POST", "/console/api/quarantine", {**form, "csrf": csrf_b})[0] == 403  # bob's
    assert a.request("POST", "/console/api/quarantine", form, headers={"X-CSRF-Token": csrf_a[:-1]})[0] == 403
    assert a.request("POST", "/console/api/quarantine", {**form, "csrf": csrf_a},
                     headers={"Origin": "http://evil.example"})[0] == 403
    assert not [r for r in pvm.audit_records() if r.get("kind") == "quarantine" and r["guest"] == "web1"]

    status, _, body = a.request("POST", "/console/api/quarantine", {**form, "csrf": csrf_a})
    assert status == 200, body
    q = pvm.wait_audit(lambda r: r.get("kind") == "quarantine" and r["guest"] == "web1")
    assert q["by"] == "console" and q["user"] == "alice@127.0.0.1" and q["profile"] == "block"
    assert "beacon" in q["reason"]
    # the same as the CLI sees it
    table = json.loads((pvm.config.parent / "state" / "quarantine.json").read_text())["guests"]
    assert table["web1"]["by"] == "console" and table["web1"]["user"] == "alice@127.0.0.1"
    status, _, body = a.request("POST", "/console/api/quarantine", {**form, "csrf": csrf_a})
    assert status == 409 and b"already quarantined" in body
    status, _, body = b.request("POST", "/console/api/release", {"guest": "web1", "reason": "clean", "csrf": csrf_b})
    assert status == 200, body
    r = pvm.wait_audit(lambda r: r.get("kind") == "release" and r["guest"] == "web1")
    assert r["by"] == "console" and r["user"] == "bob@127.0.0.1"
    status, _, body = b.request("POST", "/console/api/quarantine",
                                {"guest": "nosuch", "csrf": csrf_b, "profile": "block"})
    assert status == 400 and b"no guest named" in body
    # bearer (a script): no cookie, no CSRF needed, audited as the token
    status, _, _ = Client(pvm.admin).request("POST", "/console/api/quarantine", {"guest": "web2"},
                                             headers={"Authorization": "Bearer " + token}, cookies=False)
    assert status == 200
    q2 = pvm.wait_audit(lambda r: r.get("kind") == "quarantine" and r["guest"] == "web2")
    assert q2["user"] == "token@127.0.0.1"
    big = {"guest": "web1", "csrf": csrf_a, "reason": "x" * 10_000}
    assert a.request("POST", "/console/api/quarantine", big)[0] == 413


def _raw(pvm, data: bytes, timeout: float = 5) -> bytes:
    host, port = pvm.admin.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def test_oversized_and_odd_requests(console) -> None:
    pvm, token = console
    bearer = {"Authorization": "Bearer " + token}
    c = Client(pvm.admin)
    status, _, body = c.get("/console/api/audit?text=" + "a" * 3000, headers=bearer)
    assert status == 414, body
    out = _raw(pvm, b"GET /console/api/audit?text=" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not out.startswith(b"HTTP/1.1 200")
    assert c.get("/console/api/audit?text=" + "a" * 201, headers=bearer)[0] == 400
    assert c.get("/console/api/audit?limit=lots", headers=bearer)[0] == 400
    assert c.get("/console/api/events?view=everything", headers=bearer)[0] == 400
    assert c.request("PUT", "/console/api/quarantine", b"", headers=bearer)[0] == 405
    out = _raw(pvm, b"POST /console/api/release HTTP/1.1\r\nAuthorization: Bearer " + token.encode() +
               b"\r\nContent-Length: 100\r\n\r\nguest=web1", timeout=10)
    assert out.startswith(b"HTTP/1.1 400"), out[:100]  # the body never came: refused after 5 s
    assert pvm.healthz()[0] == 200


def test_filters_with_regex_metacharacters(console) -> None:
    pvm, token = console
    bearer = {"Authorization": "Bearer " + token}
    c = Client(pvm.admin)
    assert c.request("POST", "/console/api/quarantine", {"guest": "web1", "reason": "seen a.*(b[ and ${x}"},
                     headers=bearer, cookies=False)[0] == 200
    for text, want in ((".*(b[", 1), ("${x}", 1), ("a.*(B[", 1), (".+", 0), ("(?i)", 0), ("\\", 0), ("[", 1)):
        got = c.json("/console/api/audit?" + "text=" + __import__("urllib.parse").parse.quote(text), headers=bearer)
        assert len(got["records"]) == want, (text, got)
    for rule in ("deny-.*", "[", "(", "*"):
        got = c.json("/console/api/audit?rule=" + __import__("urllib.parse").parse.quote(rule), headers=bearer)
        assert got["records"] == [], rule


def test_guest_name_with_html(console) -> None:
    pvm, token = console
    bearer = {"Authorization": "Bearer " + token}
    c = Client(pvm.admin)
    status, h, body = c.get("/console/api/overview", headers=bearer)
    assert status == 200 and h["content-type"] == "application/json"
    names = [g["name"] for g in json.loads(body)["guests"]]
    assert names == ["unknown", "web1", "web2", HTML_GUEST]  # data, not markup: the page sets textContent
    from urllib.parse import quote
    status, h, body = c.get("/console/guest?name=" + quote(HTML_GUEST), headers=bearer)
    assert status == 200 and b"<img" not in body and b"onerror" not in body  # nothing reflected
    status, h, body = c.get("/console/api/guest?name=" + quote("<script>x</script>"), headers=bearer)
    assert status == 404 and h["content-type"] == "application/json" and h["x-content-type-options"] == "nosniff"
    assert json.loads(body)["error"] == "no guest named '<script>x</script>'"
    # metrics never get a label outside config guests + unknown
    assert "onerror" not in pvm.metrics()


def _check(d: Path, admin: str) -> subprocess.CompletedProcess[str]:
    cfg = d / "c.yaml"
    cfg.write_text(f"admin: {admin}\n")
    return subprocess.run([sys.executable, "-m", "proxyvm", "check", "-c", str(cfg)], capture_output=True,
                          text=True, timeout=60)


def test_config_rules(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("f" * 32 + "\n")
    os.chmod(tok, 0o600)
    r = _check(tmp_path, '{listen: "0.0.0.0:9700"}')
    assert r.returncode != 0
    assert re.search(r"c\.yaml:1:\d+: admin listen address '0\.0\.0\.0:9700' is not a loopback address and "
                     r"admin\.token_file is not set", r.stderr + r.stdout), r.stderr
    r = _check(tmp_path, '{listen: "[::]:9700"}')
    assert r.returncode != 0 and "not a loopback address" in r.stderr + r.stdout
    assert _check(tmp_path, '{listen: "0.0.0.0:9700", token_file: tok}').returncode == 0
    assert _check(tmp_path, '{listen: "127.0.0.1:9700"}').returncode == 0
    r = _check(tmp_path, '{listen: "127.0.0.1:9700", console: true}')
    assert r.returncode != 0 and "console: true needs admin.token_file" in r.stderr + r.stdout
    r = _check(tmp_path, '{listen: "127.0.0.1:9700", console: yes-please, token_file: tok}')
    assert r.returncode != 0 and "expected true or false" in r.stderr + r.stdout
    os.chmod(tok, 0o644)
    r = _check(tmp_path, '{listen: "127.0.0.1:9700", console: true, token_file: tok}')
    assert r.returncode != 0 and "others can read the token" in r.stderr + r.stdout
    os.chmod(tok, 0o600)
    tok.write_text("short\n")
    r = _check(tmp_path, '{listen: "127.0.0.1:9700", console: true, token_file: tok}')
    assert r.returncode != 0 and "at least 16" in r.stderr + r.stdout and "short" not in r.stderr + r.stdout
    r = _check(tmp_path, '{listen: "127.0.0.1:9700", console: true, token_file: missing}')
    assert r.returncode != 0 and "does not exist" in r.stderr + r.stdout


def test_run_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'admin: {{listen: "0.0.0.0:{19000 + os.getpid() % 1000}"}}\naudit: {{path: a.jsonl}}\n'
                   "state_dir: state\n")
    r = subprocess.run([sys.executable, "-m", "proxyvm", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "not a loopback address" in r.stderr + r.stdout


def test_console_off_is_404(tmp_path: Path) -> None:
    pvm, token, _ = write_lab(tmp_path, admin_extra="token_file: token")
    with pvm:
        c = Client(pvm.admin)
        assert c.get("/console/", headers={"Authorization": "Bearer " + token})[0] == 404
        assert c.get("/console/login")[0] == 404
        assert c.get("/healthz")[0] == 200


# -- with the DNS service and real dig ---------------------------------------------------------
async def _open_stream(host: str, port: int, token: str) -> tuple[bytes, asyncio.StreamWriter | None]:
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError as e:
        return f"connect: {e}".encode(), None
    w.write(f"GET /console/api/events?view=overview HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
            .encode())
    await w.drain()
    try:
        line = await asyncio.wait_for(r.readline(), 20)
    except (TimeoutError, ConnectionError) as e:
        return f"read: {e}".encode(), w
    return line, w


@needs_peers
@pytest.mark.lab
async def test_thousand_event_streams_proxy_unaffected(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    pvm, token, port = write_lab(tmp_path, ca=lab_ca.ca_pem, upstream=upstream1)
    await asyncio.to_thread(pvm.start)
    writers = []
    try:
        before = await dig(ADMIN_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        assert before.status == "NOERROR" and before.answers[0][3] == "192.0.2.10"
        host, p = pvm.admin.rsplit("/", 1)[1].rsplit(":", 1)
        results = await asyncio.gather(*(_open_stream(host, int(p), token) for _ in range(1000)))
        writers = [w for _, w in results if w is not None]
        statuses = [line.split(b" ")[1] if line.startswith(b"HTTP/1.1 ") else line for line, _ in results]
        ok, busy = statuses.count(b"200"), statuses.count(b"503")
        assert ok == 32 and busy == 968, {s: statuses.count(s) for s in set(statuses)}
        # with 1,000 connections open: guests are answered, the admin endpoint too
        t0 = time.monotonic()
        during = await dig(ADMIN_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        assert during.status == "NOERROR" and time.monotonic() - t0 < 2
        code, _ = await asyncio.to_thread(pvm.healthz)
        assert code == 200
        assert "proxyvm_console_event_streams 32.0" in await asyncio.to_thread(pvm.metrics)
        rec = await asyncio.to_thread(pvm.wait_audit, lambda r: r.get("protocol") == "dns" and
                                      r["request"]["qname"] == "www.lab.test" and r["seq"] > 2)
        assert rec["guest"] == "web1"
    finally:
        for w in writers:
            w.close()
        await asyncio.to_thread(pvm.stop)
    m = pvm.tail(200_000)
    assert "Traceback" not in m, m[-3000:]
