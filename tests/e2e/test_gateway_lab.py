"""End to end, as deployed: a guest whose only change is its default route uses real clients aimed
at outside addresses; proxyvm runs in the proxy namespace with `gateway up`; a capture on the
outside veth proves that nothing crossed in plaintext, and that traffic the policy has no business
with never crossed at all.

Extended per protocol as each service lands (DNS first)."""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.e2e.lab import GUEST_IP, OUTSIDE, PROXY_IN, Capture, NamespaceLab, lab_available
from tests.e2e.outside import DOT_NAME, start_unbound_dot
from tests.labs.nginx_lab import NginxLab
from tests.labs.pki import LabCA
from tests.labs.postfix import PostfixLab
from tests.labs.snmp_lab import SnmpAgent, TrapReceiverLab, V3User, have_netsnmp, run_tool

why = lab_available() or (
    None if shutil.which("unbound") and shutil.which("dig") and have_netsnmp() and shutil.which("swaks")
    and shutil.which("postfix") else "needs unbound, dig, net-snmp, swaks, postfix"
)
MONITOR = V3User("monitor", "SHA-256", "monitor-auth-pass", "AES-128", "monitor-priv-pass")
TRAPPER = V3User("trapper", "SHA-512", "trapper-auth-pass", "AES-256", "trapper-priv-pass")
ENGINE_ID = "8000000001020304"
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(why is not None, reason=why or "")]

RULES = """\
mode: enforce
default: deny
rules:
  - id: dns-lab
    action: allow
    protocol: dns
    guests: [web1]
    match: {qname: ["lab.test", "*.lab.test"]}
  - id: dns-blocked
    action: deny
    protocol: dns
    match: {qname: ["*"]}
  - id: snmp-read
    action: allow
    protocol: snmp
    match: {op: [get, getnext, getbulk], oid: ["1.3.6.1.2.1.1"]}
  - id: snmp-traps
    action: allow
    protocol: snmp
    match: {op: [trap, inform]}
  - id: mail-out
    action: allow
    protocol: smtp
    guests: [web1]
    match: {mail_from: ["*@lab.test"], rcpt_to: ["*@lab.test"]}
  - id: web
    action: allow
    protocol: http
    guests: [web1]
    match: {host: ["www.lab.test", "plain.lab.test", "untrusted.lab.test"], method: [GET]}
  - id: web-ws
    action: allow
    protocol: ws
    guests: [web1]
    match: {host: ["ws.lab.test"], path: ["/ws"]}
  - id: web-tls
    action: allow
    protocol: tls
    guests: [web1]
    match: {sni: ["www.lab.test"]}
"""


def _config(d: Path, ca: Path, web_ca: Path) -> Path:
    (d / "rules.yaml").write_text(RULES)
    for name, value in (("snmp-auth", MONITOR.auth_pass), ("snmp-priv", MONITOR.priv_pass),
                        ("trap-auth", TRAPPER.auth_pass), ("trap-priv", TRAPPER.priv_pass)):
        (d / name).write_text(value + "\n")
        (d / name).chmod(0o600)
    cfg = d / "proxyvm.yaml"
    cfg.write_text(
        f"""\
guests:
  web1: {{addresses: [{GUEST_IP}], mac: "52:54:00:00:00:10"}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "127.0.0.1:9700"}}
state_dir: state
user: nobody
gateway: {{inside: pvm-in, outside: pvm-out}}
dns:
  listen: ["{PROXY_IN}:53"]
  upstreams:
    - {{address: "{OUTSIDE['dns']}:853", name: {DOT_NAME}}}
  ca_file: {ca}
  dnssec: off
snmp:
  listen: ["{PROXY_IN}:161"]
  traps_listen: ["{PROXY_IN}:162"]
  communities: [public]
  engine_id: "0x{ENGINE_ID}"
  default_agent_credentials:
    user: {MONITOR.name}
    auth: {{protocol: {MONITOR.auth}, password_file: snmp-auth}}
    priv: {{protocol: {MONITOR.priv}, password_file: snmp-priv}}
  trap_receivers:
    - address: "{OUTSIDE['trap']}:162"
      user: {TRAPPER.name}
      auth: {{protocol: {TRAPPER.auth}, password_file: trap-auth}}
      priv: {{protocol: {TRAPPER.priv}, password_file: trap-priv}}
      inform: false
smtp:
  listen: ["{PROXY_IN}:25"]
  spool: spool
  relay: {{host: mx.lab.test, port: 25, address: "{OUTSIDE['smtp']}"}}
  tls: verify
  ca_file: {ca}
  retry: {{first: 1s, max_age: 1h}}
http:
  listen: ["{PROXY_IN}:80"]
  passthrough_listen: ["{PROXY_IN}:443"]
  ca_file: {web_ca}
"""
    )
    return cfg


