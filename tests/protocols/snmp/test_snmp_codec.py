"""The lean BER codec and USM primitives: round trips, RFC vectors, and decoder fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.snmp import ber, usm

SEED = ber.CommunityMessage(
    ber.V2C, b"public",
    ber.PDU(ber.GETBULK, 12345, 1, 10, [ber.varbind((1, 3, 6, 1, 2, 1, 1, 3, 0)),
                                        ber.varbind((1, 3, 6, 1, 2, 1, 2, 2, 1, 10))]),
).encode()


def test_community_round_trip_and_known_bytes() -> None:
    m = ber.decode_community(SEED)
    assert m.version == ber.V2C and m.community == b"public"
    assert m.pdu.tag == ber.GETBULK and m.pdu.error_status == 1 and m.pdu.error_index == 10
    assert [ber.oid_str(v.oid) for v in m.pdu.varbinds] == ["1.3.6.1.2.1.1.3.0", "1.3.6.1.2.1.2.2.1.10"]
    assert m.encode() == SEED
    # a GET for sysUpTime.0 as net-snmp's snmpget -v1 -c public encodes it (request-id 1)
    wire = bytes.fromhex("302602010004067075626c6963a019020101020100020100300e300c06082b060102010103000500")
    g = ber.decode_community(wire)
    assert g.pdu.tag == ber.GET and g.pdu.varbinds[0].oid == (1, 3, 6, 1, 2, 1, 1, 3, 0)
    assert g.encode() == wire


@pytest.mark.parametrize("oid", [(1, 3), (1, 3, 6, 1, 4, 1, 2**32 - 1), (2, 999, 3), (0, 39), (1, 3, 128, 16383, 16384)])
def test_oid_round_trip(oid: tuple[int, ...]) -> None:
    assert ber.dec_oid(ber.oid_content(oid)) == oid


@pytest.mark.parametrize("raw", [b"", b"\x2b\x86", b"\x2b\x80\x01", b"\x2b" + b"\xff" * 6 + b"\x01"])
def test_bad_oids(raw: bytes) -> None:
    with pytest.raises(ber.BERError):
        ber.dec_oid(raw)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, 2**31 - 1, -1, -128, -129, -(2**31)])
def test_integers(value: int) -> None:
    s, e = 2, len(ber.enc_int(value))
    assert ber.dec_int(ber.enc_int(value), s, e) == value


def test_v3_encode_decode_with_auth_offset() -> None:
    keys = usm.localize("SHA-256", "authpassword", "AES-128", "privpassword", b"\x80\x00\x1f\x88\x80abcdefgh")
    pdu = ber.PDU(ber.GET, 99, 0, 0, [ber.varbind((1, 3, 6, 1, 2, 1, 1, 5, 0))]).encode()
    wire = usm.build_authpriv(keys, b"monitor", msg_id=7, boots=3, etime=1000, salt=b"\x01" * 8, pdu_bytes=pdu,
                              reportable=True)
    m = ber.decode_v3(wire)
    assert (m.msg_id, m.boots, m.time, m.user, m.flags) == (7, 3, 1000, b"monitor", 7)
    assert wire[m.auth_offset: m.auth_offset + 24] == m.auth_params
    ceid, cname, got = usm.open_message(keys, m, wire)
    assert ceid == keys.engine_id and got.request_id == 99
    tampered = bytearray(wire)
    tampered[-3] ^= 1
    with pytest.raises(usm.USMError):
        usm.open_message(keys, ber.decode_v3(bytes(tampered)), bytes(tampered))


def test_rfc3414_a3_key_localisation() -> None:
    """RFC 3414 A.3.1/A.3.2: "maplesyrup" localised to engine 00..02."""
    engine = bytes.fromhex("000000000000000000000002")
    md5 = usm.localize("MD5", "maplesyrup", "AES-128", "maplesyrup", engine)
    assert md5.auth_key.hex() == "526f5eed9fcce26f8964c2930787d82b"
    sha = usm.localize("SHA", "maplesyrup", "AES-128", "maplesyrup", engine)
    assert sha.auth_key.hex() == "6695febc9288e36282235fc7151f128497b38f3f"
    assert sha.priv_key == sha.auth_key[:16]  # RFC 3826 §1.2: the first 16 octets


def test_key_extensions_differ_and_never_print() -> None:
    engine = bytes.fromhex("80001f8880c0ffee0001")
    blu = usm.localize("SHA", "authpassword", "AES-256", "privpassword", engine)
    cis = usm.localize("SHA", "authpassword", "AES-256-Cisco", "privpassword", engine)
    assert len(blu.priv_key) == len(cis.priv_key) == 32
    assert blu.priv_key[:20] == cis.priv_key[:20] and blu.priv_key != cis.priv_key
    assert blu.priv_key.hex() not in repr(blu) and "privpassword" not in repr(blu)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_decoders_raise_only_ber_error_on_random_bytes(data: bytes) -> None:
    # Any exception other than BERError fails the test; a successful decode must yield a value.
    expected = {ber.decode_community: ber.CommunityMessage, ber.decode_v3: ber.V3Message,
                ber.decode_scoped: tuple, ber.decode_version: int}
    for fn, kind in expected.items():
        try:
            result = fn(data)
        except ber.BERError:
            continue
        assert isinstance(result, kind), (fn.__name__, result)
        if isinstance(result, ber.CommunityMessage):  # what is accepted re-encodes to the same message
            assert ber.decode_community(result.encode()) == result


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, len(SEED) - 1), st.binary(min_size=1, max_size=3), st.booleans())
def test_decoders_raise_only_ber_error_on_mutations(pos: int, patch: bytes, truncate: bool) -> None:
    data = SEED[:pos] if truncate else SEED[:pos] + patch + SEED[pos + len(patch):]
    try:
        m = ber.decode_community(data)
    except ber.BERError:
        return
    again = ber.decode_community(m.encode())  # anything accepted re-encodes to the same message
    assert again == m and again.encode() == m.encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=12),
                          st.sampled_from([ber.OCTET_STRING, ber.COUNTER32, ber.COUNTER64, ber.NULL])),
                max_size=20),
       st.integers(-(2**31), 2**31 - 1))
def test_round_trip_property(vbs: list, rid: int) -> None:
    values = {ber.OCTET_STRING: b"x", ber.COUNTER32: b"\x05", ber.COUNTER64: b"\x01\x00", ber.NULL: b""}
    pdu = ber.PDU(ber.RESPONSE, rid, 0, 0, [ber.varbind((1, 3, *arcs), tag, values[tag]) for arcs, tag in vbs])
    wire = ber.CommunityMessage(ber.V1, b"c", pdu).encode()
    back = ber.decode_community(wire)
    assert back.pdu == pdu and back.encode() == wire


def test_aes_cfb_fast_paths_match_openssl_cfb() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    keys = usm.localize("SHA-256", "authpassword", "AES-256", "privpassword", b"\x80\x00\x1f\x88\x80abcdefgh")
    salt = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    iv = (7).to_bytes(4, "big") + (123456).to_bytes(4, "big") + salt
    for n in range(0, 130):
        plain = bytes(range(n))
        ref = Cipher(algorithms.AES(keys.priv_key), modes.CFB(iv)).encryptor().update(plain)
        assert usm.encrypt(keys, 7, 123456, salt, plain) == ref, n
        assert usm.decrypt(keys, 7, 123456, salt, ref) == plain, n
