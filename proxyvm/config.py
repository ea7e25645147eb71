"""The appliance configuration: one YAML file -> one frozen, typed `Config`.

Owns: the top-level schema of docs/configuration.md (`guests`, `policy`, `audit`,
`admin`, `gateway`, the protocol sections, plus `user`, `state_dir`, `detect`, `quarantine` and
`forensics`, whose parsers live in proxyvm.detect, proxyvm.quarantine and protocols.capture), the built-in default
config (the protocol sections and which module parses each are `proxyvm.services.REGISTRY`), and `load_all`,
which loads config and policy together so every problem of both is reported in one go.
Must not: parse a protocol's own section (each `protocols/<name>/settings.py` owns its schema),
load the policy rules itself in `load_config` (see `load_all`), open sockets, create directories
or files, or let a secret's content reach a repr, a message or a log line.

Errors: every problem is located (`FILE:LINE:COL: message` + hint) and all problems found in one
file are raised together as one `proxyvm.errors.ConfigError`.

Defaults that depend on who runs the process (decided here, documented in the README):
- audit path: `/var/log/proxyvm/audit.jsonl` as root; otherwise
  `$XDG_STATE_HOME/proxyvm/audit.jsonl` (`~/.local/state/proxyvm/audit.jsonl`).
- state_dir: `/var/lib/proxyvm` as root; otherwise `$XDG_STATE_HOME/proxyvm`.
- user: `proxyvm` when that account exists on this machine, else None (no privilege drop).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from policy.source import Node, Problem, Problems, SourceError, load_yaml, suggest
from protocols.listen import IPOnly, parse_address
from proxyvm import services
from proxyvm.defaults import DEFAULT_CONFIG, DEFAULT_POLICY
from proxyvm.errors import ConfigError
from proxyvm.inventory import GUEST_NAME, UNKNOWN, Guest, normalise_address, normalise_mac

if TYPE_CHECKING:
    from policy import Engine

__all__ = [
    "AdminSettings",
    "AuditSettings",
    "Config",
    "GatewaySettings",
    "Guest",
    "default_audit_path",
    "default_state_dir",
    "default_user",
    "load_all",
    "load_config",
]

TOP_LEVEL_KEYS = frozenset(
    {"guests", "policy", "audit", "admin", "gateway", "user", "state_dir", "detect", "quarantine", "fleet", "forensics",
     *services.REGISTRY}
)

DEFAULT_ROTATE_SIZE = 100 * 1000**2  # 100MB, as the size parser reads "100MB"
DEFAULT_KEEP = 10
DEFAULT_FWMARK = 0x7076  # "pv": marks guest UDP for TPROXY policy routing
DEFAULT_ROUTE_TABLE = 7076
DEFAULT_NFT_TABLE = "proxyvm"

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # Linux IFNAMSIZ is 16 including the NUL
_USERNAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)


# -- values ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: Path
    rotate_size: int = DEFAULT_ROTATE_SIZE  # bytes; the writer starts a new file past this
    keep: int = DEFAULT_KEEP  # rotated files kept besides the current one


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: tuple[str, int] | None = None  # None: no admin endpoint
    console: bool = False  # the operator console on the admin listener (proxyvm.console)
    # The console's token: only the path travels (config is packed to workers); the supervisor
    # reads the file when the admin listener starts. Checked here: readable, 0600, long enough.
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Transparent gateway mode (`proxyvm gateway-rules` / `gateway up|down`)."""

    inside: str  # bridge-facing interface (guests)
    outside: str  # interface toward the outside world
    mark: int = DEFAULT_FWMARK  # fwmark on TPROXY'd packets; `ip rule fwmark MARK lookup TABLE`
    table: int = DEFAULT_ROUTE_TABLE  # routing table holding `local 0.0.0.0/0 dev lo`
    nft_table: str = DEFAULT_NFT_TABLE  # name of the nftables table the ruleset lives in


