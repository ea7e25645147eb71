"""Compiled indexes: one per (protocol, match key), answering "which rules does this value fit?".

Every index maps a request value to a bit mask of rule positions (bit i = the protocol's i-th rule in
file order), so the engine can AND the masks of all keys and take the lowest bit: first-match
semantics with no linear scan of rules or patterns. Costs:
  - `NameIndex`: one dict probe for the exact name plus one per label suffix (the per-suffix hash
    walk); independent of how many names are indexed. Names are stored as plain `str` keys (no
    reversed-label strings or per-name objects: 1M names cost ~160 MB); "*.x" parents in one dict
    per label count, so the walk probes only depths that hold patterns, each in its own table.
  - `CidrIndex`: one dict probe per distinct prefix length present (at most 33 / 129).
  - `OidIndex`: one dict per subtree length (in arcs), probed with the request OID's prefix of
    each length present: a prefix structure with one probe per distinct length (measured faster
    here than a node-per-arc trie, which walks the shared 1.3.6.1.4.1 arcs one by one).
  - `EmailIndex`: the domain goes through name indexes; local parts through dict probes.
  - `PathIndex`: exact paths by dict; globs bucketed by their literal prefix, probed per prefix
    length, and only the globs sharing the request's prefix run their regex.
  - `SetIndex`: one dict probe (qtype, method, op, port, agent).
Each index can also `explain(value, bit)`: which (canonical) pattern made rule `bit` fit, for the
human detail; and `lookup(value, explicit=True)` leaves out match-anything patterns ("*", "/0") for
`Engine.named_by_rule`.
Owns: these data structures and the request-side normalisation of values.
Must not: know rule order, actions, guests, rates or modes (see `policy.engine`); parse YAML.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any, Protocol

from policy.model import (
    Cidr,
    EmailPattern,
    KeyKind,
    Literal,
    NameKind,
    NamePattern,
    OidPrefix,
    PathGlob,
    Pattern,
)


class Index(Protocol):
    def add(self, pattern: Pattern, bit: int) -> None: ...
    def lookup(self, value: Any, explicit: bool = False) -> int: ...
    def explain(self, value: Any, bit: int) -> str | None: ...
    def __len__(self) -> int: ...


def _or_into(d: dict[Any, int], key: Any, bit: int) -> None:
    # No `d.get(key, 0) | bit`: for large masks that allocates a new int per key (1M names = 1M ints).
    old = d.get(key)
    d[key] = bit if old is None else old | bit


class NameIndex:
    """Names: "x" exact, "*.x" strictly below x, "*" any. Case-insensitive, trailing dot ignored.

    "*.x" patterns are kept in one dict per label count of x, so the suffix walk probes only the
    depths that hold patterns, and each probe goes to a table holding names of that depth alone: a
    1M-name blocklist's "*.h.d.net" entries stay out of the cache path of a "d.net" probe, which
    lands in the small table of two-label parents ("*.example.com")."""

    __slots__ = ("exact", "below_at", "walk", "any")

    def __init__(self) -> None:
        self.exact: dict[str, int] = {}
        self.below_at: dict[int, dict[str, int]] = {}  # labels in parent -> parent -> "*.parent" rules
        self.walk: tuple[tuple[int, Callable[..., int]], ...] = ()  # (labels, table.get), deepest first
        self.any = 0

    def _below(self, depth: int) -> dict[str, int]:
        table = self.below_at.get(depth)
        if table is None:
            table = self.below_at[depth] = {}
            self.walk = tuple((d, self.below_at[d].get) for d in sorted(self.below_at, reverse=True))
        return table

    def add(self, pattern: Pattern, bit: int) -> None:
        assert isinstance(pattern, NamePattern)
        if pattern.kind is NameKind.ANY:
            self.any |= bit
        elif pattern.kind is NameKind.EXACT:
            _or_into(self.exact, pattern.name, bit)
        else:
            _or_into(self._below(pattern.name.count(".") + 1), pattern.name, bit)

    def add_names(self, exact: list[str], below: list[str], any_: bool, bit: int) -> None:
        """Bulk add from a name file (already validated and lower-cased)."""
        by_depth: dict[int, list[str]] = {}
        for n in below:
            depth = n.count(".") + 1
            group = by_depth.get(depth)
            if group is None:
                by_depth[depth] = [n]
            else:
                group.append(n)
        tables = [(self.exact, exact)] + [(self._below(depth), names) for depth, names in by_depth.items()]
        del by_depth
        for d, names in tables:
            if not d:
                d.update(dict.fromkeys(names, bit))
                continue
            get = d.get
            for n in names:
                old = get(n)
                d[n] = bit if old is None else old | bit
        if any_:
            self.any |= bit

    def lookup(self, value: str, explicit: bool = False) -> int:
        # A name the caller already normalised (the DNS service passes lower-case ASCII) is used as
        # it is: no copy. isascii() is O(1); non-ASCII takes lower(), whose mappings may reach ASCII.
        v = value if value.isascii() and value.islower() else value.lower()
        if v[-1:] == ".":
            v = v[:-1]
        m = 0 if explicit else self.any
        if self.exact:
            m |= self.exact.get(v, 0)
        if self.walk:
            labels = v.count(".") + 1
            rest = v
            for depth, get in self.walk:  # deepest first; proper suffixes only
                if depth >= labels:
                    continue
                while labels > depth:  # "a.b.c" -> "b.c" -> "c" (partition beats find+slice)
                    _, _, rest = rest.partition(".")
                    labels -= 1
                m |= get(rest, 0)
        return m

    def explain(self, value: str, bit: int) -> str | None:
        v = value if value.isascii() and value.islower() else value.lower()
        v = v.removesuffix(".")
        if self.exact.get(v, 0) & bit:
            return v
        labels = v.count(".") + 1
        rest = v
        for depth, get in self.walk:  # the longest parent first, as the walk reads best
            if depth >= labels:
                continue
            while labels > depth:
                _, _, rest = rest.partition(".")
                labels -= 1
            if get(rest, 0) & bit:
                return "*." + rest
        return "*" if self.any & bit else None

    def __len__(self) -> int:
        return len(self.exact) + sum(len(t) for t in self.below_at.values())


class SetIndex:
    """Exact values (SNMP agent names, "ip:port")."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def add(self, pattern: Pattern, bit: int) -> None:
        assert isinstance(pattern, Literal)
        _or_into(self.values, pattern.value, bit)

    def norm(self, value: Any) -> str:
        return str(value).strip()

    def lookup(self, value: Any, explicit: bool = False) -> int:
        return self.values.get(self.norm(value), 0)

    def explain(self, value: Any, bit: int) -> str | None:
        v = self.norm(value)
        return v if self.values.get(v, 0) & bit else None

    def __len__(self) -> int:
        return len(self.values)


