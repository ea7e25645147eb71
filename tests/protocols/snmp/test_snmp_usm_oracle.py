"""protocols/snmp/usm.py derives SNMPv3 keys itself; pysnmp (a test-only dependency) is the oracle.

Every auth x priv combination the config accepts is derived both ways for two engine IDs and two
password shapes (short, and longer than one 64-byte block); a differing byte fails the test. The
RFC 3414 A.3 vectors live in test_snmp_codec.py; these cover the AES key extensions (Blumenthal and
Reeder/Cisco), which have no RFC vectors.
"""

from __future__ import annotations

import hashlib

# pysnmp's eso.priv and rfc3414 import each other; importing rfc3414 first avoids the cycle.
import pysnmp.proto.secmod.rfc3414  # noqa: F401, I001
import pytest
from pyasn1.type import univ
from pysnmp.proto.secmod.eso.priv import aes192, aes256
from pysnmp.proto.secmod.rfc3414 import localkey
from pysnmp.proto.secmod.rfc3414.auth import hmacmd5, hmacsha
from pysnmp.proto.secmod.rfc3826.priv import aes
from pysnmp.proto.secmod.rfc7860.auth import hmacsha2

from protocols.snmp import usm

AUTH_SID = {
    "MD5": hmacmd5.HmacMd5.SERVICE_ID,
    "SHA": hmacsha.HmacSha.SERVICE_ID,
    "SHA-224": hmacsha2.HmacSha2.SHA224_SERVICE_ID,
    "SHA-256": hmacsha2.HmacSha2.SHA256_SERVICE_ID,
    "SHA-384": hmacsha2.HmacSha2.SAH384_SERVICE_ID,
    "SHA-512": hmacsha2.HmacSha2.SHA512_SERVICE_ID,
}
# pysnmp's class names are the other way round from its docstrings: `AesBlumenthal*` is the
# Blumenthal draft (net-snmp AES192/AES256), plain `Aes192/256` is Reeder (net-snmp AES192C/AES256C).
PRIV_SVC = {
    "AES-128": aes.Aes(),
    "AES-192": aes192.AesBlumenthal192(),
    "AES-256": aes256.AesBlumenthal256(),
    "AES-192-Cisco": aes192.Aes192(),
    "AES-256-Cisco": aes256.Aes256(),
}
ENGINES = [b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02", b"\x80\x00\x1f\x88\x80abcdefgh"]
PASSWORDS = [("maplesyrup", "privpass1"), ("a" * 70 + "Z", "x" * 129)]


def test_the_tables_cover_the_same_names() -> None:
    assert set(AUTH_SID) == set(usm.AUTH_PROTOCOLS)
    assert set(PRIV_SVC) == set(usm.PRIV_PROTOCOLS)


@pytest.mark.parametrize("auth", sorted(usm.AUTH_PROTOCOLS))
@pytest.mark.parametrize("priv", sorted(usm.PRIV_PROTOCOLS))
def test_keys_match_pysnmp(auth: str, priv: str) -> None:
    hash_name = usm.AUTH_PROTOCOLS[auth][0]
    algo = getattr(hashlib, hash_name)
    size = usm.PRIV_PROTOCOLS[priv][0]
    for engine in ENGINES:
        for apw, ppw in PASSWORDS:
            keys = usm.localize(auth, apw, priv, ppw, engine)
            want_auth = localkey.password_to_key(apw.encode(), univ.OctetString(engine), algo).asOctets()
            ku_priv = localkey.hash_passphrase(ppw.encode(), algo)
            want_priv = univ.OctetString(
                PRIV_SVC[priv].localize_key(AUTH_SID[auth], ku_priv, univ.OctetString(engine))).asOctets()[:size]
            assert keys.auth_key == want_auth, (auth, engine)
            assert len(keys.priv_key) == size
            assert keys.priv_key == want_priv, (auth, priv, engine)


def test_an_empty_password_is_refused() -> None:
    with pytest.raises(usm.USMError):
        usm.password_to_ku(b"", "sha1")
