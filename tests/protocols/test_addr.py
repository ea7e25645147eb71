"""One `host:port` text for the whole product: IPv4 plain, IPv6 in brackets."""

from __future__ import annotations

import pytest

from protocols.addr import addr_text, hostport


@pytest.mark.parametrize(
    "host, port, text",
    [
        ("198.18.0.10", 40312, "198.18.0.10:40312"),
        ("fd00::11", 40312, "[fd00::11]:40312"),
        ("::1", 53, "[::1]:53"),
        ("::ffff:198.18.0.10", 53, "[::ffff:198.18.0.10]:53"),
        ("[fd00::11]", 853, "[fd00::11]:853"),  # already bracketed: not doubled
        ("dot.example.net", 853, "dot.example.net:853"),
    ],
)
def test_hostport(host: str, port: int, text: str) -> None:
    assert hostport(host, port) == text


def test_addr_text_takes_ipv6_four_tuples() -> None:
    assert addr_text(("fd00::11", 161, 0, 0)) == "[fd00::11]:161"
    assert addr_text(("198.18.0.10", 161)) == "198.18.0.10:161"


def test_no_service_formats_addresses_by_hand() -> None:
    """Every `"[host]:port" if ":" in host` copy went into protocols.addr; keep it that way."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r'f"\[\{[^}]+\}\]:\{')
    offenders = [f"{p.relative_to(root)}:{n}" for d in ("protocols", "proxyvm", "policy")
                 for p in sorted((root / d).rglob("*.py")) if p.name != "addr.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
