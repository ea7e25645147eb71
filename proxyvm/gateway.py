"""Transparent gateway mode: the nftables ruleset and policy routing that make the proxy the
guests' only way out (`proxyvm gateway-rules`, `proxyvm gateway up|down`).

Owns: rendering one nftables table of our own (replaced atomically), the `ip rule`/`ip route` lines
TPROXY needs, and applying/removing both idempotently.
Must not: open sockets to guests (the services do; see `protocols.transparent`).

What the ruleset does, for packets arriving on `gateway.inside`:
- TCP 53/25/80/443 → REDIRECT to the DNS/SMTP/HTTP/passthrough listeners (the services read the
  original destination with SO_ORIGINAL_DST);
- UDP 53/161/162 → TPROXY to the DNS/SNMP/trap listeners, marked for the local routing table
  (the services read IP_RECVORIGDSTADDR and reply from the original address);
- optional anti-spoofing: a guest with `mac:` may only use its addresses from that MAC;
- everything else from guests is dropped and counted: nothing is forwarded (no routing around
  the proxy) and nothing else on the proxy itself is reachable.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Steering:
    proto: str  # "tcp" | "udp"
    guest_port: int  # what guests send to (53, 25, ...)
    to: Address  # our listener
    service: str


def _first_v4(addrs: Any) -> Address | None:
    for host, port in addrs or ():
        if ipaddress.ip_address(host).version == 4:
            return (host, port)
    return None


def steering(config: Any) -> list[Steering]:
    """Which guest ports go to which listener, from the enabled services' settings."""
    out: list[Steering] = []
    dns, smtp, snmp, http = config.dns, config.smtp, config.snmp, config.http
    if dns is not None and (a := _first_v4(dns.listen)):
        out += [Steering("tcp", 53, a, "dns"), Steering("udp", 53, a, "dns")]
    if smtp is not None and (a := _first_v4(smtp.listen)):
        out.append(Steering("tcp", 25, a, "smtp"))
    if http is not None:
        if a := _first_v4(http.listen):
            out.append(Steering("tcp", 80, a, "http"))
        if a := _first_v4(getattr(http, "passthrough_listen", ())):
            out.append(Steering("tcp", 443, a, "tls"))
    if snmp is not None:
        if a := _first_v4(snmp.listen):
            out.append(Steering("udp", 161, a, "snmp"))
        if a := _first_v4(getattr(snmp, "traps_listen", ())):
            out.append(Steering("udp", 162, a, "snmp-traps"))
    return out


def _listener_ports(config: Any) -> tuple[set[int], set[int]]:
    """Ports of every listener (explicit use by guests: resolver/relay/proxy pointed at us)."""
    tcp: set[int] = set()
    udp: set[int] = set()
    if config.dns is not None:
        for _, p in config.dns.listen:
            tcp.add(p)
            udp.add(p)
    if config.smtp is not None:
        tcp.update(p for _, p in config.smtp.listen)
    if config.http is not None:
        for attr in ("listen", "proxy_listen", "passthrough_listen"):
            tcp.update(p for _, p in getattr(config.http, attr, ()) or ())
    if config.snmp is not None:
        for attr in ("listen", "traps_listen"):
            udp.update(p for _, p in getattr(config.snmp, attr, ()) or ())
    return tcp, udp


def _set(items: set[int]) -> str:
    return "{ " + ", ".join(str(i) for i in sorted(items)) + " }"


