"""`proxyvm forensics export` / `verify` on the audit log of a real `proxyvm run` (DNS worker, real
Unbound DoT upstream, dig as two guests, web1 quarantined as a honeypot by the real CLI):

* the bundle has web1's records (and only its), the chain proof that verifies up to the `.head`,
  the policy and the redacted config, the honeypot recordings, the pcap ring and a manifest;
* verify passes on it, and fails (exit 1) on any edit: a changed member, a record edited with the
  manifest recomputed to match (the chain proof breaks), a member removed or added, a manifest
  other than the one export printed."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from proxyvm.forensics import redact_config
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.dns.conftest import PROXY_IP, lab_ca, lab_dir, needs_peers, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig
from tests.proxyvm.test_quarantine import GUEST_IP, OTHER_IP, write_config


def pvm_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyvm", *args], capture_output=True, text=True, timeout=60,
                          cwd=cfg.parent)


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]


def write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_redact_config() -> None:
    text = ("snmp:\n  communities: [public, secret2]\n  agents:\n"
            "    r1: {address: \"203.0.113.7:161\", community: s3cr3t, user: monitor,\n"
            "         auth: {protocol: SHA-256, password_file: /etc/proxyvm/snmp-auth}}\n"
            "smtp:\n  relay: {host: h, auth: {username: relay, password_file: smtp.pass}}\n")
    out = redact_config(text)
    for secret in ("public", "secret2", "s3cr3t", "monitor", "username: relay"):
        assert secret not in out, out
    assert "password_file: /etc/proxyvm/snmp-auth" in out and 'community: "<redacted>"' in out


@needs_peers
@pytest.mark.lab
async def test_export_and_verify(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    cfg = write_config(tmp_path, lab_ca.ca_pem, upstream1, port, admin)
    pvm = ProxyVM(cfg)
    await asyncio.to_thread(pvm.start)
    try:
        for ip in (GUEST_IP, OTHER_IP, GUEST_IP):
            assert (await dig(PROXY_IP, port, "www.lab.test", "A", "-b", ip)).status == "NOERROR"
        r = await asyncio.to_thread(pvm.cli, "quarantine", "web1", "--profile", "honeypot", "--reason", "case 42")
        assert r.returncode == 0, r.stderr
        assert (await dig(PROXY_IP, port, "evil.lab.test", "A", "-b", GUEST_IP)).answers[0][3] == "192.0.2.254"
        await asyncio.to_thread(pvm.wait_audit, lambda x: x.get("request", {}).get("qname") == "evil.lab.test")
    finally:
        assert await asyncio.to_thread(pvm.stop) == 0, pvm.tail()

    bundle = tmp_path / "web1.tar"
    r = await asyncio.to_thread(pvm_cli, cfg, "forensics", "export", "web1", "-c", str(cfg), "-o", str(bundle))
    assert r.returncode == 0, r.stderr
    assert f"{bundle}: 4 records of guest web1; manifest sha256 " in r.stdout, r.stdout  # 2 dns, quarantine, 1 dns
    digest = r.stdout.split("manifest sha256 ")[1].split()[0]
    files = members(bundle)
    manifest = json.loads(files["manifest.json"])
    assert manifest["guest"] == "web1" and manifest["format"] == "proxyvm-forensics/1"
    assert hashlib.sha256(files["manifest.json"]).hexdigest() == digest
    recs = [json.loads(x) for x in files["records.jsonl"].splitlines()]
    assert {x["guest"] for x in recs} == {"web1"} and [x.get("kind") for x in recs].count("quarantine") == 1
    (chain,) = [n for n in files if n.startswith("chain/") and not n.endswith(".head")]
    assert chain + ".head" in files
    proof = files[chain].splitlines()
    assert json.loads(proof[0])["guest"] == "web1"  # the proof starts at the guest's first record
    assert json.loads(proof[-1])["request"]["event"] == "stop"  # ... and runs to the head
    assert json.loads(files[chain + ".head"])["seq"] == json.loads(proof[-1])["seq"]
    assert any(json.loads(x)["guest"] == "web2" for x in proof)  # the records between are kept
    assert files["policy/rules.yaml"] == (tmp_path / "rules.yaml").read_bytes()
    assert manifest["policy"] == "sha256:" + hashlib.sha256(files["policy/rules.yaml"]).hexdigest()
    assert b"192.0.2.254" in files["config/proxyvm.yaml"]
    assert b"evil.lab.test" in files["recordings/requests.jsonl"]
    with tarfile.open(bundle) as t:
        assert t.getmember("pcap").isdir()
    # the quarantined guest's query is in its capture ring (tests/proxyvm/test_capture_process.py reads it)
    (pcap,) = manifest["pcap"]
    assert pcap.startswith("pcap/") and pcap in files and b"evil" in files[pcap]

    ok = await asyncio.to_thread(pvm_cli, cfg, "forensics", "verify", str(bundle), "--manifest-sha256", digest)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok: {bundle}: every member matches"), ok.stderr
    assert "4 records in intact chain proofs" in ok.stdout

    async def verify_fails(name: str, changed: dict[str, bytes], want: str, *extra: str) -> None:
        p = tmp_path / name
        write_tar(p, changed)
        res = await asyncio.to_thread(pvm_cli, cfg, "forensics", "verify", str(p), *extra)
        assert res.returncode == 1 and want in res.stderr, (name, res.stdout, res.stderr)

    edited = dict(files)
    edited["records.jsonl"] = files["records.jsonl"].replace(b"www.lab.test", b"www.lab.tesT", 1)
    await verify_fails("edited.tar", edited, "records.jsonl: sha256 differs from the manifest (edited)")

    # a record edited in the proof, and the manifest made to match: the chain gives it away
    forged = dict(files)
    lines = files[chain].split(b"\n")
    lines[1] = re.sub(rb'"verdict": ?"allow"', b'"verdict":"deny"', lines[1], count=1)
    forged[chain] = b"\n".join(lines)
    assert forged[chain] != files[chain]
    m = json.loads(files["manifest.json"])
    m["files"][chain] = {"sha256": hashlib.sha256(forged[chain]).hexdigest(), "size": len(forged[chain])}
    forged["manifest.json"] = json.dumps(m).encode()
    await verify_fails("forged.tar", forged, f"{chain}: chain proof broken")
    await verify_fails("forged2.tar", forged, "is not the one given", "--manifest-sha256", digest)

    removed = {k: v for k, v in files.items() if k != "policy/rules.yaml"}
    await verify_fails("removed.tar", removed, "policy/rules.yaml: listed in the manifest but missing")
    added = {**files, "recordings/extra.txt": b"planted\n"}
    await verify_fails("added.tar", added, "recordings/extra.txt: in the bundle but not in the manifest")

    r = await asyncio.to_thread(pvm_cli, cfg, "forensics", "export", "nosuch", "-c", str(cfg), "-o", str(bundle))
    assert r.returncode == 2 and "no guest named 'nosuch'" in r.stderr
