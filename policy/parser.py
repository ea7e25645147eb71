"""The rules-file parser: YAML (via `policy.source`) -> `policy.model.Policy`, and name files -> names.

Owns: the rules-file schema (top-level keys, rule keys, per-protocol `match:` keys), every check a
human needs to hear about with FILE:LINE:COL and a hint (unknown keys with did-you-mean, unknown
action/protocol/mode/default/guest, duplicate rule ids, bad patterns, rates, sizes, `plaintext` where
it cannot apply), collecting as many problems as it can before raising one `SourceError`; and the
`qname_file`/`host_file`/`sni_file` line format (one name per line, `#` comments, hosts-file lines).
Must not: evaluate requests or build indexes (see `policy.matchers`/`policy.engine`), or read any file
other than the rules file and the name files it names.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from policy.model import (
    FILE_KEYS,
    LIMIT_KEYS,
    MATCH_KEYS,
    NAME_RE,
    PLAINTEXT_PROTOCOLS,
    PROTOCOLS,
    RATE_PERIODS,
    Action,
    Mode,
    NameFile,
    Pattern,
    Policy,
    Rate,
    Rule,
    parse_pattern,
)
from policy.source import Node, Problem, Problems, SourceError, load_yaml, suggest

TOP_KEYS = frozenset({"version", "mode", "default", "rules"})
RULE_KEYS = frozenset({"id", "action", "protocol", "guests", "match", "rate", "plaintext", "comment"})
UNKNOWN_GUEST = "unknown"
MAX_NAME_FILE_BYTES = 512 * 1024 * 1024
MAX_NAME_FILE_PROBLEMS = 20

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}")
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*$")
_PLAINTEXT_WHY = {
    "dns": "DNS always leaves over DNS-over-TLS",
    "smtp": "mail always leaves over verified STARTTLS",
    "snmp": "SNMP always leaves as SNMPv3 authPriv",
    "tls": "passthrough TLS is encrypted end to end already",
}



_GENERIC_HINTS = (
    ("invalid YAML: duplicate key", "each key may appear once in a mapping"),
    ("invalid YAML", "check the indentation, quotes and brackets at and just before this place"),
    ("expected a mapping for the policy file", "a rules file is a mapping with mode:, default: and rules:"),
    ("expected a list of rules", "write each rule as a list item starting with '- id: ...'"),
    ("missing required key", "every rule needs id, action (allow|deny) and protocol ("
     + "|".join(PROTOCOLS) + ")"),
    ("policy file is binary", "is this the rules file? It must be UTF-8 YAML text"),
    ("expected a mapping for a rule", "write each rule as a mapping: '- id: ...' with action: and protocol:"),
    ("expected a mapping for match", "write match: as key: [patterns], e.g. match: {qname: [example.com]}"),
    ("expected true or false", "write true or false without quotes"),
    ("expected a string", "write a single value here (quote it if it contains ':', '#', '[' or '{')"),
    ("policy file is not UTF-8", "save the file as UTF-8"),
)


def _hinted(problems: Iterable[Problem]) -> list[Problem]:
    """Give every problem a one-line hint (the shared YAML layer leaves some without)."""
    out = []
    for p in problems:
        if not p.hint:
            for prefix, hint in _GENERIC_HINTS:
                if p.message.startswith(prefix):
                    p = Problem(p.file, p.line, p.col, p.message, hint)
                    break
        out.append(p)
    return out


def parse_policy(path: str | os.PathLike[str], guests: Iterable[str]) -> Policy:
    """Read and check a rules file. Raises `SourceError` with every problem found."""
    try:
        return _parse_policy(path, guests)
    except SourceError as e:
        raise SourceError(_hinted(e.problems)) from None


def _parse_policy(path: str | os.PathLike[str], guests: Iterable[str]) -> Policy:
    root = load_yaml(path, what="policy file")
    known_guests = frozenset(guests) | {UNKNOWN_GUEST}
    problems = Problems()
    top = _checked_map(root, TOP_KEYS, (), "the policy file", problems)
    if top is None:
        problems.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover

    if "version" in top:
        problems.attempt(lambda: top["version"].int(min=1, max=1, what="version"), 1)
    mode, mode_line = Mode.ENFORCE, 1
    if "mode" in top:
        mode = Mode(problems.attempt(lambda: top["mode"].enum([m.value for m in Mode], "mode"), "enforce"))
        mode_line = top["mode"].line
    default, default_line = Action.DENY, 1
    if "default" in top:
        default = Action(problems.attempt(lambda: top["default"].enum([a.value for a in Action], "default"),
                                          "deny"))
        default_line = top["default"].line

    rules: list[Rule] = []
    if "rules" in top and top["rules"].value is not None:
        items = problems.attempt(lambda: top["rules"].get_list("rules"), [])
        first_seen: dict[str, Node] = {}
        for item in items:
            rule = _parse_rule(item, len(rules), known_guests, first_seen, problems)
            if rule is not None:
                rules.append(rule)
    problems.raise_if_any()
    return Policy(root.file, mode, default, default_line, tuple(rules), mode_line)


def _checked_map(
    node: Node, allowed: Iterable[str], required: Iterable[str], what: str, problems: Problems,
    hint_for: Callable[[Problem], Problem] | None = None,
) -> dict[str, Node] | None:
    """`node.get_map` that records its problems and still returns the known entries, so that the
    rest of the mapping is checked too. None when the node is not a mapping at all."""
    allowed = frozenset(allowed)
    try:
        return node.get_map(allowed=allowed, required=required, what=what)
    except SourceError as e:
        problems.items.extend(hint_for(p) if hint_for else p for p in e.problems)
    if not node.is_map():
        return None
    return {k: v for k, v in node.get_map().items() if k in allowed}


def _parse_rule(
    item: Node, index: int, known_guests: frozenset[str], first_seen: dict[str, Node], problems: Problems
) -> Rule | None:
    start = len(problems.items)
    f = _checked_map(item, RULE_KEYS, ("id", "action", "protocol"), "a rule", problems)
    if f is None:
        return None

    rule_id = ""
    if "id" in f:
        rule_id = problems.attempt(lambda: f["id"].str("rule id"), "")
        if rule_id and not _ID_RE.fullmatch(rule_id):
            problems.add(f["id"].problem(
                f"bad rule id {rule_id!r}",
                "use letters, digits and _ . : / @ + - (it appears in audit records and metrics), "
                "at most 128 characters, starting with a letter or digit"))
        elif rule_id in first_seen:
            prev = first_seen[rule_id]
            problems.add(f["id"].problem(f"duplicate rule id '{rule_id}'",
                                         f"first used at {Path(prev.file).name}:{prev.line}"))
        elif rule_id:
            first_seen[rule_id] = f["id"]

    action = None
    if "action" in f:
        action = problems.attempt(lambda: Action(f["action"].enum([a.value for a in Action], "action")), None)
    protocol = None
    if "protocol" in f:
        protocol = problems.attempt(lambda: f["protocol"].enum(PROTOCOLS, "protocol"), None)

    guests: frozenset[str] | None = None
    if "guests" in f:
        guests = _parse_guests(f["guests"], known_guests, problems)

    match: dict[str, tuple[Pattern, ...]] = {}
    name_files: list[NameFile] = []
    limits: dict[str, int] = {}
    if "match" in f and protocol is not None:
        _parse_match(f["match"], protocol, match, name_files, limits, problems)
    elif "match" in f and f["match"].value is not None and not f["match"].is_map():
        problems.add(f["match"].problem(f"expected a mapping for match, found {f['match']._type_name()}"))

    rate = None
    if "rate" in f:
        rate = _parse_rate(f["rate"], problems)

    plaintext = False
    if "plaintext" in f:
        plaintext = problems.attempt(lambda: f["plaintext"].bool("plaintext"), False)
        if plaintext and protocol is not None and protocol not in PLAINTEXT_PROTOCOLS:
            problems.add(f["plaintext"].problem(
                f"plaintext: true cannot apply to protocol {protocol}",
                f"only http and ws requests may leave unencrypted; {_PLAINTEXT_WHY[protocol]}"))
            plaintext = False

    if action is Action.DENY:
        # Settings that only shape what an allow lets through are a mistake on a deny rule.
        if plaintext:
            problems.add(f["plaintext"].problem("plaintext: true on a deny rule has no effect",
                                                "remove it, or make the rule action: allow"))
        if rate is not None:
            problems.add(f["rate"].problem("rate on a deny rule has no effect",
                                           "a deny rule lets nothing through; put the rate on an allow rule"))
        if limits:
            problems.add(f["match"].problem(
                f"{', '.join(sorted(limits))} on a deny rule has no effect",
                "limits bound what an allow rule lets through; remove them or make the rule action: allow"))

    comment = ""
    if "comment" in f:
        comment = problems.attempt(lambda: f["comment"].str("comment", nonempty=False), "")

    if len(problems.items) > start or action is None or protocol is None:
        return None
    return Rule(
        id=rule_id, index=index, action=action, protocol=protocol, guests=guests,
        match=MappingProxyType(match), file=item.file, line=item.line, name_files=tuple(name_files),
        plaintext=plaintext, rate=rate, limits=MappingProxyType(limits), comment=comment,
    )


def _parse_guests(node: Node, known: frozenset[str], problems: Problems) -> frozenset[str] | None:
    items = problems.attempt(lambda: node.get_list("guest names", allow_scalar=True), None)
    if items is None:
        return None
    if not items:
        problems.add(node.problem("guests: [] matches no guest",
                                  "list guest names, or remove the key to match every guest"))
        return None
    out: set[str] = set()
    for g in items:
        name = problems.attempt(lambda g=g: g.str("guest name"), None)
        if name is None:
            continue
        if name not in known:
            others = sorted(known - {UNKNOWN_GUEST})
            problems.add(g.problem(
                f"unknown guest '{name}'",
                suggest(name, known)
                or ("known guests: " + ", ".join(others) + "; " if others else "no guests are defined; ")
                + "define guests in the config's guests: section ('unknown' means any unlisted source)"))
            continue
        out.add(name)
    return frozenset(out)


def _parse_match(
    node: Node, protocol: str, match: dict[str, tuple[Pattern, ...]], name_files: list[NameFile],
    limits: dict[str, int], problems: Problems,
) -> None:
    if node.value is None:
        return
    keys = MATCH_KEYS[protocol]
    files = FILE_KEYS.get(protocol, {})
    limit_keys = LIMIT_KEYS.get(protocol, frozenset())
    allowed = set(keys) | set(files) | set(limit_keys)

    def cross_protocol_hint(p: Problem) -> Problem:
        m = re.match(r"unknown key '([^']*)'", p.message)
        if not m or p.hint.startswith("did you mean"):
            return p
        key = m.group(1)
        owners = [proto for proto in PROTOCOLS
                  if key in MATCH_KEYS[proto] or key in FILE_KEYS.get(proto, {}) or key in LIMIT_KEYS.get(proto, ())]
        if owners:
            hint = f"'{key}' is a {'/'.join(owners)} key; {protocol} rules match on: " + ", ".join(sorted(allowed))
            return Problem(p.file, p.line, p.col, p.message, hint)
        return p

    entries = _checked_map(node, allowed, (), f"match for protocol {protocol}", problems, cross_protocol_hint)
    if entries is None:
        return
    for key, value in entries.items():
        if key in limit_keys:
            size = problems.attempt(lambda value=value, key=key: value.size(key), None)
            if size is not None:
                limits[key] = size
            continue
        if key in files:
            path = problems.attempt(lambda value=value, key=key: value.path(key), None)
            if path is None:
                continue
            where = f"{Path(value.file).name}:{value.line}:{value.col}"
            if not path.is_file():
                problems.add(value.problem(
                    f"{key} {path} {'is not a regular file' if path.exists() else 'does not exist'}",
                    "the path is relative to the rules file's directory"))
                continue
            if not os.access(path, os.R_OK):
                problems.add(value.problem(f"{key} {path} is not readable by this user"))
                continue
            name_files.append(NameFile(files[key], path, where))
            continue
        kind = keys[key]
        items = problems.attempt(lambda value=value, key=key: value.get_list(f"{key} patterns", allow_scalar=True),
                                 None)
        if items is None:
            continue
        if not items:
            problems.add(value.problem(f"{key}: [] matches nothing",
                                       f"list at least one pattern, or remove {key} to match any value"))
            continue
        patterns: list[Pattern] = []
        for it in items:
            text = problems.attempt(lambda it=it, key=key: it.str(f"a {key} pattern"), None)
            if text is None:
                continue
            try:
                patterns.append(parse_pattern(kind, str(text)))
            except ValueError as e:
                problems.add(it.problem(e.args[0], e.args[1] if len(e.args) > 1 else ""))
        if len(patterns) == len(items):
            match[key] = tuple(dict.fromkeys(patterns))  # keep order, drop repeats


def _parse_rate(node: Node, problems: Problems) -> Rate | None:
    text = node.value if isinstance(node.value, str) else None
    m = _RATE_RE.match(text) if text is not None else None
    if not m or int(m.group(1)) < 1:
        problems.add(node.problem(
            f"bad rate {node.value!r}",
            "write N/second, N/minute, N/hour or N/day with N at least 1, e.g. 100/hour"))
        return None
    return Rate(int(m.group(1)), RATE_PERIODS[m.group(2)], f"{int(m.group(1))}/{m.group(2)}")


# -- name files ------------------------------------------------------------------------------


@dataclass(slots=True)
class NameList:
    """Names read from a name file, split by kind (plain lists of str: no per-name objects)."""

    exact: list[str] = field(default_factory=list)
    below: list[str] = field(default_factory=list)  # parents of "*.x" lines
    any: bool = False


def read_name_file(nf: NameFile) -> NameList:
    """Read a `qname_file`/`host_file`/`sni_file`: one name per line; `#` starts a comment; blank
    lines are skipped; hosts-file lines (`0.0.0.0 ads.example.com [more names]`) give the names after
    the address. Lines use the inline pattern syntax ("x" exact, "*.x" below x, "*" any)."""
    name = str(nf.path)
    try:
        size = os.stat(nf.path).st_size
        if size > MAX_NAME_FILE_BYTES:
            raise SourceError(Problem(name, 1, 1, f"name file is {size} bytes, over the "
                                      f"{MAX_NAME_FILE_BYTES} byte limit", "split it, or drop duplicates"))
        data = nf.path.read_bytes()
    except OSError as e:
        raise SourceError(Problem(name, 1, 1, f"cannot read name file: {e.strerror}",
                                  f"named at {nf.written_at}")) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        col = nul - (data.rfind(b"\n", 0, nul) + 1) + 1
        raise SourceError(Problem(name, line, col, "name file is binary (NUL byte), not text",
                                  "a name file is UTF-8 text, one name per line"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SourceError(Problem(name, line, col, "name file is not UTF-8 text", "save the file as UTF-8")) from None
    del data
    if text.startswith("\ufeff"):  # a byte-order mark from Windows editors
        text = text[1:]
    out = NameList()
    exact_append, below_append = out.exact.append, out.below.append
    fullmatch = NAME_RE.fullmatch
    problems: list[Problem] = []
    # Lower-casing the whole text once makes each stored name the line's own str object.
    for lineno, line in enumerate(text.lower().splitlines(), 1):
        if not line:
            continue
        if "#" in line:
            line = line[: line.index("#")]
        line = line.strip()
        if not line:
            continue
        if " " in line or "\t" in line:
            tokens = line.split()
            try:
                ipaddress.ip_address(tokens[0])
            except ValueError:
                problems.append(Problem(name, lineno, 1, f"expected one name per line, found {line!r}",
                                        "hosts-file lines start with an address: 0.0.0.0 ads.example.com"))
                if len(problems) >= MAX_NAME_FILE_PROBLEMS:
                    break
                continue
            names: Iterable[str] = tokens[1:]
        else:
            names = (line,)
        for n in names:
            if n.endswith("."):
                n = n[:-1]
            if len(n) <= 253 and fullmatch(n):
                exact_append(n)
            elif n.startswith("*.") and len(n) <= 255 and fullmatch(n, 2):
                below_append(n[2:])
            elif n == "*":
                out.any = True
            else:
                from policy.model import NamePattern  # only on the error path

                try:
                    NamePattern.parse(n)
                    why, hint = f"bad name {n!r}", ""
                except ValueError as e:
                    why, hint = e.args[0], e.args[1] if len(e.args) > 1 else ""
                col = _col_of(text, lineno, n)
                problems.append(Problem(name, lineno, col, why.replace("name pattern", "name"), hint))
                if len(problems) >= MAX_NAME_FILE_PROBLEMS:
                    break
        if len(problems) >= MAX_NAME_FILE_PROBLEMS:
            break
    if problems:
        raise SourceError(problems)
    return out


def _col_of(text: str, lineno: int, token: str) -> int:
    line = text.splitlines()[lineno - 1].lower()
    pos = line.find(token)
    return pos + 1 if pos >= 0 else 1