def render_nft(config: Any) -> str:
    gw = config.gateway
    if gw is None:
        raise ValueError("no gateway section in the config")
    inside, mark, table = gw.inside, gw.mark, gw.nft_table
    steer = steering(config)
    tcp_ports, udp_ports = _listener_ports(config)
    lines = [
        f"# proxyvm transparent gateway ({config.source})",
        f"# guests on {inside}; outside on {gw.outside}; replaced atomically",
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tcounter guest_dropped {",
        '\t\tcomment "guest packets with no business here"',
        "\t}",
        "\tcounter guest_spoofed {",
        '\t\tcomment "guest packets from an address with the wrong MAC"',
        "\t}",
        "",
        "\tchain steer_mangle {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
    ]
    for g in sorted(config.guests.values(), key=lambda g: g.name):
        if not g.mac:
            continue
        for addr in g.addresses:
            fam = "ip" if ipaddress.ip_address(addr).version == 4 else "ip6"
            lines.append(
                f'\t\tiifname "{inside}" {fam} saddr {addr} ether saddr != {g.mac} counter name guest_spoofed drop'
            )
    for s in steer:
        if s.proto == "udp":
            lines.append(
                f'\t\tiifname "{inside}" ip protocol udp udp dport {s.guest_port} '
                f"tproxy ip to {s.to[0]}:{s.to[1]} meta mark set {mark:#x} accept"
            )
    tcp_steered = {s.guest_port for s in steer if s.proto == "tcp"}
    if tcp_steered:
        lines.append(f'\t\tiifname "{inside}" ip protocol tcp tcp dport {_set(tcp_steered)} accept')
    # Whatever is not for the proxy itself would be routed: drop and count it here, whether or not
    # ip_forward is on (with it off the kernel would drop it silently, uncounted).
    lines.append(
        f'\t\tiifname "{inside}" fib daddr type != {{ local, broadcast, multicast }} counter name guest_dropped drop'
    )
    lines += [
        "\t}",
        "",
        "\tchain steer_nat {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    ]
    for s in steer:
        if s.proto == "tcp":
            lines.append(f'\t\tiifname "{inside}" ip protocol tcp tcp dport {s.guest_port} redirect to :{s.to[1]}')
    lines += [
        "\t}",
        "",
        "\tchain guard_input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f'\t\tiifname "{inside}" ct state established,related accept',
        f'\t\tiifname "{inside}" meta mark {mark:#x} accept',
    ]
    if tcp_ports:
        lines.append(f'\t\tiifname "{inside}" tcp dport {_set(tcp_ports)} accept')
    if udp_ports:
        lines.append(f'\t\tiifname "{inside}" udp dport {_set(udp_ports)} accept')
    lines += [
        f'\t\tiifname "{inside}" icmp type {{ echo-request, destination-unreachable, time-exceeded }} accept',
        f'\t\tiifname "{inside}" icmpv6 type {{ echo-request, nd-neighbor-solicit, nd-neighbor-advert, '
        "nd-router-solicit, destination-unreachable, packet-too-big } accept",
        f'\t\tiifname "{inside}" counter name guest_dropped drop',
        "\t}",
        "",
        "\tchain guard_forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        f'\t\tiifname "{inside}" counter name guest_dropped drop',
        f'\t\toifname "{inside}" counter name guest_dropped drop',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def route_commands(config: Any, action: str = "add") -> list[list[str]]:
    gw = config.gateway
    m, t = f"{gw.mark:#x}", str(gw.table)
    if action == "add":
        return [
            ["ip", "rule", "add", "fwmark", m, "lookup", t],
            ["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", t],
        ]
    return [
        ["ip", "rule", "del", "fwmark", m, "lookup", t],
        ["ip", "route", "flush", "table", t],
    ]


def render(config: Any) -> str:
    """What `proxyvm gateway-rules` prints: the nft ruleset, then the routing commands."""
    out = render_nft(config)
    out += "\n# TPROXY policy routing (applied by `proxyvm gateway up`):\n"
    for cmd in route_commands(config):
        out += "# " + " ".join(cmd) + "\n"
    return out


def _run(cmd: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, text=True, capture_output=True, check=check)


def _rule_present(config: Any) -> bool:
    gw = config.gateway
    out = _run(["ip", "rule", "show"], check=False).stdout
    return any(f"fwmark {gw.mark:#x} lookup {gw.table}" in line for line in out.splitlines())


def up(config: Any) -> None:
    """Apply the ruleset and routing; running it twice changes nothing."""
    _run(["nft", "-f", "-"], stdin=render_nft(config))
    if not _rule_present(config):
        _run(route_commands(config, "add")[0])
    _run(route_commands(config, "add")[1])


def down(config: Any) -> None:
    gw = config.gateway
    if _run(["nft", "list", "table", "inet", gw.nft_table], check=False).returncode == 0:
        _run(["nft", "delete", "table", "inet", gw.nft_table])
    while _rule_present(config):
        _run(route_commands(config, "del")[0])
    _run(route_commands(config, "del")[1], check=False)


def cli_rules(config: Any) -> int:
    if config.gateway is None:
        print("proxyvm gateway-rules: the config has no gateway section (inside/outside interfaces)", file=sys.stderr)
        return 1
    sys.stdout.write(render(config))
    return 0


def cli_updown(config: Any, action: str) -> int:
    if config.gateway is None:
        print(f"proxyvm gateway {action}: the config has no gateway section", file=sys.stderr)
        return 1
    if shutil.which("nft") is None or shutil.which("ip") is None:
        print(f"proxyvm gateway {action}: needs nft (nftables) and ip (iproute2)", file=sys.stderr)
        return 1
    try:
        (up if action == "up" else down)(config)
    except subprocess.CalledProcessError as e:
        print(f"proxyvm gateway {action}: {' '.join(e.cmd)} failed: {e.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"gateway {action}: done")
    return 0
