"""SNMP test fixtures: see snmp_helpers.py (a uniquely named module, so that test areas'
helpers never collide on sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from snmp_helpers import agent, lab_dir, make_proxy, trapd  # noqa: E402

__all__ = ["agent", "lab_dir", "make_proxy", "trapd"]