@pytest.fixture(scope="module")
def lab():
    # The proxy's workers run as `nobody` and postfix as `postfix`: pytest's tmp dirs (0700 root)
    # are closed to them, as /root would be; an operator's /etc/proxyvm and spool are not.
    d = Path(tempfile.mkdtemp(prefix="pvm-e2e-"))
    d.chmod(0o755)
    ca = LabCA(d / "pki")
    with NamespaceLab() as lab:
        lab.workdir = d  # type: ignore[attr-defined]
        lab.unbound_log = start_unbound_dot(lab, d, ca)  # type: ignore[attr-defined]
        lab.agent = SnmpAgent(d, OUTSIDE["snmp"], 161, [MONITOR], netns=lab.outside).start()  # type: ignore[attr-defined]
        lab.traps = TrapReceiverLab(d, OUTSIDE["trap"], 162, [TRAPPER], sender_engine_id=ENGINE_ID,  # type: ignore[attr-defined]
                                    netns=lab.outside).start()
        lab.web = NginxLab(d / "web", main_ip=OUTSIDE["http"], untrusted_ip=OUTSIDE["http_untrusted"],  # type: ignore[attr-defined]
                           plain_ip=OUTSIDE["http_plain"], legacy_ip=None, netns=lab.outside).start()
        mx_cert, mx_key = ca.issue(["mx.lab.test"], stem="mx")
        lab.mx = PostfixLab(d / "mx", OUTSIDE["smtp"], 25, cert=mx_cert, key=mx_key,  # type: ignore[attr-defined]
                            netns=lab.outside).start()
        cfg = _config(d, ca.ca_pem, lab.web.ca_pem)
        r = lab.run(lab.proxy, sys.executable, "-m", "proxyvm", "gateway", "up", "-c", str(cfg), check=False)
        assert r.returncode == 0, r.stderr
        lab.proxyvm = lab.popen(lab.proxy, [sys.executable, "-m", "proxyvm", "run", "-c", str(cfg)],  # type: ignore[attr-defined]
                                log=d / "proxyvm.log", cwd=Path(__file__).resolve().parents[2])
        lab.wait_tcp(lab.proxy, "127.0.0.1", 9700)
        health = ("import time, urllib.request\n"
                  "for _ in range(300):\n"
                  "    try:\n"
                  "        urllib.request.urlopen('http://127.0.0.1:9700/healthz', timeout=1); break\n"
                  "    except Exception: time.sleep(0.1)\n"
                  "else: raise SystemExit('proxyvm never became healthy')\n")
        r = lab.run(lab.proxy, sys.executable, "-c", health, check=False)
        assert r.returncode == 0, (r.stdout + r.stderr + (d / "proxyvm.log").read_text()[-3000:])
        cap = Capture(lab, lab.outside, "eth0", d / "outside.pcap").start()
        lab.capture = cap  # type: ignore[attr-defined]
        yield lab
        lab.mx.stop()
        lab.web.stop()
        lab.agent.stop()
        lab.traps.stop()
    shutil.rmtree(d, ignore_errors=True)


def _dig(lab: NamespaceLab, *args: str) -> str:
    r = lab.run(lab.guest, "dig", "+tries=1", "+time=5", *args, check=False)
    return r.stdout


def test_dns_through_gateway_is_dot_only(lab) -> None:
    out = _dig(lab, f"@{OUTSIDE['dns']}", "www.lab.test", "A")
    assert "status: NOERROR" in out and "198.19.0.80" in out, out
    # the reply came from the address the guest asked (TPROXY reply-from-original-destination)
    assert f"SERVER: {OUTSIDE['dns']}#53" in out
    out = _dig(lab, "+tcp", f"@{OUTSIDE['dns']}", "mail.lab.test", "A")
    assert "status: NOERROR" in out and "198.19.0.25" in out, out
    out = _dig(lab, f"@{OUTSIDE['dns']}", "example.com", "A")
    assert "status: REFUSED" in out and "EDE: 15" in out, out
    # the audit names the guest, the resolver it thought it asked, and the DoT upstream used
    rec = _wait_audit(lab, lambda r: r.get("request", {}).get("qname") == "mail.lab.test")
    assert rec["guest"] == "web1" and rec["orig_dst"] == f"{OUTSIDE['dns']}:53"
    assert rec["upstream"]["address"] == f"{OUTSIDE['dns']}:853" and rec["upstream"]["tls"].startswith("TLSv1.")


