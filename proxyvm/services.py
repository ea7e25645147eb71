"""The explicit registry of protocol services (no discovery by name or entry-point magic).

Owns: which services exist, where their class lives, and checking at start-up that each one
really implements `protocols.base.Service` (a typo'd method must fail loudly, not disable a hook).
Must not: start anything.
"""

from __future__ import annotations

import importlib
import inspect

SERVICES: dict[str, str] = {
    "dns": "protocols.dns.service:DNSService",
    "smtp": "protocols.smtp.service:SMTPService",
    "snmp": "protocols.snmp.service:SNMPService",
    "http": "protocols.http.service:HTTPService",
}

_ASYNC = ("start", "reload", "drain")
_SYNC = ("health",)


class ServiceUnavailable(Exception):
    """The service's code is not part of this build (yet)."""


def load_service_class(name: str) -> type:
    target = SERVICES.get(name)
    if target is None:
        raise ServiceUnavailable(f"no such service {name!r}; known: {', '.join(SERVICES)}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise ServiceUnavailable(f"the {name} service is not available in this build yet") from None
        raise
    cls = getattr(module, attr, None)
    if cls is None:
        raise ServiceUnavailable(f"the {name} service is not available in this build yet ({target} missing)")
    check_service_class(name, cls)
    return cls


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

