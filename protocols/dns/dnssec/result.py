"""Validation outcomes: the value the validator hands the DNS service.

Owns: `ValidationResult`, the status names and the Extended DNS Error codes (RFC 8914) the validator
can attach. Must not: decide what the guest sees (AD bit, SERVFAIL, stripping) — that is the
service's job, driven by these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Status(StrEnum):
    SECURE = "secure"  # every RRset in the answer chain validated from a trust anchor
    INSECURE = "insecure"  # proven to lie in an unsigned zone (or unsupported algorithms / NSEC3 cap)
    BOGUS = "bogus"  # should be signed and is not, or a proof failed: SERVFAIL
    INDETERMINATE = "indeterminate"  # no conclusion (fetching keys failed, upstream error): SERVFAIL


class EDE(IntEnum):
    """Extended DNS Error info-codes the validator produces (RFC 8914 and RFC 9276)."""

    UNSUPPORTED_DNSKEY_ALGORITHM = 1
    UNSUPPORTED_DS_DIGEST_TYPE = 2
    DNSSEC_INDETERMINATE = 5
    DNSSEC_BOGUS = 6
    SIGNATURE_EXPIRED = 7
    SIGNATURE_NOT_YET_VALID = 8
    DNSKEY_MISSING = 9
    RRSIGS_MISSING = 10
    NSEC_MISSING = 12
    UNSUPPORTED_NSEC3_ITERATIONS = 27


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """`status` is one of "secure" | "insecure" | "bogus" | "indeterminate" (a `Status`, which is a str).
    `ede` is the RFC 8914 info-code to attach (None when there is nothing to say), `reason` a human
    sentence for the audit record, `ttl` the most the answer may be cached: for secure answers the
    smallest remaining RRSIG validity / original TTL of what was validated, for bogus answers the bad-cache
    lifetime, None when the records' own TTLs apply."""

    status: Status
    ede: int | None
    reason: str
    ttl: int | None = None

    @property
    def secure(self) -> bool:
        return self.status == Status.SECURE

    @property
    def bogus(self) -> bool:
        return self.status == Status.BOGUS


def secure(reason: str, ttl: int | None) -> ValidationResult:
    return ValidationResult(Status.SECURE, None, reason, ttl)


def insecure(reason: str, ede: int | None = None) -> ValidationResult:
    return ValidationResult(Status.INSECURE, ede, reason, None)


def bogus(reason: str, ede: int = EDE.DNSSEC_BOGUS, ttl: int | None = None) -> ValidationResult:
    return ValidationResult(Status.BOGUS, int(ede), reason, ttl)


def indeterminate(reason: str) -> ValidationResult:
    return ValidationResult(Status.INDETERMINATE, int(EDE.DNSSEC_INDETERMINATE), reason, None)
