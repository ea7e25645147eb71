"""The explicit service registry refuses a service whose hooks are misspelt or mis-shaped."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from proxyvm.services import REGISTRY, ServiceUnavailable, check_service_class, load_service_class


class Good:
    name: ClassVar[str] = "dns"

    def __init__(self, ctx) -> None: ...
    async def start(self) -> list[str]:
        return []

    async def reload(self, settings, engine) -> None: ...
    async def drain(self, timeout: float) -> None: ...
    def health(self) -> dict:
        return {}


def test_good_shape_passes() -> None:
    check_service_class("dns", Good)


def test_typo_in_hook_name_is_fatal() -> None:
    class Typo(Good):
        reload = None  # type: ignore[assignment]

        async def relaod(self, settings, engine) -> None: ...

    with pytest.raises(TypeError, match=r"reload\(\) must be an async method"):
        check_service_class("dns", Typo)


def test_sync_start_and_wrong_name_are_fatal() -> None:
    class Bad(Good):
        name = "dnz"

        def start(self) -> list[str]:  # type: ignore[override]
            return []

    with pytest.raises(TypeError) as e:
        check_service_class("dns", Bad)
    assert "start() must be an async method" in str(e.value) and "name must be 'dns'" in str(e.value)


def test_unknown_service() -> None:
    with pytest.raises(ServiceUnavailable):
        load_service_class("gopher")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_service_loads_and_is_well_formed(name: str) -> None:
    cls = load_service_class(name)  # a registered service that vanished from the build fails here
    assert cls.name == name


def test_registry_names_exactly_the_protocol_folders_with_settings_and_service() -> None:
    protocols = Path(__file__).resolve().parents[2] / "protocols"
    folders = {p.name for p in protocols.iterdir() if (p / "settings.py").is_file() and (p / "service.py").is_file()}
    assert set(REGISTRY) == folders
    for name, entry in REGISTRY.items():
        assert entry.settings == f"protocols.{name}.settings"
        assert entry.service.startswith(f"protocols.{name}.service:")
