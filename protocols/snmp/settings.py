"""The `snmp:` configuration section.

Owns: the typed, frozen settings of the SNMP service and `parse(node, base)`, which reads them from
a located YAML `Node` with FILE:LINE:COL errors (unknown keys, bad protocol names, unreadable or
short password files).
Must not: open sockets, derive keys, or put a password in any message or repr.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

from policy.source import Node, Secret
from protocols.addr import addr_text
from protocols.listen import IPOnly, parse_address, parse_listen
from protocols.snmp import usm

DEFAULT_AUTH = ("SHA-224", "SHA-256", "SHA-384", "SHA-512")
ALL_AUTH = (*DEFAULT_AUTH, "SHA", "MD5")
PRIV_NAMES = tuple(usm.PRIV_PROTOCOLS)
MIN_PASSWORD = 8
DEFAULT_TIMEOUT = 1.0  # seconds per attempt
DEFAULT_RETRIES = 2
_IP_ONLY = IPOnly("{what} {host!r} is not an IP address", "write an IP address; names are not resolved for SNMP")
DEFAULT_ENGINE_ID = bytes.fromhex("8000000001020304")  # RFC 3414 §11.2 / net-snmp refuse shorter pass phrases


@dataclass(frozen=True, slots=True)
class Credentials:
    """An SNMPv3 USM user (authPriv is the only security level the proxy speaks)."""

    user: str
    auth_protocol: str
    auth_password: Secret = field(repr=False)
    priv_protocol: str
    priv_password: Secret = field(repr=False)


@dataclass(frozen=True, slots=True)
class Agent:
    name: str  # the policy's `agent` value: the configured name, or "ip:port" in transparent mode
    address: tuple[str, int]
    credentials: Credentials
    community: str | None = None
    timeout: float = 1.0  # per attempt
    retries: int = 2


@dataclass(frozen=True, slots=True)
class TrapReceiver:
    address: tuple[str, int]
    credentials: Credentials
    inform: bool = False
    timeout: float = 1.0
    retries: int = 3

    @property
    def name(self) -> str:
        return addr_text(self.address)


@dataclass(frozen=True, slots=True)
class Limits:
    max_varbinds: int = 64  # per guest request; more -> tooBig
    max_response_size: int = 65000  # octets of a response to a guest; GETBULK is trimmed to fit
    max_request_size: int = 65507
    guest_inflight: int = 256  # outstanding requests per guest; more -> dropped and counted
    guest_rate: int = 20000  # requests per second per guest (token bucket, burst = rate); 0 = off
    trap_queue: int = 1000  # traps/informs waiting for receivers; more -> dropped and counted


@dataclass(frozen=True, slots=True)
class SNMPSettings:
    listen: tuple[tuple[str, int], ...] = ()
    traps_listen: tuple[tuple[str, int], ...] = ()
    communities: tuple[str, ...] = ()
    engine_id: bytes = DEFAULT_ENGINE_ID
    agents: dict[str, Agent] = field(default_factory=dict)
    default_agent_credentials: Credentials | None = None
    default_timeout: float = 1.0  # DEFAULT_TIMEOUT
    default_retries: int = 2  # DEFAULT_RETRIES
    trap_receivers: tuple[TrapReceiver, ...] = ()
    max_repetitions: int = 50
    limits: Limits = field(default_factory=Limits)

    def agent_by_community(self, community: str) -> Agent | None:
        for a in self.agents.values():
            if a.community is not None and a.community == community:
                return a
        return None

    def agent_by_address(self, host: str, port: int) -> Agent | None:
        for a in self.agents.values():
            if a.address == (host, port):
                return a
        return None


_CRED_KEYS = {"user", "auth", "priv"}


def _ip_hostport(node: Node, default_port: int, what: str) -> tuple[str, int]:
    """An outside address must be an IP literal: a name would be resolved by the host's plain
    resolver, in cleartext, and block the event loop."""
    return parse_address(node, default_port, what=what, ip=_IP_ONLY)


def _protocol_block(node: Node, kind: str) -> tuple[str, Secret]:
    m = node.get_map(allowed={"protocol", "password_file"}, required={"protocol", "password_file"}, what=kind)
    if kind == "auth":
        name = m["protocol"].enum(ALL_AUTH, what="auth protocol")
    else:
        name = m["protocol"].enum(PRIV_NAMES, what="priv protocol")
    secret = m["password_file"].secret_file(what=f"{kind} password")
    if len(secret.reveal()) < MIN_PASSWORD:
        raise m["password_file"].fail(
            f"{kind} password in {secret.source} is shorter than {MIN_PASSWORD} characters",
            "SNMPv3 pass phrases must have at least 8 characters",
        )
    return name, secret


def _credentials(m: dict[str, Node], what: str) -> Credentials:
    user = m["user"].str(what="user")
    auth_name, auth_pw = _protocol_block(m["auth"], "auth")
    priv_name, priv_pw = _protocol_block(m["priv"], "priv")
    return Credentials(user, auth_name, auth_pw, priv_name, priv_pw)


def _addresses(node: Node, default_port: int) -> tuple[tuple[str, int], ...]:
    return parse_listen(node, default_port, items="addresses", ip=_IP_ONLY)


def parse(node: Node, base: pathlib.Path | None = None) -> SNMPSettings:
    top = node.get_map(
        allowed={
            "listen", "traps_listen", "communities", "engine_id", "agents", "default_agent_credentials",
            "trap_receivers", "max_repetitions", "limits", "timeout", "retries",
        },
        what="snmp",
    )
    listen = _addresses(top["listen"], 161) if "listen" in top else ()
    traps_listen = _addresses(top["traps_listen"], 162) if "traps_listen" in top else ()
    communities = tuple(n.str(what="community") for n in top["communities"].get_list("communities")) if (
        "communities" in top) else ()
    engine_id = DEFAULT_ENGINE_ID
    if "engine_id" in top:
        text = top["engine_id"].str(what="engine_id")
        hexpart = text[2:] if text.lower().startswith("0x") else text
        try:
            engine_id = bytes.fromhex(hexpart)
        except ValueError:
            raise top["engine_id"].fail(f"engine_id {text!r} is not hexadecimal", "write it as 0x80000000...") from None
        if not 5 <= len(engine_id) <= 32:
            raise top["engine_id"].fail("engine_id must be 5 to 32 octets (RFC 3411)")
    timeout = top["timeout"].duration("timeout") if "timeout" in top else DEFAULT_TIMEOUT
    retries = top["retries"].int(min=0, max=10, what="retries") if "retries" in top else DEFAULT_RETRIES

    agents: dict[str, Agent] = {}
    seen_comm: dict[str, Node] = {}
    if "agents" in top:
        for name, an in top["agents"].get_map(what="agents").items():
            m = an.get_map(
                allowed={"address", "community", "timeout", "retries", *_CRED_KEYS},
                required={"address", *_CRED_KEYS},
                what=f"agent {name}",
            )
            community = m["community"].str(what="community") if "community" in m else None
            if community is not None:
                if community in seen_comm:
                    raise m["community"].fail(f"community of agent {name} is already used by another agent")
                seen_comm[community] = m["community"]
            agents[name] = Agent(
                name=name,
                address=_ip_hostport(m["address"], 161, "agent address"),
                credentials=_credentials(m, f"agent {name}"),
                community=community,
                timeout=m["timeout"].duration("timeout") if "timeout" in m else timeout,
                retries=m["retries"].int(min=0, max=10, what="retries") if "retries" in m else retries,
            )
    default_creds = None
    if "default_agent_credentials" in top:
        m = top["default_agent_credentials"].get_map(
            allowed=_CRED_KEYS, required=_CRED_KEYS, what="default_agent_credentials"
        )
        default_creds = _credentials(m, "default_agent_credentials")

    receivers = []
    if "trap_receivers" in top:
        for rn in top["trap_receivers"].get_list("trap receivers"):
            m = rn.get_map(
                allowed={"address", "inform", "timeout", "retries", *_CRED_KEYS},
                required={"address", *_CRED_KEYS},
                what="trap receiver",
            )
            receivers.append(
                TrapReceiver(
                    address=_ip_hostport(m["address"], 162, "trap receiver address"),
                    credentials=_credentials(m, "trap receiver"),
                    inform=m["inform"].bool("inform") if "inform" in m else False,
                    timeout=m["timeout"].duration("timeout") if "timeout" in m else timeout,
                    retries=m["retries"].int(min=0, max=10, what="retries") if "retries" in m else 3,
                )
            )
    max_rep = top["max_repetitions"].int(min=1, max=1000, what="max_repetitions") if "max_repetitions" in top else 50
    limits = Limits()
    if "limits" in top:
        lm = top["limits"].get_map(
            allowed={"max_varbinds", "max_response_size", "max_request_size", "guest_inflight", "guest_rate",
                     "trap_queue"},
            what="snmp limits",
        )
        kw: dict[str, int] = {}
        if "max_varbinds" in lm:
            kw["max_varbinds"] = lm["max_varbinds"].int(min=1, max=2048, what="max_varbinds")
        if "max_response_size" in lm:
            kw["max_response_size"] = lm["max_response_size"].size("max_response_size")
            if not 484 <= kw["max_response_size"] <= 65507:
                raise lm["max_response_size"].fail("max_response_size must be 484 to 65507 octets")
        if "max_request_size" in lm:
            kw["max_request_size"] = lm["max_request_size"].size("max_request_size")
            if not 484 <= kw["max_request_size"] <= 65507:
                raise lm["max_request_size"].fail("max_request_size must be 484 to 65507 octets")
        if "guest_inflight" in lm:
            kw["guest_inflight"] = lm["guest_inflight"].int(min=1, max=100000, what="guest_inflight")
        if "guest_rate" in lm:
            kw["guest_rate"] = lm["guest_rate"].int(min=0, max=10_000_000, what="guest_rate")
        if "trap_queue" in lm:
            kw["trap_queue"] = lm["trap_queue"].int(min=1, max=1_000_000, what="trap_queue")
        limits = Limits(**kw)
    return SNMPSettings(
        listen=listen,
        traps_listen=traps_listen,
        communities=communities,
        engine_id=engine_id,
        agents=agents,
        default_agent_credentials=default_creds,
        default_timeout=timeout,
        default_retries=retries,
        trap_receivers=tuple(receivers),
        max_repetitions=max_rep,
        limits=limits,
    )
