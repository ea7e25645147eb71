"""The audit path as deployed (`proxyvm run`): every answered request has its record even when the
worker is killed with SIGKILL right after the answer, nothing is lost on SIGTERM under load, and
the supervisor writes what workers encode without decoding it."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from proxyvm.audit import AuditLog, verify
from proxyvm.worker import ChannelAudit, encode_record
from tests.labs.proxy import ProxyVM
from tests.proxyvm.test_supervisor import ADDR, RULES_V1, _free

RULES = RULES_V1  # allow by default, deny *.bad.test


@pytest.fixture
def proxy(tmp_path: Path):
    port = _free()
    (tmp_path / "rules.yaml").write_text(RULES)
    cfg = tmp_path / "proxyvm.yaml"
    cfg.write_text(f"""\
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{ADDR}:{_free()}"}}
state_dir: state
http: false
dns:
  listen: ["{ADDR}:{port}"]
  upstreams:
    - {{address: "127.0.2.53:853", name: dot.lab.test}}
  dnssec: off
""")
    p = ProxyVM(cfg)
    p.port = port  # type: ignore[attr-defined]
    p.start()
    yield p
    p.stop()


def _ask(sock: socket.socket, port: int, name: str) -> int:
    sock.sendto(dns.message.make_query(name, "A").to_wire(), (ADDR, port))
    return dns.message.from_wire(sock.recv(4096)).rcode()


def _qnames(pv: ProxyVM) -> list[str]:
    return [r["request"]["qname"] for r in pv.audit_records() if "qname" in (r.get("request") or {})]


def test_sigkill_right_after_the_answers_loses_no_record_of_an_answered_request(proxy: ProxyVM) -> None:
    names = [f"q{i}.bad.test" for i in range(300)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for n in names:
            assert _ask(s, proxy.port, n) == dns.rcode.REFUSED
    pid = proxy.worker_pids()["dns"]
    os.kill(pid, signal.SIGKILL)  # at once: no drain, no flush timer
    crash = proxy.wait_audit(lambda r: r.get("request", {}).get("event") == "service_crash", timeout=15)
    assert "killed by signal 9" in crash["reason"]
    seen = _qnames(proxy)
    assert [n for n in names if n not in seen] == []  # every answered request was recorded
    assert len(seen) == len(set(seen)) == len(names)  # once each
    assert verify([proxy.audit_path]).ok


def test_sigterm_under_load_writes_every_answered_record(proxy: ProxyVM) -> None:
    """Queries in flight (many outstanding) when SIGTERM arrives: each one answered is recorded."""
    answered: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        for i in range(2000):
            s.sendto(dns.message.make_query(f"t{i}.bad.test", "A").to_wire(), (ADDR, proxy.port))
            if i == 1500:
                os.kill(proxy.proc.pid, signal.SIGTERM)
        try:
            while True:
                answered.add(str(dns.message.from_wire(s.recv(4096)).question[0].name).rstrip("."))
        except TimeoutError:
            pass
    assert proxy.proc.wait(20) == 0
    assert len(answered) > 100, "the load never reached the service"
    seen = set(_qnames(proxy))
    assert answered - seen == set()
    recs = proxy.audit_records()
    assert recs[-1]["request"] == {"event": "stop"} and verify([proxy.audit_path]).ok


def test_records_are_encoded_once_and_chained_without_decoding(tmp_path: Path) -> None:
    """The worker's encoding and the supervisor's splice, as one unit (no process needed)."""
    from proxyvm.admin import Metrics
    from proxyvm.supervisor import Supervisor

    sink = ChannelAudit()
    sink.policy = "sha256:" + "ab" * 32
    sink.emit({"guest": "web1", "src": "[fd00::11]:40312", "protocol": "dns", "verdict": "deny", "rule": "r1",
               "at": "rules.yaml:4", "reason": "qname é.bad.test\tmatches", "request": {"qname": "é.bad.test"},
               "upstream": None, "duration_ms": 0.25, "odd": {1: b"bytes", "set": {1}}})
    sink.emit({"kind": "delivery", "protocol": "smtp", "guest": "mail1", "verdict": "allow", "rule": "mail"})
    payload = bytes(sink.buf)
    assert payload.count(b"\n") == 2 and b"\tmatches" not in payload  # a tab in a value is escaped

    class Half:  # the supervisor's writer state, without starting a supervisor
        audit = AuditLog(tmp_path / "audit.jsonl")
        metrics = Metrics()
        observers: list = []
        line_observers: list = []

    half = Half()
    got: list[dict] = []
    half.observers.append(got.append)
    shipped: list[tuple[int, bytes]] = []
    half.line_observers.append(lambda seq, line: shipped.append((seq, line)))
    Supervisor.write_encoded(half, payload)  # type: ignore[arg-type]
    half.audit.flush()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["seq"] == 1 and list(first)[0] == "seq" and list(first)[-1] == "prev"
    assert first["ts"].endswith("Z") and first["policy"] == sink.policy
    assert first["reason"] == "qname é.bad.test\tmatches" and first["odd"] == {"1": "b'bytes'", "set": "{1}"}
    assert "policy" not in json.loads(lines[1])  # not a decision: no digest
    assert [g["seq"] for g in got] == [1, 2]
    assert shipped == [(i + 1, ln.encode()) for i, ln in enumerate(lines)]  # the chain's exact bytes
    assert verify([tmp_path / "audit.jsonl"]).ok
    text = half.metrics.render().decode()
    assert 'proxyvm_decisions_total{guest="web1",protocol="dns",rule="r1",verdict="deny"} 1.0' in text
    assert 'guest="mail1"' not in text.split("proxyvm_request_seconds")[0]  # a delivery is no decision
    assert 'proxyvm_request_seconds_count{protocol="dns"} 1.0' in text


def test_a_malformed_line_is_not_written_and_is_counted(tmp_path: Path) -> None:
    """A worker never sends one (it encodes with orjson); a fake line stands in for a broken or
    hostile worker, which the real one cannot be made into."""
    from proxyvm.admin import Metrics
    from proxyvm.supervisor import Supervisor

    class Half:
        audit = AuditLog(tmp_path / "audit.jsonl")
        metrics = Metrics()
        observers: list = []
        line_observers: list = []

    half = Half()
    good = b"\tdns\tweb1\tallow\tr\t\t" + encode_record({"guest": "web1", "protocol": "dns"})
    Supervisor.write_encoded(half, b"no tabs here\n" + good + b"\n\t\t\t\t\t\tnot-json\n")  # type: ignore[arg-type]
    half.audit.flush()
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 1
    assert "proxyvm_audit_malformed_records_total 2.0" in half.metrics.render().decode()


def test_encode_record_never_raises() -> None:
    deep: dict = {}
    d = deep
    for _ in range(300):  # deeper than orjson nests
        d["x"] = {}
        d = d["x"]
    assert encode_record({"deep": deep}).startswith(b'{"deep":')
    assert json.loads(encode_record({"big": 1 << 80}))["big"] == 1 << 80
    with tempfile.TemporaryDirectory() as t:
        assert json.loads(encode_record({"path": Path(t)}))["path"] == t
