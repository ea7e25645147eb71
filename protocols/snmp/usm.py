"""SNMPv3 User-based Security Model (RFC 3414, RFC 3826, RFC 7860) for the proxy's outside leg.

Owns: protocol name tables, key derivation (RFC 3414 A.2 password -> Ku, localisation to an engine,
and the two AES key-extension variants), HMAC authentication and AES-CFB privacy of whole messages,
and building/opening authPriv messages.
Must not: do I/O or policy, or let a key/password reach a log line, exception text or repr.

The key derivation is some twenty lines of hashing, written here rather than borrowed from pysnmp:
pysnmp (with pyasn1) is a large dependency that the proxy used for nothing else. pysnmp stays in
the test extra as an oracle: tests/protocols/snmp/test_snmp_usm_oracle.py derives every
auth x priv combination both ways and compares, next to the RFC 3414 A.3 vectors.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocols.snmp import ber

# name -> (hashlib name, digest bytes on the wire: RFC 3414 / RFC 7860 truncation)
AUTH_PROTOCOLS: dict[str, tuple[str, int]] = {
    "MD5": ("md5", 12),
    "SHA": ("sha1", 12),
    "SHA-224": ("sha224", 16),
    "SHA-256": ("sha256", 24),
    "SHA-384": ("sha384", 32),
    "SHA-512": ("sha512", 48),
}
LEGACY_AUTH = frozenset({"MD5", "SHA"})

# Blumenthal (draft-blumenthal-aes-usm-04, net-snmp "AES192"/"AES256") extends a short localised key
# by hashing it again; the Cisco variant (draft-reeder, net-snmp "AES192C"/"AES256C") re-runs the
# password-to-key steps with the short key as the password.
# name -> (key bytes, extension: "" (none needed) | "blumenthal" | "reeder")
PRIV_PROTOCOLS: dict[str, tuple[int, str]] = {
    "AES-128": (16, ""),
    "AES-192": (24, "blumenthal"),
    "AES-256": (32, "blumenthal"),
    "AES-192-Cisco": (24, "reeder"),
    "AES-256-Cisco": (32, "reeder"),
}
KU_BYTES = 1_048_576  # RFC 3414 A.2: the password repeated to one megabyte

FLAG_AUTH, FLAG_PRIV, FLAG_REPORTABLE = 0x01, 0x02, 0x04
USM_MODEL = 3

# usmStats counters that come back in REPORT PDUs (RFC 3414 §5)
USM_STATS = (1, 3, 6, 1, 6, 3, 15, 1, 1)
REPORT_NAMES = {
    USM_STATS + (1, 0): "unsupportedSecLevels",
    USM_STATS + (2, 0): "notInTimeWindows",
    USM_STATS + (3, 0): "unknownUserNames",
    USM_STATS + (4, 0): "unknownEngineIDs",
    USM_STATS + (5, 0): "wrongDigests",
    USM_STATS + (6, 0): "decryptionErrors",
}
TIME_WINDOW = 150


class USMError(Exception):
    """An SNMPv3 message failed a USM check; the text names the check, never a key."""


def password_to_ku(password: bytes, hash_name: str) -> bytes:
    """RFC 3414 A.2: the hash of the password repeated to fill 1,048,576 bytes."""
    if not password:
        raise USMError("an empty password cannot make a key")
    buf = (password * (KU_BYTES // len(password) + 1))[:KU_BYTES]
    return hashlib.new(hash_name, buf).digest()


def localize_key(ku: bytes, engine_id: bytes, hash_name: str) -> bytes:
    """RFC 3414 A.2: Kul = H(Ku || snmpEngineID || Ku)."""
    return hashlib.new(hash_name, ku + engine_id + ku).digest()


def localize_priv_key(priv_name: str, ku: bytes, engine_id: bytes, hash_name: str) -> bytes:
    """The privacy key for `priv_name`: the localised key, extended when the hash is shorter than
    the AES key (Blumenthal: append H(key so far); Reeder/Cisco: append the key localised from the
    key so far used as a password), cut to the key size."""
    size, extension = PRIV_PROTOCOLS[priv_name]
    key = localize_key(ku, engine_id, hash_name)
    while len(key) < size:
        if extension == "blumenthal":
            key += hashlib.new(hash_name, key).digest()
        elif extension == "reeder":
            key += localize_key(password_to_ku(key, hash_name), engine_id, hash_name)
        else:
            raise USMError(f"{priv_name} needs a {size}-byte key; the auth hash gives {len(key)}")
    return key[:size]


@lru_cache(maxsize=64)
def _ku(password: str, hash_name: str) -> bytes:
    """password_to_ku, cached per password (1 MB of hashing each)."""
    return password_to_ku(password.encode(), hash_name)


_ku_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class LocalKeys:
    """Keys localised to one authoritative engine. repr never shows them."""

    auth_name: str
    priv_name: str
    engine_id: bytes
    auth_key: bytes = field(repr=False)
    priv_key: bytes = field(repr=False)
    hash_name: str = field(default="", repr=False)
    auth_len: int = 0
    # AES with this key: the algorithm object (CFB contexts for encryption are made from it) and a
    # reusable ECB encryptor (CFB decryption = one ECB pass over IV||C[:-1], then XOR).
    aes: Any = field(default=None, repr=False, compare=False)
    ecb: Any = field(default=None, repr=False, compare=False)


def localize(auth_name: str, auth_password: str, priv_name: str, priv_password: str, engine_id: bytes) -> LocalKeys:
    hash_name, auth_len = AUTH_PROTOCOLS[auth_name]
    with _ku_lock:
        ku_auth = _ku(auth_password, hash_name)
        ku_priv = _ku(priv_password, hash_name)
    kul_auth = localize_key(ku_auth, engine_id, hash_name)
    kul_priv = localize_priv_key(priv_name, ku_priv, engine_id, hash_name)
    aes_alg = algorithms.AES(kul_priv)
    return LocalKeys(auth_name, priv_name, engine_id, kul_auth, kul_priv, hash_name, auth_len,
                     aes_alg, Cipher(aes_alg, modes.ECB()).encryptor())


def sign(keys: LocalKeys, whole: bytes, offset: int) -> bytes:
    mac = hmac.digest(keys.auth_key, whole, keys.hash_name)[: keys.auth_len]
    return whole[:offset] + mac + whole[offset + keys.auth_len :]


def verify(keys: LocalKeys, msg: ber.V3Message, whole: bytes) -> bool:
    n = keys.auth_len
    if len(msg.auth_params) != n:
        return False
    zeroed = whole[: msg.auth_offset] + bytes(n) + whole[msg.auth_offset + n :]
    return hmac.compare_digest(hmac.digest(keys.auth_key, zeroed, keys.hash_name)[:n], msg.auth_params)


def encrypt(keys: LocalKeys, boots: int, etime: int, salt: bytes, plain: bytes) -> bytes:
    """RFC 3826 §3.1.3: AES-CFB128, IV = boots || time || salt."""
    iv = boots.to_bytes(4, "big") + etime.to_bytes(4, "big") + salt
    n = len(plain)
    if n <= 64:
        # Short PDUs (most GETs): CFB block by block with the key's ECB encryptor is cheaper than
        # setting up a CFB context (a key schedule per message).
        out = []
        prev = iv
        ecb = keys.ecb
        for i in range(0, n, 16):
            chunk = plain[i : i + 16]
            k = len(chunk)
            prev = (int.from_bytes(chunk, "big") ^ int.from_bytes(ecb.update(prev)[:k], "big")).to_bytes(k, "big")
            out.append(prev)
        return b"".join(out)
    enc = Cipher(keys.aes, modes.CFB(iv)).encryptor()
    return enc.update(plain) + enc.finalize()


def decrypt(keys: LocalKeys, boots: int, etime: int, salt: bytes, data: bytes) -> bytes:
    """CFB128 decryption with the key's ECB encryptor: keystream = E(IV || C[0..n-2])."""
    if len(salt) != 8:
        raise USMError("privacy parameters are not 8 octets")
    n = len(data)
    if n == 0:
        return b""
    iv = (boots & 0xFFFFFFFF).to_bytes(4, "big") + (etime & 0xFFFFFFFF).to_bytes(4, "big") + salt
    stream = keys.ecb.update(iv + data[: (n - 1) // 16 * 16])[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class SaltCounter:
    """RFC 3826 §3.1.2.1: a 64-bit integer, initialised randomly, incremented per message."""

    def __init__(self) -> None:
        self._v = int.from_bytes(os.urandom(8), "big")

    def next(self) -> bytes:
        self._v = (self._v + 1) & 0xFFFFFFFFFFFFFFFF
        return self._v.to_bytes(8, "big")


def build_authpriv(
    keys: LocalKeys,
    user: bytes,
    *,
    msg_id: int,
    boots: int,
    etime: int,
    salt: bytes,
    pdu_bytes: bytes,
    reportable: bool,
    context_engine_id: bytes | None = None,
    max_size: int = 65507,
) -> bytes:
    scoped = ber.encode_scoped(keys.engine_id if context_engine_id is None else context_engine_id, b"", pdu_bytes)
    data = encrypt(keys, boots, etime, salt, scoped)
    flags = FLAG_AUTH | FLAG_PRIV | (FLAG_REPORTABLE if reportable else 0)
    whole, off = ber.encode_v3(
        msg_id=msg_id, max_size=max_size, flags=flags, engine_id=keys.engine_id, boots=boots, etime=etime,
        user=user, auth_len=keys.auth_len, priv_params=salt, data=data, encrypted=True,
    )
    return sign(keys, whole, off)


def build_discovery(msg_id: int, request_id: int, max_size: int = 65507) -> bytes:
    """RFC 3414 §4: a noAuthNoPriv reportable GET with an empty engine ID and user."""
    pdu = ber.PDU(ber.GET, request_id, 0, 0, []).encode()
    scoped = ber.encode_scoped(b"", b"", pdu)
    whole, _ = ber.encode_v3(
        msg_id=msg_id, max_size=max_size, flags=FLAG_REPORTABLE, engine_id=b"", boots=0, etime=0,
        user=b"", auth_len=0, priv_params=b"", data=scoped, encrypted=False,
    )
    return whole


def open_message(keys: LocalKeys | None, msg: ber.V3Message, whole: bytes) -> tuple[bytes, bytes, ber.PDU]:
    """Authenticate and decrypt a received message as `keys` say; (ctxEngineID, ctxName, PDU).
    Unauthenticated messages are only opened when `keys` is None (discovery reports)."""
    if msg.security_model != USM_MODEL:
        raise USMError(f"security model {msg.security_model} is not USM")
    if keys is None:
        if msg.flags & (FLAG_AUTH | FLAG_PRIV):
            raise USMError("expected an unauthenticated report")
        return ber.decode_scoped(msg.data)
    if not msg.flags & FLAG_AUTH:
        raise USMError("unauthenticated message")
    if not verify(keys, msg, whole):
        raise USMError("wrong digest")
    if msg.flags & FLAG_PRIV:
        plain = decrypt(keys, msg.boots, msg.time, msg.priv_params, msg.data)
        return ber.decode_scoped(plain)
    return ber.decode_scoped(msg.data)
