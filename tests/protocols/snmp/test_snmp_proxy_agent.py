"""Guests' v1/v2c requests through the in-process service to a real v3-only snmpd."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from snmp_helpers import MATRIX, MONITOR, needs_netsnmp, tool

from tests.labs.snmp_lab import SnmpAgent

pytestmark = [needs_netsnmp, pytest.mark.lab]

SYS_DESCR = "1.3.6.1.2.1.1.1.0"
SYS_NAME = "1.3.6.1.2.1.1.5.0"
SYS_CONTACT = "1.3.6.1.2.1.1.4.0"
SYSTEM = "1.3.6.1.2.1.1"
IF_NUMBER = "1.3.6.1.2.1.2.1.0"
IF_IN_OCTETS_HC = "1.3.6.1.2.1.31.1.1.1.6"


def values(out: str) -> dict[str, str]:
    """`-On` output lines -> {oid: "TYPE: value"}."""
    res = {}
    for line in out.splitlines():
        m = re.match(r"^\.?([\d.]+) = (.*)$", line.strip())
        if m:
            res[m.group(1)] = m.group(2)
    return res


def stable(d: dict[str, str]) -> dict[str, str]:
    """Values that cannot change between two queries (sysUpTime ticks on)."""
    return {k: ("Timeticks" if k == "1.3.6.1.2.1.1.3.0" else v) for k, v in d.items()}


async def test_v2c_get_equals_direct_v3(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(agent=agent)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_DESCR, SYS_NAME, IF_NUMBER)
    assert rc == 0, err
    direct = agent.tool("snmpget", MONITOR, SYS_DESCR, SYS_NAME, IF_NUMBER)
    assert direct.returncode == 0, direct.stderr
    assert values(out) == values(direct.stdout)
    assert "proxyvm lab agent" in out
    rec = run.records(request__op="get")[-1]
    assert rec["verdict"] == "allow" and rec["rule"] == "snmp-read" and rec["guest"] == "mon1"
    assert rec["request"]["agent"] == "lab" and rec["request"]["oid_count"] == 3
    assert rec["request"]["oids"][0] == SYS_DESCR
    assert rec["status"] == "noError" and rec["upstream"]["security"] == "authPriv"
    assert "duration_ms" in rec
    text = repr(run.audit.records)
    assert "authpass" not in text and "privpass" not in text and "labcomm" not in text


async def test_v1_get_equals_direct_v3(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(agent=agent)
    rc, out, err = await tool(tmp_path, "snmpget", "-v1", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_DESCR, IF_NUMBER)
    assert rc == 0, err
    direct = agent.tool("snmpget", MONITOR, SYS_DESCR, IF_NUMBER)
    assert values(out) == values(direct.stdout) and len(values(out)) == 2
    assert run.records(request__op="get")[-1]["request"]["version"] == "v1"


@pytest.mark.parametrize("user", MATRIX, ids=lambda u: f"{u.auth}+{u.priv}")
async def test_each_auth_and_priv_protocol(make_proxy, agent: SnmpAgent, tmp_path: Path, user) -> None:
    """The outside leg with every auth (SHA-224..512, SHA-1, MD5) and priv (AES-128/192/256,
    Blumenthal and Cisco key extension) protocol net-snmp supports; a wrong key extension would
    fail decryption at the agent (decryptionErrors) and the guest would get genErr."""
    run = await make_proxy(agent=agent, agent_user=user)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_NAME, SYS_DESCR)
    assert rc == 0, err
    direct = agent.tool("snmpget", user, SYS_NAME, SYS_DESCR)
    assert direct.returncode == 0, direct.stderr
    assert values(out) == values(direct.stdout) and len(values(out)) == 2
    rec = run.records(request__op="get")[-1]
    assert rec["status"] == "noError"
    assert rec["upstream"]["auth"] == user.auth and rec["upstream"]["priv"] == user.priv


async def test_walks_equal_direct_v3(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(agent=agent)
    direct = agent.tool("snmpwalk", MONITOR, SYSTEM)
    assert direct.returncode == 0 and len(values(direct.stdout)) > 5
    for argv in (["snmpwalk", "-v2c"], ["snmpwalk", "-v1"], ["snmpbulkwalk", "-v2c", "-Cr7"]):
        rc, out, err = await tool(tmp_path, *argv, "-c", "labcomm", "-On", "-r", "0", "-t", "3", run.address, SYSTEM)
        assert rc == 0, err
        assert stable(values(out)) == stable(values(direct.stdout)), argv
    assert run.records(request__op="getbulk")


def _only_system(extra_ops: str = "") -> str:
    return f"""\
