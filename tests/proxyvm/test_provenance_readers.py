"""Provenance in the reading commands: `replay` and `learn` say which policies (by digest) made the
decisions they read, and replay names the digest of the policy it replays under."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.proxyvm.auditlogs import config, dns, run, write_log

OLD_A = "sha256:" + "a1" * 32
OLD_B = "sha256:" + "b2" * 32


def _log(tmp_path: Path) -> Path:
    recs = [dns("web1", "www.example.com", policy=OLD_A, t=1), dns("web1", "api.example.com", policy=OLD_A, t=2),
            dns("web1", "cdn.example.com", policy=OLD_B, t=3), dns("web1", "old.example.com", t=4)]
    return write_log(tmp_path / "audit.jsonl", recs)


def test_replay_reports_the_digests_it_read_and_the_new_one(tmp_path: Path) -> None:
    log = _log(tmp_path)
    rules = tmp_path / "new.yaml"
    text = "mode: enforce\ndefault: deny\nrules:\n  - {id: ex, action: allow, protocol: dns, match: {qname: ['*.example.com']}}\n"
    rules.write_text(text)
    cfg = config(tmp_path, ["web1"])
    r = run("replay", "-c", str(cfg), "--policy", str(rules), "--json", str(log))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["policy_digest"] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert rep["recorded_under"] == {OLD_A: 2, OLD_B: 1, "(no digest: recorded before provenance)": 1}
    r = run("replay", "-c", str(cfg), "--policy", str(rules), str(log))
    assert f"recorded under: {OLD_A} (2), (no digest: recorded before provenance) (1), {OLD_B} (1)" in r.stdout
    assert rep["policy_digest"] in r.stdout


def test_learn_names_the_policies_that_allowed_what_it_learned(tmp_path: Path) -> None:
    log = _log(tmp_path)
    out = tmp_path / "learned.yaml"
    r = run("learn", "-c", str(config(tmp_path, ["web1"])), "-o", str(out), str(log))
    assert r.returncode == 0, r.stderr
    header = [ln for ln in out.read_text().splitlines() if ln.startswith("# Allowed under policy")]
    assert header == [f"# Allowed under policy {OLD_A} (2), (no digest: recorded before provenance) (1), {OLD_B} (1)."]
