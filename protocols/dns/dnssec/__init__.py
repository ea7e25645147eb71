"""DNSSEC validation for the DNS service: a stub validator that trusts no upstream's AD bit.

Owns: the seam the DNS service codes against —
`make_validator(settings, fetch, *, clock=time.time) -> Validator | None` and
`await validator.validate(qname, rdtype, response) -> ValidationResult` — plus trust anchors
(`anchors`), signature/digest checks (`crypto`), denial proofs (`denial`), the chain walk
(`validator`) and `scrub(qname, rdtype, response)` (drop RRsets validation did not cover).
Must not: open sockets or talk to the network (the service injects `fetch`, which sends a DO=1, CD=1
query through the DoT pool), or shape the answer to the guest.

`settings` is the DNS settings dataclass; only `.dnssec` ("validate" | "off", YAML false = off) and
`.trust_anchors` (a path or None = the built-in IANA root anchors) are read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .anchors import TrustAnchor, TrustAnchorError, builtin_anchors, load_anchor_file, parse_anchors
from .result import EDE, Status, ValidationResult
from .scrub import scrub
from .validator import Fetch, Validator

__all__ = [
    "EDE",
    "Fetch",
    "Status",
    "TrustAnchor",
    "TrustAnchorError",
    "ValidationResult",
    "Validator",
    "builtin_anchors",
    "load_anchor_file",
    "make_validator",
    "parse_anchors",
    "scrub",
]


def make_validator(settings: Any, fetch: Fetch, *, clock: Callable[[], float] = time.time) -> Validator | None:
    """A validator per the DNS settings, or None when `dnssec` is off.
    Raises `TrustAnchorError` (a ValueError naming the file) when the anchor file is unusable."""
    mode = getattr(settings, "dnssec", "validate")
    if mode is False or str(mode).lower() in ("off", "false", "no"):
        return None
    path = getattr(settings, "trust_anchors", None)
    anchors = load_anchor_file(path) if path else builtin_anchors()
    return Validator(anchors, fetch, clock=clock)
