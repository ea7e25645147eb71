"""Signature and digest checks: the only place that touches `cryptography` (through dnspython).

Owns: which DNSKEY algorithms and DS digest types are supported (RFC 8624 validation column),
DS-to-DNSKEY matching, RRSIG verification with a cache of parsed public keys, and the classification
of a failed verification into an EDE (expired, not yet valid, no key, bad signature).
Must not: fetch, walk the tree, or decide secure/insecure for a zone — callers do.

dnspython builds the canonical signed data (`dns.dnssec._make_rrsig_signature_data`: private, so
pyproject.toml pins dnspython exactly and an upgrade runs the DNSSEC lab first); the public-key step is ours, straight on `cryptography`, because
dnspython 2.9 switches its own DNSSEC crypto off unless cryptography>=50 (mitmproxy 11 pins 44).
Parsed public keys are cached: parsing an RSA key costs more than verifying with it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.dnssec
import dns.exception
import dns.name
import dns.rdataset
import dns.rdatatype
import dns.rrset
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .result import EDE

# RFC 8624 §3.1, "DNSSEC Validation" column: MUST / RECOMMENDED algorithms. 5 and 7 (RSASHA1) are MUST
# validate there; 1, 3, 6 are MUST NOT; 12 (GOST) is MAY and not offered by `cryptography`.
SUPPORTED_ALGORITHMS: frozenset[int] = frozenset({5, 7, 8, 10, 13, 14, 15, 16})
# RFC 8624 §3.3: SHA-1 (1) MUST validate, SHA-256 (2) MUST, SHA-384 (4) RECOMMENDED; GOST (3) MAY: no.
SUPPORTED_DIGESTS: frozenset[int] = frozenset({1, 2, 4})
# RFC 5702 §2.1 / RFC 3110: RSA moduli below 1024 bits are accepted by validators in the wild only for
# old test vectors; we accept 512+ like Unbound does (RFC 5155's examples use 512-bit keys).

_DIGESTS = {1: hashlib.sha1, 2: hashlib.sha256, 4: hashlib.sha384}


def key_tag(key: dns.rdata.Rdata) -> int:
    return dns.dnssec.key_id(key)  # type: ignore[arg-type]


def ds_matches(ds: dns.rdata.Rdata, owner: dns.name.Name, key: dns.rdata.Rdata) -> bool:
    """RFC 4034 §5.1.4: digest = H(owner canonical wire | DNSKEY rdata)."""
    if ds.algorithm != key.algorithm or ds.key_tag != key_tag(key):
        return False
    h = _DIGESTS.get(ds.digest_type)
    if h is None:
        return False
    return h(owner.canonicalize().to_wire() + key.to_digestable()).digest() == ds.digest


def usable_ds(ds_set: Iterable[dns.rdata.Rdata]) -> list[dns.rdata.Rdata]:
    """The DS records a validator may use: supported algorithm and digest. SHA-1 digests are ignored
    when a SHA-256/384 digest is present (RFC 4509 §3)."""
    ok = [d for d in ds_set if d.algorithm in SUPPORTED_ALGORITHMS and d.digest_type in SUPPORTED_DIGESTS]
    if any(d.digest_type != 1 for d in ok):
        ok = [d for d in ok if d.digest_type != 1]
    return ok


@dataclass(frozen=True, slots=True)
class VerifyFailure:
    ede: EDE
    reason: str


@dataclass(frozen=True, slots=True)
class Verified:
    rrsig: dns.rdata.Rdata  # the signature that verified (its labels field tells wildcard expansion)
    expires: int  # RRSIG expiration (seconds since the epoch)


_RSA_HASH = {5: hashes.SHA1, 7: hashes.SHA1, 8: hashes.SHA256, 10: hashes.SHA512}
_EC = {13: (ec.SECP256R1, hashes.SHA256, 32), 14: (ec.SECP384R1, hashes.SHA384, 48)}


class PublicKey:
    """One DNSKEY's public key, ready to verify RRSIG signature fields (RFC 3110, 5702, 6605, 8080)."""

    __slots__ = ("_verify",)

    def __init__(self, algorithm: int, key: bytes) -> None:
        if algorithm in _RSA_HASH:
            if not key:
                raise ValueError("empty RSA key")
            if key[0]:
                elen, off = key[0], 1
            else:
                elen, off = int.from_bytes(key[1:3], "big"), 3
            e = int.from_bytes(key[off:off + elen], "big")
            n = int.from_bytes(key[off + elen:], "big")
            if not e or n.bit_length() < 512 or n.bit_length() > 4096:
                raise ValueError("RSA key size out of range")
            pub = rsa.RSAPublicNumbers(e, n).public_key()
            h = _RSA_HASH[algorithm]

            def verify(sig: bytes, data: bytes) -> None:
                pub.verify(sig, data, padding.PKCS1v15(), h())
        elif algorithm in _EC:
            curve, h, size = _EC[algorithm]
            if len(key) != 2 * size:
                raise ValueError("bad ECDSA key length")
            pub = ec.EllipticCurvePublicNumbers(
                int.from_bytes(key[:size], "big"), int.from_bytes(key[size:], "big"), curve()
            ).public_key()

            def verify(sig: bytes, data: bytes) -> None:
                if len(sig) != 2 * size:
                    raise InvalidSignature
                der = encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
                pub.verify(der, data, ec.ECDSA(h()))
        elif algorithm == 15:
            verify = ed25519.Ed25519PublicKey.from_public_bytes(key).verify
        elif algorithm == 16:
            verify = ed448.Ed448PublicKey.from_public_bytes(key).verify
        else:
            raise ValueError(f"unsupported algorithm {algorithm}")
        self._verify = verify

    def verify(self, sig: bytes, data: bytes) -> None:
        """Raises InvalidSignature (or ValueError) unless `sig` is a valid signature over `data`."""
        self._verify(sig, data)