@dataclass(frozen=True, slots=True)
class Config:
    source: str  # the file it was read from
    guests: Mapping[str, Guest]
    policy_path: Path | None  # None: the built-in allow-all policy (see `policy_file`)
    audit: AuditSettings
    admin: AdminSettings
    gateway: GatewaySettings | None
    user: str | None  # account to run as after binding (when started as root)
    state_dir: Path
    dns: Any = None  # protocols.dns.settings.DNSSettings, or None when off
    smtp: Any = None
    snmp: Any = None
    http: Any = None
    unavailable: tuple[str, ...] = ()  # built-in default only: sections this build cannot run yet
    builtin: bool = False  # True when this is the built-in default (no -c)
    detect: Any = None  # proxyvm.detect.DetectSettings (None: no `detect:` section, every detector off)
    quarantine: Any = None  # proxyvm.quarantine.QuarantineSettings (None: the defaults)
    fleet: Any = None  # proxyvm.fleet.FleetSettings (None: not in a fleet)
    # `workers: N` of each protocol section that sets it (absent: 1): processes the supervisor
    # runs for that service, each with its own SO_REUSEPORT listeners (proxyvm.supervisor).
    workers: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    forensics: Any = None  # protocols.capture.CaptureSettings (None: no section, capture on with defaults)

    @property
    def capture_dir(self) -> Path | None:
        """Where forensic capture writes (None: `forensics: false`)."""
        from protocols.capture import CaptureSettings

        s = self.forensics if self.forensics is not None else CaptureSettings()
        return s.directory(self.state_dir) if s.enabled else None

    @property
    def policy_file(self) -> Path:
        """The rules file to load: `policy:` or the built-in allow-all policy."""
        return self.policy_path if self.policy_path is not None else DEFAULT_POLICY

    @property
    def guest_names(self) -> frozenset[str]:
        return frozenset(self.guests)

    def workers_of(self, name: str) -> int:
        """Worker processes for service `name` (1 unless its section says `workers: N`)."""
        return int(self.workers.get(name, 1))

    def services(self) -> dict[str, Any]:
        """Enabled protocol sections in registry order: {"dns": DNSSettings, ...}."""
        out: dict[str, Any] = {}
        for name in services.REGISTRY:
            settings = getattr(self, name)
            if settings is not None:
                out[name] = settings
        return out


# -- defaults that depend on the running user ---------------------------------------------------
def _is_root() -> bool:
    return os.geteuid() == 0


def _root(as_root: bool | None) -> bool:
    return _is_root() if as_root is None else as_root


def _user_state_home() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "proxyvm"


def default_state_dir(as_root: bool | None = None) -> Path:
    return Path("/var/lib/proxyvm") if _root(as_root) else _user_state_home()


def default_audit_path(as_root: bool | None = None) -> Path:
    return Path("/var/log/proxyvm/audit.jsonl") if _root(as_root) else _user_state_home() / "audit.jsonl"


def default_user() -> str | None:
    try:
        pwd.getpwnam("proxyvm")
    except KeyError:
        return None
    return "proxyvm"


# -- helpers ------------------------------------------------------------------------------------


def _key_node(parent: Node, key: str, value: Node) -> Node:
    """A Node placed at `key:` itself (errors about a whole section point at its name)."""
    lc = getattr(parent.value, "lc", None)
    try:
        line, col = lc.key(key)  # type: ignore[union-attr]
    except (AttributeError, KeyError, TypeError):
        return value
    return Node(key, parent.file, line + 1, col + 1, parent.base)


_BINDABLE = IPOnly(
    "bad {what} {value!r}: {host!r} is not an IP address",
    "write an address of this machine with a port, e.g. 127.0.0.1:9700 or [::1]:9700",
    accepts=lambda host: normalise_address(host) is not None and "%" not in host,
)


def listen_address(node: Node, what: str = "listen address") -> tuple[str, int]:
    """"127.0.0.1:9700" / "[::1]:9700" -> (host, port); the host must be an IP literal (we bind
    it, so a name would depend on a resolver the appliance may not have)."""
    return parse_address(node, what=what, ip=_BINDABLE)


def _interface(node: Node, what: str) -> str:
    name = node.str(what)
    if not _IFNAME.match(name) or name in (".", ".."):
        raise node.fail(
            f"bad interface name {name!r} for {what}",
            "Linux interface names are 1-15 letters, digits, '_', '.' or '-' (see `ip link`)",
        )
    return name


