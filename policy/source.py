"""Located YAML: load a file keeping FILE:LINE:COL for every value, and typed readers that fail
with located, human errors.

Owns: reading YAML text safely (size cap, binary/encoding checks), the `Node` wrapper, schema
helpers (maps with did-you-mean on unknown keys, durations, sizes, paths, secret files), and the
`Problem`/`SourceError` error types.
Must not: know about any particular config section or policy rule (callers own their schemas), or
ever put a secret's content in a message.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

MAX_YAML_BYTES = 8 * 1024 * 1024  # configs and rule files are human-written; long lists go in *_file


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    col: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.col}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class SourceError(Exception):
    """One or more located problems in a configuration or policy file."""

    def __init__(self, problems: Problem | Iterable[Problem]):
        self.problems: list[Problem] = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


T = TypeVar("T")


class Problems:
    """Collects located problems from independent parts of a file, so one run of `proxyvm check`
    reports as many as it can (the one collector of the policy parser and the config loader)."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def attempt(self, fn: Callable[[], T], default: T) -> T:
        """fn(), or `default` after recording its SourceError's problems."""
        try:
            return fn()
        except SourceError as e:
            self.items.extend(e.problems)
            return default

    def add(self, problem: Problem) -> None:
        self.items.append(problem)

    def raise_if_any(self) -> None:
        if self.items:
            self.items.sort(key=lambda p: (p.file, p.line, p.col))
            raise SourceError(self.items)


class Secret:
    """Bytes read from a `*_file`; never printed."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = ""):
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def suggest(word: str, choices: Iterable[str]) -> str:
    """A did-you-mean hint, or "" when nothing is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


