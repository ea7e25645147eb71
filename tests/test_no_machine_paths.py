"""No tracked file names a path that exists only on one development machine.

A fresh clone on a new machine must pass `./scripts/test`: tests, benches, the Makefile and the
image build find Python through the repository (`./.venv`, made by `./scripts/bootstrap`) or
`sys.executable`. This scans every tracked text file for absolute paths under the roots where
machine-local things live (/tmp, /root, /home, /work, ...) and fails on any the project does not
create itself. System paths (/usr/sbin/nft, /etc/..., /var/lib/proxyvm, /run/...) are not scanned:
they are the same on every Debian machine and appear in configuration examples.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Roots where only one machine's (or one person's) files live.
MACHINE_ROOTS = ("tmp", "root", "home", "work", "farm", "mnt", "srv", "media", "Users", "scratch")
PATH_RE = re.compile(
    r"(?<![A-Za-z0-9_.$}~/])/(?:" + "|".join(MACHINE_ROOTS) + r")(?![A-Za-z0-9_.-])(?:/[^\s\"'`),;}\]]*)?"
)

# What the check allows, and why: exact paths, then prefixes.
ALLOWED = {
    "/tmp": "the system temporary directory itself (prose, tempfile checks)",
    "/tmp/": "the system temporary directory itself",
    "/tmp/*": "image build empties the image's own /tmp",
    "/tmp/wheels": "image build stages wheels inside the image root file system, then removes them",
    "/root": "prose: a home directory unreadable to the service user",
    "/root/.cache": "image build empties the image's own root cache",
}
ALLOWED_PREFIXES = {
    "/tmp/wheels/": "image build stages wheels inside the image root file system, then removes them",
}


def _allowed(path: str) -> bool:
    return path in ALLOWED or path.startswith(tuple(ALLOWED_PREFIXES))


def machine_paths(text: str) -> list[tuple[int, str]]:
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in PATH_RE.finditer(line):
            if not _allowed(m.group(0)):
                hits.append((n, m.group(0)))
    return hits


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / p for p in out.decode().split("\0") if p]


@pytest.mark.parametrize(
    "text, found",
    [
        ('PY="${PYTHON:-/tmp/pvenv/bin/python}"', ["/tmp/pvenv/bin/python"]),
        ("see `/work/shared/DESIGN.md`", ["/work/shared/DESIGN.md"]),
        ("cd /home/alice/proxyvm && make", ["/home/alice/proxyvm"]),
        ('subprocess.run(["/root/.pyenv/bin/python"])', ["/root/.pyenv/bin/python"]),
        ("nft -f /etc/nftables.conf; /usr/sbin/nft list ruleset", []),
        ('rm -rf "$root"/tmp/* "$root"/var/tmp/*', []),
        ("state_dir: /var/lib/proxyvm", []),
        ("https://example.org/tmp/x and ./tmp/local and $HOME/tmp", []),
        ("a pyenv in /root is unreadable", []),
    ],
)
def test_the_scanner_finds_machine_paths(text: str, found: list[str]) -> None:
    assert [p for _, p in machine_paths(text)] == found


def test_no_tracked_file_names_a_machine_path() -> None:
    problems = []
    files = _tracked()
    assert len(files) > 100, "git ls-files found too few files: not run inside the repository?"
    for f in files:
        if f == Path(__file__).resolve():
            continue  # this file spells the forbidden paths out as examples
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for n, path in machine_paths(text):
            problems.append(f"{f.relative_to(REPO)}:{n}: {path}")
    assert not problems, "paths of one machine in tracked files:\n" + "\n".join(problems)
