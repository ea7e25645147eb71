"""`http: workers: 2` in the real `proxyvm run -c CONFIG`: two ordinary workers run by the supervisor,
each with its own SO_REUSEPORT listeners, in front of the real nginx lab (curl is the guest through
the explicit proxy listener):

* connections are spread over both processes (their own counters in /healthz), every request has
  exactly one audit record in the one chain, which verifies, and /metrics sums the workers;
* a SIGHUP reaches both workers: afterwards no process lets anything through;
* kill -9 of one worker: the other keeps serving, and the killed one is restarted."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from proxyvm.audit import verify
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.protocols.http.conftest import GUEST_IP, PROXY_IP
from tests.protocols.http.test_reload_rate import curl, wait_http_records

pytestmark = pytest.mark.lab

RULES = """\
mode: enforce
default: deny
rules:
  - {id: lab, action: allow, protocol: http, match: {host: [www.lab.test]}}
"""


def write_config(lab: Any, port: int, admin: int) -> str:
    hosts = "\n".join(f"    {k}: {v}" for k, v in lab.hosts().items())
    return f"""\
guests:
  web1: {{addresses: [{GUEST_IP}]}}
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "{PROXY_IP}:{admin}"}}
state_dir: state
http:
  proxy_listen: ["{PROXY_IP}:{port}"]
  workers: 2
  ca_file: {lab.ca_pem}
  hosts:
{hosts}
"""


def served(ws: list[dict[str, Any]]) -> list[int]:
    return [int(((w.get("detail") or {}).get("traffic") or {}).get("by_status", {}).get("200", 0)) for w in ws]


@pytest.fixture
def pvm(lab, tmp_path: Path):
    port, admin = free_port(PROXY_IP), free_port(PROXY_IP)
    (tmp_path / "rules.yaml").write_text(RULES)
    p = ProxyVM.from_text(tmp_path, write_config(lab, port, admin))
    p.proxy = f"http://{PROXY_IP}:{port}"  # type: ignore[attr-defined]
    p.start()
    yield p
    assert p.stop() == 0, p.tail()
    assert verify([p.audit_path]).ok


def test_workers_share_the_ports_and_reload_together(pvm: ProxyVM, lab) -> None:
    ws = pvm.workers("http")
    assert len(ws) == 2 and len({w["pid"] for w in ws}) == 2, ws
    tag = secrets.token_hex(4)
    codes = [curl(pvm.proxy, f"http://www.lab.test/echo?w={tag}-{i}")[0] for i in range(24)]  # type: ignore[attr-defined]
    assert codes == [200] * 24
    recs = wait_http_records(pvm, 24)
    assert {(r["status"], r["rule"]) for r in recs} == {(200, "lab")}
    ws = pvm.wait_workers("http", lambda ws: sum(served(ws)) == 24)
    assert sum(served(ws)) == 24 and min(served(ws)) > 0, served(ws)  # the kernel spread them
    text = pvm.metrics()
    assert 'proxyvm_http_requests_total{status="200"} 24.0' in text, [x for x in text.splitlines() if "http_req" in x]

    (Path(pvm.config).parent / "rules.yaml").write_text("mode: enforce\ndefault: deny\nrules: []\n")
    last = max(x["seq"] for x in pvm.audit_records())
    pvm.reload()
    rel = pvm.wait_audit(lambda x: x.get("request", {}).get("event") == "reload" and x["seq"] > last, 20)
    assert rel["services"] == {"http": True}, rel
    codes = [curl(pvm.proxy, f"http://www.lab.test/echo?after={tag}-{i}")[0] for i in range(12)]  # type: ignore[attr-defined]
    assert codes == [403] * 12
    assert f"after={tag}" not in lab.log("main")


def test_dead_worker_is_restarted_while_the_other_serves(pvm: ProxyVM) -> None:
    victim, survivor = (w["pid"] for w in pvm.workers("http"))
    ProxyVM.kill_worker(victim)
    codes = [curl(pvm.proxy, "http://www.lab.test/echo")[0] for _ in range(16)]  # type: ignore[attr-defined]
    assert codes == [200] * 16  # nothing refused or lost meanwhile
    ws = pvm.wait_workers("http", lambda ws: ws[0]["pid"] not in (victim, None) and ws[0]["state"] == "ok")
    assert ws[0]["pid"] != victim and ws[0]["restarts"] == 1 and ws[1]["pid"] == survivor, ws
    codes = [curl(pvm.proxy, "http://www.lab.test/echo")[0] for _ in range(24)]  # type: ignore[attr-defined]
    assert codes == [200] * 24
    ws = pvm.wait_workers("http", lambda ws: sum(served(ws)) == 40)
    assert served(ws)[0] > 0, served(ws)  # the restarted worker serves again
    wait_http_records(pvm, 40)
