"""Every runtime dependency is imported by product code (the VM image ships each one)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# distribution name -> the module product code imports
MODULE = {"dnspython": "dns", "ruamel.yaml": "ruamel.yaml", "prometheus-client": "prometheus_client",
          "nats-py": "nats"}


def test_every_runtime_dependency_is_used_by_product_code() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in deps]
    assert "mitmproxy" in names and len(names) >= 5
    source = "\n".join(p.read_text() for d in ("proxyvm", "protocols", "policy") for p in (REPO / d).rglob("*.py"))
    unused = []
    for name in names:
        mod = re.escape(MODULE.get(name, name.replace("-", "_")))
        if not re.search(rf"^\s*(from|import)\s+{mod}\b", source, re.M):
            unused.append(name)
    assert unused == [], f"runtime dependencies no product code imports (move them to the dev extra): {unused}"

