"""Quarantine, supervisor side, and the control socket (docs/cli.md#quarantine).

Owns: the `quarantine:` config section, the quarantine table (`state_dir/quarantine.json`,
replaced atomically: tmp + fsync + rename + directory fsync), the control socket
`state_dir/control.sock` (AF_UNIX, mode 0600, a peer whose SO_PEERCRED uid is neither 0 nor the
supervisor's is refused), the `kind: quarantine` / `kind: release` audit records, pushing the whole
table to every worker (`{"t": "quarantine", "table": {...}}`), and the client the CLI uses.
Must not: decide requests (services enforce the table: protocols.quarantine), or parse guest
traffic.

Control protocol: one JSON request line, one JSON response line.
  {"op": "quarantine", "guest": G, "profile": "block"|"honeypot", "reason": TEXT}
  {"op": "release", "guest": G, "reason": TEXT}
  {"op": "list"}
  -> {"ok": true, ...} | {"ok": false, "error": TEXT, "exit": 1|2}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy.source import Node
from protocols.quarantine import DEFAULT_RECORD_MAX, write_durably
from proxyvm.audit import now_iso

log = logging.getLogger("proxyvm")

PROFILES = ("block", "honeypot")
STATE_FILE = "quarantine.json"
SOCKET_FILE = "control.sock"
MAX_REQUEST = 64 * 1024
MAX_REASON = 500
DEFAULT_SINKHOLE_A = ("192.0.2.254",)
DEFAULT_SINKHOLE_AAAA = ("2001:db8::254",)


# -- config -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QuarantineSettings:
    sinkhole_a: tuple[str, ...] = DEFAULT_SINKHOLE_A  # honeypot DNS answers (A)
    sinkhole_aaaa: tuple[str, ...] = DEFAULT_SINKHOLE_AAAA  # honeypot DNS answers (AAAA)
    record_max: int = DEFAULT_RECORD_MAX  # bytes of honeypot recording kept per guest


def parse_quarantine(node: Node) -> QuarantineSettings:
    fields = node.get_map(allowed={"sinkhole", "record_max"}, what="quarantine")
    a, aaaa = DEFAULT_SINKHOLE_A, DEFAULT_SINKHOLE_AAAA
    if "sinkhole" in fields:
        sk = fields["sinkhole"].get_map(allowed={"a", "aaaa"}, what="quarantine sinkhole")
        if "a" in sk:
            a = tuple(_ip(n, 4, "sinkhole a") for n in sk["a"].get_list("IPv4 addresses", allow_scalar=True))
        if "aaaa" in sk:
            aaaa = tuple(_ip(n, 6, "sinkhole aaaa") for n in sk["aaaa"].get_list("IPv6 addresses", allow_scalar=True))
    record_max = DEFAULT_RECORD_MAX
    if "record_max" in fields:
        record_max = fields["record_max"].size("quarantine record_max")
    return QuarantineSettings(a, aaaa, record_max)


def _ip(node: Node, version: int, what: str) -> str:
    import ipaddress

    text = node.ip(what)
    if ipaddress.ip_address(text).version != version:
        raise node.fail(f"{what} {text} is not an IPv{version} address",
                        "a: takes IPv4 addresses, aaaa: IPv6 addresses")
    return text


# -- the table on disk ------------------------------------------------------------------------
def load_state(path: Path) -> dict[str, dict[str, Any]]:
    """The saved table ({} when there is none). A file that does not parse is an error: starting
    with an empty table would silently release every quarantined guest."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    guests = data.get("guests") if isinstance(data, dict) else None
    if not isinstance(guests, dict):
        raise ValueError(f"{path}: not a quarantine table (no 'guests' mapping)")
    return {str(g): dict(e) for g, e in guests.items() if isinstance(e, dict)}