# -- sections -----------------------------------------------------------------------------------
def _parse_guests(node: Node, problems: Problems) -> dict[str, Guest]:
    entries = node.get_map(what="guests")
    guests: dict[str, Guest] = {}
    owner_of_address: dict[str, tuple[str, Node]] = {}
    owner_of_mac: dict[str, tuple[str, Node]] = {}
    for name, gnode in entries.items():
        knode = _key_node(node, name, gnode)
        if name == UNKNOWN:
            problems.add(
                knode.problem(
                    "the guest name 'unknown' is reserved",
                    "it names every source that is not listed; pick another name",
                )
            )
            continue
        if not GUEST_NAME.match(name):
            problems.add(
                knode.problem(
                    f"bad guest name {name!r}",
                    "use letters, digits, '_', '.' and '-', starting with a letter or digit (max 63)",
                )
            )
            continue
        parsed = problems.attempt(lambda n=name, g=gnode: _parse_guest(n, g), None)
        if parsed is None:
            continue
        guest, anodes, mnode = parsed
        # Duplicates across guests: reported at the later one, naming where the first is.
        for addr, anode in zip(guest.addresses, anodes, strict=True):
            prev = owner_of_address.get(addr)
            if prev is not None:
                problems.add(
                    anode.problem(
                        f"address {addr} is already guest '{prev[0]}' ({prev[1].file}:{prev[1].line})"
                        if prev[0] != name
                        else f"address {addr} is listed twice for guest '{name}'",
                        "each source address identifies exactly one guest",
                    )
                )
                continue
            owner_of_address[addr] = (name, anode)
        if guest.mac is not None and mnode is not None:
            prev = owner_of_mac.get(guest.mac)
            if prev is not None:
                problems.add(
                    mnode.problem(
                        f"MAC {guest.mac} is already guest '{prev[0]}' ({prev[1].file}:{prev[1].line})",
                        "each MAC address identifies exactly one guest",
                    )
                )
            else:
                owner_of_mac[guest.mac] = (name, mnode)
        guests[name] = guest
    return guests


def _parse_guest(name: str, node: Node) -> tuple[Guest, list[Node], Node | None]:
    """The guest, plus the nodes of its addresses and MAC (for duplicate reports)."""
    fields = node.get_map(allowed={"addresses", "mac"}, required={"addresses"}, what=f"guest '{name}'")
    anodes = fields["addresses"].get_list("IP addresses", allow_scalar=True)
    if not anodes:
        raise fields["addresses"].fail(f"guest '{name}' has no addresses", "list at least one IP address")
    addresses: list[str] = []
    good_nodes: list[Node] = []
    problems: list[Problem] = []
    for anode in anodes:
        text = anode.str("IP address").strip()
        addr = normalise_address(text) if "%" not in text else None
        if addr is None:
            hint = "write one address per entry, e.g. 198.18.0.10 or \"fd00::11\""
            if "/" in text:
                hint = "guests are single addresses, not networks: list each address"
            elif "%" in text:
                hint = f"write it without the zone: {text.split('%', 1)[0]}"
            problems.append(anode.problem(f"bad IP address {text!r} for guest '{name}'", hint))
            continue
        ip_problem = _unusable_source(addr)
        if ip_problem:
            problems.append(anode.problem(f"address {addr} of guest '{name}' {ip_problem}"))
            continue
        addresses.append(addr)
        good_nodes.append(anode)
    mac: str | None = None
    mnode: Node | None = None
    if "mac" in fields:
        mnode = fields["mac"]
        text = mnode.str("MAC address")
        mac = normalise_mac(text)
        if mac is None:
            problems.append(
                mnode.problem(f"bad MAC address {text!r} for guest '{name}'", 'write six hex octets: "52:54:00:00:00:11"')
            )
    if problems:
        raise SourceError(problems)
    return Guest(name, tuple(addresses), mac), good_nodes, mnode


