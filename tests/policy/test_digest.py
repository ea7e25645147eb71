"""The policy digest every decision record carries: what it covers and when it changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from policy import load_policy

RULES = """\
mode: enforce
default: deny
rules:
  - id: corp
    action: allow
    protocol: dns
    match: {qname: ["example.com"]}
"""

WITH_LIST = RULES + """\
  - id: blocklist
    action: deny
    protocol: dns
    match: {qname_file: lists/block.txt}
  - id: blocklist-again
    action: deny
    protocol: http
    match: {host_file: lists/block.txt}
"""


def test_digest_of_a_plain_rules_file_is_its_sha256(tmp_path: Path) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    assert load_policy(p).digest == "sha256:" + hashlib.sha256(RULES.encode()).hexdigest()


def test_digest_covers_list_files_once_and_changes_with_them(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    block = tmp_path / "lists" / "block.txt"
    block.write_text("ads.example.net\n")
    p = tmp_path / "rules.yaml"
    p.write_text(WITH_LIST)
    d1 = load_policy(p).digest
    data = block.read_bytes()
    want = hashlib.sha256(WITH_LIST.encode() + b"\0lists/block.txt\0" + str(len(data)).encode() + b"\0" + data)
    assert d1 == "sha256:" + want.hexdigest()  # the list named twice is hashed once
    assert d1 != "sha256:" + hashlib.sha256(WITH_LIST.encode()).hexdigest()
    block.write_text("ads.example.net\ntrack.example.net\n")
    d2 = load_policy(p).digest
    assert d2 != d1
    block.write_text("ads.example.net\n")
    assert load_policy(p).digest == d1  # same bytes, same digest: deterministic
