"""Reading forensic capture back in tests: a guest's pcap ring (protocols.capture) decoded by the real
`tshark` (Debian package `tshark`, .ci/packages-forensics.txt)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (.ci/packages-forensics.txt)")


def tshark(path: Path, *fields: str, display: str = "", decode: tuple[str, ...] = (),
           prefs: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Every packet of a pcap as {field: value}, as tshark decodes it (exit 0 required).
    `decode`: e.g. "tcp.port==10053,dns" for a protocol on a port tshark does not know it on."""
    args = [TSHARK or "tshark", "-r", str(path), "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
    for d in decode:
        args += ["-d", d]
    for o in prefs:  # e.g. "http.desegment_body:FALSE"
        args += ["-o", o]
    for f in fields:
        args += ["-e", f]
    if display:
        args += ["-Y", display]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (path, r.stderr)
    return [dict(zip(fields, line.split("\t"), strict=False)) for line in r.stdout.splitlines()]


def ring(state: Path, guest: str, root: Path | None = None) -> list[Path]:
    """The guest's pcap files under `state/forensics` (or `root`), by name."""
    d = (root or state / "forensics") / guest
    return sorted(d.glob("*.pcap")) if d.is_dir() else []


def all_packets(files: list[Path], *fields: str, decode: tuple[str, ...] = (),
                prefs: tuple[str, ...] = ()) -> list[dict[str, str]]:
    return [p for f in files for p in tshark(f, *fields, decode=decode, prefs=prefs)]


def wait_for(pred: Any, timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or pred}")