class UpperSetIndex(SetIndex):
    """qtype, HTTP method: compared upper-case."""

    __slots__ = ()

    def norm(self, value: Any) -> str:
        return value.upper() if value.__class__ is str else str(value).upper()

    def lookup(self, value: Any, explicit: bool = False) -> int:
        if value.__class__ is str and value.isascii() and value.isupper():  # "A", "GET": no copy
            return self.values.get(value, 0)
        return self.values.get(value.upper() if value.__class__ is str else str(value).upper(), 0)


class LowerSetIndex(SetIndex):
    """SNMP op: compared lower-case."""

    __slots__ = ()

    def norm(self, value: Any) -> str:
        return value.lower() if value.__class__ is str else str(value).lower()

    def lookup(self, value: Any, explicit: bool = False) -> int:
        if value.__class__ is str and value.isascii() and value.islower():  # "get": no copy
            return self.values.get(value, 0)
        return self.values.get(value.lower() if value.__class__ is str else str(value).lower(), 0)


class PortSetIndex(SetIndex):
    """Ports, given as int or digits."""

    __slots__ = ()

    def norm(self, value: Any) -> str:
        s = str(value).strip()
        return str(int(s)) if s.isascii() and s.isdigit() else s


def ip_to_int(value: str) -> tuple[int, int] | None:
    """(version, integer) of an address string; IPv4-mapped IPv6 counts as IPv4. None if invalid."""
    v = value.strip()
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, v), "big")
    except (OSError, ValueError):  # ValueError: embedded NUL
        pass
    try:
        ip = ipaddress.IPv6Address(v)
    except ValueError:
        return None
    if ip.ipv4_mapped is not None:
        return 4, int(ip.ipv4_mapped)
    return 6, int(ip)


