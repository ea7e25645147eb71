"""The rules model: what a parsed rules file *is*, independent of how it is evaluated.

Owns: the value types of a policy (`Policy`, `Rule`, `Rate`, `NameFile`), the pattern types a rule's
`match:` holds (`NamePattern`, `EmailPattern`, `PathGlob`, `Cidr`, `OidPrefix`, `Literal`) with their
plain, obviously-correct `matches()` semantics, the pattern syntax checks (each raises `ValueError`
with a message and a hint) and the per-protocol schema (which keys a protocol's rules may match on).
Must not: read files, know about YAML or FILE:LINE (see `policy.parser`), or index anything for speed
(see `policy.matchers`; the compiled indexes must agree with the `matches()` written here).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

import dns.rdatatype


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Mode(StrEnum):
    ENFORCE = "enforce"
    MONITOR = "monitor"  # denials are reported as would_deny and let through
    LEARN = "learn"  # every request allowed and recorded as rule "learn" (for `proxyvm learn`)


class NameKind(StrEnum):
    EXACT = "exact"  # "example.com": that name only
    BELOW = "below"  # "*.example.com": any name strictly below example.com, not example.com itself
    ANY = "any"  # "*": every name (the empty name too)


class KeyKind(StrEnum):
    """How a match key's values are written and compared."""

    NAME = "name"  # DNS-style names, case-insensitive, "*.x" / "x" / "*"
    EMAIL = "email"  # "*@example.com", "ops@partner.net", "*@*.example.com", "<>", "*"
    PATH = "path"  # case-sensitive globs, "*" = any run of characters
    CIDR = "cidr"  # "10.0.0.0/8", "fd00::/8", a bare address = one host
    OID = "oid"  # numeric subtree, "1.3.6.1.2.1"
    QTYPE = "qtype"  # DNS RR type mnemonic, "A", "AAAA", "TYPE65280"
    METHOD = "method"  # HTTP method, upper-case
    OP = "op"  # SNMP operation
    PORT = "port"  # 1-65535
    TEXT = "text"  # exact string (SNMP agent name or "ip:port")


PROTOCOLS: tuple[str, ...] = ("dns", "smtp", "snmp", "http", "ws", "tls")

_HTTP_KEYS = {"host": KeyKind.NAME, "method": KeyKind.METHOD, "path": KeyKind.PATH, "port": KeyKind.PORT}

#: request keys a rule may match on, per protocol (the interface in docs/dev/interfaces.md)
MATCH_KEYS: Mapping[str, Mapping[str, KeyKind]] = MappingProxyType(
    {
        "dns": {"qname": KeyKind.NAME, "qtype": KeyKind.QTYPE, "answer_ip": KeyKind.CIDR},
        "smtp": {"mail_from": KeyKind.EMAIL, "rcpt_to": KeyKind.EMAIL},
        "snmp": {"agent": KeyKind.TEXT, "op": KeyKind.OP, "oid": KeyKind.OID},
        "http": dict(_HTTP_KEYS),
        "ws": dict(_HTTP_KEYS),
        "tls": {"sni": KeyKind.NAME, "dst": KeyKind.CIDR},
    }
)

#: `*_file` keys: a long list of names read from a file, merged into the named match key
FILE_KEYS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "dns": {"qname_file": "qname"},
        "http": {"host_file": "host"},
        "ws": {"host_file": "host"},
        "tls": {"sni_file": "sni"},
    }
)

#: limits written inside `match:` that do not select requests but travel in `Decision.limits`
LIMIT_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "smtp": frozenset({"max_size"}),
        "http": frozenset({"max_body"}),
        "ws": frozenset({"max_body", "max_message"}),
    }
)

#: protocols where `plaintext: true` can mean something (the request may leave unencrypted)
PLAINTEXT_PROTOCOLS: frozenset[str] = frozenset({"http", "ws"})

