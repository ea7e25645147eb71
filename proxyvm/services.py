"""The explicit registry of protocol services (no discovery by name or entry-point magic).

Owns: the one table of services (`REGISTRY`: each service's settings parser module and its
Service class), the one "not available in this build" decision for both, and checking at
start-up that each class really implements `protocols.base.Service` (a typo'd method must fail
loudly, not disable a hook).
Must not: start anything, or parse a section (`proxyvm.config` calls the parser it names).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """Where one service's code lives."""

    settings: str  # module with `parse(node: policy.source.Node, base: Path) -> <Name>Settings`
    service: str  # "module:Class" of its `protocols.base.Service`


REGISTRY: Mapping[str, ServiceEntry] = MappingProxyType(
    {
        "dns": ServiceEntry("protocols.dns.settings", "protocols.dns.service:DNSService"),
        "smtp": ServiceEntry("protocols.smtp.settings", "protocols.smtp.service:SMTPService"),
        "snmp": ServiceEntry("protocols.snmp.settings", "protocols.snmp.service:SNMPService"),
        "http": ServiceEntry("protocols.http.settings", "protocols.http.service:HTTPService"),
    }
)
"""Service (and config section) name -> its code, in the order sections are parsed and services
started. A registered service whose module is missing is reported, never silently skipped."""

_ASYNC = ("start", "reload", "drain")
_SYNC = ("health",)


class ServiceUnavailable(Exception):
    """The service's code is not part of this build (yet)."""


def _entry(name: str) -> ServiceEntry:
    entry = REGISTRY.get(name)
    if entry is None:
        raise ServiceUnavailable(f"no such service {name!r}; known: {', '.join(REGISTRY)}")
    return entry


def _import(name: str, target: str) -> Any:
    """`module:attr` (or a module) of service `name`. Only that module (or its package) being
    absent, or the attribute missing, means "not in this build"; a missing dependency inside it
    is a broken build and is raised as is."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise ServiceUnavailable(f"the {name} service is not available in this build yet") from None
        raise
    if not attr:
        return module
    found = getattr(module, attr, None)
    if found is None:
        raise ServiceUnavailable(f"the {name} service is not available in this build yet ({target} missing)")
    return found


def load_settings_parser(name: str) -> Callable[[Any, Path], Any]:
    """The `parse(node, base)` of service `name`'s config section; ServiceUnavailable when this
    build lacks it."""
    target = _entry(name).settings
    parse = _import(name, f"{target}:parse")
    if not callable(parse):
        raise ServiceUnavailable(f"the {name} service is not available in this build yet ({target}:parse missing)")
    return parse  # type: ignore[no-any-return]


def load_service_class(name: str) -> type:
    cls = _import(name, _entry(name).service)
    check_service_class(name, cls)
    return cls  # type: ignore[no-any-return]


def check_service_class(name: str, cls: type) -> None:
    """Raise TypeError naming what is missing or wrongly shaped."""
    problems = []
    if getattr(cls, "name", None) != name:
        problems.append(f"class attribute name must be {name!r}")
    for m in _ASYNC:
        fn = getattr(cls, m, None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            problems.append(f"{m}() must be an async method")
    for m in _SYNC:
        fn = getattr(cls, m, None)
        if fn is None or inspect.iscoroutinefunction(fn):
            problems.append(f"{m}() must be a plain method")
    if problems:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a valid {name} service: " + "; ".join(problems))

