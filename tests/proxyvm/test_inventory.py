"""proxyvm.inventory: source address -> guest name, "unknown" for everything not listed."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.base import GuestLookup
from proxyvm.inventory import UNKNOWN, Guest, Inventory, normalise_address, normalise_mac

GUESTS = [
    Guest("web1", ("198.18.0.10",)),
    Guest("mail1", ("198.18.0.11", "fd00::11"), "52:54:00:00:00:11"),
    Guest("v6only", ("fe80::5054:ff:fe00:12",), "52:54:00:00:00:12"),
]


@pytest.fixture(scope="module")
def inv() -> Inventory:
    return Inventory(GUESTS)


def test_ipv4_and_ipv6_sources(inv: Inventory) -> None:
    assert inv.lookup("198.18.0.10") == "web1"
    assert inv.lookup("198.18.0.11") == "mail1"
    assert inv.lookup("fd00::11") == "mail1"
    assert inv.lookup("fe80::5054:ff:fe00:12") == "v6only"


def test_everything_else_is_unknown(inv: Inventory) -> None:
    for src in ("198.18.0.12", "198.19.0.10", "127.0.0.1", "fd00::12", "::", "0.0.0.0", "", "web1", "garbage",
                "198.18.0.10:53", "198.18.0.0/24", "999.1.1.1"):
        assert inv.lookup(src) == UNKNOWN, src


def test_ipv4_mapped_ipv6_is_the_ipv4_guest(inv: Inventory) -> None:
    # A dual-stack socket reports IPv4 peers this way.
    assert inv.lookup("::ffff:198.18.0.10") == "web1"
    assert inv.lookup("::FFFF:c612:000b") == "mail1"
    assert inv.lookup("::ffff:198.18.0.99") == UNKNOWN


def test_scope_ids_and_spelling_do_not_matter(inv: Inventory) -> None:
    assert inv.lookup("fe80::5054:ff:fe00:12%eth1") == "v6only"
    assert inv.lookup("fe80::5054:ff:fe00:12%3") == "v6only"
    assert inv.lookup("FD00:0000::0011") == "mail1"
    assert inv.lookup(" 198.18.0.10 ") == "web1"


def test_guest_addresses_written_in_any_spelling_are_found() -> None:
    inv = Inventory([Guest("a", ("::ffff:198.18.0.20", "FD00:0::20"))])
    assert inv.lookup("198.18.0.20") == "a"
    assert inv.lookup("fd00::20") == "a"


def test_by_mac_and_names(inv: Inventory) -> None:
    assert inv.by_mac("52:54:00:00:00:11") == "mail1"
    assert inv.by_mac("52-54-00-00-00-12") == "v6only"
    assert inv.by_mac("52:54:00:00:00:11".upper()) == "mail1"
    assert inv.by_mac("52:54:00:00:00:99") == UNKNOWN
    assert inv.by_mac("not a mac") == UNKNOWN
    assert inv.names == frozenset({"web1", "mail1", "v6only"})
    assert len(inv) == 3
    assert inv.guests["mail1"].addresses == ("198.18.0.11", "fd00::11")


def test_accepts_the_config_mapping() -> None:
    inv = Inventory({g.name: g for g in GUESTS})
    assert inv.lookup("198.18.0.10") == "web1"


def test_is_a_guest_lookup_for_services(inv: Inventory) -> None:
    lookup: GuestLookup = inv
    assert lookup.lookup("198.18.0.10") == "web1"


def test_empty_inventory_knows_nobody() -> None:
    inv = Inventory()
    assert inv.lookup("198.18.0.10") == UNKNOWN
    assert inv.names == frozenset()


@pytest.mark.parametrize(
    "guests, message",
    [
        ([Guest("unknown", ("198.18.0.10",))], "bad guest name 'unknown'"),
        ([Guest("a b", ("198.18.0.10",))], "bad guest name 'a b'"),
        ([Guest("a", ("198.18.0.10",)), Guest("a", ("198.18.0.11",))], "guest 'a' listed twice"),
        ([Guest("a", ("198.18.0.10",)), Guest("b", ("::ffff:198.18.0.10",))],
         "address 198.18.0.10 belongs to 'a' and 'b'"),
        ([Guest("a", ("198.18.0.300",))], "guest 'a': bad address '198.18.0.300'"),
        ([Guest("a", ("198.18.0.10",), "52:54"), ], "guest 'a': bad MAC '52:54'"),
        ([Guest("a", ("198.18.0.10",), "52:54:00:00:00:01"), Guest("b", ("198.18.0.11",), "52-54-00-00-00-01")],
         "MAC 52:54:00:00:00:01 belongs to 'a' and 'b'"),
    ],
)
def test_inconsistent_guests_are_refused(guests: list[Guest], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Inventory(guests)
    assert str(info.value) == message


def test_normalisers() -> None:
    assert normalise_address("::ffff:10.0.0.1") == "10.0.0.1"
    assert normalise_address("fe80::1%eth0") == "fe80::1"
    assert normalise_address("FD00::A") == "fd00::a"
    assert normalise_address("10.0.0.1/32") is None
    assert normalise_address("") is None
    assert normalise_mac("52-54-00-AA-BB-CC") == "52:54:00:aa:bb:cc"
    assert normalise_mac("52:54-00:aa:bb:cc") is None  # mixed separators
    assert normalise_mac("5254.00aa.bbcc") is None


@given(st.ip_addresses(v=4), st.booleans())
def test_property_ipv4_and_its_mapped_form_agree(ip: ipaddress.IPv4Address, listed: bool) -> None:
    inv = Inventory([Guest("g", (str(ip),))] if listed else [])
    expected = "g" if listed else UNKNOWN
    assert inv.lookup(str(ip)) == expected
    assert inv.lookup(f"::ffff:{ip}") == expected
    assert inv.lookup(str(ipaddress.IPv6Address(f"::ffff:{ip}"))) == expected


@given(st.ip_addresses(v=6))
def test_property_ipv6_every_spelling_agrees(ip: ipaddress.IPv6Address) -> None:
    if ip.ipv4_mapped is not None:
        return
    inv = Inventory([Guest("g", (str(ip),))])
    assert inv.lookup(ip.exploded) == "g"
    assert inv.lookup(ip.exploded.upper()) == "g"
    assert inv.lookup(f"{ip.compressed}%7") == "g"


def test_lookup_cost_does_not_grow_with_the_inventory() -> None:
    """O(1): a 100,000-address inventory answers about as fast as a 10-address one (a scan would be
    thousands of times slower; 10x leaves room for cache effects and a busy machine)."""

    def per_lookup(n: int) -> float:
        base = int(ipaddress.IPv4Address("10.0.0.0"))
        guests = [Guest(f"g{i}", (str(ipaddress.IPv4Address(base + i)),)) for i in range(n)]
        inv = Inventory(guests)
        probes = [str(ipaddress.IPv4Address(base + (i * 7919) % n)) for i in range(2000)] * 10
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for p in probes:
                inv.lookup(p)
            best = min(best, (time.perf_counter() - t0) / len(probes))
        return best

    small, large = per_lookup(10), per_lookup(100_000)
    assert large < 10 * small, (small, large)


def test_dual_stack_spelling_is_answered_without_parsing(inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    import proxyvm.inventory as mod

    def refuse(address: str) -> str | None:
        raise AssertionError(f"parsed {address!r}")

    monkeypatch.setattr(mod, "normalise_address", refuse)
    assert inv.lookup("::ffff:198.18.0.10") == "web1"
    assert inv.lookup("198.18.0.11") == "mail1"
    assert inv.lookup("fd00::11") == "mail1"
    assert repr(inv) == "Inventory(3 guests, 4 addresses)"
