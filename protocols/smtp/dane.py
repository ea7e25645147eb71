"""DANE for SMTP (RFC 7672, RFC 6698): does a peer's certificate chain match its secure TLSA records?

Owns: which TLSA records are usable for SMTP (DANE-TA(2) and DANE-EE(3) only), matching a
certificate (full or SPKI; exact, SHA-256 or SHA-512) and, for DANE-TA, verifying the chain up to the
matched trust anchor with the TLSA base domain / next-hop domain as reference names.
Must not: look anything up or touch sockets; it judges DER bytes it is given. It never accepts a
chain when usable records exist and none matches (no fallback to the WebPKI).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from protocols.smtp.resolver import TLSARecord

DANE_TA, DANE_EE = 2, 3


class DANEError(Exception):
    """The presented chain does not match the secure TLSA records."""


def usable(records: Sequence[TLSARecord]) -> list[TLSARecord]:
    """RFC 7672 §3.1.3: PKIX-TA(0)/PKIX-EE(1) are unusable for SMTP; unknown selector/mtype too."""
    return [r for r in records if r.usage in (DANE_TA, DANE_EE) and r.selector in (0, 1) and r.mtype in (0, 1, 2)]


def _selected(cert_der: bytes, selector: int) -> bytes:
    if selector == 0:
        return cert_der
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def association(cert_der: bytes, selector: int, mtype: int) -> bytes:
    """The certificate association data a TLSA record with this selector/mtype would carry."""
    data = _selected(cert_der, selector)
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(cert_der: bytes, rec: TLSARecord) -> bool:
    try:
        return association(cert_der, rec.selector, rec.mtype) == rec.data
    except ValueError:
        return False


def verify_chain(
    chain: Sequence[bytes], records: Sequence[TLSARecord], names: Sequence[str], now: dt.datetime | None = None
) -> str:
    """Judge a peer chain (leaf first, DER) against secure TLSA records.
    Returns "dane-ee" or "dane-ta"; raises DANEError when nothing usable matches."""
    recs = usable(records)
    if not recs:
        raise DANEError("no usable TLSA records (only PKIX usages or unknown parameters)")
    if not chain:
        raise DANEError("peer presented no certificate")
    leaf = chain[0]
    # DANE-EE: the leaf's key/cert is the authority; no name or validity checks (RFC 7672 §3.1.1).
    if any(r.usage == DANE_EE and matches(leaf, r) for r in recs):
        return "dane-ee"
    ta_recs = [r for r in recs if r.usage == DANE_TA]
    if not ta_recs:
        raise DANEError("leaf certificate does not match any DANE-EE(3) record")
    leaf_cert = x509.load_der_x509_certificate(leaf)
    intermediates = [x509.load_der_x509_certificate(c) for c in chain[1:]]
    anchors = [c for c, der in zip(intermediates, chain[1:], strict=True) if any(matches(der, r) for r in ta_recs)]
    if not anchors:
        raise DANEError("no certificate in the chain matches a DANE-TA(2) record")
    when = now or dt.datetime.now(dt.UTC)
    last: Exception | None = None
    for name in names:
        try:
            verifier = (
                verification.PolicyBuilder()
                .store(verification.Store(anchors))
                .time(when)
                .build_server_verifier(x509.DNSName(name))
            )
            verifier.verify(leaf_cert, intermediates)
            return "dane-ta"
        except (verification.VerificationError, ValueError) as e:
            last = e
    raise DANEError(f"chain does not verify to the DANE-TA(2) anchor for {', '.join(names)}: {last}")