class CidrIndex:
    """Networks by prefix length: {version: {prefixlen: {network >> (bits - prefixlen): mask}}}."""

    __slots__ = ("tables", "texts")

    def __init__(self) -> None:
        self.tables: dict[int, list[tuple[int, int, dict[int, int]]]] = {4: [], 6: []}
        self.texts: dict[tuple[int, int, int], str] = {}  # (version, prefixlen, key) -> "10.0.0.0/8"

    def add(self, pattern: Pattern, bit: int) -> None:
        assert isinstance(pattern, Cidr)
        net = pattern.network
        bits = net.max_prefixlen
        plen = net.prefixlen
        rows = self.tables[net.version]
        self.texts[(net.version, plen, int(net.network_address) >> (bits - plen))] = str(net)
        for row in rows:
            if row[0] == plen:
                _or_into(row[2], int(net.network_address) >> (bits - plen), bit)
                return
        rows.append((plen, bits - plen, {int(net.network_address) >> (bits - plen): bit}))
        rows.sort()

    def __len__(self) -> int:
        return len(self.texts)

    def lookup(self, value: str, explicit: bool = False) -> int:
        vi = ip_to_int(value)
        if vi is None:
            return 0
        m = 0
        for plen, shift, table in self.tables[vi[0]]:
            if explicit and plen == 0:
                continue
            m |= table.get(vi[1] >> shift, 0)
        return m

    def explain(self, value: str, bit: int) -> str | None:
        vi = ip_to_int(value)
        if vi is None:
            return None
        for plen, shift, table in reversed(self.tables[vi[0]]):  # most specific first
            if table.get(vi[1] >> shift, 0) & bit:
                return self.texts[(vi[0], plen, vi[1] >> shift)]
        return None


class OidIndex:
    """OID subtrees: a hash per subtree length. {"1.3.6.1.2.1": mask}, probed once for each distinct
    pattern length (in arcs) with the request OID's prefix of that length, so a lookup costs one probe
    per distinct length, whatever the number of patterns, and never walks shared arcs one by one."""

    __slots__ = ("prefixes", "depths")

    def __init__(self) -> None:
        self.prefixes: dict[str, int] = {}
        self.depths: list[int] = []  # distinct pattern lengths in arcs, ascending

    def add(self, pattern: Pattern, bit: int) -> None:
        assert isinstance(pattern, OidPrefix)
        _or_into(self.prefixes, pattern.oid, bit)
        self.depths = sorted({p.count(".") + 1 for p in self.prefixes})

    def __len__(self) -> int:
        return len(self.prefixes)

    def _prefixes(self, value: str) -> list[str]:
        """The request OID's prefixes at each pattern length it reaches, shortest first."""
        v = value.strip()
        if v[:1] == ".":
            v = v[1:]
        out = []
        n = len(v)
        for depth in self.depths:
            parts = v.split(".", depth)  # one C call; the last part is what follows the prefix
            if len(parts) > depth:
                out.append(v[: n - len(parts[depth]) - 1])
            else:
                if len(parts) == depth:  # exactly `depth` arcs: the whole OID
                    out.append(v)
                break
        return out

    def lookup(self, value: str, explicit: bool = False) -> int:
        get = self.prefixes.get
        m = 0
        for prefix in self._prefixes(value):
            m |= get(prefix, 0)
        return m

    def explain(self, value: str, bit: int) -> str | None:
        for prefix in reversed(self._prefixes(value)):  # the deepest subtree reads best
            if self.prefixes.get(prefix, 0) & bit:
                return prefix
        return None


