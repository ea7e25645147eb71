"""The console lab: a real `proxyvm run` with `admin.console: true` (and, when given an upstream,
the DNS service in front of the DNS lab's real Unbound), plus a small HTTP client that keeps
cookies the way a browser does (per name, sent back on /console paths)."""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM

ADMIN_IP = "127.0.3.1"
GUEST_IP = "127.0.0.1"
OTHER_IP = "127.0.0.2"
RULES = """\
mode: enforce
default: allow
rules:
  - id: deny-blocked
    action: deny
    protocol: dns
    guests: [web1]
    match: {qname: ["blocked.lab.test"]}
  - id: allow-lab
    action: allow
    protocol: dns
    match: {qname: ["*.lab.test"]}
"""


def write_lab(d: Path, *, ca: Path | None = None, upstream: Any = None, extra: str = "",
              admin_extra: str = "console: true, token_file: token") -> tuple[ProxyVM, str, int]:
    """Config + rules + token in `d`; returns (ProxyVM, token, dns port or 0)."""
    os.chmod(d, 0o755)  # workers drop privileges after binding
    token = secrets.token_hex(32)
    tok = d / "token"
    tok.write_text(token + "\n")
    os.chmod(tok, 0o600)
    (d / "rules.yaml").write_text(RULES)
    admin = free_port(ADMIN_IP)
    dns_port = 0
    text = textwrap.dedent(f"""\
        guests:
          web1: {{addresses: [{GUEST_IP}]}}
          web2: {{addresses: [{OTHER_IP}]}}
        policy: rules.yaml
        audit: {{path: audit.jsonl}}
        admin: {{listen: "{ADMIN_IP}:{admin}", {admin_extra}}}
        state_dir: state
        """)
    if upstream is not None:
        dns_port = free_port(ADMIN_IP)
        text += textwrap.dedent(f"""\
            dns:
              listen: ["{ADMIN_IP}:{dns_port}"]
              ca_file: {ca}
              dnssec: off
              upstreams:
                - {{address: "{upstream.address}:853", name: {upstream.name}}}
            """)
    cfg = d / "proxyvm.yaml"
    cfg.write_text(text + extra)
    return ProxyVM(cfg), token, dns_port


class Client:
    """HTTP/1.1 to the admin listener, one connection per request (it closes after each)."""

    def __init__(self, base: str) -> None:
        m = re.match(r"http://([^:/]+):(\d+)", base)
        assert m
        self.host, self.port = m.group(1), int(m.group(2))
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: bytes | dict[str, str] | None = None,
                headers: dict[str, str] | None = None, cookies: bool = True) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        if isinstance(body, dict):
            body = urlencode(body).encode()
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        if cookies and self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            for k, v in r.getheaders():
                if k.lower() == "set-cookie" and cookies:
                    name, _, rest = v.partition("=")
                    value = rest.split(";", 1)[0]
                    if "Max-Age=0" in v:
                        self.cookies.pop(name, None)
                    else:
                        self.cookies[name] = value
            hdrs["set-cookie"] = "\n".join(v for k, v in r.getheaders() if k.lower() == "set-cookie")
            return r.status, hdrs, data
        finally:
            c.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)

    def json(self, path: str, **kw: Any) -> Any:
        status, _, body = self.get(path, **kw)
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def login(self, token: str, name: str = "alice") -> tuple[int, dict[str, str], bytes]:
        status, _, page = self.get("/console/login")
        assert status == 200
        csrf = re.search(rb'name="csrf" value="([^"]+)"', page)
        assert csrf, page[:500]
        return self.request("POST", "/console/login", {"csrf": csrf.group(1).decode(), "name": name, "token": token})

    def csrf(self) -> str:
        return self.json("/console/api/session")["csrf"]
