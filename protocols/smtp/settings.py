"""The `smtp:` configuration section: typed, frozen settings and their located parser.

Owns: the schema of the `smtp:` section (guest listeners, spool directory, optional relay with its
credentials, outbound TLS authentication mode, CA file, size/recipient limits, retry schedule,
timeouts) and its defaults.
Must not: open sockets, create directories, or put a secret's content anywhere but in a `Secret`.
There is deliberately no setting that allows plaintext or unverified delivery.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from policy.source import Node, Secret
from protocols.listen import parse_listen

TLS_MODES = ("verify", "dane", "mta-sts")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


@dataclass(frozen=True, slots=True)
class RelayAuth:
    username: str
    password: Secret  # read from password_file; repr is redacted

    def __repr__(self) -> str:
        return f"RelayAuth(username={self.username!r}, password=Secret(<redacted>))"


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """The smarthost every message goes to. `host` is the name verified in its certificate;
    `address` (optional) is where to connect instead of resolving `host`."""

    host: str
    port: int = 587
    address: str | None = None
    auth: RelayAuth | None = None

    @property
    def implicit_tls(self) -> bool:
        return self.port == 465  # RFC 8314 submissions; 25/587 use STARTTLS


@dataclass(frozen=True, slots=True)
class RetrySettings:
    first: float = 60.0  # first retry after this long; doubles each time
    max_age: float = 5 * 86400.0  # then bounced with a DSN
    max_interval: float = 4 * 3600.0  # the doubling stops here (never below `first`)


@dataclass(frozen=True, slots=True)
class TimeoutSettings:
    """RFC 5321 §4.5.3.2 timeouts, guest side (command, data) and toward peers (connect, reply)."""

    command: float = 300.0  # guest idle between commands (server timeout, 5 min)
    data: float = 180.0  # guest silent inside DATA (data block, 3 min)
    connect: float = 30.0  # TCP + TLS toward a relay/MX
    reply: float = 300.0  # waiting for a peer's reply (MAIL/RCPT 5 min; DATA end 10 min is capped here)
    idle: float = 30.0  # an unused verified connection is kept this long for the next message


@dataclass(frozen=True, slots=True)
class SMTPSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 10025),)
    spool: Path = Path("/var/lib/proxyvm/spool")
    relay: RelaySettings | None = None  # None: deliver to each recipient domain's MX
    tls: str = "verify"  # verify | dane | mta-sts
    ca_file: Path | None = None  # None: the system trust store
    hostname: str = "proxyvm.invalid"  # our name in the banner, EHLO toward peers, Received, DSNs
    max_message_size: int = 25_000_000
    max_recipients: int = 100
    max_connections: int = 20  # concurrent outbound connections (and pooled verified sessions)
    retry: RetrySettings = field(default_factory=RetrySettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)


def _hostname(node: Node, what: str) -> str:
    s = node.str(what).strip().rstrip(".")
    if not _HOSTNAME.match(s):
        raise node.fail(f"bad host name {s!r} for {what}", "a DNS name such as smtp.example.org")
    return s.lower()


def _ip(node: Node, what: str) -> str:
    s = node.str(what).strip()
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise node.fail(f"bad IP address {s!r} for {what}", "relay.address is an IP address; the name goes in host") from None


def _relay(node: Node) -> RelaySettings:
    m = node.get_map(allowed={"host", "port", "address", "auth"}, required={"host"}, what="smtp.relay")
    host = _hostname(m["host"], "smtp.relay.host")
    port = m["port"].int(min=1, max=65535, what="smtp.relay.port") if "port" in m else 587
    address = _ip(m["address"], "smtp.relay.address") if "address" in m else None
    auth = None
    if "auth" in m:
        a = m["auth"].get_map(allowed={"username", "password_file"}, required={"username", "password_file"},
                              what="smtp.relay.auth")
        auth = RelayAuth(a["username"].str("smtp.relay.auth.username"),
                         a["password_file"].secret_file("smtp.relay.auth.password_file"))
    return RelaySettings(host=host, port=port, address=address, auth=auth)


def parse(node: Node, base: Path) -> SMTPSettings:
    """Parse the `smtp:` section. Relative paths are relative to `base` (the config's directory)."""
    if base is not None and node.base != base:
        node = Node(node.value, node.file, node.line, node.col, base)
    m = node.get_map(
        allowed={"listen", "spool", "relay", "tls", "ca_file", "hostname", "max_message_size",
                 "max_recipients", "max_connections", "retry", "timeouts"},
        what="smtp",
    )
    d = SMTPSettings()
    listen = d.listen
    if "listen" in m:
        listen = parse_listen(m["listen"], 25, what="smtp.listen address", ip=None,
                              empty=("smtp.listen is empty", "give at least one address such as 198.18.0.1:25"))
    spool = m["spool"].path("smtp.spool") if "spool" in m else d.spool
    relay = _relay(m["relay"]) if "relay" in m and m["relay"].value is not None else None
    tls = m["tls"].enum(TLS_MODES, what="smtp.tls mode") if "tls" in m else d.tls
    ca_file = None
    if "ca_file" in m:
        ca_file = m["ca_file"].path("smtp.ca_file")
        if not ca_file.is_file():
            raise m["ca_file"].fail(f"smtp.ca_file {ca_file} does not exist or is not a file")
    hostname = _hostname(m["hostname"], "smtp.hostname") if "hostname" in m else d.hostname
    size = m["max_message_size"].size("smtp.max_message_size") if "max_message_size" in m else d.max_message_size
    if size < 1024:
        raise m["max_message_size"].fail("smtp.max_message_size must be at least 1KB")
    rcpts = (m["max_recipients"].int(min=1, max=10000, what="smtp.max_recipients")
             if "max_recipients" in m else d.max_recipients)
    conns = (m["max_connections"].int(min=1, max=1000, what="smtp.max_connections")
             if "max_connections" in m else d.max_connections)
    retry = d.retry
    if "retry" in m:
        r = m["retry"].get_map(allowed={"first", "max_age", "max_interval"}, what="smtp.retry")
        first = r["first"].duration("smtp.retry.first") if "first" in r else retry.first
        max_age = r["max_age"].duration("smtp.retry.max_age") if "max_age" in r else retry.max_age
        max_interval = (r["max_interval"].duration("smtp.retry.max_interval")
                        if "max_interval" in r else retry.max_interval)
        if first <= 0:
            raise r["first"].fail("smtp.retry.first must be positive")
        if max_age < first:
            raise (r.get("max_age") or r["first"]).fail("smtp.retry.max_age must not be shorter than retry.first")
        retry = RetrySettings(first=first, max_age=max_age, max_interval=max(max_interval, first))
    timeouts = d.timeouts
    if "timeouts" in m:
        t = m["timeouts"].get_map(allowed={"command", "data", "connect", "reply", "idle"}, what="smtp.timeouts")
        vals = {}
        for k, v in t.items():
            secs = v.duration(f"smtp.timeouts.{k}")
            if secs <= 0:
                raise v.fail(f"smtp.timeouts.{k} must be positive")
            vals[k] = secs
        timeouts = TimeoutSettings(**{**{k: getattr(d.timeouts, k) for k in
                                         ("command", "data", "connect", "reply", "idle")}, **vals})
    return SMTPSettings(listen=listen, spool=spool, relay=relay, tls=tls, ca_file=ca_file,
                        hostname=hostname, max_message_size=size, max_recipients=rcpts,
                        max_connections=conns, retry=retry, timeouts=timeouts)