mode: enforce
default: deny
rules:
  - id: system-only
    action: allow
    protocol: snmp
    match: {{op: [get, getnext, getbulk{extra_ops}], oid: ["{SYSTEM}"]}}
"""


async def test_walk_never_leaves_the_allowed_subtree(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    """GETNEXT/GETBULK past the allowed subtree: endOfMibView (v2c) / noSuchName (v1), like VACM."""
    run = await make_proxy(rules=_only_system(), agent=agent)
    direct = agent.tool("snmpwalk", MONITOR, SYSTEM)
    last = list(values(direct.stdout))[-1]  # the agent's next OID after this is outside system
    rc, out, err = await tool(tmp_path, "snmpgetnext", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, last)
    assert rc == 0, err
    assert "No more variables left in this MIB View" in out, out
    assert not any(o.startswith("1.3.6.1.2.1.2") for o in values(out))
    rec = run.records(request__op="getnext")[-1]
    assert rec["past_view"] == 1 and rec["verdict"] == "allow"
    rc, out, err = await tool(tmp_path, "snmpbulkget", "-v2c", "-Cn0", "-Cr40", "-c", "labcomm", "-On", "-r", "0",
                              "-t", "3", run.address, SYSTEM + ".9")
    assert rc == 0, err
    oids = [o for o in values(out)]
    assert oids and all(o.startswith(SYSTEM + ".") for o in oids), out
    assert "No more variables left in this MIB View" in out
    rc, out, err = await tool(tmp_path, "snmpgetnext", "-v1", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, last)
    assert "noSuchName" in (out + err) or "no such variable" in (out + err).lower(), out + err
    # the agent's answer itself would have leaked ifNumber; the proxy's reply did not
    assert "1.3.6.1.2.1.2.1.0" not in out + err


async def test_monitor_mode_lets_results_past_the_view_through(make_proxy, agent: SnmpAgent,
                                                                tmp_path: Path) -> None:
    rules = _only_system().replace("mode: enforce", "mode: monitor")
    run = await make_proxy(rules=rules, agent=agent)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, IF_NUMBER)
    assert rc == 0 and IF_NUMBER in values(out), out + err
    rec = run.records(request__op="get")[-1]
    assert rec["verdict"] == "would_deny" and rec["status"] == "noError"


async def test_get_outside_policy_is_denied(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(rules=_only_system(), agent=agent)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_NAME, IF_NUMBER)
    assert rc != 0 and "authorizationError" in err, out + err
    rec = run.records(request__op="get")[0]  # snmpget then retries without the failed varbind
    assert rec["verdict"] == "deny" and rec["rule"] == "default" and rec["upstream"] is None
    assert rec["request"]["oids"] == [SYS_NAME, IF_NUMBER]
    rc, out, err = await tool(tmp_path, "snmpget", "-v1", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, IF_NUMBER)
    assert rc != 0 and "noSuchName" in err or "There is no such variable" in err, out + err


async def test_set_denied_unless_a_rule_allows_it(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(agent=agent)
    # guest "unknown" (no --clientaddr): the set rule names only mon1
    rc, out, err = await tool(tmp_path, "snmpset", "-v2c", "-c", "writecomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_CONTACT, "s", "intruder", guest=False)
    assert rc != 0 and "noAccess" in err, out + err
    rc, out, err = await tool(tmp_path, "snmpset", "-v1", "-c", "writecomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_CONTACT, "s", "intruder", guest=False)
    assert rc != 0 and ("noSuchName" in err or "There is no such variable" in err), out + err
    denied = run.records(request__op="set", verdict="deny")
    assert len(denied) == 2 and all(r["guest"] == "unknown" for r in denied)
    direct = agent.tool("snmpget", MONITOR, SYS_CONTACT)
    assert "intruder" not in direct.stdout
    # mon1 may set sysContact through the read-write agent credentials
    rc, out, err = await tool(tmp_path, "snmpset", "-v2c", "-c", "writecomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_CONTACT, "s", "ops@example.test")
    assert rc == 0, err
    direct = agent.tool("snmpget", MONITOR, SYS_CONTACT)
    assert "ops@example.test" in direct.stdout
    ok = run.records(request__op="set", verdict="allow")[-1]
    assert ok["rule"] == "snmp-set-contact" and ok["request"]["agent"] == "writer"
    # allowed by policy, refused by the agent (read-only user): the agent's error comes back
    rc, out, err = await tool(tmp_path, "snmpset", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, SYS_CONTACT, "s", "x")
    assert rc != 0 and ("noAccess" in err or "notWritable" in err or "authorization" in err), out + err


async def test_agent_timeout_gives_generr_and_audit(make_proxy, tmp_path: Path) -> None:
    """An agent address where nothing listens (the agent is down): genErr, audited "agent timeout"."""
    from snmp_helpers import AGENT_HOST, creds_yaml

    from tests.labs.proc import free_port
    dead = f"{AGENT_HOST}:{free_port(AGENT_HOST, 'udp')}"
    extra = (f'  dead: {{address: "{dead}", community: deadcomm, {creds_yaml(tmp_path, MONITOR)}, '
             "timeout: 200ms, retries: 1}")
    run = await make_proxy(agents_extra=extra)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "deadcomm", "-On", "-r", "0", "-t", "5",
                              run.address, SYS_NAME)
    assert rc != 0 and "genErr" in err, out + err
    rec = run.records(request__op="get")[-1]
    assert rec["status"] == "agent timeout" and rec["upstream"]["address"] == dead
    assert 300 <= rec["duration_ms"] < 3000


async def test_unknown_community_gets_no_answer(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    run = await make_proxy(agent=agent)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "not-a-community", "-On", "-r", "0", "-t", "1",
                              run.address, SYS_NAME)
    assert rc != 0 and "Timeout" in err
    rec = run.records(rule="snmp.community")[-1]
    assert rec["verdict"] == "deny" and "not-a-community" not in repr(rec)


async def test_v1_guest_never_sees_counter64(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    rules = """\
mode: enforce
default: deny
rules:
  - id: all-read
    action: allow
    protocol: snmp
    match: {op: [get, getnext, getbulk], oid: ["1.3.6.1"]}
