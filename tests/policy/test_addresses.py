"""One definition of an internal address, one table-driven test: the DNS rebinding guard and the
HTTP SSRF guard classify every address here the same way, text or packed."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from policy.addresses import DOCUMENTATION, INTERNAL, AddressClass, internal_class, internal_packed
from protocols.dns.forwarder import is_private_ip, is_private_packed
from protocols.http.core import guarded_address

C = AddressClass

CASES = [
    ("169.254.169.254", C.METADATA),
    ("fd00:ec2::254", C.METADATA),
    ("127.0.0.1", C.LOOPBACK),
    ("127.255.255.254", C.LOOPBACK),
    ("::1", C.LOOPBACK),
    ("::ffff:127.0.0.1", C.LOOPBACK),
    ("0.0.0.0", C.UNSPECIFIED),
    ("0.1.2.3", C.UNSPECIFIED),
    ("::", C.UNSPECIFIED),
    ("169.254.1.1", C.LINK_LOCAL),
    ("fe80::1", C.LINK_LOCAL),
    ("febf::1", C.LINK_LOCAL),
    ("10.1.2.3", C.PRIVATE),
    ("172.16.0.1", C.PRIVATE),
    ("172.31.255.255", C.PRIVATE),
    ("192.168.1.1", C.PRIVATE),
    ("fd00::5", C.PRIVATE),
    ("fc00::1", C.PRIVATE),
    ("fec0::1", C.PRIVATE),
    ("::ffff:10.0.0.1", C.PRIVATE),
    ("64:ff9b::a00:1", C.PRIVATE),  # NAT64 of 10.0.0.1
    ("64:ff9b:1::1", C.PRIVATE),
    ("100.64.0.1", C.SHARED),
    ("100.127.255.255", C.SHARED),
    ("198.18.0.10", C.BENCHMARK),  # the disagreement: HTTP blocked it, DNS answered it
    ("198.19.255.255", C.BENCHMARK),
    ("224.0.0.1", C.MULTICAST),  # the disagreement
    ("239.255.255.250", C.MULTICAST),
    ("ff02::1", C.MULTICAST),
    ("240.0.0.1", C.RESERVED),  # the disagreement
    ("255.255.255.255", C.RESERVED),
    ("192.0.0.8", C.RESERVED),
    ("100::1", C.RESERVED),
    ("::2", C.RESERVED),
    ("::10.0.0.1", C.RESERVED),
    # public
    ("8.8.8.8", None),
    ("93.184.215.14", None),
    ("172.32.0.1", None),
    ("100.128.0.1", None),
    ("169.253.0.1", None),
    ("11.0.0.1", None),
    ("192.169.0.1", None),
    ("198.20.0.1", None),
    ("223.255.255.255", None),
    ("2606:4700::1111", None),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    # documentation ranges reach nothing: not guarded (listed in DOCUMENTATION)
    ("192.0.2.1", None),
    ("198.51.100.7", None),
    ("203.0.113.9", None),
    ("2001:db8::1", None),
]


@pytest.mark.parametrize(("ip", "cls"), CASES)
def test_both_guards_use_the_one_table(ip: str, cls: AddressClass | None) -> None:
    packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    assert internal_class(ip) == cls
    assert internal_packed(packed) == cls
    assert guarded_address(ip) == cls  # HTTP SSRF guard
    assert is_private_ip(ip) is (cls is not None)  # DNS rebinding guard, text
    assert is_private_packed(packed) is (cls is not None)  # DNS rebinding guard, packed answers


def test_not_an_address_is_refused() -> None:
    assert guarded_address("not-an-ip") == C.RESERVED
    assert internal_packed(b"\x01\x02") == C.RESERVED


def test_table_is_well_formed() -> None:
    nets = [ipaddress.ip_network(n) for n, _, _ in INTERNAL]
    assert len(set(nets)) == len(nets)
    for doc in map(ipaddress.ip_network, DOCUMENTATION):
        assert not any(doc.overlaps(n) for n in nets if n.version == doc.version), doc
    # every range's first and last address classify as that range (or a more specific entry)
    for (text, cls, why), net in zip(INTERNAL, nets, strict=True):
        assert why
        for a in (net.network_address, net.broadcast_address):
            got = internal_class(str(a))
            assert got is not None, (text, a)
            if net.prefixlen == net.max_prefixlen:
                assert got == cls, text
