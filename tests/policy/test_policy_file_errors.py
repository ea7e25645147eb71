"""Bad rules files: each case is a named fixture in tests/fixtures/policy/ with its exact message.

Every message is FILE:LINE:COL: message plus a one-line hint; several problems in one file are
reported together; nothing raises anything but SourceError (never a traceback for the operator).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from policy import load_policy
from policy.source import SourceError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policy"
GUESTS = {"web1", "mail1"}

EXPECTED: dict[str, str] = {
    "bad_cidr": (
        "bad_cidr.yaml:6:19: bad CIDR '10.0.0.1/8': has host bits set\n"
        "  hint: did you mean '10.0.0.0/8'?\n"
        "bad_cidr.yaml:6:33: bad CIDR '192.168.0.0/33'\n"
        '  hint: write an address or a network: 10.0.0.0/8, 192.0.2.7, fd00::/8'
    ),
    "bad_email": (
        "bad_email.yaml:6:17: bad e-mail pattern 'example.org': no '@'\n"
        "  hint: write '*@example.org' for any address at example.org, or '*' for any address"
    ),
    "bad_glob": (
        "bad_glob.yaml:6:15: bad name pattern '*example.com': '*' may only be the whole first label\n"
        "  hint: write '*.example.com' for every name below example.com, 'example.com' for the name itself, or '*' for any name"
    ),
    "bad_name_file": (
        "bad_names.txt:4:1: expected one name per line, found 'tracker .example.net'\n"
        '  hint: hosts-file lines start with an address: 0.0.0.0 ads.example.com\n'
        "bad_names.txt:6:1: bad name 'foo*.example.org': '*' may only be the whole first label\n"
        "  hint: write '*.example.com' for every name below example.com, 'example.com' for the name itself, or '*' for any name"
    ),
    "bad_oid": (
        "bad_oid.yaml:5:45: bad OID 'iso.3.6.1'\n"
        '  hint: write OIDs numerically, dot-separated, e.g. 1.3.6.1.2.1 (MIB names are not loaded)'
    ),
    "bad_path_glob": (
        "bad_path_glob.yaml:5:45: bad path glob 'v1/*': must start with '/'\n"
        "  hint: write '/v1/*' (paths are compared from the leading slash)"
    ),
    "bad_port": (
        "bad_port.yaml:5:24: bad port '70000'\n"
        '  hint: ports are 1-65535'
    ),
    "bad_qtype": (
        "bad_qtype.yaml:5:24: unknown qtype 'AAA'\n"
        '  hint: use an RR type mnemonic: A, AAAA, MX, TXT, ANY, ... or TYPEnnn'
    ),
    "bad_rate": (
        "bad_rate.yaml:5:11: bad rate '100/week'\n"
        '  hint: write N/second, N/minute, N/hour or N/day with N at least 1, e.g. 100/hour'
    ),
    "bad_rule_id": (
        "bad_rule_id.yaml:2:9: bad rule id 'dns corp'\n"
        '  hint: use letters, digits and _ . : / @ + - (it appears in audit records and metrics), at most 128 characters, starting with a letter or digit'
    ),
    "bad_size": (
        "bad_size.yaml:6:17: bad size '10 megabytes' for max_size\n"
        '  hint: write a number with a unit: 512B, 10KB, 25MB, 1GB (KiB/MiB/GiB for powers of 2)'
    ),
    "binary": (
        'binary.yaml:2:10: policy file is binary (NUL byte), not YAML text\n'
        '  hint: is this the rules file? It must be UTF-8 YAML text'
    ),
    "binary_name_file": (
        'binary_names.txt:3:4: name file is binary (NUL byte), not text\n'
        '  hint: a name file is UTF-8 text, one name per line'
    ),
    "duplicate_id": (
        "duplicate_id.yaml:6:9: duplicate rule id 'dns-corp'\n"
        '  hint: first used at duplicate_id.yaml:2'
    ),
    "duplicate_key": (
        "duplicate_key.yaml:4:5: invalid YAML: duplicate key 'action'\n"
        '  hint: each key may appear once in a mapping'
    ),
    "empty": (
        'empty.yaml:1:1: policy file is empty\n'
        '  hint: see the example in the README'
    ),
    "empty_guests": (
        'empty_guests.yaml:5:13: guests: [] matches no guest\n'
        '  hint: list guest names, or remove the key to match every guest'
    ),
    "empty_match_list": (
        'empty_match_list.yaml:5:19: host: [] matches nothing\n'
        '  hint: list at least one pattern, or remove host to match any value'
    ),
    "garbage": (
        "garbage.yaml:4:11: invalid YAML: expected ',' or ']', but got ':'\n"
        '  hint: check the indentation, quotes and brackets at and just before this place'
    ),
    "match_key_typo": (
        "match_key_typo.yaml:6:7: unknown key 'qnmae' in match for protocol dns\n"
        "  hint: did you mean 'qname'?"
    ),
    "match_key_wrong_protocol": (
        "match_key_wrong_protocol.yaml:6:7: unknown key 'qname' in match for protocol http\n"
        "  hint: 'qname' is a dns key; http rules match on: host, host_file, max_body, method, path, port"
    ),
    "missing_required": (
        "missing_required.yaml:2:5: missing required key 'action' in a rule\n"
        '  hint: every rule needs id, action (allow|deny) and protocol (dns|smtp|snmp|http|ws|tls)'
    ),
    "not_a_mapping": (
        'not_a_mapping.yaml:1:1: expected a mapping for the policy file, found a list\n'
        '  hint: a rules file is a mapping with mode:, default: and rules:'
    ),
    'not_utf8': (
        'not_utf8.yaml:2:12: policy file is not UTF-8 text\n'
        '  hint: save the file as UTF-8'
    ),
    "plaintext_on_deny": (
        'plaintext_on_deny.yaml:6:16: plaintext: true on a deny rule has no effect\n'
        '  hint: remove it, or make the rule action: allow'
    ),
    "plaintext_on_dns": (
        'plaintext_on_dns.yaml:5:16: plaintext: true cannot apply to protocol dns\n'
        '  hint: only http and ws requests may leave unencrypted; DNS always leaves over DNS-over-TLS'
    ),
    "qname_file_missing": (
        'qname_file_missing.yaml:6:19: qname_file no-such-list.txt does not exist\n'
        "  hint: the path is relative to the rules file's directory"
    ),
    "rules_not_a_list": (
        'rules_not_a_list.yaml:3:3: expected a list of rules, found a mapping\n'
        "  hint: write each rule as a list item starting with '- id: ...'"
    ),
    "several_problems": (
        "several_problems.yaml:7:39: bad name pattern 'bad..example.com': has an empty label\n"
        '  hint: remove the doubled, leading or stray dot\n'
        "several_problems.yaml:7:71: unknown qtype 'AAAAA'\n"
        '  hint: use an RR type mnemonic: A, AAAA, MX, TXT, ANY, ... or TYPEnnn\n'
        'several_problems.yaml:12:11: rate on a deny rule has no effect\n'
        '  hint: a deny rule lets nothing through; put the rate on an allow rule\n'
        "several_problems.yaml:13:9: duplicate rule id 'a'\n"
        '  hint: first used at several_problems.yaml:4'
    ),
    "unknown_action": (
        "unknown_action.yaml:5:13: unknown action 'alow'\n"
        "  hint: did you mean 'allow'?"
    ),
    "unknown_default": (
        "unknown_default.yaml:2:10: unknown default 'reject'\n"
        '  hint: one of: allow, deny'
    ),
    "unknown_guest": (
        "unknown_guest.yaml:5:20: unknown guest 'web2'\n"
        "  hint: did you mean 'web1'?"
    ),
    "unknown_key_typo": (
        "unknown_key_typo.yaml:1:1: unknown key 'defualt' in the policy file\n"
        "  hint: did you mean 'default'?\n"
        "unknown_key_typo.yaml:6:5: unknown key 'guest' in a rule\n"
        "  hint: did you mean 'guests'?"
    ),
    "unknown_method": (
        "unknown_method.yaml:5:27: unknown HTTP method 'PSOT'\n"
        "  hint: did you mean 'POST'?"
    ),
    "unknown_mode": (
        "unknown_mode.yaml:1:7: unknown mode 'enforcing'\n"
        "  hint: did you mean 'enforce'?"
    ),
    "unknown_op": (
        "unknown_op.yaml:5:18: unknown SNMP op 'sett'\n"
        "  hint: did you mean 'set'?"
    ),
    "unknown_protocol": (
        "unknown_protocol.yaml:4:15: unknown protocol 'htpp'\n"
        "  hint: did you mean 'http'?"
    ),
    "match_not_a_mapping": (
        'match_not_a_mapping.yaml:5:12: expected a mapping for match for protocol dns, found a list\n'
        '  hint: write match: as key: [patterns], e.g. match: {qname: [example.com]}'
    ),
    "rule_not_a_mapping": (
        'rule_not_a_mapping.yaml:2:5: expected a mapping for a rule, found a string\n'
        "  hint: write each rule as a mapping: '- id: ...' with action: and protocol:"
    ),
    "wrong_type": (
        'wrong_type.yaml:1:7: expected a string for mode, found a list\n'
        "  hint: write a single value here (quote it if it contains ':', '#', '[' or '{')\n"
        'wrong_type.yaml:6:16: expected true or false for plaintext, found a string\n'
        '  hint: write true or false without quotes\n'
        'wrong_type.yaml:7:21: expected a string for a qname pattern, found a mapping\n'
        "  hint: write a single value here (quote it if it contains ':', '#', '[' or '{')"
    ),
}


def _message(path: Path) -> str:
    with pytest.raises(SourceError) as info:
        load_policy(path, GUESTS)
    return str(info.value).replace(f"{FIXTURES}/", "")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_rules_file_gives_exact_located_message(name: str) -> None:
    assert _message(FIXTURES / f"{name}.yaml") == EXPECTED[name]


def test_every_fixture_is_covered() -> None:
    on_disk = {p.stem for p in FIXTURES.glob("*.yaml")}
    assert on_disk == set(EXPECTED), "a fixture without an expected message (or the reverse)"


def test_every_problem_has_a_hint_and_a_location() -> None:
    for name in EXPECTED:
        with pytest.raises(SourceError) as info:
            load_policy(FIXTURES / f"{name}.yaml", GUESTS)
        for problem in info.value.problems:
            assert problem.hint, f"{name}: {problem} has no hint"
            assert problem.line >= 1 and problem.col >= 1


def test_fifty_megabyte_file_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "huge.yaml"
    line = b"# " + b"x" * 1021 + b"\n"
    with big.open("wb") as f:
        for _ in range(50 * 1024):
            f.write(line)
    assert big.stat().st_size == 50 * 1024 * 1024
    with pytest.raises(SourceError) as info:
        load_policy(big, GUESTS)
    assert str(info.value) == (
        f"{big}:1:1: policy file is 52428800 bytes, over the 8388608 byte limit\n"
        "  hint: long name lists belong in a qname_file/host_file, not in the YAML"
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        load_policy(tmp_path / "nope.yaml", GUESTS)
    assert str(info.value).startswith(f"{tmp_path}/nope.yaml:1:1: policy file not found")


def test_unknown_guest_hint_lists_known_guests_when_nothing_is_close(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - {id: a, action: allow, protocol: dns, guests: [zzzzzz]}\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert str(info.value) == (
        f"{p}:2:52: unknown guest 'zzzzzz'\n"
        "  hint: known guests: mail1, web1; define guests in the config's guests: section "
        "('unknown' means any unlisted source)"
    )


def test_unknown_is_always_a_valid_guest(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - {id: a, action: allow, protocol: dns, guests: [unknown]}\n")
    engine = load_policy(p, set())
    assert engine.decide("dns", "unknown", {"qname": "x", "qtype": "A"}).rule == "a"


@pytest.mark.parametrize(
    ("protocol", "why"),
    [
        ("smtp", "mail always leaves over verified STARTTLS"),
        ("snmp", "SNMP always leaves as SNMPv3 authPriv"),
        ("tls", "passthrough TLS is encrypted end to end already"),
    ],
)
def test_plaintext_only_on_http_and_ws(tmp_path: Path, protocol: str, why: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"rules:\n  - id: a\n    action: allow\n    protocol: {protocol}\n    plaintext: true\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert str(info.value) == (
        f"{p}:5:16: plaintext: true cannot apply to protocol {protocol}\n"
        f"  hint: only http and ws requests may leave unencrypted; {why}"
    )
    for ok in ("http", "ws"):
        p.write_text(f"rules:\n  - id: a\n    action: allow\n    protocol: {ok}\n    plaintext: true\n")
        assert load_policy(p, GUESTS).decide(ok, "web1", {"host": "h", "method": "GET", "path": "/"}).plaintext


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("qname", '"a..b"', "bad name pattern 'a..b': has an empty label"),
        ("qname", '"-a.b"', "bad name pattern '-a.b': has a label that starts or ends with '-'"),
        ("qname", '"a b.c"', "bad name pattern 'a b.c': has a character that is not a letter, digit, '-' or '_'"),
        ("qname", '"a.*.c"', "bad name pattern 'a.*.c': '*' may only be the whole first label"),
        ("qname", '"**.c"', "bad name pattern '**.c': '*' may only be the whole first label"),
        ("qname", f'"{"a" * 64}.c"', f"bad name pattern '{'a' * 64}.c': has a label longer than 63 characters"),
        ("answer_ip", '"10.0.0.0/8/8"', "bad CIDR '10.0.0.0/8/8'"),
        ("answer_ip", '"fd00::1/8"', "bad CIDR 'fd00::1/8': has host bits set"),
        ("qtype", '"NOPE"', "unknown qtype 'NOPE'"),
    ],
)
def test_bad_dns_patterns(tmp_path: Path, key: str, value: str, message: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"rules:\n  - id: a\n    action: allow\n    protocol: dns\n    match: {{{key}: [{value}]}}\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    [problem] = info.value.problems
    assert problem.message == message
    assert (problem.line, problem.hint != "") == (5, True)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("oid", '"1.3..6"', "bad OID '1.3..6'"),
        ("oid", '"3.1"', "bad OID '3.1': arc out of range"),
        ("oid", '"1.3.99999999999"', "bad OID '1.3.99999999999': arc out of range"),
        ("op", '"walk"', "unknown SNMP op 'walk'"),
    ],
)
def test_bad_snmp_patterns(tmp_path: Path, key: str, value: str, message: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"rules:\n  - id: a\n    action: allow\n    protocol: snmp\n    match: {{{key}: [{value}]}}\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert [pr.message for pr in info.value.problems] == [message]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("path", '"/v1/*?x=1"', "bad path glob '/v1/*?x=1': '?' cannot appear in a path"),
        ("path", '"/v1/**"', "bad path glob '/v1/**': '**' is not a glob here"),
        ("path", '"/a b"', "bad path glob '/a b': contains whitespace or a control character"),
        ("host", '"*.*.example.com"', "bad name pattern '*.*.example.com': '*' may only be the whole first label"),
        ("port", "0", "bad port '0'"),
        ("method", "FETCH", "unknown HTTP method 'FETCH'"),
    ],
)
def test_bad_http_patterns(tmp_path: Path, key: str, value: str, message: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"rules:\n  - id: a\n    action: allow\n    protocol: http\n    match: {{{key}: [{value}]}}\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert [pr.message for pr in info.value.problems] == [message]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"ops@"', "bad e-mail pattern 'ops@': domain is empty"),
        ('"o*s@example.com"', "bad e-mail pattern 'o*s@example.com': the local part must be '*' or a literal address part"),
        ('"@example.com"', "bad e-mail pattern '@example.com': the local part must be '*' or a literal address part"),
        ('"*@exa mple.com"', "bad e-mail pattern '*@exa mple.com': domain has a character that is not a letter, digit, '-' or '_'"),
    ],
)
def test_bad_email_patterns(tmp_path: Path, value: str, message: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"rules:\n  - id: a\n    action: allow\n    protocol: smtp\n    match: {{rcpt_to: [{value}]}}\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert [pr.message for pr in info.value.problems] == [message]


def test_limits_on_wrong_protocol_are_unknown_keys(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - id: a\n    action: allow\n    protocol: http\n    match: {max_size: 1MB}\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert str(info.value) == (
        f"{p}:5:13: unknown key 'max_size' in match for protocol http\n"
        "  hint: 'max_size' is a smtp key; http rules match on: host, host_file, max_body, method, path, port"
    )


def test_rate_and_limits_on_deny_rules_are_errors(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - id: a\n    action: deny\n    protocol: smtp\n    match: {max_size: 1MB}\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert [pr.message for pr in info.value.problems] == ["max_size on a deny rule has no effect"]


def test_version_must_be_one(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("version: 2\ndefault: allow\n")
    with pytest.raises(SourceError) as info:
        load_policy(p, GUESTS)
    assert [pr.message for pr in info.value.problems] == ["version must be at most 1, found 2"]
    p.write_text("version: 1\ndefault: allow\n")
    assert load_policy(p, GUESTS).decide("dns", "web1", {"qname": "a"}).verdict == "allow"