def _unusable_source(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    if ip.is_unspecified:
        return "is the unspecified address; no packet comes from it"
    if ip.is_multicast:
        return "is a multicast address; no packet comes from it"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "is the broadcast address; no packet comes from it"
    return ""


def _parse_audit(node: Node, as_root: bool) -> AuditSettings:
    fields = node.get_map(allowed={"path", "rotate_size", "keep"}, what="audit")
    path = default_audit_path(as_root)
    if "path" in fields:
        pnode = fields["path"]
        path = pnode.path("audit path")
        if path.is_dir() or str(pnode.value).endswith("/"):
            raise pnode.fail(f"audit path {path} is a directory", "name the log file, e.g. /var/log/proxyvm/audit.jsonl")
    rotate_size = DEFAULT_ROTATE_SIZE
    if "rotate_size" in fields:
        rnode = fields["rotate_size"]
        rotate_size = rnode.size("audit rotate_size")
        if rotate_size < 1000:
            raise rnode.fail(
                f"audit rotate_size must be at least 1KB, found {rnode.value!r}",
                "one record is a few hundred bytes; use e.g. 100MB",
            )
    keep = fields["keep"].int(min=1, max=100_000, what="audit keep") if "keep" in fields else DEFAULT_KEEP
    return AuditSettings(path, rotate_size, keep)


TOKEN_MIN_LENGTH = 16


def _parse_admin(node: Node) -> AdminSettings:
    fields = node.get_map(allowed={"listen", "console", "token_file"}, required={"listen"}, what="admin")
    listen = listen_address(fields["listen"], "admin listen address")
    console = fields["console"].bool("admin console") if "console" in fields else False
    token_file = None
    if "token_file" in fields:
        tnode = fields["token_file"]
        token = tnode.secret_file("admin token").reveal()  # checked, not kept
        token_file = tnode.path("admin token_file")
        if len(token) < TOKEN_MIN_LENGTH:
            raise tnode.fail(f"admin token file {token_file} holds {len(token)} characters; at least "
                             f"{TOKEN_MIN_LENGTH} are needed", "make one with: openssl rand -hex 32 > FILE")
        mode = os.stat(token_file).st_mode & 0o777
        if mode & 0o077:
            raise tnode.fail(f"admin token file {token_file} has mode {mode:04o}: others can read the token",
                             f"chmod 600 {token_file}")
    if console and token_file is None:
        raise fields["console"].fail("admin console: true needs admin.token_file (the console's login token)",
                                     "make one with: openssl rand -hex 32 > FILE; chmod 600 FILE")
    if token_file is None and not ipaddress.ip_address(listen[0]).is_loopback:
        raise fields["listen"].fail(
            f"admin listen address {fields['listen'].value!r} is not a loopback address and admin.token_file "
            "is not set: anyone who reaches it could use the admin endpoint",
            "bind it to 127.0.0.1 / [::1], or set admin.token_file",
        )
    return AdminSettings(listen, console, token_file)


def _parse_gateway(node: Node) -> GatewaySettings:
    fields = node.get_map(
        allowed={"inside", "outside", "mark", "table", "nft_table"}, required={"inside", "outside"}, what="gateway"
    )
    inside = _interface(fields["inside"], "gateway inside")
    outside = _interface(fields["outside"], "gateway outside")
    if inside == outside:
        raise fields["outside"].fail(
            f"gateway inside and outside are the same interface {inside!r}",
            "inside faces the guests' bridge, outside faces the world",
        )
    mark = fields["mark"].int(min=1, max=0xFFFFFFFF, what="gateway mark") if "mark" in fields else DEFAULT_FWMARK
    table = DEFAULT_ROUTE_TABLE
    if "table" in fields:
        tnode = fields["table"]
        table = tnode.int(min=1, max=0xFFFFFFFF, what="gateway table")
        if table in (253, 254, 255):
            raise tnode.fail(
                f"routing table {table} is reserved (default/main/local)", "pick another, e.g. 7076"
            )
    nft_table = DEFAULT_NFT_TABLE
    if "nft_table" in fields:
        nnode = fields["nft_table"]
        nft_table = nnode.str("gateway nft_table")
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]{0,31}$", nft_table):
            raise nnode.fail(f"bad nftables table name {nft_table!r}", "letters, digits and '_', e.g. proxyvm")
    return GatewaySettings(inside, outside, mark, table, nft_table)


def _parse_user(node: Node) -> str:
    name = node.str("user")
    if not _USERNAME.match(name):
        raise node.fail(f"bad user name {name!r}")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise node.fail(
            f"user {name!r} does not exist on this machine",
            f"create it (adduser --system --no-create-home {name}) or name an existing account",
        ) from None
    return name


def _parse_state_dir(node: Node) -> Path:
    path = node.path("state_dir")
    if path.exists() and not path.is_dir():
        raise node.fail(f"state_dir {path} exists and is not a directory")
    return path


