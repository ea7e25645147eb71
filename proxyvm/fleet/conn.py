"""NATS connections for the fleet: TLS only, verified, fail closed.

Owns: building the TLS context from `fleet.ca_file` (hostname checked, TLS 1.2+), choosing how
`fleet.credentials_file` authenticates (a NATS `.creds` file, JWT + nkey seed, or a bare nkey
seed), refusing a server that does not require TLS before anything is sent to it, and
turning connection errors into one clear sentence.
Must not: fall back to plaintext, or put a credential into a message or log line.

nats-py upgrades to TLS only when the server's INFO says `tls_required`, even for a `tls://`
URL: a server (or anything in between) that omits it would get our CONNECT in plaintext. The
client here refuses such a server on every (re)connect.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

CONNECT_TIMEOUT = 3.0


class PlaintextRefused(nats.errors.Error):
    def __str__(self) -> str:
        return ("the server does not require TLS: refusing to talk to it in plaintext (fail closed); "
                "configure tls on the NATS server")


class TLSOnlyClient(Client):
    """A nats-py client that will not send CONNECT to a server that does not require TLS."""

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and not info.get("tls_required"):
            raise PlaintextRefused()
        await super()._process_info(info, initial_connection=initial_connection)  # type: ignore[misc]


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def credential_options(path: Path | None) -> dict[str, Any]:
    """nats-py options for a credentials file: `.creds` (user JWT + seed, decentralised auth) or a
    file holding just an nkey seed (`SU...`, for `authorization { users = [{nkey: U...}] }`)."""
    if path is None:
        return {}
    text = Path(path).read_text(errors="replace")
    if "BEGIN NATS USER JWT" in text:
        return {"user_credentials": str(path)}
    if text.strip().startswith("SU"):
        return {"nkeys_seed": str(path)}
    raise ValueError(f"{path} is neither a NATS .creds file (user JWT + nkey seed) nor an nkey user seed (SU...)")


def describe(e: BaseException) -> str:
    """One sentence for a connection problem (no credential in it)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate of the NATS server not accepted: {e.verify_message} (fail closed: nothing sent)"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake with the NATS server failed: {e.reason or e} (fail closed: nothing sent)"
    if isinstance(e, PlaintextRefused):
        return str(e)
    text = str(e) or type(e).__name__
    low = text.lower()
    if "authorization" in low or "authentication" in low:
        return f"the NATS servers refused our credentials ({text}): check fleet.credentials_file"
    if isinstance(e, nats.errors.NoServersError):
        return "no NATS server could be reached"
    if isinstance(e, (ConnectionRefusedError, OSError)):
        return f"cannot reach the NATS server: {e.strerror or text}" if isinstance(e, OSError) else text
    return f"{type(e).__name__}: {text}"


async def connect(
    servers: list[str] | tuple[str, ...],
    *,
    ca_file: Path | None,
    credentials_file: Path | None,
    name: str,
    on_error: Callable[[BaseException], Awaitable[None]] | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    attempts: int = -1,
    pending_size: int = 64 * 1024 * 1024,
) -> TLSOnlyClient:
    """Connect. `attempts` -1 (a node): keep trying every server until one answers, and reconnect
    for ever after (errors go to `on_error` meanwhile); N (the CLI): give up after N rounds."""
    for url in servers:
        if not url.startswith("tls://"):
            raise ValueError(f"{url}: fleet NATS URLs are tls:// only")
    nc = TLSOnlyClient()

    async def _err(e: Exception) -> None:
        if on_error is not None:
            await on_error(e)

    async def _disc() -> None:
        if on_disconnect is not None:
            await on_disconnect()

    async def _rec() -> None:
        if on_reconnect is not None:
            await on_reconnect()

    await nc.connect(
        servers=list(servers), name=name, tls=tls_context(ca_file),
        connect_timeout=CONNECT_TIMEOUT, allow_reconnect=True, max_reconnect_attempts=attempts,
        reconnect_time_wait=1.0, ping_interval=5, max_outstanding_pings=2,
        error_cb=_err, disconnected_cb=_disc, reconnected_cb=_rec, pending_size=pending_size,
        **credential_options(credentials_file),
    )
    return nc


async def connect_settings(settings: Any, name: str, **kw: Any) -> TLSOnlyClient:
    return await connect(settings.nats, ca_file=settings.ca_file, credentials_file=settings.credentials_file,
                         name=name, **kw)