class KeyCache:
    """Parsed public keys by DNSKEY wire form (bounded; parsing RSA keys is the expensive part), and
    signatures already verified: the same SOA/NSEC/NSEC3 RRsets come back in many negative and
    wildcard answers. A verified entry is bound to the very DNSKEY object that verified it, so it only
    counts while that key is still in the zone's validated key set; time checks are never skipped."""

    def __init__(self, size: int = 4096, verified_size: int = 20000) -> None:
        self._keys: dict[bytes, PublicKey] = {}
        self._size = size
        self.verified: OrderedDict[tuple[bytes, bytes], dns.rdata.Rdata] = OrderedDict()
        self._verified_size = verified_size

    def remember(self, signature: bytes, data: bytes, key: dns.rdata.Rdata) -> None:
        self.verified[(signature, data)] = key
        if len(self.verified) > self._verified_size:
            self.verified.popitem(last=False)

    def public_key(self, key: dns.rdata.Rdata) -> PublicKey:
        wire = key.to_digestable()
        pk = self._keys.get(wire)
        if pk is None:
            pk = PublicKey(key.algorithm, key.key)
            if len(self._keys) >= self._size:
                self._keys.pop(next(iter(self._keys)))
            self._keys[wire] = pk
        return pk


class KeySet:
    """A zone's DNSKEYs indexed by (key tag, algorithm): built once when the keys are validated, so a
    verification does not recompute key tags."""

    __slots__ = ("by_tag",)

    def __init__(self, keys: Sequence[dns.rdata.Rdata]) -> None:
        self.by_tag: dict[tuple[int, int], list[dns.rdata.Rdata]] = {}
        for k in keys:
            if k.protocol == 3 and k.flags & 0x0100:  # zone keys only (RFC 4034 §2.1.1/§2.1.2)
                self.by_tag.setdefault((key_tag(k), k.algorithm), []).append(k)

    def candidates(self, rrsig: dns.rdata.Rdata) -> list[dns.rdata.Rdata]:
        keys = self.by_tag.get((rrsig.key_tag, rrsig.algorithm), ())
        if rrsig.type_covered == dns.rdatatype.DNSKEY:
            return list(keys)
        return [k for k in keys if not k.flags & 0x0080]  # a revoked key signs only DNSKEY (RFC 5011)


