"""SNMPv3 User-based Security Model (RFC 3414, RFC 3826, RFC 7860) for the proxy's outside leg.

Owns: protocol name tables, key derivation (password -> Ku via pysnmp's RFC 3414 code, localisation
and the two AES key-extension variants via pysnmp's classes), HMAC authentication and AES-CFB
privacy of whole messages, and building/opening authPriv messages.
Must not: do I/O or policy, or let a key/password reach a log line, exception text or repr.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

# pysnmp's eso.priv and rfc3414 import each other; importing rfc3414 first avoids the cycle.
import pysnmp.proto.secmod.rfc3414  # noqa: F401, I001
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pyasn1.type import univ
from pysnmp.proto.secmod.eso.priv import aes192, aes256
from pysnmp.proto.secmod.rfc3414 import localkey
from pysnmp.proto.secmod.rfc3414.auth import hmacmd5, hmacsha
from pysnmp.proto.secmod.rfc3826.priv import aes
from pysnmp.proto.secmod.rfc7860.auth import hmacsha2

from protocols.snmp import ber

# name -> (hashlib name, digest bytes on the wire, pysnmp service id)
AUTH_PROTOCOLS: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "MD5": ("md5", 12, hmacmd5.HmacMd5.SERVICE_ID),
    "SHA": ("sha1", 12, hmacsha.HmacSha.SERVICE_ID),
    "SHA-224": ("sha224", 16, hmacsha2.HmacSha2.SHA224_SERVICE_ID),
    "SHA-256": ("sha256", 24, hmacsha2.HmacSha2.SHA256_SERVICE_ID),
    "SHA-384": ("sha384", 32, hmacsha2.HmacSha2.SAH384_SERVICE_ID),
    "SHA-512": ("sha512", 48, hmacsha2.HmacSha2.SHA512_SERVICE_ID),
}
LEGACY_AUTH = frozenset({"MD5", "SHA"})

# Blumenthal (draft-blumenthal-aes-usm-04, net-snmp "AES192"/"AES256") extends a short localised key
# by hashing it again; the Cisco variant (draft-reeder, net-snmp "AES192C"/"AES256C") re-runs the
# password-to-key steps. pysnmp's class names are the other way round from its docstrings: its
# `AesBlumenthal*` are Blumenthal and its plain `Aes192/256` are Reeder (Cisco).
PRIV_PROTOCOLS: dict[str, tuple[int, object]] = {
    "AES-128": (16, aes.Aes()),
    "AES-192": (24, aes192.AesBlumenthal192()),
    "AES-256": (32, aes256.AesBlumenthal256()),
    "AES-192-Cisco": (24, aes192.Aes192()),
    "AES-256-Cisco": (32, aes256.Aes256()),
}

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


@lru_cache(maxsize=64)
def _ku(password: str, hash_name: str) -> bytes:
    """RFC 3414 A.2 password-to-key (1 MB of hashing; cached per password)."""
    return localkey.hash_passphrase(password.encode(), getattr(hashlib, hash_name)).asOctets()


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
    hash_name, _, auth_sid = AUTH_PROTOCOLS[auth_name]
    key_size, priv_svc = PRIV_PROTOCOLS[priv_name]
    with _ku_lock:
        ku_auth = _ku(auth_password, hash_name)
        ku_priv = _ku(priv_password, hash_name)
    kul_auth = localkey.localize_key(ku_auth, univ.OctetString(engine_id), getattr(hashlib, hash_name)).asOctets()
    kul_priv = priv_svc.localize_key(auth_sid, ku_priv, univ.OctetString(engine_id))  # type: ignore[attr-defined]
    kul_priv = univ.OctetString(kul_priv).asOctets()[:key_size]
    if len(kul_priv) != key_size:
        raise USMError(f"{priv_name} needs a {key_size}-byte key; {auth_name} cannot provide one")
    aes_alg = algorithms.AES(kul_priv)
    return LocalKeys(auth_name, priv_name, engine_id, kul_auth, kul_priv, hash_name, AUTH_PROTOCOLS[auth_name][1],
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