SNMP_OPS: tuple[str, ...] = ("get", "getnext", "getbulk", "set", "trap", "inform")
HTTP_METHODS: frozenset[str] = frozenset(
    "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH "
    "PROPFIND PROPPATCH MKCOL COPY MOVE LOCK UNLOCK REPORT MKCALENDAR SEARCH".split()
)

RATE_PERIODS: Mapping[str, float] = MappingProxyType(
    {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
)


# -- patterns --------------------------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
NAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")  # lower-case, no trailing dot


def normalize_name(value: str) -> str:
    """Request-side name normalisation: case-insensitive, trailing dot optional."""
    value = value.lower()
    return value[:-1] if value.endswith(".") else value


def check_name(name: str) -> tuple[str, str] | None:
    """Why `name` (lower-case, no trailing dot) is not a valid DNS name, with a hint; or None."""
    if len(name) > 253:
        return "longer than 253 characters", "DNS names are at most 253 characters"
    if NAME_RE.fullmatch(name):
        return None
    labels = name.split(".")
    if "" in labels:
        return "has an empty label", "remove the doubled, leading or stray dot"
    if any(len(label) > 63 for label in labels):
        return "has a label longer than 63 characters", "DNS labels are at most 63 characters"
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return "has a label that starts or ends with '-'", "labels start and end with a letter or digit"
    return ("has a character that is not a letter, digit, '-' or '_'",
            "write internationalised names in their xn-- form; no spaces, '*' only as '*.name'")


@dataclass(frozen=True, slots=True)
class NamePattern:
    text: str  # as written
    kind: NameKind
    name: str  # normalised; "" for ANY; for BELOW the parent ("example.com" for "*.example.com")

    def matches(self, value: str) -> bool:
        v = normalize_name(value)
        if self.kind is NameKind.ANY:
            return True
        if self.kind is NameKind.EXACT:
            return v == self.name
        return v.endswith("." + self.name)

    @staticmethod
    def parse(text: str) -> NamePattern:
        t = text.strip()
        name = normalize_name(t)
        if name == "*":
            return NamePattern(text, NameKind.ANY, "")
        kind = NameKind.EXACT
        if name.startswith("*."):
            kind, name = NameKind.BELOW, name[2:]
        if "*" in name:
            raise ValueError(
                f"bad name pattern {text!r}: '*' may only be the whole first label",
                "write '*.example.com' for every name below example.com, 'example.com' for the name "
                "itself, or '*' for any name",
            )
        why = check_name(name) if name else ("is empty", "write a name, '*.name' or '*'")
        if why:
            raise ValueError(f"bad name pattern {text!r}: {why[0]}", why[1])
        return NamePattern(text, kind, name)


@dataclass(frozen=True, slots=True)
class EmailPattern:
    text: str
    local: str | None  # None = any local part
    domain: NamePattern | None  # None = the null sender "<>" (or, with local None too, "*")
    null_sender: bool = False

    def matches(self, value: str) -> bool:
        v = value.strip().lower()
        if v.startswith("<") and v.endswith(">"):
            v = v[1:-1]
        if self.null_sender:
            return v == ""
        if self.domain is None:  # "*"
            return True
        if "@" not in v:
            return False
        local, _, dom = v.rpartition("@")
        if self.local is not None and local != self.local:
            return False
        return self.domain.matches(dom)

    @staticmethod
    def parse(text: str) -> EmailPattern:
        t = text.strip().lower()
        if t == "<>":
            return EmailPattern(text, None, None, null_sender=True)
        if t == "*":
            return EmailPattern(text, None, None)
        if "@" not in t:
            raise ValueError(
                f"bad e-mail pattern {text!r}: no '@'",
                f"write '*@{t}' for any address at {t}, or '*' for any address",
            )
        local, _, dom = t.rpartition("@")
        if not local or "@" in local or (local != "*" and ("*" in local or any(c.isspace() for c in local))):
            raise ValueError(
                f"bad e-mail pattern {text!r}: the local part must be '*' or a literal address part",
                "examples: '*@example.com', 'ops@partner.net', '*@*.example.com'",
            )
        try:
            domain = NamePattern.parse(dom)
        except ValueError as e:
            raise ValueError(f"bad e-mail pattern {text!r}: domain {e.args[0].split(': ', 1)[-1]}",
                             e.args[1] if len(e.args) > 1 else "") from None
        return EmailPattern(text, None if local == "*" else local, domain)


@dataclass(frozen=True, slots=True)
class PathGlob:
    text: str
    regex: re.Pattern[str] = field(compare=False, repr=False)
    prefix: str = ""  # literal text before the first '*' (the whole path when there is no '*')
    is_glob: bool = False

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None

    @staticmethod
    def parse(text: str) -> PathGlob:
        if text != "*" and not text.startswith(("/", "*")):
            raise ValueError(
                f"bad path glob {text!r}: must start with '/'",
                f"write '/{text}' (paths are compared from the leading slash)",
            )
        for ch in "?#":
            if ch in text:
                raise ValueError(
                    f"bad path glob {text!r}: {ch!r} cannot appear in a path",
                    "the path is matched without its query string and fragment; only '*' is special",
                )
        if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
            raise ValueError(f"bad path glob {text!r}: contains whitespace or a control character",
                             "percent-encode it as it appears on the wire (%20)")
        if "**" in text:
            raise ValueError(
                f"bad path glob {text!r}: '**' is not a glob here",
                "a single '*' already matches any run of characters, '/' included",
            )
        regex = re.compile("".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", text)),
                           re.DOTALL)
        star = text.find("*")
        return PathGlob(text, regex, text if star < 0 else text[:star], star >= 0)


@dataclass(frozen=True, slots=True)
class Cidr:
    text: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    def matches(self, value: str) -> bool:
        try:
            ip = ipaddress.ip_address(value.strip())
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 on the wire
        return ip.version == self.network.version and ip in self.network

    @staticmethod
    def parse(text: str) -> Cidr:
        t = text.strip()
        try:
            return Cidr(text, ipaddress.ip_network(t, strict=True))
        except ValueError as e:
            hint = "write an address or a network: 10.0.0.0/8, 192.0.2.7, fd00::/8"
            if "host bits set" in str(e):
                hint = f"did you mean '{ipaddress.ip_network(t, strict=False)}'?"
                raise ValueError(f"bad CIDR {text!r}: has host bits set", hint) from None
            raise ValueError(f"bad CIDR {text!r}", hint) from None


_OID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def normalize_oid(value: str) -> str:
    value = value.strip()
    return value[1:] if value.startswith(".") else value


@dataclass(frozen=True, slots=True)
class OidPrefix:
    text: str
    oid: str  # "1.3.6.1.2.1" (no leading dot)

    def matches(self, value: str) -> bool:
        v = normalize_oid(value)
        return v == self.oid or v.startswith(self.oid + ".")

    @staticmethod
    def parse(text: str) -> OidPrefix:
        oid = normalize_oid(text)
        if not _OID_RE.fullmatch(oid):
            raise ValueError(
                f"bad OID {text!r}",
                "write OIDs numerically, dot-separated, e.g. 1.3.6.1.2.1 (MIB names are not loaded)",
            )
        parts = oid.split(".")
        if int(parts[0]) > 2 or any(int(p) > 4294967295 for p in parts):
            raise ValueError(f"bad OID {text!r}: arc out of range",
                             "the first arc is 0, 1 or 2 and every arc is at most 4294967295")
        return OidPrefix(text, oid)


@dataclass(frozen=True, slots=True)
class Literal:
    """A value compared exactly after the key's normalisation (qtype/method upper, op lower)."""

    text: str
    value: str

    def matches(self, value: str) -> bool:
        return self.value == value


Pattern = NamePattern | EmailPattern | PathGlob | Cidr | OidPrefix | Literal


def parse_literal(kind: KeyKind, text: str) -> Literal:
    t = text.strip()
    if kind is KeyKind.QTYPE:
        u = t.upper()
        try:
            dns.rdatatype.from_text(u)
        except Exception:  # dnspython raises several types for junk
            raise ValueError(f"unknown qtype {text!r}", "use an RR type mnemonic: A, AAAA, MX, TXT, "
                             "ANY, ... or TYPEnnn") from None
        return Literal(text, u)
    if kind is KeyKind.METHOD:
        u = t.upper()
        if u not in HTTP_METHODS:
            import difflib

            close = difflib.get_close_matches(u, sorted(HTTP_METHODS), n=1)
            raise ValueError(f"unknown HTTP method {text!r}",
                             f"did you mean '{close[0]}'?" if close else "one of: " + ", ".join(sorted(HTTP_METHODS)))
        return Literal(text, u)
    if kind is KeyKind.OP:
        low = t.lower()
        if low not in SNMP_OPS:
            import difflib

            close = difflib.get_close_matches(low, SNMP_OPS, n=1)
            raise ValueError(f"unknown SNMP op {text!r}",
                             f"did you mean '{close[0]}'?" if close else "one of: " + ", ".join(SNMP_OPS))
        return Literal(text, low)
    if kind is KeyKind.PORT:
        if not (t.isascii() and t.isdigit()) or not 0 < int(t) < 65536:
            raise ValueError(f"bad port {text!r}", "ports are 1-65535")
        return Literal(text, str(int(t)))
    if not t:
        raise ValueError("empty value", "")
    return Literal(text, t)


def parse_pattern(kind: KeyKind, text: str) -> Pattern:
    """One written pattern of a key of `kind`; ValueError(message, hint) when it is bad."""
    if kind is KeyKind.NAME:
        return NamePattern.parse(text)
    if kind is KeyKind.EMAIL:
        return EmailPattern.parse(text)
    if kind is KeyKind.PATH:
        return PathGlob.parse(text)
    if kind is KeyKind.CIDR:
        return Cidr.parse(text)
    if kind is KeyKind.OID:
        return OidPrefix.parse(text)
    return parse_literal(kind, text)


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    period: float  # seconds
    text: str  # "100/hour"


@dataclass(frozen=True, slots=True)
class NameFile:
    """A `qname_file:`/`host_file:`/`sni_file:` reference, read when the engine compiles."""

    key: str  # the match key the names join ("qname")
    path: Path
    written_at: str  # "rules.yaml:7:15" (the YAML value), for errors about the file as a whole


_NO_LIMITS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    index: int  # 0-based position in the file: lower wins
    action: Action
    protocol: str
    guests: frozenset[str] | None  # None = every guest, "unknown" included
    match: Mapping[str, tuple[Pattern, ...]]  # inline patterns per key
    file: str
    line: int
    name_files: tuple[NameFile, ...] = ()
    plaintext: bool = False
    rate: Rate | None = None
    limits: Mapping[str, int] = field(default_factory=lambda: _NO_LIMITS)
    comment: str = ""

    @property
    def at(self) -> str:
        return f"{Path(self.file).name}:{self.line}"

    def constrained_keys(self) -> frozenset[str]:
        return frozenset(self.match) | {nf.key for nf in self.name_files}


@dataclass(frozen=True, slots=True)
class Policy:
    file: str
    mode: Mode
    default: Action
    default_line: int  # the `default:` line (1 when the key is absent and deny applies)
    rules: tuple[Rule, ...]
    mode_line: int = 1  # the `mode:` line (learn-mode decisions point at it)

    @property
    def default_at(self) -> str:
        return f"{Path(self.file).name}:{self.default_line}"

    @property
    def mode_at(self) -> str:
        return f"{Path(self.file).name}:{self.mode_line}"
