"""`proxyvm forensics export GUEST -o BUNDLE.tar` and `proxyvm forensics verify BUNDLE.tar`
(docs/cli.md#forensics-export-and-verify).

Owns: the bundle layout and its manifest, the chain proof (for every chain of the audit log that
holds a record of the guest: the contiguous run of lines from the guest's first record to the end
of the chain, plus the `.head` they link to), redacting the config, and verifying a bundle.
Must not: write or repair the audit log, or read secret files (the config names them; it is
copied with community strings and user names redacted, secret files are never opened).

Bundle (a tar):
  manifest.json               format, guest, since, created, the policy digest, sha256+size of every other member
  records.jsonl               the guest's records (decisions, quarantine/release), exactly as stored
  alerts.jsonl                the guest's `kind: alert` records, exactly as stored
  chain/NNN-<file>.jsonl      the chain proof: consecutive lines of one chain ...
  chain/NNN-<file>.jsonl.head ... and the head file they end at
  policy/<files>              the rules file and list files in force (their digest is in the manifest)
  config/<file>               the config in force, redacted
  recordings/...              state_dir/quarantine/<guest>/ (honeypot requests, quarantine mail)
  pcap/<n>-<tag>.pcap         the guest's forensic capture ring (protocols.capture: `forensics: dir`/<guest>/),
                              every file, oldest first; named in the manifest's `pcap` list
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.capture import guest_dirname
from proxyvm.audit import line_hash, now_iso

FORMAT = "proxyvm-forensics/1"
_REDACT = re.compile(r"(?P<k>\b(?:community|communities|username|user)\s*:\s*)(?P<v>\[[^\]\n]*\]|[^,}\n#]+)")


def redact_config(text: str) -> str:
    """The config with community strings and user names replaced (secret *files* are paths and
    stay; their contents are never read here)."""
    return _REDACT.sub(lambda m: m.group("k") + '"<redacted>"', text)


@dataclass
class Bundle:
    members: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, data: bytes) -> None:
        if name in self.members:
            raise ValueError(f"duplicate bundle member {name}")
        self.members[name] = data


def _chain_lines(files: tuple[Path, ...]) -> list[bytes]:
    out: list[bytes] = []
    for f in files:
        with open(f, "rb") as fh:
            for raw in fh:
                out.append(raw.rstrip(b"\n"))
    return out


def export(config: Any, engine: Any, guest: str, since: str, output: Path) -> tuple[int, str]:
    """Write the bundle; returns (number of the guest's records, sha256 of manifest.json)."""
    from proxyvm.auditlog_read import log_set, ts_key

    b = Bundle()
    records: list[bytes] = []
    alerts: list[bytes] = []
    chains_meta = []
    for n, chain in enumerate(log_set(config.audit.path)):
        lines = _chain_lines(chain.files)
        first = None
        for i, raw in enumerate(lines):
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if rec.get("guest") != guest or (since and ts_key(rec.get("ts")) < since):
                continue
            if first is None:
                first = i
            (alerts if rec.get("kind") == "alert" else records).append(raw)
        if first is None:
            continue
        name = f"chain/{n:03d}-{Path(chain.files[-1]).name}"
        b.add(name, b"\n".join(lines[first:]) + b"\n")
        head = Path(chain.files[-1]).with_name(Path(chain.files[-1]).name + ".head")
        if head.is_file():
            b.add(name + ".head", head.read_bytes())
        chains_meta.append({"file": name, "log": chain.name, "from_line": first + 1, "lines": len(lines) - first,
                            "head": head.is_file()})
    b.add("records.jsonl", b"".join(r + b"\n" for r in records))
    b.add("alerts.jsonl", b"".join(r + b"\n" for r in alerts))
    policy_files = [Path(engine.policy.file)]
    for rule in getattr(engine.policy, "rules", ()):
        for nf in getattr(rule, "name_files", ()):
            if Path(nf.path) not in policy_files:
                policy_files.append(Path(nf.path))
    for p in policy_files:
        b.add(f"policy/{p.name}", p.read_bytes())
    src = Path(config.source)
    if src.is_file():
        b.add(f"config/{src.name}", redact_config(src.read_text(errors="replace")).encode())
    rec_dir = Path(config.state_dir) / "quarantine" / re.sub(r"[^A-Za-z0-9_.-]", "_", guest)
    if rec_dir.is_dir():
        for p in sorted(rec_dir.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                b.add(f"recordings/{p.relative_to(rec_dir)}", p.read_bytes())
    pcaps: list[str] = []
    cap_dir = getattr(config, "capture_dir", None)
    if cap_dir is not None and (Path(cap_dir) / guest_dirname(guest)).is_dir():
        ring = sorted((p for p in (Path(cap_dir) / guest_dirname(guest)).iterdir()
                       if p.is_file() and p.suffix == ".pcap" and not p.name.startswith(".")),
                      key=lambda p: (p.stat().st_mtime, p.name))
        for p in ring:
            try:
                data = p.read_bytes()
            except FileNotFoundError:  # aged out by the running instance meanwhile
                continue
            b.add(f"pcap/{p.name}", data)
            pcaps.append(f"pcap/{p.name}")
    manifest = {
        "format": FORMAT, "guest": guest, "since": since or None, "created": now_iso(),
        "policy": getattr(engine, "digest", ""), "config": str(src), "chains": chains_meta,
        "records": len(records), "alerts": len(alerts),
        "pcap": pcaps,  # the capture ring, oldest first (their sha256 are in `files`)
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                  for name, data in sorted(b.members.items())},
    }
    mdata = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    tmp = output.with_name(f".{output.name}.tmp")
    mtime = int(time.time())
    with tarfile.open(tmp, "w") as tar:
        def put(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o600
            tar.addfile(info, io.BytesIO(data))

        put("manifest.json", mdata)
        for name, data in sorted(b.members.items()):
            put(name, data)
        d = tarfile.TarInfo("pcap/")
        d.type, d.mtime, d.mode = tarfile.DIRTYPE, mtime, 0o700
        tar.addfile(d)
    tmp.replace(output)
    return len(records), hashlib.sha256(mdata).hexdigest()


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str]
    manifest_sha256: str = ""
    records: int = 0


def verify(path: Path, expect_manifest: str = "") -> VerifyReport:
    """Every member against the manifest (none missing, none added, none changed), every chain
    proof line by line up to its head, and every record of the guest found in a proof."""
    from proxyvm.audit import verify as verify_chain

    problems: list[str] = []
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        return VerifyReport(False, [f"{path}: not a readable tar: {e}"])
    with tar:
        members: dict[str, bytes] = {}
        for m in tar.getmembers():
            if m.isdir():
                continue
            if not m.isfile():
                problems.append(f"{m.name}: not a regular file")
                continue
            f = tar.extractfile(m)
            members[m.name] = f.read() if f is not None else b""
    raw_manifest = members.pop("manifest.json", None)
    if raw_manifest is None:
        return VerifyReport(False, [f"{path}: no manifest.json"])
    msha = hashlib.sha256(raw_manifest).hexdigest()
    if expect_manifest and msha != expect_manifest.lower():
        problems.append(f"manifest.json: sha256 {msha} is not the one given ({expect_manifest})")
    try:
        manifest = json.loads(raw_manifest)
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            problems.append(f"manifest.json: format {manifest.get('format')!r}, expected {FORMAT}")
    except (ValueError, KeyError, TypeError):
        return VerifyReport(False, ["manifest.json: not a forensics manifest"], msha)
    for name in sorted(set(files) | set(members)):
        if name not in members:
            problems.append(f"{name}: listed in the manifest but missing")
        elif name not in files:
            problems.append(f"{name}: in the bundle but not in the manifest (added)")
        elif hashlib.sha256(members[name]).hexdigest() != files[name].get("sha256") \
                or len(members[name]) != files[name].get("size"):
            problems.append(f"{name}: sha256 differs from the manifest (edited)")
    proof_lines: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="pvm-forensics-") as td:
        for c in manifest.get("chains", []):
            name = c.get("file", "")
            data = members.get(name)
            if data is None:
                continue
            p = Path(td) / Path(name).name
            p.write_bytes(data)
            if name + ".head" in members:
                p.with_name(p.name + ".head").write_bytes(members[name + ".head"])
            res = verify_chain([p])
            if not res.ok:
                problems.append(f"{name}: chain proof broken: line {res.line}: {res.message}")
            proof_lines.update(line_hash(x) for x in data.split(b"\n") if x)
    n = 0
    for part in ("records.jsonl", "alerts.jsonl"):
        for i, line in enumerate(members.get(part, b"").split(b"\n"), 1):
            if not line:
                continue
            n += 1
            if line_hash(line) not in proof_lines:
                problems.append(f"{part}:{i}: not in any chain proof")
    return VerifyReport(not problems, problems, msha, n)
