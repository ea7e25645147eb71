"""The `snmp:` section: the documented example parses; mistakes are located errors; no secret leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
from snmp_helpers import parse_settings

from policy.source import SourceError


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    for name, value in (("snmp-auth", "auth-secret-1"), ("snmp-priv", "priv-secret-1"), ("short", "abc")):
        (tmp_path / name).write_text(value + "\n")
    return tmp_path


EXAMPLE = """\
listen: ["198.18.0.1:161"]
traps_listen: ["198.18.0.1:162"]
communities: [public]
engine_id: "0x8000000001020304"
agents:
  router1:
    address: "203.0.113.7:161"
    community: public-router1
    user: monitor
    auth: {protocol: SHA-256, password_file: snmp-auth}
    priv: {protocol: AES-128, password_file: snmp-priv}
default_agent_credentials:
  user: monitor
  auth: {protocol: SHA-256, password_file: snmp-auth}
  priv: {protocol: AES-256-Cisco, password_file: snmp-priv}
trap_receivers:
  - address: "203.0.113.50:162"
    user: trapper
    auth: {protocol: SHA-512, password_file: snmp-auth}
    priv: {protocol: AES-192, password_file: snmp-priv}
    inform: true
max_repetitions: 20
limits: {max_varbinds: 32, max_response_size: 8KB, guest_rate: 100}
"""


def test_design_example(secrets: Path) -> None:
    s = parse_settings(EXAMPLE, secrets)
    assert s.listen == (("198.18.0.1", 161),) and s.traps_listen == (("198.18.0.1", 162),)
    assert s.engine_id == bytes.fromhex("8000000001020304")
    r1 = s.agents["router1"]
    assert r1.address == ("203.0.113.7", 161) and r1.community == "public-router1"
    assert r1.credentials.auth_protocol == "SHA-256" and r1.credentials.auth_password.reveal() == "auth-secret-1"
    assert s.default_agent_credentials is not None and s.default_agent_credentials.priv_protocol == "AES-256-Cisco"
    tr = s.trap_receivers[0]
    assert tr.inform and tr.credentials.auth_protocol == "SHA-512" and tr.credentials.priv_protocol == "AES-192"
    assert s.max_repetitions == 20 and s.limits.max_varbinds == 32 and s.limits.max_response_size == 8000
    assert s.agent_by_community("public-router1") is r1 and s.agent_by_community("public") is None
    text = repr(s)
    assert "auth-secret-1" not in text and "priv-secret-1" not in text


@pytest.mark.parametrize(
    ("patch", "where", "message"),
    [
        (("protocol: SHA-256, password_file: snmp-auth}\n    priv", "protocol: SHA256, password_file: snmp-auth}\n    priv"),
         "10:", "unknown auth protocol 'SHA256'"),
        (("protocol: AES-128", "protocol: DES"), "11:", "unknown priv protocol 'DES'"),
        (("protocol: AES-128", "protocol: AES"), "11:", "unknown priv protocol 'AES'"),
        (("    community: public-router1", "    comunity: public-router1"), "8:5", "unknown key 'comunity'"),
        (("password_file: snmp-priv}\ndefault", "password_file: missing}\ndefault"), "11:", "does not exist"),
        (("password_file: snmp-priv}\ndefault", "password_file: short}\ndefault"), "11:", "shorter than 8"),
        (('engine_id: "0x8000000001020304"', 'engine_id: "0x80zz"'), "4:", "not hexadecimal"),
        (('engine_id: "0x8000000001020304"', 'engine_id: "0x80"'), "4:", "5 to 32 octets"),
        (("max_repetitions: 20", "max_repetitions: 0"), "22:", "at least 1"),
        (("    user: monitor\n    auth: {protocol: SHA-256, password_file: snmp-auth}\n    priv: {protocol: AES-128",
          "    auth: {protocol: SHA-256, password_file: snmp-auth}\n    priv: {protocol: AES-128"), "7:", "missing required key 'user'"),
        (('address: "203.0.113.7:161"', 'address: "203.0.113.7:99999"'), "7:", "bad port"),
        (('address: "203.0.113.7:161"', 'address: "router1.example.net:161"'), "7:", "is not an IP address"),
    ],
)
def test_located_errors(secrets: Path, patch: tuple[str, str], where: str, message: str) -> None:
    text = EXAMPLE.replace(*patch, 1)
    assert text != EXAMPLE
    with pytest.raises(SourceError) as ei:
        parse_settings(text, secrets)
    err = str(ei.value)
    assert message in err and f"proxyvm.yaml:{where}" in err, err
    assert "auth-secret-1" not in err and "priv-secret-1" not in err and "abc" not in err.split("short")[-1][:5]


def test_legacy_auth_only_when_written(secrets: Path) -> None:
    s = parse_settings(EXAMPLE.replace("protocol: SHA-256, password_file: snmp-auth}\n    priv",
                                       "protocol: MD5, password_file: snmp-auth}\n    priv", 1), secrets)
    assert s.agents["router1"].credentials.auth_protocol == "MD5"
    assert parse_settings(EXAMPLE, secrets).agents["router1"].credentials.auth_protocol == "SHA-256"


def test_duplicate_agent_community_is_an_error(secrets: Path) -> None:
    text = EXAMPLE.replace("default_agent_credentials:", """  router2:
    address: "203.0.113.8:161"
    community: public-router1
    user: monitor
    auth: {protocol: SHA-256, password_file: snmp-auth}
    priv: {protocol: AES-128, password_file: snmp-priv}
default_agent_credentials:""")
    with pytest.raises(SourceError, match="already used"):
        parse_settings(text, secrets)
