"""Fleet mode on NATS JetStream (docs/configuration.md#fleet, docs/deployment.md#fleet-mode-nats-jetstream).

Owns: the `fleet:` config section (`FleetSettings`, `parse_fleet`) and the names every part of
the fleet agrees on: the audit stream and its subjects, the KV buckets, message ids.
The parts: `conn` (TLS-only NATS connections), `shipper` (audit records -> stream, with a disk
spool), `bundle` (Ed25519-signed policy bundles), `node` (the supervisor side: watchers for
policy and quarantine, status), `cli` (`proxyvm fleet ...`).
Must not: decide requests, or ever stop guests from being served (every fleet failure is logged,
recorded and retried; the appliance runs on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from policy.source import Node

STREAM = "PROXYVM_AUDIT"
SUBJECT_PREFIX = "proxyvm.audit"
POLICY_BUCKET = "PROXYVM_POLICY"
POLICY_KEY = "current"
QUARANTINE_BUCKET = "PROXYVM_QUARANTINE"
NODES_BUCKET = "PROXYVM_NODES"
MIN_DUPLICATE_WINDOW = 60.0  # seconds; below this a re-send after a crash may be stored twice
DEFAULT_DUPLICATE_WINDOW = 600.0  # what `proxyvm fleet init` sets (docs/deployment.md#fleet-mode-nats-jetstream)
DEFAULT_SPOOL_MAX = 1000**3  # 1GB of records waiting for NATS
DEFAULT_STATUS_EVERY = 5.0

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # one NATS subject token, a KV key part


def subject(node: str, protocol: str) -> str:
    return f"{SUBJECT_PREFIX}.{node}.{protocol}"


def msg_id(node: str, chain: str, seq: int) -> str:
    return f"{node}:{chain}:{seq}"


@dataclass(frozen=True, slots=True)
class FleetSettings:
    node: str
    nats: tuple[str, ...]
    credentials_file: Path | None = None  # a NATS .creds file (JWT + seed) or an nkey seed file
    ca_file: Path | None = None  # CA bundle for the servers' certificates (None: the system's)
    policy_key: Path | None = None  # Ed25519 public key (PEM); None: fleet policy bundles are refused
    spool_max: int = DEFAULT_SPOOL_MAX
    status_every: float = DEFAULT_STATUS_EVERY


def _readable(node: Node, what: str) -> Path:
    p = node.path(what)
    if not p.is_file():
        raise node.fail(f"{what} {p} {'is a directory' if p.is_dir() else 'does not exist'}",
                        "paths are relative to the config file")
    try:
        with open(p, "rb"):
            pass
    except PermissionError:
        raise node.fail(f"{what} {p} is not readable by this user") from None
    return p


def parse_fleet(node: Node) -> FleetSettings | None:
    """`fleet:` (absent or `false`: not in a fleet)."""
    if node.value is False or node.value is None:
        return None
    fields = node.get_map(
        allowed={"node", "nats", "credentials_file", "ca_file", "policy_key", "spool_max", "status_every"},
        required={"node", "nats"}, what="fleet")
    from policy.source import SourceError

    problems = []

    def run(fn, fallback=None):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except SourceError as e:
            problems.extend(e.problems)
            return fallback

    def _node() -> str:
        name = fields["node"].str("fleet node")
        if not NODE_NAME.match(name):
            raise fields["node"].fail(
                f"bad fleet node name {name!r}",
                "letters, digits, '_' and '-' (no dots: it is one NATS subject token), e.g. hv-17")
        return name

    def _urls() -> tuple[str, ...]:
        out = []
        for u in fields["nats"].get_list("NATS server URLs", allow_scalar=True):
            text = u.str("NATS server URL").strip()
            scheme, sep, rest = text.partition("://")
            if not sep or scheme != "tls" or not rest:
                raise u.fail(f"NATS server URL {text!r} is not tls://HOST:PORT",
                             "fleet traffic is TLS only (no plaintext fallback): write tls://nats1:4222")
            out.append(text)
        if not out:
            raise fields["nats"].fail("fleet nats lists no server", 'e.g. ["tls://nats1:4222", "tls://nats2:4222"]')
        return tuple(out)

    def _policy_key() -> Path:
        p = _readable(fields["policy_key"], "fleet policy_key")
        from proxyvm.fleet.bundle import BundleError, load_public_key

        try:
            load_public_key(p)
        except BundleError as e:
            raise fields["policy_key"].fail(f"fleet policy_key {p}: {e}",
                                            "an Ed25519 public key in PEM (`proxyvm fleet keygen` makes a pair)") from None
        return p

    name = run(_node)
    urls = run(_urls)
    def _creds() -> Path:
        p = _readable(fields["credentials_file"], "fleet credentials_file")
        from proxyvm.fleet.conn import credential_options

        try:
            credential_options(p)
        except (ValueError, OSError) as e:
            raise fields["credentials_file"].fail(str(e), "`nsc generate creds` makes a .creds file; "
                                                  "`nk -gen user` an nkey seed") from None
        return p

    creds = run(_creds) if "credentials_file" in fields else None
    ca = run(lambda: _readable(fields["ca_file"], "fleet ca_file")) if "ca_file" in fields else None
    key = run(_policy_key) if "policy_key" in fields else None
    spool_max = DEFAULT_SPOOL_MAX
    if "spool_max" in fields:
        spool_max = run(lambda: fields["spool_max"].size("fleet spool_max"), DEFAULT_SPOOL_MAX)
        if spool_max < 64 * 1024:
            problems.append(fields["spool_max"].problem("fleet spool_max must be at least 64KB", "e.g. 1GB"))
    status_every = DEFAULT_STATUS_EVERY
    if "status_every" in fields:
        status_every = run(lambda: fields["status_every"].duration("fleet status_every"), DEFAULT_STATUS_EVERY)
        if not 0.2 <= status_every <= 3600:
            problems.append(fields["status_every"].problem("fleet status_every must be between 200ms and 1h"))
    if problems:
        raise SourceError(problems)
    return FleetSettings(name, urls, creds, ca, key, spool_max, status_every)  # type: ignore[arg-type]