"""
    run = await make_proxy(rules=rules, agent=agent)
    direct = agent.tool("snmpget", MONITOR, IF_IN_OCTETS_HC + ".1")
    assert "Counter64" in direct.stdout, direct.stdout
    rc, out, err = await tool(tmp_path, "snmpget", "-v1", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, IF_IN_OCTETS_HC + ".1")
    assert rc != 0 and "Counter64" not in out, out + err
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "3",
                              run.address, IF_IN_OCTETS_HC + ".1")
    assert rc == 0 and "Counter64" in out
    # GETNEXT from just before the HC counters steps over every Counter64 column
    rc, out, err = await tool(tmp_path, "snmpgetnext", "-v1", "-c", "labcomm", "-On", "-r", "0", "-t", "5",
                              run.address, "1.3.6.1.2.1.31.1.1.1.5")
    assert rc == 0, err
    (oid, val), = values(out).items()
    assert "Counter64" not in val and not oid.startswith(IF_IN_OCTETS_HC)
    assert oid > "1.3.6.1.2.1.31.1.1.1.13"


async def test_agent_reboot_resyncs_time_and_engine_id(make_proxy, lab_dir: Path, tmp_path: Path) -> None:
    """A rebooted agent (engineBoots + 1) answers the proxy's cached clock with notInTimeWindow;
    one with a new engine ID answers unknownEngineID. Both are recovered without a guest error."""
    import asyncio

    from snmp_helpers import AGENT_HOST

    from tests.labs.proc import free_port
    own = SnmpAgent(lab_dir / "reboot", AGENT_HOST, free_port(AGENT_HOST, "udp"), [MONITOR], engine_id=None).start()
    try:
        run = await make_proxy(agent=own, timeout="1s")

        async def ask() -> str:
            rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "5",
                                      run.address, SYS_NAME)
            assert rc == 0, err
            return out

        await ask()
        peer = next(iter(run.service._peers.values()))
        first_id = peer.engine_id
        await asyncio.to_thread(own.restart)
        await ask()
        assert peer.counters["resyncs"] >= 1 and peer.engine_id == first_id, peer.counters
        await asyncio.to_thread(own.restart, keep_state=False)
        await ask()
        assert peer.engine_id != first_id and peer.counters["discoveries"] == 2, peer.counters
        assert all(r["status"] == "noError" for r in run.records(request__op="get"))
    finally:
        own.stop()


async def test_rule_rate_limit_drops_without_answer(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    rules = """\
mode: enforce
default: deny
rules:
  - id: slow-read
    action: allow
    protocol: snmp
    match: {op: [get]}
    rate: 2/minute
