"""The control channel between the supervisor and one service worker.

Owns: framing (one JSON object per line over a UNIX stream socketpair) and the message vocabulary.
Must not: carry secrets (workers read their own secrets files) or block the event loop.

worker → supervisor: {"t": "ready", "listening": [...]} · audit frames (below) ·
                     {"t": "health", "h": {...}} · {"t": "reloaded", "ok": bool, "errors": [...]} ·
                     {"t": "fatal", "error": "..."}
supervisor → worker: {"t": "reload", "config": <pickled Config>} · {"t": "drain", "timeout": s}

Audit frames (worker → supervisor) are not JSON messages: a line `\x1e<length>\n` followed by
`length` bytes of pre-encoded records (see `proxyvm.worker.ChannelAudit`), so the supervisor never
decodes a record to write it.

The supervisor (still root) loads and validates the new config on SIGHUP and hands the parsed
result to the workers: after dropping privileges they may no longer be able to read root-only
secret files. The channel is a private socketpair between the two, so unpickling is safe here.
"""

from __future__ import annotations

import asyncio
import base64
import copyreg
import json
import pickle
from types import MappingProxyType
from typing import Any


def _mappingproxy(d: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(d)


# Config objects keep read-only mappings; let them cross the channel.
copyreg.pickle(MappingProxyType, lambda m: (_mappingproxy, (dict(m),)))

MAX_LINE = 64 * 1024 * 1024


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Next message, or None at EOF."""
    line = await reader.readline()
    if not line:
        return None
    return json.loads(line)


AUDIT_FRAME = 0x1E


async def read_any(reader: asyncio.StreamReader) -> dict[str, Any] | bytes | None:
    """Next message (a dict) or audit frame payload (bytes), or None at EOF."""
    line = await reader.readline()
    if not line:
        return None
    if line[0] == AUDIT_FRAME:
        n = int(line[1:])
        if n < 0 or n > MAX_LINE:
            raise ValueError(f"audit frame of {n} bytes")
        return await reader.readexactly(n)
    return json.loads(line)


def pack(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def unpack(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))  # noqa: S301 - from our own supervisor only