@dataclass(slots=True)
class Node:
    """A YAML value with the place it was written."""

    value: Any
    file: str
    line: int
    col: int
    base: Path = field(default_factory=Path)

    # -- errors -----------------------------------------------------------------------------
    def problem(self, message: str, hint: str = "") -> Problem:
        return Problem(self.file, self.line, self.col, message, hint)

    def fail(self, message: str, hint: str = "") -> SourceError:
        """Return (for `raise node.fail(...)`) a SourceError located at this node."""
        return SourceError(self.problem(message, hint))

    def _type_name(self) -> str:
        v = self.value
        if v is None:
            return "nothing (null)"
        if isinstance(v, bool):
            return "a boolean"
        if isinstance(v, (int, float)):
            return "a number"
        if isinstance(v, str):
            return "a string"
        if isinstance(v, dict):
            return "a mapping"
        if isinstance(v, list):
            return "a list"
        return type(v).__name__

    # -- structure --------------------------------------------------------------------------
    def _child(self, value: Any, pos: tuple[int, int] | None) -> Node:
        line, col = (pos[0] + 1, pos[1] + 1) if pos else (self.line, self.col)
        return Node(value, self.file, line, col, self.base)

    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    def is_list(self) -> bool:
        return isinstance(self.value, list)

    def get_map(
        self,
        allowed: Iterable[str] | None = None,
        required: Iterable[str] = (),
        what: str = "",
    ) -> dict[str, Node]:
        """The mapping's entries as Nodes. Unknown keys (when `allowed` is given) and missing
        required keys are errors; all problems in this mapping are reported together."""
        if not isinstance(self.value, dict):
            raise self.fail(f"expected a mapping{' for ' + what if what else ''}, found {self._type_name()}")
        out: dict[str, Node] = {}
        problems: list[Problem] = []
        allowed_set = set(allowed) if allowed is not None else None
        for key, value in self.value.items():
            kpos = _key_pos(self.value, key)
            vpos = _value_pos(self.value, key)
            knode = self._child(key, kpos)
            if not isinstance(key, str):
                problems.append(knode.problem(f"keys must be strings, found {knode._type_name()}"))
                continue
            if allowed_set is not None and key not in allowed_set:
                where = f" in {what}" if what else ""
                problems.append(
                    knode.problem(
                        f"unknown key '{key}'{where}",
                        suggest(key, allowed_set) or "allowed keys: " + ", ".join(sorted(allowed_set)),
                    )
                )
                continue
            out[key] = self._child(value, vpos or kpos)
        for key in required:
            if key not in self.value:
                problems.append(self.problem(f"missing required key '{key}'{' in ' + what if what else ''}"))
        if problems:
            raise SourceError(problems)
        return out

    def get_list(self, what: str = "", allow_scalar: bool = False) -> list[Node]:
        if isinstance(self.value, list):
            return [self._child(v, _item_pos(self.value, i)) for i, v in enumerate(self.value)]
        if allow_scalar and self.value is not None and not isinstance(self.value, dict):
            return [self]
        raise self.fail(f"expected a list{' of ' + what if what else ''}, found {self._type_name()}")

    def items(self) -> Iterator[tuple[str, Node]]:
        yield from self.get_map().items()

    # -- scalars ----------------------------------------------------------------------------
    def str(self, what: str = "", nonempty: bool = True) -> str:
        v = self.value
        if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
            raise self.fail(f"expected a string{' for ' + what if what else ''}, found {self._type_name()}")
        s = str(v)
        if nonempty and not s.strip():
            raise self.fail(f"expected a non-empty string{' for ' + what if what else ''}")
        return s

    def int(self, min: int | None = None, max: int | None = None, what: str = "") -> int:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"expected an integer{' for ' + what if what else ''}, found {self._type_name()}")
        if min is not None and v < min:
            raise self.fail(f"{what or 'value'} must be at least {min}, found {v}")
        if max is not None and v > max:
            raise self.fail(f"{what or 'value'} must be at most {max}, found {v}")
        return v

    def bool(self, what: str = "") -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(
                f"expected true or false{' for ' + what if what else ''}, found {self._type_name()}"
            )
        return self.value

    def enum(self, choices: Iterable[str], what: str = "") -> str:
        choices = list(choices)
        s = self.str(what)
        if s not in choices:
            raise self.fail(
                f"unknown {what or 'value'} '{s}'",
                suggest(s, choices) or "one of: " + ", ".join(choices),
            )
        return s

    def duration(self, what: str = "") -> float:
        v = self.value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        m = _DURATION.match(str(v)) if isinstance(v, str) else None
        if not m:
            raise self.fail(
                f"bad duration {v!r}{' for ' + what if what else ''}",
                "write a number with a unit: 500ms, 30s, 5m, 2h, 3d",
            )
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]

    def size(self, what: str = "") -> int:
        v = self.value
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 0:
                raise self.fail(f"size must not be negative, found {v}")
            return v
        m = _SIZE.match(str(v)) if isinstance(v, str) else None
        if not m:
            raise self.fail(
                f"bad size {v!r}{' for ' + what if what else ''}",
                "write a number with a unit: 512B, 10KB, 25MB, 1GB (KiB/MiB/GiB for powers of 2)",
            )
        return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])

    def path(self, what: str = "") -> Path:
        p = Path(self.str(what))
        return p if p.is_absolute() else (self.base / p)

    def secret_file(self, what: str = "secret") -> Secret:
        p = self.path(what)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise self.fail(f"{what} file {p} does not exist", "create it (mode 0600) or fix the path") from None
        except PermissionError:
            raise self.fail(f"{what} file {p} is not readable by this user") from None
        except IsADirectoryError:
            raise self.fail(f"{what} file {p} is a directory") from None
        try:
            text = data.decode("utf-8").strip("\r\n")
        except UnicodeDecodeError:
            raise self.fail(f"{what} file {p} is not UTF-8 text") from None
        if not text:
            raise self.fail(f"{what} file {p} is empty")
        return Secret(text, str(p))

    def hostport(self, default_port: int | None = None, what: str = "address") -> tuple[str, int]:
        s = self.str(what).strip()
        host, port = s, None
        if s.startswith("["):
            end = s.find("]")
            if end < 0:
                raise self.fail(f"bad {what} {s!r}: missing ']'")
            host, rest = s[1:end], s[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise self.fail(f"bad {what} {s!r}")
                port = rest[1:]
        elif s.count(":") == 1:
            host, port = s.split(":")
        elif s.count(":") > 1:
            host = s  # bare IPv6
        if port is None:
            if default_port is None:
                raise self.fail(f"{what} {s!r} needs a port", f"write it as {s}:PORT")
            return host, default_port
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise self.fail(f"bad port in {what} {s!r}", "ports are 1-65535")
        if not host:
            raise self.fail(f"{what} {s!r} has no host")
        return host, int(port)

    def ip(self, what: str = "address") -> str:
        s = self.str(what).strip()
        try:
            return str(ipaddress.ip_address(s))
        except ValueError:
            raise self.fail(f"bad IP address {s!r}") from None


def _key_pos(m: Any, key: Any) -> tuple[int, int] | None:
    if isinstance(m, CommentedMap):
        try:
            return m.lc.key(key)
        except (KeyError, TypeError, AttributeError):
            return None
    return None


def _value_pos(m: Any, key: Any) -> tuple[int, int] | None:
    if isinstance(m, CommentedMap):
        try:
            return m.lc.value(key)
        except (KeyError, TypeError, AttributeError):
            return None
    return None


def _item_pos(s: Any, i: int) -> tuple[int, int] | None:
    if isinstance(s, CommentedSeq):
        try:
            return s.lc.item(i)
        except (KeyError, TypeError, AttributeError, IndexError):
            return None
    return None


def read_text(path: Path, what: str = "file", max_bytes: int = MAX_YAML_BYTES) -> str:
    """Read a human-written text file, refusing huge and binary files with a located message."""
    name = str(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise SourceError(Problem(name, 1, 1, f"{what} not found")) from None
    except PermissionError:
        raise SourceError(Problem(name, 1, 1, f"{what} is not readable by this user")) from None
    if os.path.isdir(path):
        raise SourceError(Problem(name, 1, 1, f"{what} is a directory"))
    if size > max_bytes:
        raise SourceError(
            Problem(
                name, 1, 1, f"{what} is {size} bytes, over the {max_bytes} byte limit",
                "long name lists belong in a qname_file/host_file, not in the YAML",
            )
        )
    try:
        data = path.read_bytes()
    except PermissionError:
        raise SourceError(Problem(name, 1, 1, f"{what} is not readable by this user")) from None
    if b"\x00" in data:
        off = data.index(b"\x00")
        line = data.count(b"\n", 0, off) + 1
        col = off - (data.rfind(b"\n", 0, off) + 1) + 1
        raise SourceError(Problem(name, line, col, f"{what} is binary (NUL byte), not YAML text"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SourceError(Problem(name, line, col, f"{what} is not UTF-8 text")) from None


def load_yaml(path: str | os.PathLike[str], what: str = "file") -> Node:
    """Parse a YAML file into a located `Node` (an empty file is an error)."""
    p = Path(path)
    text = read_text(p, what)
    return parse_yaml(text, str(p), p.parent, what)


def parse_yaml(text: str, name: str, base: Path, what: str = "file") -> Node:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        data = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = (e.problem or e.context or "invalid YAML").strip()
        if "duplicate key" in str(e):
            msg = "duplicate key " + (str(e).split('duplicate key "', 1)[-1].split('"', 1)[0].join("''"))
        raise SourceError(Problem(name, line, col, f"invalid YAML: {msg}")) from None
    except YAMLError as e:
        raise SourceError(Problem(name, 1, 1, f"invalid YAML: {str(e).splitlines()[0]}")) from None
    except RecursionError:
        raise SourceError(Problem(name, 1, 1, "invalid YAML: nested too deeply")) from None
    if data is None:
        raise SourceError(Problem(name, 1, 1, f"{what} is empty", "see the example in the README"))
    return Node(data, name, 1, 1, base)