def _wait_audit(lab, pred, timeout: float = 10.0) -> dict:
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (lab.workdir / "audit.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if pred(rec):
                return rec
        time.sleep(0.2)
    raise AssertionError("no matching audit record")


def test_snmp_v2c_get_and_walk_become_v3(lab) -> None:
    direct = lab.agent.get("1.3.6.1.2.1.1.1.0", MONITOR)
    assert direct.returncode == 0 and "proxyvm lab agent" in direct.stdout
    r = run_tool(lab.workdir, ["snmpget", "-v2c", "-c", "public", "-On", "-r", "1", "-t", "3",
                               OUTSIDE["snmp"], "1.3.6.1.2.1.1.1.0"], netns=lab.guest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == direct.stdout.strip()
    walk = run_tool(lab.workdir, ["snmpwalk", "-v2c", "-c", "public", "-On", "-r", "1", "-t", "3",
                                  OUTSIDE["snmp"], "1.3.6.1.2.1.1"], netns=lab.guest)
    assert walk.returncode == 0, walk.stderr
    oids = [line.split()[0] for line in walk.stdout.splitlines() if line.startswith(".")]
    assert len(oids) > 3 and all(o.startswith(".1.3.6.1.2.1.1.") for o in oids), oids[-3:]


def test_snmp_trap_becomes_v3(lab) -> None:
    r = run_tool(lab.workdir, ["snmptrap", "-v2c", "-c", "public", f"{OUTSIDE['trap']}:162", "",
                               "1.3.6.1.6.3.1.1.5.3", "1.3.6.1.2.1.2.2.1.1.7", "i", "7"], netns=lab.guest)
    assert r.returncode == 0, r.stderr
    lines = lab.traps.wait_for("1.3.6.1.6.3.1.1.5.3", timeout=10)
    # the receiver accepts only v3 authPriv; the guest's address travels as snmpTrapAddress.0
    assert any(GUEST_IP in line for line in lines), lines


def test_smtp_relayed_over_verified_starttls(lab) -> None:
    marker = f"e2e-body-{uuid.uuid4().hex}"
    r = lab.run(lab.guest, "swaks", "--server", OUTSIDE["smtp"], "--from", "app@lab.test", "--to", "ops@lab.test",
                "--header", "Subject: e2e", "--body", marker, "--timeout", "20", check=False)
    assert r.returncode == 0 and "250" in r.stdout, r.stdout[-1500:]
    msg = lab.mx.find(marker.encode(), timeout=30)
    assert b"ESMTPS" in msg and b"mx.lab.test" in msg  # Received: ... with ESMTPS: it crossed TLS
    lab.marker = marker
    # a recipient the policy has no rule for is refused at RCPT time
    r = lab.run(lab.guest, "swaks", "--server", OUTSIDE["smtp"], "--from", "app@lab.test",
                "--to", "someone@elsewhere.example", "--timeout", "20", check=False)
    assert "550 5.7.1" in r.stdout, r.stdout[-800:]


def _curl(lab, *args: str) -> tuple[str, str]:
    r = lab.run(lab.guest, "curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args, check=False)
    body, _, code = r.stdout.rpartition("\n")
    return code, body + r.stderr


def test_http_is_upgraded_to_verified_https(lab) -> None:
    code, body = _curl(lab, "--resolve", f"www.lab.test:80:{OUTSIDE['http']}", "http://www.lab.test/echo")
    assert code == "200", body
    log = lab.web.log("main")
    assert "ssl=TLSv1.3 sni=www.lab.test" in log or "ssl=TLSv1.2 sni=www.lab.test" in log, log[-500:]
    # an untrusted certificate and a server with no TLS are refused, nothing sent in clear
    code, body = _curl(lab, "--resolve", f"untrusted.lab.test:80:{OUTSIDE['http_untrusted']}",
                       "http://untrusted.lab.test/")
    assert code == "502" and "untrusted" in body, body
    code, body = _curl(lab, "--resolve", f"plain.lab.test:80:{OUTSIDE['http_plain']}", "http://plain.lab.test/")
    assert code == "502", body
    assert "port=80" not in lab.web.log("plain")
    # not in the policy
    code, body = _curl(lab, "--resolve", f"other.lab.test:80:{OUTSIDE['http']}", "http://other.lab.test/")
    assert code == "403" and "blocked by proxyvm rule" in body, body


def test_https_passes_through_by_sni(lab) -> None:
    code, body = _curl(lab, "--cacert", str(lab.web.ca_pem), "--resolve", f"www.lab.test:443:{OUTSIDE['http']}",
                       "https://www.lab.test/files/1k.bin", "-o", "/dev/null")
    assert code == "200", body
    code, body = _curl(lab, "-k", "--resolve", f"ws.lab.test:443:{OUTSIDE['http']}", "https://ws.lab.test/")
    assert code != "200", body  # SNI not allowed by any tls rule: the tunnel is refused


def test_websocket_goes_out_as_wss(lab) -> None:
    client = (
        "import asyncio, websockets\n"
        "async def main():\n"
        f"    async with websockets.connect('ws://ws.lab.test/ws', host='{OUTSIDE['http']}', port=80) as ws:\n"
        "        await ws.send('ping-e2e'); print(await ws.recv())\n"
        "asyncio.run(main())\n"
    )
    r = lab.run(lab.guest, sys.executable, "-c", client, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ping-e2e", r.stderr[-800:]


def test_other_traffic_is_dropped(lab) -> None:
    probe = (
        "import socket\n"
        "ok = []\n"
        f"try:\n    socket.create_connection(('{OUTSIDE['ssh']}', 22), timeout=1); ok.append('ssh')\n"
        "except OSError: pass\n"
        f"u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)\n"
        f"u.sendto(b'\\x1b' + 47 * b'\\0', ('{OUTSIDE['ntp']}', 123))\n"
        "try:\n    u.recv(100); ok.append('ntp')\nexcept OSError: pass\n"
        "print(ok)\n"
    )
    r = lab.run(lab.guest, sys.executable, "-c", probe)
    assert r.stdout.strip() == "[]"


def test_capture_shows_no_plaintext(lab) -> None:
    from scapy.layers.inet import IP, TCP, UDP

    # make sure some traffic of each kind happened before we read the capture
    _dig(lab, f"@{OUTSIDE['dns']}", "www.lab.test", "AAAA")
    pkts = lab.capture.stop()
    assert pkts, "capture is empty: the assertions below would prove nothing"
    from_proxy = [p for p in pkts if IP in p and p[IP].src == "198.19.0.1"]
    assert any(TCP in p and p[TCP].dport == 853 for p in from_proxy), "no DoT seen: the DNS test did not cross"
    plain_dns = [p for p in pkts if (UDP in p and 53 in (p[UDP].dport, p[UDP].sport))
                 or (TCP in p and 53 in (p[TCP].dport, p[TCP].sport))]
    assert plain_dns == [], f"plaintext DNS crossed the outside link: {plain_dns[:3]}"
    from_guest = [p for p in pkts if IP in p and p[IP].src == GUEST_IP]
    assert from_guest == [], "a guest packet was routed around the proxy"
    web = [p for p in from_proxy if TCP in p]
    assert any(p[TCP].dport == 443 for p in web), "no HTTPS crossed: the web tests did not run"
    assert not any(p[TCP].dport == 80 for p in web), "plain HTTP crossed the outside link"
    smtp = b"".join(bytes(p[TCP].payload) for p in from_proxy if TCP in p and p[TCP].dport == 25)
    assert b"STARTTLS" in smtp, "no SMTP crossed: the SMTP test did not run"
    marker = getattr(lab, "marker", None)
    assert marker is not None and marker.encode() not in smtp, "the message body crossed in clear"
    assert b"DATA" not in smtp.split(b"STARTTLS", 1)[1], "SMTP commands after STARTTLS were in clear"
    snmp = [bytes(p[UDP].payload) for p in from_proxy if UDP in p and p[UDP].dport in (161, 162)]
    assert snmp, "no SNMP crossed: the SNMP tests did not run"
    versions = {_snmp_version(b) for b in snmp}
    assert versions == {3}, f"SNMP versions seen outside: {versions} (1 = v2c, 0 = v1)"


def _snmp_version(msg: bytes) -> int:
    """The msgVersion INTEGER at the start of an SNMP message's outer SEQUENCE."""
    i = 1
    n = msg[i]
    i += 1 + (n & 0x7F if n & 0x80 else 0)
    assert msg[i] == 0x02, "not an SNMP message"
    length = msg[i + 1]
    return int.from_bytes(msg[i + 2 : i + 2 + length], "big")