"""
    run = await make_proxy(rules=rules, agent=agent)
    outcomes = []
    for _ in range(3):
        rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "1",
                                  run.address, SYS_NAME)
        outcomes.append(rc == 0)
    assert outcomes == [True, True, False]
    rec = run.records(request__op="get")[-1]
    assert rec["status"] == "dropped (rate limited)" and rec["rule"] == "slow-read" and rec["verdict"] == "deny"


async def test_trap_queue_is_bounded(make_proxy, tmp_path: Path) -> None:
    """With one slot and an INFORM receiver that never answers, further traps are dropped, counted
    and audited instead of queueing without bound."""
    import asyncio

    from snmp_helpers import GUEST_IP, INFORMER, TRAPD_HOST, creds_yaml

    from protocols.snmp import ber
    from tests.labs.proc import free_port
    dead = f"{TRAPD_HOST}:{free_port(TRAPD_HOST, 'udp')}"
    receivers = (f'trap_receivers:\n  - {{address: "{dead}", {creds_yaml(tmp_path, INFORMER)}, inform: true, '
                 "timeout: 300ms, retries: 1}")
    run = await make_proxy(receivers=receivers, extra="limits: {trap_queue: 1}")
    trap = ber.CommunityMessage(ber.V2C, b"public", ber.PDU(ber.TRAP_V2, 1, 0, 0, [
        ber.varbind((1, 3, 6, 1, 2, 1, 1, 3, 0), ber.TIMETICKS, b"\x01"),
        ber.varbind((1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0), ber.OID, ber.oid_content((1, 3, 6, 1, 4, 1, 8072, 2, 3, 0, 1))),
    ])).encode()
    for i in range(3):
        assert await run.service.handle_trap(trap, (GUEST_IP, 41000 + i), None) is None
    assert run.service.counters["traps_dropped"] == 2
    assert len(run.records(reason="trap queue full; dropped")) == 2
    for _ in range(100):  # the one in flight times out (2 x 300 ms): dropped and audited too
        if run.service.counters["traps_dropped"] == 3:
            break
        await asyncio.sleep(0.05)
    assert run.service.counters["traps_dropped"] == 3
    assert "receiver timeout" in run.records(request__op="trap")[-1]["status"]


async def test_reload_swaps_agents_and_policy(make_proxy, agent: SnmpAgent, tmp_path: Path) -> None:
    from snmp_helpers import parse_settings, snmp_yaml, write_rules

    from policy import load_policy
    run = await make_proxy(agent=agent)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "2",
                              run.address, SYS_NAME)
    assert rc == 0, err
    new_text = snmp_yaml(tmp_path, agent, run.port, run.trap_port).replace("community: labcomm", "community: newcomm")
    new_engine = load_policy(write_rules(tmp_path, _only_system()), guests={"mon1"})
    await run.service.reload(parse_settings(new_text, tmp_path), new_engine)
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "labcomm", "-On", "-r", "0", "-t", "1",
                              run.address, SYS_NAME)
    assert rc != 0 and "Timeout" in err  # the old community is gone
    rc, out, err = await tool(tmp_path, "snmpget", "-v2c", "-c", "newcomm", "-On", "-r", "0", "-t", "2",
                              run.address, IF_NUMBER)
    assert rc != 0 and "authorizationError" in err  # the new policy applies
    assert run.records(request__op="get")[-1]["rule"] == "default"
