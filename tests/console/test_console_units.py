"""The console's security pieces and its feed, on their own: the token comparison, sessions
(expiry, the cap), the login limiter, query-string limits, the audit filter (literal, never a
regex) and the bounds of the per-guest counters."""

from __future__ import annotations

import pytest

from proxyvm.console import feed as feedmod
from proxyvm.console.feed import Feed, RecordQuery, view
from proxyvm.console.server import (
    LOGIN_FAILURES,
    LOGIN_WINDOW,
    MAX_QUERY,
    MAX_SESSIONS,
    SESSION_IDLE,
    SESSION_MAX,
    LoginLimiter,
    Refused,
    Sessions,
    parse_cookies,
    parse_query,
    record_query,
    token_matches,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_matches_only_the_token() -> None:
    tok = b"0123456789abcdef0123456789abcdef"
    assert token_matches(tok, tok.decode())
    assert not token_matches(tok, tok.decode()[:-1])
    assert not token_matches(tok, tok.decode() + "0")
    assert not token_matches(tok, "")
    assert not token_matches(tok, "0123456789ABCDEF0123456789abcdef")
    assert not token_matches(tok, "\udcff" * 40)  # not even UTF-8: refused, no exception


def test_sessions_expire_idle_and_absolute() -> None:
    clock = Clock()
    s = Sessions(clock)
    a = s.create("alice@127.0.0.1")
    assert a.sid != a.csrf and len(a.sid) >= 40 and len(a.csrf) >= 40
    assert s.get(a.sid) is a
    clock.t += SESSION_IDLE - 1
    assert s.get(a.sid) is a  # used: idle timer restarts
    clock.t += SESSION_IDLE + 1
    assert s.get(a.sid) is None
    b = s.create("bob@127.0.0.1")
    for _ in range(int(SESSION_MAX // (SESSION_IDLE / 2)) + 1):
        clock.t += SESSION_IDLE / 2
        s.get(b.sid)
    assert s.get(b.sid) is None  # kept busy, still ends at SESSION_MAX
    assert s.get("") is None and s.get("nope") is None


def test_sessions_are_capped_oldest_first() -> None:
    clock = Clock()
    s = Sessions(clock)
    first = s.create("a@x")
    for i in range(MAX_SESSIONS + 10):
        clock.t += 1
        s.create(f"u{i}@x")
    assert len(s.by_id) == MAX_SESSIONS
    assert s.get(first.sid) is None


def test_login_limiter() -> None:
    clock = Clock()
    lim = LoginLimiter(clock)
    for _ in range(LOGIN_FAILURES):
        assert not lim.blocked("127.0.0.9")
        lim.failed("127.0.0.9")
    assert lim.blocked("127.0.0.9")
    assert not lim.blocked("127.0.0.8")  # per peer
    clock.t += LOGIN_WINDOW + 1
    assert not lim.blocked("127.0.0.9")
    for i in range(5000):  # a scan from many addresses stays bounded
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(lim.failures) <= 1024


def test_query_limits() -> None:
    assert parse_query("guest=web1&text=a%2Bb") == {"guest": "web1", "text": "a+b"}
    with pytest.raises(Refused) as e:
        parse_query("text=" + "a" * MAX_QUERY)
    assert e.value.status == 414
    with pytest.raises(Refused) as e:
        parse_query("&".join(f"k{i}=v" for i in range(100)))
    assert e.value.status == 400
    with pytest.raises(Refused) as e:
        record_query({"text": "x" * 201})
    assert e.value.status == 400
    with pytest.raises(Refused):
        record_query({"after": "1; drop"})


def test_cookies() -> None:
    assert parse_cookies("a=1; pvm_session=xyz; pvm_session=evil") == {"a": "1", "pvm_session": "xyz"}
    assert parse_cookies("garbage;;=;x") == {}


def rec(seq: int, **kw: object) -> dict[str, object]:
    base = {"seq": seq, "ts": "2024-01-01T00:00:00.000Z", "guest": "web1", "protocol": "dns", "verdict": "allow",
            "rule": "allow-lab", "at": "rules.yaml:9", "reason": "ok", "request": {"qname": "www.lab.test", "qtype": "A"}}
    base.update(kw)
    return base


def test_text_filter_is_literal() -> None:
    f = Feed(["web1"])
    f.observe(rec(1, request={"qname": "a.*(b.lab.test", "qtype": "A"}))
    f.observe(rec(2, request={"qname": "aXXb.lab.test", "qtype": "A"}))
    f.observe(rec(3, request={"qname": "[x]+$.lab.test", "qtype": "TXT"}))
    got = lambda text: [r["seq"] for r in f.records(RecordQuery(text=text))]  # noqa: E731
    assert got("a.*(b") == [1]
    assert got(".*") == [1]  # only the literal ".*"
    assert got("[x]+$") == [3]
    assert got("(") == [1]
    assert got("\\") == []
    assert got("A.*(B") == [1]  # case-insensitive
    assert [r["seq"] for r in f.records(RecordQuery(after=1))] == [3, 2]


def test_feed_counts_bounded() -> None:
    f = Feed(["web1"], clock=lambda: 5000.0)
    f.observe(rec(1, guest="not-a-configured-guest"))  # counted as unknown, no new key
    f.observe(rec(2, verdict="deny", rule="deny-blocked"))
    f.observe(rec(3, kind="alert", detector="dns_tunnel", severity="high", verdict=None))
    f.observe(rec(4, event="attempt", protocol="smtp", request={}))  # a follow-up: not a request
    assert set(f.guests) == {"web1", "unknown"}
    assert f.guests["unknown"].allowed == {"dns": 1}
    w = f.guests["web1"]
    assert w.denied == {"dns": 1} and w.alerts == 1 and w.allowed == {}
    for i in range(3 * feedmod.MAX_DESTINATIONS):
        f.observe(rec(10 + i, request={"qname": f"n{i}.lab.test", "qtype": "A"}))
    assert len(w.destinations) <= feedmod.MAX_DESTINATIONS
    for i in range(feedmod.RING + 100):
        f.observe(rec(10_000 + i))
    assert len(f.ring) == feedmod.RING


def test_view_hides_query_strings_and_bodies() -> None:
    v = view(rec(1, protocol="http", request={"method": "GET", "host": "a.test", "path": "/cb?token=s3cret&x=1",
                                              "body": "password=hunter2"}))
    assert v["what"] == "GET a.test /cb"
    assert "s3cret" not in str(v) and "hunter2" not in str(v)
    long = view(rec(2, reason="x" * 10_000, request={"qname": "\x00\x1b[31m.lab.test", "qtype": "A"}))
    assert len(long["reason"]) <= feedmod.MAX_TEXT
    assert "\x1b" not in long["what"] and "\\x1b" in long["what"]
