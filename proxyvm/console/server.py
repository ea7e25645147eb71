"""The operator console's routes on the admin listener (docs/configuration.md#admin, README
"Operator console").

Owns: the `/console` routes, the token check (`admin.token_file`, compared in constant time), the
sessions (cookie `pvm_session`, `HttpOnly; SameSite=Strict`, bounded, idle and absolute expiry),
the CSRF token every POST carries (one per session; the login form has its own, double-submitted
with a `pvm_login` cookie), the login limiter, the event streams (server-sent events, capped),
and the `kind: console` audit records (login, logout, refused logins).
Must not: render secrets (the token is never sent back, records are shown cut down by
`proxyvm.console.feed`), answer anything but `/console/login` and the login page's stylesheet
without a token, or change the quarantine table except through `proxyvm.quarantine`
(`by: console` and the operator's name).

A script presents `Authorization: Bearer TOKEN` (GETs and POSTs; a bearer request carries no
ambient credential, so it needs no CSRF token). A browser logs in with the token and a name (who
it is, for the audit records) and gets a session cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from proxyvm.console.feed import FILTER_TEXT_MAX, Feed, RecordQuery, clean

log = logging.getLogger("proxyvm")

STATIC = Path(__file__).parent / "static"
COOKIE = "pvm_session"
LOGIN_COOKIE = "pvm_login"
MAX_QUERY = 2048  # bytes of query string; more is refused with 414
MAX_BODY = 8192
MAX_SESSIONS = 64
SESSION_IDLE = 3600.0
SESSION_MAX = 12 * 3600.0
MAX_STREAMS = 32  # open event streams at once; more get 503
STREAM_TICK = 1.0
STREAM_MAX_AGE = 600.0  # a stream ends after this (EventSource reconnects)
LOGIN_FAILURES = 5  # refused logins per peer per LOGIN_WINDOW before 429
LOGIN_WINDOW = 60.0
MAX_PEERS_TRACKED = 1024
OPERATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
PAGES = {"/console/": "index.html", "/console/audit": "audit.html", "/console/guest": "guest.html",
         "/console/health": "health.html"}
ASSETS = {"/console/static/style.css": ("style.css", "text/css; charset=utf-8"),
          "/console/static/app.js": ("app.js", "text/javascript; charset=utf-8")}
PUBLIC_ASSETS = {"/console/static/style.css"}
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n"
    "Cache-Control: no-store\r\n"
)
REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
           414: "URI Too Long", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def read_token(path: Path) -> bytes:
    text = path.read_bytes().decode("utf-8").strip("\r\n")
    if not text:
        raise ValueError(f"admin token file {path} is empty")
    return text.encode()


def token_matches(expected: bytes, given: str | bytes) -> bool:
    """Constant time in the content and the length of both (each is hashed first)."""
    g = given.encode("utf-8", "replace") if isinstance(given, str) else given
    return hmac.compare_digest(hashlib.sha256(expected).digest(), hashlib.sha256(g).digest())


@dataclass(slots=True)
class Session:
    sid: str
    csrf: str
    who: str  # "alice@127.0.0.1"
    created: float
    seen: float


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    peer: str
    body: bytes = b""
    cookies: dict[str, str] = field(default_factory=dict)


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.by_id: dict[str, Session] = {}

    def create(self, who: str) -> Session:
        now = self.clock()
        self.expire()
        while len(self.by_id) >= MAX_SESSIONS:  # the oldest goes
            oldest = min(self.by_id.values(), key=lambda s: s.created)
            del self.by_id[oldest.sid]
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), who, now, now)
        self.by_id[s.sid] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self.by_id.get(sid)
        if s is None:
            return None
        now = self.clock()
        if now - s.seen > SESSION_IDLE or now - s.created > SESSION_MAX:
            del self.by_id[sid]
            return None
        s.seen = now
        return s

    def drop(self, sid: str) -> None:
        self.by_id.pop(sid, None)

    def expire(self) -> None:
        now = self.clock()
        for sid, s in list(self.by_id.items()):
            if now - s.seen > SESSION_IDLE or now - s.created > SESSION_MAX:
                del self.by_id[sid]


class LoginLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.failures: dict[str, list[float]] = {}

    def blocked(self, peer: str) -> bool:
        now = self.clock()
        times = [t for t in self.failures.get(peer, ()) if now - t < LOGIN_WINDOW]
        if times:
            self.failures[peer] = times
        else:
            self.failures.pop(peer, None)
        return len(times) >= LOGIN_FAILURES

    def failed(self, peer: str) -> None:
        if len(self.failures) >= MAX_PEERS_TRACKED and peer not in self.failures:
            self.failures.pop(next(iter(self.failures)))
        self.failures.setdefault(peer, []).append(self.clock())


def parse_cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k and k not in out:
            out[k] = v
    return out


def parse_query(text: str) -> dict[str, str]:
    if len(text.encode()) > MAX_QUERY:
        raise Refused(414, f"query string longer than {MAX_QUERY} bytes")
    try:
        q = parse_qs(text, keep_blank_values=True, max_num_fields=32, strict_parsing=False)
    except ValueError:
        raise Refused(400, "too many query parameters") from None
    return {k: v[0] for k, v in q.items()}


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        if sep:
            headers.setdefault(k.strip().lower(), v.strip())
    path, _, query = target.partition("?")
    return method, path, query, headers


class Console:
    """`sup` is the Supervisor (health, config, quarantine, write_audit)."""

    def __init__(self, sup: Any, token: bytes, feed: Feed) -> None:
        self.sup = sup
        self.token = token
        self.feed = feed
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self.streams = 0
        self.rules: list[dict[str, Any]] = []
        self.logins: Any = None
        registry = getattr(getattr(sup, "metrics", None), "registry", None)
        if registry is not None:
            from prometheus_client import Counter, Gauge

            self.logins = Counter("proxyvm_console_logins", "Console logins", ["result"], registry=registry)
            g = Gauge("proxyvm_console_event_streams", "Console event streams open", registry=registry)
            g.set_function(lambda: self.streams)

    # -- routing ------------------------------------------------------------------------------
    @staticmethod
    def owns(path: str) -> bool:
        return path == "/console" or path.startswith("/console/")

    async def handle(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_ip = str(peer[0]) if peer else "?"
        try:
            method, path, query, headers = parse_head(head)
            req = Request(method, path, parse_query(query), headers, peer_ip,
                          cookies=parse_cookies(headers.get("cookie", "")))
            if method == "POST":
                req.body = await self._body(reader, headers)
            elif method not in ("GET", "HEAD"):
                raise Refused(405, "only GET, HEAD and POST")
            await self._route(req, writer)
        except Refused as e:
            await self._json(writer, e.status, {"error": str(e)})
        except ValueError:
            await self._json(writer, 400, {"error": "bad request"})

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            raise Refused(400, "bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise Refused(413, f"request body over {MAX_BODY} bytes")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise Refused(400, "chunked bodies are not accepted")
        try:
            return await asyncio.wait_for(reader.readexactly(n), 5) if n else b""
        except (TimeoutError, asyncio.IncompleteReadError):
            raise Refused(400, "incomplete body") from None

    async def _route(self, req: Request, w: asyncio.StreamWriter) -> None:
        p = req.path
        if p == "/console":
            return await self._redirect(w, "/console/")
        if p == "/console/login":
            return await (self._login(req, w) if req.method == "POST" else self._login_page(req, w))
        if p in PUBLIC_ASSETS:
            name, ctype = ASSETS[p]
            return await self._send(w, 200, ctype, (STATIC / name).read_bytes(), req.method)
        who, session = self._auth(req)
        if who is None:
            if p.startswith("/console/api/") or req.method == "POST":
                raise Refused(401, "log in at /console/login or send Authorization: Bearer TOKEN")
            return await self._redirect(w, "/console/login")
        if req.method == "POST":
            self._check_csrf(req, session)
            if p == "/console/logout":
                if session is not None:
                    self.sessions.drop(session.sid)
                    self._audit_console("logout", f"console logout by {session.who}", session.who, req.peer)
                return await self._redirect(w, "/console/login", clear=True)
            if p == "/console/api/quarantine":
                return await self._quarantine(req, w, who, release=False)
            if p == "/console/api/release":
                return await self._quarantine(req, w, who, release=True)
            raise Refused(404, "no such action")
        if p in PAGES:
            return await self._send(w, 200, "text/html; charset=utf-8", (STATIC / PAGES[p]).read_bytes(), req.method)
        if p in ASSETS:
            name, ctype = ASSETS[p]
            return await self._send(w, 200, ctype, (STATIC / name).read_bytes(), req.method)
        api = {
            "/console/api/session": lambda: {"who": who, "csrf": session.csrf if session else None},
            "/console/api/overview": self.overview,
            "/console/api/health": lambda: self.sup.health()[1],
            "/console/api/audit": lambda: self.audit(req.query),
            "/console/api/guest": lambda: self.guest(req.query.get("name", "")),
        }
        if p in api:
            return await self._json(w, 200, api[p](), req.method)
        if p == "/console/api/events":
            return await self._events(req, w, session)
        raise Refused(404, "not found")

    # -- auth ---------------------------------------------------------------------------------
    def _auth(self, req: Request) -> tuple[str | None, Session | None]:
        auth = req.headers.get("authorization", "")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and token_matches(self.token, value.strip()):
                return f"token@{req.peer}", None
            raise Refused(401, "wrong token")
        s = self.sessions.get(req.cookies.get(COOKIE))
        return (s.who, s) if s is not None else (None, None)

    def _check_csrf(self, req: Request, session: Session | None) -> None:
        if session is None:
            return  # bearer: no cookie, nothing a foreign page could make the browser send
        given = req.headers.get("x-csrf-token") or self._form(req).get("csrf", "")
        if not given or not hmac.compare_digest(given.encode(), session.csrf.encode()):
            raise Refused(403, "missing or wrong CSRF token")
        origin = req.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != req.headers.get("host", ""):
            raise Refused(403, f"request from another origin ({clean(origin, 80)})")

    @staticmethod
    def _form(req: Request) -> dict[str, str]:
        ctype = req.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                data = json.loads(req.body or b"{}")
            except ValueError:
                raise Refused(400, "body is not JSON") from None
            if not isinstance(data, dict):
                raise Refused(400, "body is not a JSON object")
            return {str(k): str(v) for k, v in data.items() if isinstance(v, str | int)}
        try:
            q = parse_qs(req.body.decode("utf-8"), keep_blank_values=True, max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "bad form body") from None
        return {k: v[0] for k, v in q.items()}

    async def _login_page(self, req: Request, w: asyncio.StreamWriter, error: str = "", status: int = 200) -> None:
        pre = secrets.token_urlsafe(24)
        page = (STATIC / "login.html").read_text()
        page = page.replace("{{csrf}}", pre).replace("{{error}}", error)  # error: our own fixed texts
        cookie = f"{LOGIN_COOKIE}={pre}; Path=/console/login; HttpOnly; SameSite=Strict"
        await self._send(w, status, "text/html; charset=utf-8", page.encode(), req.method, cookies=[cookie])

    async def _login(self, req: Request, w: asyncio.StreamWriter) -> None:
        form = self._form(req)
        pre = req.cookies.get(LOGIN_COOKIE, "")
        if not pre or not hmac.compare_digest(form.get("csrf", "").encode(), pre.encode()):
            return await self._login_page(req, w, "The login form expired; try again.", 403)
        if self.limiter.blocked(req.peer):
            self._count("throttled")
            return await self._login_page(req, w, "Too many refused logins from this address; wait a minute.", 429)
        name = form.get("name", "").strip()
        if not OPERATOR.match(name):
            return await self._login_page(req, w, "Give your name (letters, digits, . _ @ -; up to 64).", 400)
        if not token_matches(self.token, form.get("token", "").strip()):
            self.limiter.failed(req.peer)
            self._count("refused")
            self._audit_console("login_refused", f"console login refused for {name} from {req.peer}: wrong token",
                                f"{name}@{req.peer}", req.peer)
            return await self._login_page(req, w, "Wrong token.", 401)
        s = self.sessions.create(f"{name}@{req.peer}")
        self._count("ok")
        self._audit_console("login", f"console login by {s.who}", s.who, req.peer)
        cookie = f"{COOKIE}={s.sid}; Path=/console; HttpOnly; SameSite=Strict"
        clear = f"{LOGIN_COOKIE}=; Path=/console/login; Max-Age=0; HttpOnly; SameSite=Strict"
        await self._redirect(w, "/console/", cookies=[cookie, clear])

    def _count(self, result: str) -> None:
        if self.logins is not None:
            self.logins.labels(result).inc()

    def _audit_console(self, event: str, reason: str, who: str, peer: str) -> None:
        try:
            self.sup.write_audit([{
                "kind": "console", "guest": None, "src": peer, "protocol": "proxyvm", "verdict": None, "rule": None,
                "at": "console", "reason": reason, "request": {"event": event}, "upstream": None,
                "by": "console", "user": who,
            }])
            self.sup.audit.flush()
        except Exception:  # noqa: BLE001 - the log line below still says it
            log.exception("console: could not audit %s", event)
        (log.warning if event == "login_refused" else log.info)("console: %s", reason)

    # -- actions ------------------------------------------------------------------------------
    async def _quarantine(self, req: Request, w: asyncio.StreamWriter, who: str, release: bool) -> None:
        from proxyvm.quarantine import QuarantineError

        q = self.sup.quarantine
        if q is None:
            raise Refused(503, "quarantine is not running")
        form = self._form(req)
        guest = form.get("guest", "")
        reason = form.get("reason", "").strip()
        if not guest:
            raise Refused(400, "no guest named")
        try:
            if release:
                entry = q.release(guest, reason, "console", who)
            else:
                entry = q.quarantine(guest, form.get("profile", "block"), reason, "console", who)
        except QuarantineError as e:
            raise Refused(409 if e.exit_code == 1 else 400, str(e)) from None
        except OSError as e:
            raise Refused(500, f"cannot write the quarantine table: {e.strerror}") from None
        await self._json(w, 200, {"ok": True, "guest": guest, "released" if release else "entry": entry})

    # -- data ---------------------------------------------------------------------------------
    def _quarantine_table(self) -> dict[str, dict[str, Any]]:
        q = self.sup.quarantine
        return dict(q.table) if q is not None else {}

    def overview(self) -> dict[str, Any]:
        now = int(time.time())
        table = self._quarantine_table()
        guests = []
        names = list(self.feed.guests) + [g for g in table if g not in self.feed.guests]
        for name in names:
            st = self.feed.guests.get(name)
            g = self.feed.guest_summary(name, st, now) if st is not None else {
                "name": name, "rate": {}, "allowed": 0, "denied": 0, "alerts": 0, "series": [], "by_protocol": {}}
            g["name"] = clean(name, 80)
            g["quarantine"] = _qview(table.get(name))
            guests.append(g)
        ok, health = self.sup.health()
        return {"seq": self.feed.last_seq, "ok": ok, "guests": guests, "policy_mode": health.get("policy_mode"),
                "services": {k: v.get("state") for k, v in health.get("services", {}).items()}}

    def audit(self, query: dict[str, str]) -> dict[str, Any]:
        flt = record_query(query)
        try:
            limit = max(1, min(500, int(query.get("limit") or 200)))
        except ValueError:
            raise Refused(400, "limit is a number") from None
        return {"seq": self.feed.last_seq, "records": self.feed.records(flt, limit)}

    def guest(self, name: str) -> dict[str, Any]:
        table = self._quarantine_table()
        st = self.feed.guests.get(name)
        if st is None and name not in table:
            raise Refused(404, f"no guest named {clean(name, 80)!r}")
        now = int(time.time())
        out: dict[str, Any] = {"name": clean(name, 80), "quarantine": _qview(table.get(name)),
                               "known": name in self.feed.guests}
        if st is not None:
            out.update(self.feed.guest_summary(name, st, now))
            out["name"] = clean(name, 80)
            out["destinations"] = [[clean(d, 120), n] for d, n in
                                   sorted(st.destinations.items(), key=lambda kv: -kv[1])[:20]]
            out["denials"] = list(reversed(st.last_denials))
            out["alerts_recent"] = list(reversed(st.last_alerts))
        det = getattr(getattr(self.sup, "quarantine", None), "detectors", None)
        base = det.baseline(name) if det is not None else None
        if base is not None and "named" in base:
            base["named"] = [clean(d, 120) for d in base["named"]]
        out["baseline"] = base
        out["rules"] = [r for r in self.rules if r["guests"] is None or name in r["guests"]]
        out["policy_file"] = str(getattr(self.sup.config, "policy_file", ""))
        return out

    def load_rules(self) -> None:
        """Rules and where they are in the file (at start and after every reload)."""
        from policy import load_policy

        cfg = self.sup.config
        try:
            path = getattr(self.sup, "policy_path", None) or cfg.policy_file  # a fleet bundle in force
            engine = load_policy(path, guests=frozenset(cfg.guests))
        except Exception as e:  # noqa: BLE001 - the console shows no rules rather than failing
            log.error("console: cannot read the rules for the guest pages: %s", e)
            return
        self.rules = [{"id": clean(r.id, 80), "action": str(getattr(r.action, "value", r.action)),
                       "protocol": r.protocol, "guests": sorted(r.guests) if r.guests is not None else None,
                       "file": r.file, "line": r.line, "at": r.at, "comment": clean(r.comment, 200)}
                      for r in engine.rules]

    # -- events -------------------------------------------------------------------------------
    async def _events(self, req: Request, w: asyncio.StreamWriter, session: Session | None) -> None:
        if self.streams >= MAX_STREAMS:
            raise Refused(503, f"{MAX_STREAMS} event streams are open already; try again later")
        view = req.query.get("view", "overview")
        if view not in ("overview", "audit", "guest", "health"):
            raise Refused(400, "view is overview, audit, guest or health")
        flt = record_query(req.query) if view == "audit" else None
        self.streams += 1
        try:
            w.write(("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + SECURITY_HEADERS +
                     "Connection: close\r\n\r\nretry: 2000\n\n").encode())
            await w.drain()
            started = time.monotonic()
            last_seq = -1
            after = flt.after if flt else 0
            while time.monotonic() - started < STREAM_MAX_AGE:
                if session is not None and self.sessions.get(session.sid) is None:
                    w.write(b"event: logout\ndata: {}\n\n")
                    await w.drain()
                    return
                payload: Any = None
                if view == "overview":
                    payload = self.overview()
                elif view == "health":
                    payload = self.sup.health()[1]
                elif view == "guest":
                    try:
                        payload = self.guest(req.query.get("name", ""))
                    except Refused as e:
                        payload = {"error": str(e)}
                elif flt is not None and self.feed.last_seq != last_seq:
                    last_seq = self.feed.last_seq
                    recs = self.feed.records(RecordQuery(**{**_fields(flt), "after": after}), 200)
                    if recs:
                        after = max(r["seq"] or 0 for r in recs)
                    payload = {"seq": last_seq, "records": recs}
                if payload is not None:
                    w.write(b"data: " + json.dumps(payload, default=str).encode() + b"\n\n")
                else:
                    w.write(b": idle\n\n")
                await asyncio.wait_for(w.drain(), 10)
                stopping = getattr(self.sup, "stopping", None)
                if stopping is None:
                    await asyncio.sleep(STREAM_TICK)
                else:  # streams end when the supervisor stops
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), STREAM_TICK)
                    if stopping.is_set():
                        return
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:  # the loop shutting down: nothing to tell the client
            return
        finally:
            self.streams -= 1

    # -- replies ------------------------------------------------------------------------------
    async def _json(self, w: asyncio.StreamWriter, status: int, body: Any, method: str = "GET") -> None:
        await self._send(w, status, "application/json", json.dumps(body, default=str).encode() + b"\n", method)

    async def _redirect(self, w: asyncio.StreamWriter, to: str, cookies: list[str] | None = None,
                        clear: bool = False) -> None:
        cookies = list(cookies or [])
        if clear:
            cookies.append(f"{COOKIE}=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict")
        await self._send(w, 303, "text/plain", b"", extra=f"Location: {quote(to, safe='/?=&')}\r\n", cookies=cookies)

    @staticmethod
    async def _send(w: asyncio.StreamWriter, status: int, ctype: str, body: bytes, method: str = "GET",
                    extra: str = "", cookies: list[str] | None = None) -> None:
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n{SECURITY_HEADERS}{extra}"
                + "".join(f"Set-Cookie: {c}\r\n" for c in cookies or ())
                + "Connection: close\r\n\r\n")
        w.write(head.encode())
        if method != "HEAD":
            w.write(body)
        await w.drain()


def _qview(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {k: clean(entry.get(k), 200) for k in ("profile", "since", "by", "user", "reason") if entry.get(k)}


def _fields(q: RecordQuery) -> dict[str, Any]:
    return {k: getattr(q, k) for k in RecordQuery.__slots__}


def record_query(query: dict[str, str]) -> RecordQuery:
    vals = {}
    for k in ("guest", "protocol", "verdict", "rule", "kind", "text"):
        v = query.get(k, "")
        if len(v) > FILTER_TEXT_MAX:
            raise Refused(400, f"filter {k} is longer than {FILTER_TEXT_MAX} characters")
        vals[k] = v
    try:
        after = int(query.get("after") or 0)
    except ValueError:
        raise Refused(400, "after is a record seq (a number)") from None
    return RecordQuery(**vals, after=max(0, after))


def attach(sup: Any) -> Console:
    """Build the console for a starting supervisor: read the token, register the feed as an audit
    observer (and the rules reload after a SIGHUP)."""
    admin = sup.config.admin
    token = read_token(Path(admin.token_file))
    feed = Feed(sup.config.guests)
    console = Console(sup, token, feed)
    console.load_rules()

    def reloaded() -> None:
        try:
            from proxyvm.config import load_config

            feed.set_guests(load_config(sup.config_path).guests)
        except Exception:  # noqa: BLE001 - keep the old guest list
            log.exception("console: could not re-read the guests after reload")
        console.load_rules()

    def observe(rec: dict[str, Any]) -> None:
        feed.observe(rec)
        if rec.get("kind") == "reload" and (rec.get("request") or {}).get("event") == "reload":
            asyncio.get_running_loop().call_soon(reloaded)  # not inside the audit writer

    sup.observers.append(observe)
    return console