def save_state(path: Path, table: dict[str, dict[str, Any]]) -> None:
    write_durably(path, (json.dumps({"version": 1, "guests": table}, indent=1, sort_keys=True) + "\n").encode())


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class QuarantineError(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# -- supervisor side --------------------------------------------------------------------------
class Quarantine:
    """The running instance's quarantine table. `sup` is the Supervisor (write_audit, services,
    config); everything runs on its event loop."""

    def __init__(self, sup: Any, settings: QuarantineSettings | None = None) -> None:
        self.sup = sup
        self.settings = settings or QuarantineSettings()
        self.state_dir = Path(sup.config.state_dir)
        self.path = self.state_dir / STATE_FILE
        self.sock_path = self.state_dir / SOCKET_FILE
        self.table: dict[str, dict[str, Any]] = load_state(self.path)
        self.server: asyncio.AbstractServer | None = None
        self.on_change: list[Callable[[], None]] = []
        self.detectors: Any = None  # proxyvm.detect.Detectors when `detect:` turns any on
        self._gauge: Any = None
        registry = getattr(getattr(sup, "metrics", None), "registry", None)
        if registry is not None:
            from prometheus_client import Gauge

            self._gauge = Gauge("proxyvm_quarantined_guests", "Guests in quarantine", ["profile"], registry=registry)
            self._update_gauge()
        unknown = [g for g in self.table if g != "unknown" and g not in sup.config.guests]
        if unknown:
            log.warning("quarantine: %s in %s %s not in the config's guests (kept; release to remove)",
                        ", ".join(sorted(unknown)), self.path, "is" if len(unknown) == 1 else "are")
        for g, e in sorted(self.table.items()):
            log.warning("quarantine: guest %s is quarantined (%s, by %s since %s): %s",
                        g, e.get("profile"), e.get("by"), e.get("since"), e.get("reason"))

    def _update_gauge(self) -> None:
        if self._gauge is None:
            return
        for p in PROFILES:
            self._gauge.labels(p).set(sum(1 for e in self.table.values() if e.get("profile") == p))

    # -- the table as the workers get it ----------------------------------------------------
    def pushed_table(self) -> dict[str, dict[str, Any]]:
        s = self.settings
        sink = {"a": list(s.sinkhole_a), "aaaa": list(s.sinkhole_aaaa)}
        return {g: {**e, "sinkhole": sink, "record_max": s.record_max} for g, e in self.table.items()}

    def message(self) -> bytes:
        from proxyvm import channel

        return channel.encode({"t": "quarantine", "table": self.pushed_table()})

    def send_to(self, s: Any) -> None:
        """Push the table to one worker (right after it is ready: a restarted worker gets it too)."""
        w = getattr(s, "writer", None)
        if w is not None and not w.is_closing():
            try:
                w.write(self.message())
            except (ConnectionError, RuntimeError):
                pass

    def push(self) -> None:
        data = self.message()
        for s in self.sup.procs():  # every worker of every service
            w = s.writer
            if w is not None and not w.is_closing() and s.state == "ready":
                try:
                    w.write(data)
                except (ConnectionError, RuntimeError):
                    pass

    # -- changes ----------------------------------------------------------------------------
    def known_guest(self, guest: str) -> bool:
        return guest == "unknown" or guest in self.sup.config.guests

    def quarantine(self, guest: str, profile: str, reason: str, by: str, user: str = "") -> dict[str, Any]:
        if not self.known_guest(guest):
            names = ", ".join(sorted(self.sup.config.guests)) or "none"
            raise QuarantineError(f"no guest named {guest!r} in {self.sup.config.source} (guests: {names})", 2)
        if profile not in PROFILES:
            raise QuarantineError(f"unknown profile {profile!r}: block or honeypot", 2)
        old = self.table.get(guest)
        if old is not None:
            raise QuarantineError(
                f"guest {guest} is already quarantined ({old.get('profile')}, by {old.get('by')} since "
                f"{old.get('since')}: {old.get('reason')}); release it first to change the profile")
        entry = {"profile": profile, "reason": reason[:MAX_REASON], "by": by, "since": now_iso()}
        if user:
            entry["user"] = user
        table = {**self.table, guest: entry}
        save_state(self.path, table)  # on disk before it is in force or acknowledged
        self.table = table
        self.push()
        self._audit("quarantine", guest, entry)
        log.warning("quarantine: guest %s quarantined (%s) by %s: %s", guest, profile, by, entry["reason"])
        self._changed()
        return entry

    def release(self, guest: str, reason: str, by: str, user: str = "") -> dict[str, Any]:
        old = self.table.get(guest)
        if old is None:
            hint = "" if self.known_guest(guest) else f" (and no guest named {guest!r} is in the config)"
            raise QuarantineError(f"guest {guest} is not quarantined{hint}")
        table = {g: e for g, e in self.table.items() if g != guest}
        save_state(self.path, table)
        self.table = table
        self.push()
        entry = {"profile": old.get("profile"), "reason": reason[:MAX_REASON], "by": by,
                 "quarantined": {k: old.get(k) for k in ("since", "by", "reason")}}
        if user:
            entry["user"] = user
        self._audit("release", guest, entry)
        log.warning("quarantine: guest %s released by %s", guest, by)
        self._changed()
        return old

    def reloaded(self, rec: dict[str, Any]) -> None:
        """Observer: after a successful SIGHUP (its `kind: reload` record), take the new
        `quarantine:` and `detect:` sections (detectors whose settings changed start afresh)."""
        if rec.get("kind") != "reload" or (rec.get("request") or {}).get("event") != "reload":
            return
        if not all((rec.get("services") or {}).values()):
            return
        from proxyvm import detect
        from proxyvm.config import load_config

        try:
            cfg = load_config(self.sup.config_path)
        except Exception as e:  # noqa: BLE001 - it was valid a moment ago; keep what runs
            log.error("quarantine: could not re-read the config after reload: %s", e)
            return
        settings = cfg.quarantine or QuarantineSettings()
        if settings != self.settings:
            self.settings = settings
            self.push()
            log.info("quarantine: new settings in force (sinkhole %s %s)", settings.sinkhole_a, settings.sinkhole_aaaa)
        detect.reattach(self.sup, self, cfg)

    def _changed(self) -> None:
        self._update_gauge()
        for fn in self.on_change:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a listener must not undo a quarantine
                log.exception("quarantine change listener failed")

    def _audit(self, kind: str, guest: str, entry: dict[str, Any]) -> None:
        verb = "quarantined" if kind == "quarantine" else "released"
        self.sup.write_audit([{
            "kind": kind, "guest": guest, "src": None, "protocol": "proxyvm", "verdict": None, "rule": None,
            "at": str(self.path), "reason": f"guest {guest} {verb} by {entry['by']}: {entry['reason'] or 'no reason given'}",
            "request": {"event": kind}, "upstream": None,
            "profile": entry.get("profile"), "by": entry["by"],
            **({"user": entry["user"]} if "user" in entry else {}),
            **({"quarantined": entry["quarantined"]} if "quarantined" in entry else {}),
        }])
        self.sup.audit.flush()

    # -- control socket ---------------------------------------------------------------------
    async def start(self) -> None:
        path = self.sock_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                log.error("quarantine: %s exists and is not a socket; the control socket is off "
                          "(remove it and restart)", path)
                return
            if await _answers(path):
                log.error("quarantine: another proxyvm answers on %s (same state_dir?); the control socket "
                          "is off for this instance", path)
                return
            path.unlink()  # stale: left by a supervisor that died
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=str(path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        log.info("quarantine: control socket %s (root only)", path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = _peer_uid(sock)
            if uid not in (0, os.getuid()):
                await _reply(writer, {"ok": False, "exit": 1,
                                      "error": f"uid {uid} may not use the control socket (root only)"})
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except (ValueError, TimeoutError, asyncio.LimitOverrunError):
                await _reply(writer, {"ok": False, "exit": 2, "error": "bad request: one JSON object per line"})
                return
            await _reply(writer, self.handle(req, uid))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def handle(self, req: dict[str, Any], uid: int) -> dict[str, Any]:
        op = req.get("op")
        user = _user_name(uid)
        try:
            if op == "list":
                return {"ok": True, "guests": self.table}
            guest = req.get("guest")
            if not isinstance(guest, str) or not guest:
                return {"ok": False, "exit": 2, "error": "no guest named"}
            reason = str(req.get("reason") or "")
            if op == "quarantine":
                entry = self.quarantine(guest, str(req.get("profile") or "block"), reason, "cli", user)
                return {"ok": True, "guest": guest, "entry": entry}
            if op == "release":
                old = self.release(guest, reason, "cli", user)
                return {"ok": True, "guest": guest, "entry": old}
            return {"ok": False, "exit": 2, "error": f"unknown op {op!r}"}
        except QuarantineError as e:
            return {"ok": False, "exit": e.exit_code, "error": str(e)}
        except OSError as e:
            return {"ok": False, "exit": 1, "error": f"cannot write {self.path}: {e.strerror}"}


async def _reply(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write(json.dumps(msg, default=str).encode() + b"\n")
    await writer.drain()


async def _answers(path: Path) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


# -- client side (the CLI) --------------------------------------------------------------------
def control_request(state_dir: Path, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the running instance. Raises QuarantineError (exit 1) when the socket
    is missing, stale, not a socket, not owned by root (or us), open to others, or answered by a
    process that is not root (or us)."""
    path = Path(state_dir) / SOCKET_FILE
    me = os.getuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise QuarantineError(f"no control socket at {path}: is `proxyvm run` running with this config?") from None
    except PermissionError:
        raise QuarantineError(f"cannot reach {path}: permission denied (the control socket is root only)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise QuarantineError(f"{path} is not a socket: refusing to use it (remove it; `proxyvm run` makes its own)")
    if st.st_uid not in (0, me):
        raise QuarantineError(f"{path} is owned by {_user_name(st.st_uid)} (uid {st.st_uid}), not root: "
                              "refusing to use a control socket that is not ours")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise QuarantineError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0600: refusing to use a "
                              "control socket others can reach")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            raise QuarantineError(f"{path} is stale: no proxyvm is running with this state_dir "
                                  "(start `proxyvm run`; it replaces the stale socket)") from None
        except PermissionError:
            raise QuarantineError(f"cannot connect to {path}: permission denied (root only)") from None
        except OSError as e:
            raise QuarantineError(f"cannot connect to {path}: {e.strerror}") from None
        peer = _peer_uid(s)
        if peer not in (0, me):
            raise QuarantineError(f"{path} is served by uid {peer}, not root: refusing to talk to it")
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise QuarantineError(f"no answer on {path} within {timeout:g}s") from None
    finally:
        s.close()
    try:
        resp = json.loads(buf)
    except ValueError:
        raise QuarantineError(f"{path}: the running instance sent no valid answer") from None
    if not isinstance(resp, dict):
        raise QuarantineError(f"{path}: the running instance sent no valid answer")
    return resp


async def attach(sup: Any) -> Quarantine:
    """Wire quarantine and the detectors into a starting supervisor: load the table, start the
    control socket, register the detectors as audit observers."""
    settings = getattr(sup.config, "quarantine", None) or QuarantineSettings()
    q = Quarantine(sup, settings)
    await q.start()
    from proxyvm import detect

    detect.attach(sup, q)
    sup.observers.append(q.reloaded)
    return q
