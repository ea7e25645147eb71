"""The digest of a policy as loaded: which exact rules (and name lists) made a decision.

Owns: `policy_digest()`, the `"policy": "sha256:<hex>"` value every decision record carries, and
the byte layout it hashes (also what a signed fleet bundle covers). Must not: parse or compile.

Layout: with no name files, the SHA-256 of the rules file's bytes, so `sha256sum rules.yaml`
gives the same hex. With `qname_file`/`host_file`/`sni_file` lists, the SHA-256 over the rules
file's bytes followed, for each list file in the order the rules name them (each once), by
`\\0<file name relative to the rules file>\\0<decimal length>\\0<bytes>`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from policy.model import Policy


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # pragma: no cover - other drive (not on Linux)
        return str(path)


def policy_digest(policy: Policy) -> str:
    """"sha256:<hex>" over the rules file and the list files it names, read now."""
    rules = Path(policy.file)
    h = hashlib.sha256(rules.read_bytes())
    seen: set[Path] = set()
    for rule in policy.rules:
        for nf in rule.name_files:
            p = Path(nf.path)
            if p in seen:
                continue
            seen.add(p)
            data = p.read_bytes()
            h.update(b"\0" + _relative(p, rules.parent).encode() + b"\0" + str(len(data)).encode() + b"\0")
            h.update(data)
    return "sha256:" + h.hexdigest()