class EmailIndex:
    """E-mail patterns: "*" any, "<>" null sender, "L@D" with L a literal local part or "*" and D a
    name pattern. Flat dicts, so a lookup is one or two probes per domain label:
      dom_exact / dom_below    "*@example.com" / "*@*.example.com", keyed by the domain
      addr_exact / addr_below  "ops@partner.net" / "ops@*.partner.net", keyed by "local@domain"
      anydom                   "ops@*" keyed by "ops", "*@*" keyed by "*"
    """

    __slots__ = ("any", "null", "dom_exact", "dom_below", "addr_exact", "addr_below", "anydom")

    def __init__(self) -> None:
        self.any = 0  # "*"
        self.null = 0  # "<>"
        self.dom_exact: dict[str, int] = {}
        self.dom_below: dict[str, int] = {}
        self.addr_exact: dict[str, int] = {}
        self.addr_below: dict[str, int] = {}
        self.anydom: dict[str, int] = {}

    def add(self, pattern: Pattern, bit: int) -> None:
        assert isinstance(pattern, EmailPattern)
        if pattern.null_sender:
            self.null |= bit
            return
        if pattern.domain is None:
            self.any |= bit
            return
        local, dom = pattern.local, pattern.domain
        if dom.kind is NameKind.ANY:
            _or_into(self.anydom, "*" if local is None else local, bit)
        elif local is None:
            _or_into(self.dom_exact if dom.kind is NameKind.EXACT else self.dom_below, dom.name, bit)
        else:
            _or_into(self.addr_exact if dom.kind is NameKind.EXACT else self.addr_below, f"{local}@{dom.name}", bit)

    def __len__(self) -> int:
        return (len(self.dom_exact) + len(self.dom_below) + len(self.addr_exact) + len(self.addr_below)
                + len(self.anydom) + bool(self.any) + bool(self.null))

    def lookup(self, value: str, explicit: bool = False) -> int:
        v = value.strip().lower()
        if v[:1] == "<" and v[-1:] == ">":
            v = v[1:-1]
        m = 0 if explicit else self.any
        if not v:
            return m | self.null
        at = v.rfind("@")
        if at < 0:
            return m
        dom = v[at + 1 :]
        if dom[-1:] == ".":
            dom = dom[:-1]
            v = v[:-1]
        if self.dom_exact:
            m |= self.dom_exact.get(dom, 0)
        if self.addr_exact:
            m |= self.addr_exact.get(v, 0)
        if self.dom_below:
            get = self.dom_below.get
            _, dot, rest = dom.partition(".")
            while dot:
                m |= get(rest, 0)
                _, dot, rest = rest.partition(".")
        if self.addr_below:
            get = self.addr_below.get
            local = v[: at + 1]  # "ops@"
            _, dot, rest = dom.partition(".")
            while dot:
                m |= get(local + rest, 0)
                _, dot, rest = rest.partition(".")
        if self.anydom:
            m |= self.anydom.get(v[:at], 0)
            if not explicit:
                m |= self.anydom.get("*", 0)
        return m

    def explain(self, value: str, bit: int) -> str | None:
        v = value.strip().lower()
        if v[:1] == "<" and v[-1:] == ">":
            v = v[1:-1]
        if not v:
            return "<>" if self.null & bit else ("*" if self.any & bit else None)
        at = v.rfind("@")
        if at >= 0:
            local, dom = v[:at], v[at + 1 :].removesuffix(".")
            if self.addr_exact.get(f"{local}@{dom}", 0) & bit:
                return f"{local}@{dom}"
            if self.dom_exact.get(dom, 0) & bit:
                return f"*@{dom}"
            i = dom.find(".")
            while i >= 0:
                i += 1
                if self.addr_below.get(f"{local}@{dom[i:]}", 0) & bit:
                    return f"{local}@*.{dom[i:]}"
                if self.dom_below.get(dom[i:], 0) & bit:
                    return f"*@*.{dom[i:]}"
                i = dom.find(".", i)
            for lp in (local, "*"):
                if self.anydom.get(lp, 0) & bit:
                    return f"{lp}@*"
        return "*" if self.any & bit else None


class PathIndex:
    """Case-sensitive path globs ('*' = any run of characters, '/' included). Globs are bucketed by
    their literal prefix; a glob written by several rules runs its regex once."""

    __slots__ = ("exact", "globs", "lengths", "anything")

    def __init__(self) -> None:
        self.exact: dict[str, int] = {}
        # literal prefix -> {glob text: [compiled glob, mask]}
        self.globs: dict[str, dict[str, list[Any]]] = {}
        self.lengths: list[int] = []
        self.anything = 0  # "*"

    def add(self, pattern: Pattern, bit: int) -> None:
        assert isinstance(pattern, PathGlob)
        if not pattern.is_glob:
            _or_into(self.exact, pattern.text, bit)
        elif pattern.text == "*":
            self.anything |= bit
        else:
            bucket = self.globs.setdefault(pattern.prefix, {})
            if pattern.text in bucket:
                bucket[pattern.text][1] |= bit
            else:
                bucket[pattern.text] = [pattern.regex.fullmatch, bit]
            self.lengths = sorted({len(p) for p in self.globs})

    def lookup(self, value: str, explicit: bool = False) -> int:
        m = self.exact.get(value, 0)
        if not explicit:
            m |= self.anything
        if self.globs:
            n = len(value)
            get = self.globs.get
            for plen in self.lengths:
                if plen > n:
                    break
                bucket = get(value[:plen])
                if bucket:
                    for fullmatch, mask in bucket.values():
                        if fullmatch(value):
                            m |= mask
        return m

    def explain(self, value: str, bit: int) -> str | None:
        if self.exact.get(value, 0) & bit:
            return value
        for plen in reversed(self.lengths):  # the glob with the longest literal prefix reads best
            for text, (fullmatch, mask) in self.globs.get(value[:plen], {}).items():
                if mask & bit and fullmatch(value):
                    return text
        return "*" if self.anything & bit else None

    def __len__(self) -> int:
        return len(self.exact) + sum(len(b) for b in self.globs.values())


def new_index(kind: KeyKind) -> Index:
    if kind is KeyKind.NAME:
        return NameIndex()
    if kind is KeyKind.EMAIL:
        return EmailIndex()
    if kind is KeyKind.PATH:
        return PathIndex()
    if kind is KeyKind.CIDR:
        return CidrIndex()
    if kind is KeyKind.OID:
        return OidIndex()
    if kind in (KeyKind.QTYPE, KeyKind.METHOD):
        return UpperSetIndex()
    if kind is KeyKind.OP:
        return LowerSetIndex()
    if kind is KeyKind.PORT:
        return PortSetIndex()
    return SetIndex()
