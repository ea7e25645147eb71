"""protocols.listen: the one listen-address parser (as each section uses it, with its own words)
and the one restart-only check of reloads."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from policy.source import SourceError, parse_yaml
from protocols.listen import parse_listen, restart_only_changes, warn_restart_only


def _node(tmp_path: Path, text: str) -> Any:
    return parse_yaml(text, "c.yaml", tmp_path)


CASES = YAML(typ="safe").load(Path(__file__).resolve().parents[1] / "fixtures" / "listen" / "cases.yaml")


def _parse(tmp_path: Path, where: str, value: Any) -> Any:
    """`where` ("dns.listen") set to `value` in a config text, read as the section (or the admin
    listener) reads it."""
    section, key = where.split(".")
    top = _node(tmp_path, f"{section}:\n  {key}: {json.dumps(value)}\n").get_map()[section]
    if section == "admin":
        from proxyvm.config import listen_address

        return listen_address(top.get_map()[key], "admin listen address")
    from proxyvm.services import load_settings_parser

    return getattr(load_settings_parser(section)(top, tmp_path), key)


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_listen_addresses_as_each_section_reads_them(tmp_path: Path, case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(SourceError) as e:
            _parse(tmp_path, case["where"], case["value"])
        assert str(e.value) == case["error"]
    else:
        assert _parse(tmp_path, case["where"], case["value"]) == _tuples(case["ok"])


def test_seen_spans_lists_and_names_both_kinds(tmp_path: Path) -> None:
    m = _node(tmp_path, 'a: ["127.0.7.1:80"]\nb: "127.0.7.1:80"\n').get_map()
    seen: dict[tuple[str, int], str] = {}
    assert parse_listen(m["a"], 80, ip=None, seen=seen, kind="transparent") == (("127.0.7.1", 80),)
    with pytest.raises(SourceError, match=r"c\.yaml:2:4: 127\.0\.7\.1:80 is used by both transparent and proxy"):
        parse_listen(m["b"], 3128, ip=None, seen=seen, kind="proxy")


@dataclass(frozen=True)
class _S:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    spool: str = "spool"
    workers: int = 1
    cache: int = 0


@pytest.mark.parametrize(
    ("new", "changed"),
    [
        (_S(), []),
        (_S(cache=5), []),
        (_S(listen=(("127.0.0.2", 53),)), ["listen"]),
        (_S(workers=2, spool="other"), ["spool", "workers"]),
    ],
)
def test_restart_only_changes(new: _S, changed: list[str]) -> None:
    assert restart_only_changes(_S(), new, ("listen", "spool", "workers")) == changed


def test_warn_restart_only_logs_one_line_naming_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.listen")
    with caplog.at_level(logging.WARNING, logger="test.listen"):
        assert warn_restart_only(log, "dns", _S(), _S(), ("listen",)) == []
        assert not caplog.records
        assert warn_restart_only(log, "smtp", _S(), _S(listen=(), workers=3), ("listen", "workers")) == [
            "listen", "workers"]
    assert [r.getMessage() for r in caplog.records] == [
        "smtp: listen, workers changed; only a restart applies that (the running ones stay)"]
