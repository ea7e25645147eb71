"""The documentation stands on its own: links inside the repository resolve, nothing points at a
design file outside it, and every config and policy key the code accepts is documented."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = "zqxjkvw"  # a key no parser accepts and none is close to (so the hint lists the allowed keys)

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.IGNORECASE)


def tracked_markdown() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--", "*.md"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell which Markdown files are tracked")
    return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code blocks and code spans."""
    found: list[tuple[int, str]] = []
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = _INLINE_CODE.sub("", line)
        found.extend((n, m.group(1)) for m in _LINK.finditer(line))
        m = _REF_DEF.match(line)
        if m:
            found.append((n, m.group(1)))
    return found


def test_link_parser() -> None:
    text = "\n".join([
        "see [config](docs/configuration.md#audit) and ![img](pic.png \"title\")",
        "[web](https://example.org) [mail](mailto:a@example.org) [here](#top) `[no](code.md)`",
        "```",
        "[not](in-a-fence.md)",
        "```",
        "[ref]: docs/policy.md",
    ])
    assert links(text) == [
        (1, "docs/configuration.md#audit"), (1, "pic.png"), (2, "https://example.org"),
        (2, "mailto:a@example.org"), (2, "#top"), (6, "docs/policy.md"),
    ]


def test_relative_links_resolve() -> None:
    broken = []
    for md in tracked_markdown():
        for n, target in links(md.read_text(encoding="utf-8")):
            if _EXTERNAL.match(target):
                continue
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not path:
                continue
            resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (md.parent / path)
            if not resolved.exists():
                broken.append(f"{md.relative_to(ROOT)}:{n}: link to {target} does not exist")
    assert not broken, "\n".join(broken)


def test_no_design_file_outside_the_repository() -> None:
    bad = []
    for md in tracked_markdown():
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            if "shared/DESIGN.md" in line:
                bad.append(f"{md.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "a user of this repository does not have shared/DESIGN.md:\n" + "\n".join(bad)


# -- every key the code accepts is documented -----------------------------------------------------
def _documented(doc: Path) -> str:
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    # Keys count as documented when they appear in code style: `key`, `dns.cache.size`, `key: ...`
    return " ".join(_INLINE_CODE.findall(doc.read_text(encoding="utf-8"))) + "\n" + doc.read_text(encoding="utf-8")


def _mentions(text: str, key: str) -> bool:
    return re.search(rf"`[^`\n]*(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])[^`\n]*`", text) is not None


def _allowed_keys(tmp: Path, doc: Any) -> set[str] | None:
    """The keys the config loader accepts where `doc` has the probe key, read from its
    `unknown key` hint; None when the loader does not get that far (or the place is no mapping)."""
    from proxyvm.config import load_config
    from proxyvm.errors import ConfigError

    path = tmp / "probe.yaml"
    path.write_text(json.dumps(doc))
    try:
        load_config(path, as_root=False)
    except ConfigError as e:
        for p in e.problems:
            if p.message.startswith(f"unknown key '{PROBE}'") and p.hint.startswith("allowed keys: "):
                return set(p.hint[len("allowed keys: "):].split(", "))
    return None


def config_keys(tmp: Path) -> dict[str, set[str]]:
    """{"" : top-level keys, "dns": its keys, "dns.cache": ..., "guests.*": ...}, found by asking
    the loader itself: a mapping, a list of mappings or a mapping of named mappings at each key."""
    out: dict[str, set[str]] = {}

    def probe(place: str, wrap: Any) -> None:
        if place.count(".") > 3:
            return
        keys = _allowed_keys(tmp, wrap({PROBE: 1}))
        if keys is None:
            return
        out[place] = keys
        for k in sorted(keys):
            sub = f"{place}.{k}" if place else k
            for shape in (lambda v, k=k: {k: v}, lambda v, k=k: {k: [v]}, lambda v, k=k: {k: {"n1": v}}):
                before = len(out)
                probe(sub, lambda v, shape=shape: wrap(shape(v)))
                if len(out) > before:
                    break

    probe("", lambda v: v)
    return out


def test_config_key_enumeration_finds_the_sections(tmp_path: Path) -> None:
    from proxyvm.config import TOP_LEVEL_KEYS
    from proxyvm.services import REGISTRY

    keys = config_keys(tmp_path)
    assert keys[""] == set(TOP_LEVEL_KEYS)
    for name in REGISTRY:
        assert name in keys and keys[name], f"no keys found for the {name} section"
    assert {"addresses", "mac"} <= keys["guests"]
    assert "size" in keys["dns.cache"]


def test_every_config_key_is_in_configuration_md(tmp_path: Path) -> None:
    from proxyvm.config import TOP_LEVEL_KEYS
    from proxyvm.services import REGISTRY

    text = _documented(ROOT / "docs" / "configuration.md")
    missing = sorted(f"{place}: {k}" if place else k
                     for place, keys in config_keys(tmp_path).items() for k in keys if not _mentions(text, k))
    missing += [k for k in sorted({*TOP_LEVEL_KEYS, *REGISTRY}) if not _mentions(text, k)]
    assert not missing, "config keys not documented in docs/configuration.md:\n" + "\n".join(missing)


def test_every_policy_key_is_in_policy_md() -> None:
    from policy.model import FILE_KEYS, LIMIT_KEYS, MATCH_KEYS, PROTOCOLS
    from policy.parser import RULE_KEYS, TOP_KEYS

    text = _documented(ROOT / "docs" / "policy.md")
    keys = {*TOP_KEYS, *RULE_KEYS, *PROTOCOLS}
    for proto in PROTOCOLS:
        keys |= set(MATCH_KEYS[proto]) | set(FILE_KEYS.get(proto, {})) | set(LIMIT_KEYS.get(proto, ()))
    missing = sorted(k for k in keys if not _mentions(text, k))
    assert not missing, "policy keys not documented in docs/policy.md:\n" + "\n".join(missing)
