"""protocols.listen: the one listen-address parser (as each section uses it, with its own words)
and the one restart-only check of reloads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from policy.source import SourceError, parse_yaml
from protocols.listen import parse_listen, restart_only_changes, warn_restart_only


def _node(tmp_path: Path, text: str) -> Any:
    return parse_yaml(text, "c.yaml", tmp_path)


def _section(tmp_path: Path, name: str, body: str) -> Any:
    from proxyvm.services import load_settings_parser

    node = _node(tmp_path, f"{name}:\n{body}").get_map()[name]
    return load_settings_parser(name)(node, tmp_path)


def _admin(tmp_path: Path, value: str) -> Any:
    from proxyvm.config import listen_address

    return listen_address(_node(tmp_path, f"listen: {value}\n").get_map()["listen"], "admin listen address")


def _listen_of(name: str, field: str = "listen"):  # noqa: ANN202 - a test table's getter
    return lambda tmp_path, value: getattr(_section(tmp_path, name, f"  {field}: {value}\n"), field)


DNS, SMTP, SNMP, HTTP = _listen_of("dns"), _listen_of("smtp"), _listen_of("snmp"), _listen_of("http")
SNMP_TRAPS, HTTP_PROXY = _listen_of("snmp", "traps_listen"), _listen_of("http", "proxy_listen")

# (case, parser, value as written in YAML, expected tuple or the error text as `proxyvm check` prints it)
CASES = [
    ("dns ipv4", DNS, '["127.0.3.1:10053"]', (("127.0.3.1", 10053),)),
    ("dns ipv6", DNS, '["[::1]:53"]', (("::1", 53),)),
    ("dns default port", DNS, '"127.0.3.1"', (("127.0.3.1", 53),)),
    ("dns bad port", DNS, '["127.0.3.1:0"]',
     "c.yaml:2:12: bad port in listen address '127.0.3.1:0'\n  hint: ports are 1-65535"),
    ("dns duplicate kept", DNS, '["127.0.3.1", "127.0.3.1:53"]', (("127.0.3.1", 53), ("127.0.3.1", 53))),
    ("dns hostname refused", DNS, '["dns.example:53"]', "c.yaml:2:12: listen address 'dns.example' must be an IP address"),
    ("dns empty", DNS, "[]",
     "c.yaml:2:11: dns.listen is empty\n  hint: give at least one address, e.g. 127.0.0.1:10053"),
    ("dns not a list", DNS, "{a: 1}", "c.yaml:2:11: expected a list of listen addresses, found a mapping"),
    ("smtp ipv4", SMTP, '["127.0.5.1:2525"]', (("127.0.5.1", 2525),)),
    ("smtp ipv6 default port", SMTP, '["::1"]', (("::1", 25),)),
    ("smtp hostname accepted", SMTP, '["localhost:2525"]', (("localhost", 2525),)),
    ("smtp bad port", SMTP, '["127.0.5.1:x"]',
     "c.yaml:2:12: bad port in smtp.listen address '127.0.5.1:x'\n  hint: ports are 1-65535"),
    ("smtp empty", SMTP, "[]",
     "c.yaml:2:11: smtp.listen is empty\n  hint: give at least one address such as 198.18.0.1:25"),
    ("snmp ipv6", SNMP, '["[::1]:1161"]', (("::1", 1161),)),
    ("snmp default port", SNMP, '"127.0.6.1"', (("127.0.6.1", 161),)),
    ("snmp traps default port", SNMP_TRAPS, '["127.0.6.1"]', (("127.0.6.1", 162),)),
    ("snmp hostname refused", SNMP, '["agent.example"]',
     "c.yaml:2:12: listen address 'agent.example' is not an IP address\n"
     "  hint: write an IP address; names are not resolved for SNMP"),
    ("snmp empty allowed", SNMP, "[]", ()),
    ("snmp not a list", SNMP, "{a: 1}", "c.yaml:2:11: expected a list of addresses, found a mapping"),
    ("http default port", HTTP, '["127.0.7.1"]', (("127.0.7.1", 80),)),
    ("http proxy ipv6", HTTP_PROXY, '["[::1]:3128"]', (("::1", 3128),)),
    ("http hostname accepted", HTTP, '["localhost:8080"]', (("localhost", 8080),)),
    ("http bad port", HTTP, '["127.0.7.1:99999"]',
     "c.yaml:2:12: bad port in address '127.0.7.1:99999'\n  hint: ports are 1-65535"),
    ("http duplicate refused", HTTP, '["127.0.7.1", "127.0.7.1:80"]',
     "c.yaml:2:25: 127.0.7.1:80 is used by both transparent and transparent listeners"),
    ("admin ipv4", _admin, '"127.0.2.1:9700"', ("127.0.2.1", 9700)),
    ("admin ipv6", _admin, '"[::1]:9700"', ("::1", 9700)),
    ("admin needs a port", _admin, '"127.0.2.1"',
     "c.yaml:1:9: admin listen address '127.0.2.1' needs a port\n  hint: write it as 127.0.2.1:PORT"),
    ("admin hostname refused", _admin, '"localhost:9700"',
     "c.yaml:1:9: bad admin listen address 'localhost:9700': 'localhost' is not an IP address\n"
     "  hint: write an address of this machine with a port, e.g. 127.0.0.1:9700 or [::1]:9700"),
    ("admin zone refused", _admin, '"[fe80::1%lo]:9700"',
     "c.yaml:1:9: bad admin listen address '[fe80::1%lo]:9700': 'fe80::1%lo' is not an IP address\n"
     "  hint: write an address of this machine with a port, e.g. 127.0.0.1:9700 or [::1]:9700"),
]


@pytest.mark.parametrize(("parser", "value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_listen_addresses_as_each_section_reads_them(tmp_path: Path, parser, value: str, expected) -> None:  # noqa: ANN001
    if isinstance(expected, str):
        with pytest.raises(SourceError) as e:
            parser(tmp_path, value)
        assert str(e.value) == expected
    else:
        assert parser(tmp_path, value) == expected


def test_seen_spans_lists_and_names_both_kinds(tmp_path: Path) -> None:
    m = _node(tmp_path, 'a: ["127.0.7.1:80"]\nb: "127.0.7.1:80"\n').get_map()
    seen: dict[tuple[str, int], str] = {}
    assert parse_listen(m["a"], 80, ip=None, seen=seen, kind="transparent") == (("127.0.7.1", 80),)
    with pytest.raises(SourceError, match=r"c\.yaml:2:4: 127\.0\.7\.1:80 is used by both transparent and proxy"):
        parse_listen(m["b"], 3128, ip=None, seen=seen, kind="proxy")


@dataclass(frozen=True)
class _S:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    spool: str = "spool"
    workers: int = 1
    cache: int = 0


@pytest.mark.parametrize(
    ("new", "changed"),
    [
        (_S(), []),
        (_S(cache=5), []),
        (_S(listen=(("127.0.0.2", 53),)), ["listen"]),
        (_S(workers=2, spool="other"), ["spool", "workers"]),
    ],
)
def test_restart_only_changes(new: _S, changed: list[str]) -> None:
    assert restart_only_changes(_S(), new, ("listen", "spool", "workers")) == changed


def test_warn_restart_only_logs_one_line_naming_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.listen")
    with caplog.at_level(logging.WARNING, logger="test.listen"):
        assert warn_restart_only(log, "dns", _S(), _S(), ("listen",)) == []
        assert not caplog.records
        assert warn_restart_only(log, "smtp", _S(), _S(listen=(), workers=3), ("listen", "workers")) == [
            "listen", "workers"]
    assert [r.getMessage() for r in caplog.records] == [
        "smtp: listen, workers changed; that takes effect at the next restart (still running the old ones)"]
