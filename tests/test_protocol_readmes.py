"""Every protocol README has the same top-level sections, in the same order (issue 17 item 4)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["Description", "Configuration", "Examples", "Policy keys", "Audit fields", "Metrics", "Bad input",
            "Limits", "Benchmark"]
PROTOCOLS = ["dns", "smtp", "snmp", "http"]
_FENCE = re.compile(r"^\s*(```|~~~)")


def top_sections(text: str) -> list[str]:
    """The `## ` headings outside code blocks, in order."""
    found, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("## "):
            found.append(line[3:].strip())
    return found


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_readme_has_the_sections_in_order(protocol: str) -> None:
    readme = ROOT / "protocols" / protocol / "README.md"
    assert readme.is_file(), f"{readme.relative_to(ROOT)} is missing"
    text = readme.read_text()
    assert text.startswith(f"# {protocol}\n"), f"{protocol}: the README starts with '# {protocol}'"
    got = top_sections(text)
    missing = [s for s in SECTIONS if s not in got]
    assert not missing, f"protocols/{protocol}/README.md lacks section(s) {missing}"
    assert got == SECTIONS, (f"protocols/{protocol}/README.md: top-level sections must be exactly {SECTIONS}, "
                             f"in this order; found {got}")


def test_every_protocol_folder_is_checked() -> None:
    folders = sorted(p.parent.name for p in (ROOT / "protocols").glob("*/README.md"))
    assert folders == sorted(PROTOCOLS)


def test_top_sections_ignores_code_blocks() -> None:
    assert top_sections("# x\n## A\n```\n## not a heading\n```\n### sub\n## B\n") == ["A", "B"]