def _parse_policy_path(node: Node, shown_base: Path) -> tuple[Path, Path]:
    """(absolute path, the path as the user sees it from here): the second one names the file in
    messages, so `proxyvm check -c etc/proxyvm.yaml` says `etc/rules.yaml:7:3: ...`."""
    path = node.path("policy file")
    written = Path(node.str("policy file"))
    shown = written if written.is_absolute() else shown_base / written
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise node.fail(
            f"policy file {shown} {what}",
            "paths are relative to the config file; omit `policy:` for the built-in allow-all policy",
        )
    return path, shown


MAX_WORKERS = 64


def _take_workers(name: str, node: Node, workers: dict[str, int]) -> None:
    """`workers: N` (1..MAX_WORKERS) is the supervisor's, the same for every protocol section: read
    it here and hide it from the section's own parser (except http's, which still reads it)."""
    if not isinstance(node.value, dict) or "workers" not in node.value:
        return
    entry = node.get_map()["workers"]
    if name != "http":
        del node.value["workers"]  # in place: the other keys keep their line:col
    workers[name] = entry.int(min=1, max=MAX_WORKERS, what="workers")


def _parse_section(name: str, key: Node, node: Node, base: Path) -> Any:
    """Settings for one protocol section; `false` turns it off (None)."""
    if node.value is False:
        return None
    try:
        parse = services.load_settings_parser(name)
    except services.ServiceUnavailable:
        raise key.fail(
            f"the {name} service is not available in this build yet",
            f"remove the '{name}' section (or set '{name}: false') until a build includes it",
        ) from None
    return parse(node, base)


# -- entry points -------------------------------------------------------------------------------
@dataclass(slots=True)
class _Partial:
    """What a load learned, even when it failed: enough to load the policy and report its
    problems too."""

    config: Config | None = None
    problems: list[Problem] = field(default_factory=list)
    policy_file: Path | None = None  # as shown in messages (relative when the config path was)
    guest_names: set[str] = field(default_factory=set)


