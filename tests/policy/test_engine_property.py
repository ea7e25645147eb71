"""Property: the compiled, indexed engine decides exactly like a naive first-match evaluator.

The reference below is written from the policy reference's words (docs/policy.md), independently of policy.model/matchers: it
walks the rules in order and compares every pattern by plain string operations. Hypothesis draws
random rule sets over small alphabets (so patterns and requests collide often) and random requests,
including wrong case, trailing dots, missing keys, unknown guests and junk values.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import Engine, load_policy

GUESTS = ["web1", "mail1", "db1"]
LABELS = ["a", "b", "c"]

KEYS: dict[str, dict[str, str]] = {
    "dns": {"qname": "name", "qtype": "qtype", "answer_ip": "cidr"},
    "smtp": {"mail_from": "email", "rcpt_to": "email"},
    "snmp": {"agent": "agent", "op": "op", "oid": "oid"},
    "http": {"host": "name", "method": "method", "path": "path", "port": "port"},
    "ws": {"host": "name", "method": "method", "path": "path", "port": "port"},
    "tls": {"sni": "name", "dst": "cidr"},
}

# -- the naive reference ---------------------------------------------------------------------


def ref_name(p: str, v: str) -> bool:
    v = v.lower()
    if v.endswith("."):
        v = v[:-1]
    if p == "*":
        return True
    if p.startswith("*."):
        return v.endswith("." + p[2:])
    return v == p


def ref_email(p: str, v: str) -> bool:
    v = v.strip().lower()
    if v.startswith("<") and v.endswith(">"):
        v = v[1:-1]
    if p == "<>":
        return v == ""
    if p == "*":
        return True
    if "@" not in v:
        return False
    local, dom = v.rsplit("@", 1)
    plocal, pdom = p.rsplit("@", 1)
    return plocal in ("*", local) and ref_name(pdom, dom)


def ref_cidr(p: str, v: str) -> bool:
    try:
        ip = ipaddress.ip_address(v)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    net = ipaddress.ip_network(p)
    return ip.version == net.version and ip in net


def ref_oid(p: str, v: str) -> bool:
    if v.startswith("."):
        v = v[1:]
    return v == p or v.startswith(p + ".")


def ref_glob(p: str, v: str) -> bool:
    if not p:
        return not v
    if p[0] == "*":
        return any(ref_glob(p[1:], v[i:]) for i in range(len(v) + 1))
    return bool(v) and v[0] == p[0] and ref_glob(p[1:], v[1:])


def ref_fits(kind: str, p: str, v: Any) -> bool:
    v = str(v)
    if kind == "name":
        return ref_name(p, v)
    if kind == "email":
        return ref_email(p, v)
    if kind == "cidr":
        return ref_cidr(p, v)
    if kind == "oid":
        return ref_oid(p, v)
    if kind == "path":
        return ref_glob(p, v)
    if kind in ("qtype", "method"):
        return p.upper() == v.upper()
    if kind == "op":
        return p.lower() == v.lower()
    if kind == "port":
        return str(p) == v
    return p == v


def reference(policy: dict[str, Any], protocol: str, guest: str, request: dict[str, Any]) -> tuple[str, str, str]:
    """(rule id, verdict, code) by walking the rules in order."""
    if guest not in GUESTS:
        guest = "unknown"
    monitor = policy.get("mode") == "monitor"
    for rule in policy["rules"]:
        if rule["protocol"] != protocol:
            continue
        if "guests" in rule and guest not in rule["guests"]:
            continue
        ok = True
        for key, patterns in rule.get("match", {}).items():
            kind = KEYS[protocol][key]
            value = request.get(key)
            if value is None or not any(ref_fits(kind, p, value) for p in patterns):
                ok = False
                break
        if ok:
            if rule["action"] == "allow":
                return rule["id"], "allow", "rule"
            return rule["id"], "would_deny" if monitor else "deny", "rule"
    if policy.get("default", "deny") == "allow":
        return "default", "allow", "default"
    return "default", "would_deny" if monitor else "deny", "default"


def ref_named(policy: dict[str, Any], protocol: str, guest: str, key: str, value: str) -> bool:
    if guest not in GUESTS:
        guest = "unknown"
    for rule in policy["rules"]:
        if rule["protocol"] != protocol or rule["action"] != "allow":
            continue
        if "guests" in rule and guest not in rule["guests"]:
            continue
        if any(p != "*" and ref_fits("name", p, value) for p in rule.get("match", {}).get(key, [])):
            return True
    return False


# -- strategies ------------------------------------------------------------------------------

names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=3).map(".".join)
name_patterns = st.one_of(names, names.map(lambda n: "*." + n), st.just("*"))
IP_BASES = ["10.1.2.3", "10.1.200.7", "192.168.1.1", "0.0.0.0", "fd00::1", "2001:db8::1"]
cidrs = st.builds(
    lambda ip, frac: str(ipaddress.ip_network(
        f"{ip}/{int(frac * ipaddress.ip_address(ip).max_prefixlen)}", strict=False)),
    st.sampled_from(IP_BASES), st.floats(0, 1))
request_ips = st.sampled_from(IP_BASES + ["10.1.2.4", "10.2.0.1", "::ffff:10.1.2.3", "fd00:1::", "junk", ""])
emails = st.one_of(
    st.just("<>"), st.just("*"),
    st.builds(lambda lp, dp: f"{lp}@{dp}", st.sampled_from(["*", "ops", "dev"]), name_patterns))
request_emails = st.one_of(
    st.builds(lambda lp, d, wrap: (f"<{lp}@{d}>" if wrap else f"{lp}@{d}"),
              st.sampled_from(["ops", "dev", "OPS", "x"]), names, st.booleans()),
    st.sampled_from(["", "<>", "noat", "ops@", "@a"]))
oids = st.lists(st.sampled_from(["1", "3", "6"]), max_size=3).map(lambda arcs: ".".join(["1", *arcs]))
request_oids = st.builds(lambda o, dot: ("." if dot else "") + o,
                         st.lists(st.sampled_from(["1", "3", "6", "2"]), min_size=1, max_size=6).map(".".join),
                         st.booleans())
globs = st.lists(st.sampled_from(["/", "a", "b", "*"]), min_size=1, max_size=5).map("".join).filter(
    lambda g: "**" not in g and (g == "*" or g.startswith(("/", "*"))))
request_paths = st.text(alphabet="/ab", max_size=6)

PATTERNS = {
    "name": name_patterns, "email": emails, "cidr": cidrs, "oid": oids, "path": globs,
    "qtype": st.sampled_from(["A", "AAAA", "mx"]), "method": st.sampled_from(["GET", "post", "PUT"]),
    "op": st.sampled_from(["get", "SET", "getnext"]), "port": st.sampled_from([80, 443, 8080]),
    "agent": st.sampled_from(["r1", "r2"]),
}
VALUES = {
    "name": st.builds(lambda n, up, dot: (n.upper() if up else n) + ("." if dot else ""),
                      names, st.booleans(), st.booleans()),
    "email": request_emails, "cidr": request_ips, "oid": request_oids, "path": request_paths,
    "qtype": st.sampled_from(["A", "aaaa", "MX", "TXT"]), "method": st.sampled_from(["GET", "POST", "get", "HEAD"]),
    "op": st.sampled_from(["get", "set", "GETNEXT", "trap"]), "port": st.sampled_from([80, "443", 8080, 22]),
    "agent": st.sampled_from(["r1", "r2", "r3"]),
}


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    rules = []
    for i in range(draw(st.integers(0, 12))):
        protocol = draw(st.sampled_from(sorted(KEYS)))
        rule: dict[str, Any] = {"id": f"r{i}", "action": draw(st.sampled_from(["allow", "deny"])),
                                "protocol": protocol}
        if draw(st.booleans()):
            rule["guests"] = draw(st.lists(st.sampled_from(GUESTS + ["unknown"]), min_size=1, unique=True))
        keys = draw(st.lists(st.sampled_from(sorted(KEYS[protocol])), unique=True, max_size=3))
        if keys:
            rule["match"] = {k: draw(st.lists(PATTERNS[KEYS[protocol][k]], min_size=1, max_size=3)) for k in keys}
        rules.append(rule)
    return {"mode": draw(st.sampled_from(["enforce", "monitor"])),
            "default": draw(st.sampled_from(["allow", "deny"])), "rules": rules}


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    protocol = draw(st.sampled_from(sorted(KEYS)))
    guest = draw(st.sampled_from(GUESTS + ["unknown", "stranger"]))
    req = {}
    for key, kind in KEYS[protocol].items():
        if draw(st.integers(0, 4)):  # mostly present, sometimes missing
            req[key] = draw(VALUES[kind])
    return protocol, guest, req


MID = {"name": " matches ", "email": " matches ", "path": " matches ", "cidr": " is in ",
       "oid": " is in subtree "}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=rule_sets(), reqs=st.lists(requests(), min_size=1, max_size=25))
def test_compiled_engine_agrees_with_naive_reference(policy: dict[str, Any],
                                                     reqs: list[tuple[str, str, dict[str, Any]]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rules.yaml"
        path.write_text(json.dumps(policy, indent=1))  # JSON is YAML
        engine = load_policy(path, GUESTS)
    for protocol, guest, req in reqs:
        got = engine.decide(protocol, guest, req)
        assert (got.rule, str(got.verdict), str(got.code)) == reference(policy, protocol, guest, req), (
            protocol, guest, req, got.detail)
        assert got.detail and got.at
        if got.code == "rule":
            # the detail names, for each pattern key of the winning rule, a pattern that fits
            rule = next(r for r in policy["rules"] if r["id"] == got.rule)
            for key, patterns in rule.get("match", {}).items():
                kind = KEYS[protocol][key]
                if kind in MID:
                    texts = [f"{key} {req[key]}{MID[kind]}{p}" for p in patterns if ref_fits(kind, p, req[key])]
                    assert any(t in got.detail for t in texts), (got.detail, texts)
        for key, kind in KEYS[protocol].items():
            if kind == "name" and key in req:
                assert engine.named_by_rule(protocol, guest, key, req[key]) == ref_named(
                    policy, protocol, guest, key, req[key]), (protocol, guest, key, req[key])


_FUZZ_RULES = {
    "default": "deny",
    "rules": [
        {"id": "d", "action": "allow", "protocol": "dns",
         "match": {"qname": ["*.a", "b"], "qtype": ["A"], "answer_ip": ["10.0.0.0/8"]}},
        {"id": "s", "action": "allow", "protocol": "smtp", "match": {"mail_from": ["*@*.a", "<>"],
                                                                   "rcpt_to": ["ops@b", "*"]}},
        {"id": "n", "action": "allow", "protocol": "snmp", "match": {"agent": ["r"], "op": ["get"], "oid": ["1.3"]}},
        {"id": "h", "action": "allow", "protocol": "http",
         "match": {"host": ["*"], "method": ["GET"], "path": ["/a*", "/b"], "port": [80]}},
        {"id": "t", "action": "allow", "protocol": "tls", "match": {"sni": ["*.a"], "dst": ["::/0"]}},
    ],
}


@functools.cache
def _fuzz_engine() -> Engine:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rules.yaml"
        path.write_text(json.dumps(_FUZZ_RULES))
        return load_policy(path, GUESTS)


@settings(max_examples=300, deadline=None)
@given(protocol=st.sampled_from(sorted(KEYS)), guest=st.text(max_size=5),
       values=st.dictionaries(st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})),
                              st.one_of(st.text(max_size=30), st.integers(), st.binary(max_size=5))))
def test_any_request_value_gets_a_decision(protocol: str, guest: str, values: dict[str, Any]) -> None:
    """Bad input never raises: any text, number or bytes in any key gets a full Decision."""
    got = _fuzz_engine().decide(protocol, guest, values)
    assert got.rule and got.at and got.detail and got.verdict in ("allow", "deny")
    assert got.detail.isprintable()
