"""Files shipped with the appliance: the built-in default config and its allow-all policy.

Owns: locating those files inside the installed package.
Must not: parse them (see `proxyvm.config`)."""

from __future__ import annotations

from pathlib import Path

DEFAULTS_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = DEFAULTS_DIR / "proxyvm.yaml"
DEFAULT_POLICY = DEFAULTS_DIR / "rules.yaml"
