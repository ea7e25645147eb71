"""`proxyvm check` and `proxyvm explain`: output, exit codes (0 allow/ok, 1 deny/error, 2 usage)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RULES = """\
mode: enforce
default: deny
rules:
  - id: dns-corp
    action: allow
    protocol: dns
    guests: [web1]
    match:
      qname: ["example.com", "*.example.com"]
      qtype: [A, AAAA]
  - id: api
    action: allow
    protocol: http
    guests: [web1]
    match: {host: ["api.example.com"], method: [GET], path: ["/v1/*"]}
  - id: legacy
    action: allow
    protocol: http
    match: {host: ["old.example.net"]}
    plaintext: true
"""

CONFIG = """\
guests:
  web1: {addresses: [198.18.0.10, "fd00::10"]}
  mail1: {addresses: [198.18.0.11]}
policy: rules.yaml
audit: {path: audit.jsonl}
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "rules.yaml").write_text(RULES)
    p = tmp_path / "proxyvm.yaml"
    p.write_text(CONFIG)
    return p


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxyvm", *args], capture_output=True, text=True, timeout=60)


def test_explain_allow_by_guest(cfg: Path) -> None:
    r = run("explain", "-c", str(cfg), "--guest", "web1", "dns", "qname=www.example.com", "qtype=A")
    assert r.returncode == 0, r.stderr
    assert "verdict: allow" in r.stdout
    assert "rule:    dns-corp" in r.stdout
    assert "at:      rules.yaml:4" in r.stdout
    assert "www.example.com" in r.stdout and "*.example.com" in r.stdout


def test_explain_deny_by_src_default(cfg: Path) -> None:
    r = run("explain", "-c", str(cfg), "--src", "198.18.0.11", "dns", "qname=www.example.com", "qtype=A")
    assert r.returncode == 1
    assert "verdict: deny" in r.stdout and "guest:   mail1" in r.stdout and "rule:    default" in r.stdout
    assert "at:      rules.yaml:2" in r.stdout


def test_explain_unknown_source_and_ipv6(cfg: Path) -> None:
    r = run("explain", "-c", str(cfg), "--src", "198.18.0.99", "http", "method=GET", "host=api.example.com",
            "path=/v1/x")
    assert r.returncode == 1 and "guest:   unknown" in r.stdout
    r = run("explain", "-c", str(cfg), "--src", "fd00::10", "http", "method=GET", "host=API.example.com", "path=/v1/x")
    assert r.returncode == 0 and "rule:    api" in r.stdout and "guest:   web1" in r.stdout


def test_explain_reports_plaintext(cfg: Path) -> None:
    r = run("explain", "-c", str(cfg), "--guest", "mail1", "http", "method=GET", "host=old.example.net", "path=/")
    assert r.returncode == 0 and "plaintext: true" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "--guest", "web1"],  # no protocol
        ["explain", "--guest", "web1", "--src", "198.18.0.10", "dns"],  # both
        ["explain", "--guest", "web1", "gopher", "x=y"],  # unknown protocol
        ["explain", "--guest", "nosuch", "dns", "qname=a.b"],  # unknown guest
        ["explain", "--src", "not-an-ip", "dns", "qname=a.b"],
        ["explain", "--guest", "web1", "dns", "qname"],  # not KEY=VALUE
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(cfg: Path, args: list[str]) -> None:
    if args and args[0] == "explain":
        args = [args[0], "-c", str(cfg), *args[1:]]
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


def test_check_ok_and_builtin_default(cfg: Path) -> None:
    r = run("check", "-c", str(cfg))
    assert r.returncode == 0 and ": ok (2 guests" in r.stdout
    r = run("check")
    assert r.returncode == 0 and "built-in default: ok" in r.stdout


def test_check_reports_every_problem_located(cfg: Path) -> None:
    (cfg.parent / "rules.yaml").write_text(RULES.replace("action: allow\n    protocol: http\n    guests: [web1]",
                                                         "action: alow\n    protocol: http\n    guests: [web2]"))
    cfg.write_text(CONFIG + "admn: {listen: 127.0.0.1:1}\n")
    r = run("check", "-c", str(cfg))
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if not x.startswith("  hint")]
    assert lines[0].startswith(f"{cfg}:6:1: unknown key 'admn'")
    assert any("rules.yaml:12:13: unknown action 'alow'" in x for x in lines), r.stderr
    assert any("rules.yaml:14:14: unknown guest 'web2'" in x for x in lines), r.stderr
    assert "Traceback" not in r.stderr
