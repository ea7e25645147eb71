"""The control channel between the supervisor and one service worker.

Owns: framing (one JSON object per line over a UNIX stream socketpair) and the message vocabulary.
Must not: carry secrets (workers read their own secrets files) or block the event loop.

worker → supervisor: {"t": "ready", "listening": [...]} · {"t": "audit", "r": [record, ...]} ·
                     {"t": "health", "h": {...}} · {"t": "reloaded", "ok": bool, "errors": [...]} ·
                     {"t": "fatal", "error": "..."}
supervisor → worker: {"t": "reload"} · {"t": "drain", "timeout": s}
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

MAX_LINE = 64 * 1024 * 1024


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Next message, or None at EOF."""
    line = await reader.readline()
    if not line:
        return None
    return json.loads(line)