def verify_rrset(
    rrset: dns.rrset.RRset,
    rrsigs: dns.rdataset.Rdataset | Sequence[dns.rdata.Rdata] | None,
    signer: dns.name.Name,
    keys: Sequence[dns.rdata.Rdata] | KeySet,
    now: float,
    cache: KeyCache,
) -> Verified | VerifyFailure:
    """Verify `rrset` with any RRSIG in `rrsigs` made by `signer` with one of `keys`.
    Returns the first signature that verifies, else the most telling failure."""
    if not rrsigs:
        return VerifyFailure(EDE.RRSIGS_MISSING, f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} has no RRSIG")
    keyset = keys if isinstance(keys, KeySet) else KeySet(keys)
    failures: list[VerifyFailure] = []
    owner_labels = len(rrset.name) - 1 - (1 if rrset.name.is_wild() else 0)
    for sig in rrsigs:
        if sig.signer != signer or sig.type_covered != rrset.rdtype:
            continue
        if sig.labels > owner_labels:
            failures.append(VerifyFailure(EDE.DNSSEC_BOGUS, f"RRSIG labels {sig.labels} exceed the owner's"))
            continue
        if sig.algorithm not in SUPPORTED_ALGORITHMS:
            failures.append(VerifyFailure(EDE.DNSSEC_BOGUS, f"RRSIG algorithm {sig.algorithm} is not supported"))
            continue
        cands = keyset.candidates(sig)
        if not cands:
            failures.append(VerifyFailure(EDE.DNSKEY_MISSING, f"no DNSKEY {sig.key_tag}/{sig.algorithm} in {signer}"))
            continue
        # Serial-number arithmetic is not needed before 2106; RRSIG times are plain seconds here.
        if now > sig.expiration:
            failures.append(VerifyFailure(EDE.SIGNATURE_EXPIRED, f"RRSIG by {signer} key {sig.key_tag} expired"))
            continue
        if now < sig.inception:
            failures.append(VerifyFailure(EDE.SIGNATURE_NOT_YET_VALID, f"RRSIG by {signer} key {sig.key_tag} not yet valid"))
            continue
        try:
            data = dns.dnssec._make_rrsig_signature_data(rrset, sig)  # noqa: SLF001 (see module docstring)
        except dns.dnssec.ValidationFailure as exc:
            failures.append(VerifyFailure(EDE.DNSSEC_BOGUS, f"RRSIG unusable: {exc}"))
            continue
        known = cache.verified.get((sig.signature, data))
        if known is not None and any(k is known for k in cands):
            return Verified(sig, sig.expiration)
        for key in cands:
            try:
                cache.public_key(key).verify(sig.signature, data)
            except (InvalidSignature, ValueError, dns.exception.DNSException):
                continue
            cache.remember(sig.signature, data, key)
            return Verified(sig, sig.expiration)
        failures.append(VerifyFailure(EDE.DNSSEC_BOGUS, f"RRSIG by {signer} key {sig.key_tag} does not verify"))
    if not failures:
        return VerifyFailure(EDE.RRSIGS_MISSING, f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} has no RRSIG by {signer}")
    # Prefer the most specific failure: a bad signature beats a missing key beats an expired one.
    order = [EDE.DNSSEC_BOGUS, EDE.DNSKEY_MISSING, EDE.SIGNATURE_EXPIRED, EDE.SIGNATURE_NOT_YET_VALID]
    failures.sort(key=lambda f: order.index(f.ede) if f.ede in order else len(order))
    return failures[0]