def _load(path: str | os.PathLike[str] | None, as_root: bool | None) -> _Partial:
    builtin = path is None
    src = DEFAULT_CONFIG if builtin else Path(path)  # type: ignore[arg-type]
    privileged = _root(as_root)
    out = _Partial()
    problems = Problems()
    try:
        root = load_yaml(src, "config file")
        # Messages keep the file name as the user wrote it; paths inside it become absolute so a
        # service that changes directory (or drops privileges) still finds its files.
        root.base = Path(os.path.abspath(root.base))
        everything = root.get_map(what="the config file")
    except SourceError as e:
        out.problems = list(e.problems)
        return out
    base = root.base
    # Unknown top-level keys are fatal, but the known ones are still checked so one run shows
    # every problem.
    top: dict[str, Node] = {}
    unknown_keys = False
    for key, value in everything.items():
        if key in TOP_LEVEL_KEYS:
            top[key] = value
            continue
        unknown_keys = True
        problems.add(
            _key_node(root, key, value).problem(
                f"unknown key '{key}' in the config file",
                suggest(key, TOP_LEVEL_KEYS) or "allowed keys: " + ", ".join(sorted(TOP_LEVEL_KEYS)),
            )
        )

    guests: dict[str, Guest] = {}
    if "guests" in top:
        gnode = top["guests"]
        if gnode.is_map():
            out.guest_names = {k for k in gnode.value if isinstance(k, str) and k != UNKNOWN}
        guests = problems.attempt(lambda: _parse_guests(gnode, problems), {})

    policy_path: Path | None = None
    # A misspelt `policy:` must not get the allow-all default checked in its place.
    out.policy_file = None if unknown_keys else DEFAULT_POLICY
    if "policy" in top:
        paths = problems.attempt(lambda: _parse_policy_path(top["policy"], src.parent), None)
        policy_path, out.policy_file = paths if paths is not None else (None, None)

    audit = problems.attempt(lambda: _parse_audit(top["audit"], privileged), None) if "audit" in top else None
    if audit is None:
        audit = AuditSettings(default_audit_path(privileged))
    admin = problems.attempt(lambda: _parse_admin(top["admin"]), None) if "admin" in top else None
    admin = admin or AdminSettings()
    gateway = problems.attempt(lambda: _parse_gateway(top["gateway"]), None) if "gateway" in top else None
    user = problems.attempt(lambda: _parse_user(top["user"]), None) if "user" in top else default_user()
    state_dir = (
        problems.attempt(lambda: _parse_state_dir(top["state_dir"]), None) if "state_dir" in top else None
    ) or default_state_dir(privileged)

    response: dict[str, Any] = {}
    if "detect" in top:
        from proxyvm.detect import parse_detect

        response["detect"] = problems.attempt(lambda: parse_detect(top["detect"]), None)
    if "quarantine" in top:
        from proxyvm.quarantine import parse_quarantine

        response["quarantine"] = problems.attempt(lambda: parse_quarantine(top["quarantine"]), None)
    if "forensics" in top:
        from protocols.capture import parse as parse_forensics

        response["forensics"] = problems.attempt(lambda: parse_forensics(top["forensics"], base), None)
    if "fleet" in top:
        from proxyvm.fleet import parse_fleet

        response["fleet"] = problems.attempt(lambda: parse_fleet(top["fleet"]), None)

    sections: dict[str, Any] = {}
    workers: dict[str, int] = {}
    unavailable: list[str] = []
    for name in services.REGISTRY:
        if name not in top:
            continue
        node = top[name]
        if builtin and node.value is not False:
            try:
                services.load_settings_parser(name)
            except services.ServiceUnavailable:
                unavailable.append(name)
                continue
        key = _key_node(root, name, node)
        problems.attempt(lambda n=name, v=node: _take_workers(n, v, workers), None)
        sections[name] = problems.attempt(lambda n=name, k=key, v=node: _parse_section(n, k, v, base), None)

    # Report in file order, whichever part found them (sorted() is stable for equal places).
    out.problems = sorted(problems.items, key=lambda p: (p.file != root.file, p.file, p.line, p.col))
    if out.problems:
        return out
    out.config = Config(
        source=os.path.abspath(src),
        guests=MappingProxyType(guests),
        policy_path=policy_path,
        audit=audit,
        admin=admin,
        gateway=gateway,
        user=user,
        state_dir=state_dir,
        unavailable=tuple(unavailable),
        builtin=builtin,
        workers=MappingProxyType({k: v for k, v in workers.items() if sections.get(k) is not None}),
        **response,
        **sections,
    )
    return out


def load_config(path: str | os.PathLike[str] | None, *, as_root: bool | None = None) -> Config:
    """Read and validate a config file (None: the built-in default). Does not load the policy:
    use `load_all` for that. Raises `ConfigError` carrying every problem found.

    `as_root` picks the defaults that depend on privilege (audit path, state_dir); None means
    "this process runs as root now". A worker that re-reads the config after dropping
    privileges passes True so its defaults match the supervisor's."""
    partial = _load(path, as_root)
    if partial.config is None:
        raise ConfigError(partial.problems)
    return partial.config


def load_all(
    path: str | os.PathLike[str] | None,
    *,
    clock: Callable[[], float] | None = None,
    as_root: bool | None = None,
    policy_path: str | os.PathLike[str] | None = None,
) -> tuple[Config, Engine]:
    """Config and policy together (what `check`, `run` and SIGHUP reload need). Raises one
    `ConfigError` with every problem: the config's first, then the policy's. The policy is
    loaded even when the config has problems (when its path is known), so one `proxyvm check`
    shows everything. `clock` goes to the engine's rate limiter (default: its own). `policy_path`
    replaces the config's `policy:` (a fleet policy bundle in force, proxyvm.fleet)."""
    from policy import load_policy

    partial = _load(path, as_root)
    if policy_path is not None:
        partial.policy_file = Path(policy_path)
        if partial.config is not None:
            partial.config = dataclasses.replace(partial.config, policy_path=Path(policy_path))
    problems = list(partial.problems)
    engine = None
    if partial.policy_file is not None:
        kwargs: dict[str, Any] = {"guests": frozenset(partial.guest_names)}
        if clock is not None:
            kwargs["clock"] = clock
        try:
            engine = load_policy(partial.policy_file, **kwargs)
        except SourceError as e:
            problems.extend(e.problems)
    if problems or partial.config is None or engine is None:
        raise ConfigError(problems)
    return partial.config, engine
