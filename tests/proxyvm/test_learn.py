"""`proxyvm learn`: collapsing (public suffixes, paths, OIDs), a rules file `proxyvm check` accepts
and under which the same log replays unchanged, deterministic bytes, filters, bad input; and
`mode: learn` in a running `proxyvm run` (/healthz, the hourly warning)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path

import pytest

from proxyvm.learn import collapse_names, collapse_oids, collapse_paths
from tests.labs.proc import free_port
from tests.labs.proxy import ProxyVM
from tests.proxyvm.auditlogs import config, dns, http, run, smtp, snmp, supervisor, tls, write_log


# -- collapsing ----------------------------------------------------------------------------------
def test_names_collapse_to_the_narrowest_wildcard() -> None:
    got = collapse_names(["a1.cdn.example.com", "a2.cdn.example.com", "a3.cdn.example.com", "www.example.com"])
    assert got == {"*.cdn.example.com": ["a1.cdn.example.com", "a2.cdn.example.com", "a3.cdn.example.com"],
                   "www.example.com": ["www.example.com"]}
    got = collapse_names(["www.example.com", "api.example.com", "mail.example.com", "example.com"])
    assert sorted(got) == ["*.example.com", "example.com"]
    assert sorted(got["*.example.com"]) == ["api.example.com", "mail.example.com", "www.example.com"]


def test_names_below_threshold_stay_exact() -> None:
    assert collapse_names(["www.example.com", "api.example.com"]) == {
        "www.example.com": ["www.example.com"], "api.example.com": ["api.example.com"]}
    assert sorted(collapse_names(["a.example.com", "b.example.com"], threshold=2)) == ["*.example.com"]


@pytest.mark.parametrize("names", [
    ["a.com", "b.com", "c.com", "d.com"],                             # never *.com
    ["x.a.co.uk", "y.b.co.uk", "z.c.co.uk", "bbc.co.uk"],             # never *.co.uk
    ["foo.github.io", "bar.github.io", "baz.github.io"],              # a private-section suffix
    ["one.lab.test", "two.other.test", "three.third.test"],           # unknown TLDs are suffixes too
])
def test_a_public_suffix_is_never_swallowed(names: list[str]) -> None:
    got = collapse_names(names, threshold=2)
    assert got == {n: [n] for n in names}


def test_addresses_and_single_labels_stay_exact() -> None:
    names = ["203.0.113.5", "203.0.113.6", "203.0.113.7", "localhost", "com"]
    assert collapse_names(names, threshold=2) == {n: [n] for n in names}


def test_paths_collapse_past_the_threshold() -> None:
    paths = [f"/v1/items/{i}" for i in (123, 124, 125)] + ["/v1/items", "/health", "/v1/users/7"]
    got = collapse_paths(paths)
    assert sorted(got) == ["/health", "/v1/items", "/v1/items/*", "/v1/users/7"]
    assert sorted(got["/v1/items/*"]) == ["/v1/items/123", "/v1/items/124", "/v1/items/125"]
    assert sorted(collapse_paths(["/a", "/b", "/c"])) == ["/*"]
    assert collapse_paths(["/", "/x"]) == {"/": ["/"], "/x": ["/x"]}


def test_paths_a_glob_cannot_hold_become_prefixes() -> None:
    got = collapse_paths(["/files/a b.txt", "/star/*/x", "*", "/ok"])
    assert got == {"/files/a*": ["/files/a b.txt"], "/star/*/x": ["/star/*/x"], "*": ["*"], "/ok": ["/ok"]}


def test_oids_collapse_at_a_sensible_depth() -> None:
    system = ["1.3.6.1.2.1.1.1.0", "1.3.6.1.2.1.1.3.0", "1.3.6.1.2.1.1.5.0"]
    assert collapse_oids(system) == {"1.3.6.1.2.1.1": system}
    # different mib-2 groups never merge into mib-2 itself (depth 6 < 7)
    groups = ["1.3.6.1.2.1.1.1.0", "1.3.6.1.2.1.2.1.0", "1.3.6.1.2.1.4.1.0"]
    assert collapse_oids(groups) == {o: [o] for o in groups}
    walk = ["1.3.6.1.2.1.2.2.1.10.1", "1.3.6.1.2.1.2.2.1.10.2", "1.3.6.1.2.1.2.2.1.10.3", "1.3.6.1.2.1.2.2.1.10"]
    assert list(collapse_oids(walk)) == ["1.3.6.1.2.1.2.2.1.10"]


# -- the command -----------------------------------------------------------------------------------
GUESTS = ["web1", "mail1", "mon1"]


def _traffic() -> list[dict]:
    recs: list[dict] = [supervisor("start")]
    t = 1.0
    for n in ["www.example.com", "api.example.com", "mail.example.com", "example.com", "a1.cdn.example.net",
              "a2.cdn.example.net", "a3.cdn.example.net", "www.bbc.co.uk", "news.bbc.co.uk", "UPPER.Example.ORG."]:
        for qtype in ("A", "AAAA"):
            recs.append(dns("web1", n, qtype=qtype, t=t))
            t += 1
    recs += [http("web1", "api.example.com", f"/v1/items/{i}", t=100 + i) for i in range(5)]
    recs += [http("web1", "api.example.com", "/health", method="HEAD", t=110),
             http("web1", "static.example.org", "/logo.png", t=111),
             http("web1", "ws.example.com", "/socket", protocol="ws", t=112)]
    recs += [smtp("mail1", "app@example.com", "ops@example.org", t=120), smtp("mail1", "", "x@partner.net", t=121)]
    recs += [snmp("mon1", "get", ["1.3.6.1.2.1.1.1.0", "1.3.6.1.2.1.1.3.0", "1.3.6.1.2.1.1.5.0"], t=130),
             snmp("mon1", "getnext", ["1.3.6.1.2.1.2.2.1.10.1"], t=131)]
    recs += [tls("web1", "secure.example.com", t=140), tls("web1", "", dst="203.0.113.7", t=141)]
    # not learned
    recs += [dns("web1", "evil.test", verdict="deny", rule="default", at="r.yaml:2", t=150),
             dns("web1", "maybe.test", verdict="would_deny", rule="default", at="r.yaml:2", t=151),
             dns("web1", "rebind.example.net", verdict="deny", rule="rebinding-protection", at="dns", t=152),
             {**smtp("mail1", "app@example.com", "ops@example.org", t=153), "event": "accepted"}]
    return recs


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    log = write_log(tmp_path / "audit.jsonl", _traffic())
    (tmp_path / "rules.yaml").write_text("mode: learn\n")
    return log, config(tmp_path, GUESTS, policy="rules.yaml")


def test_learned_file_passes_check_and_replays_unchanged(setup: tuple[Path, Path], tmp_path: Path) -> None:
    log, cfg = setup
    r = run("learn", "--mode", "enforce", "-o", str(tmp_path / "learned.yaml"), str(log))
    assert r.returncode == 0, r.stderr
    assert "8 rules from 34 allowed requests written to" in r.stderr
    text = (tmp_path / "learned.yaml").read_text()
    checked = config(tmp_path, GUESTS, policy="learned.yaml")
    c = run("check", "-c", str(checked))
    assert c.returncode == 0, c.stdout + c.stderr
    rp = run("replay", "--json", "-c", str(checked), "--policy", str(tmp_path / "learned.yaml"), str(log))
    # every allowed request stays allowed; the one let through in monitor mode (would_deny) is now
    # denied, which is what replay is for
    assert rp.returncode == 3, rp.stdout + rp.stderr
    assert json.loads(rp.stdout)["verdicts"] == {"allow->allow": 34, "deny->deny": 1, "would_deny->deny": 1}
    assert text.rstrip().endswith("default: deny")
    assert "mode: enforce" in text
    assert "\n# Not learned: 1 builtin, 1 deny, 1 follow up, 1 non decision, 1 would deny.\n" in text


def test_rules_content(setup: tuple[Path, Path]) -> None:
    log, _ = setup
    r = run("learn", str(log))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "mode: monitor" in text
    dns_rule = text[text.index("  # web1 dns:"):text.index("  # web1 http:")]
    assert dns_rule.startswith("  # web1 dns: 20 requests, first seen 2026-09-21T14:13:21.000Z, "
                               "last seen 2026-09-21T14:13:40.000Z\n  - id: learn-web1-dns\n")
    for line in ['        - "*.cdn.example.net"  # 3 names, 6 requests',
                 '        - "*.example.com"      # 3 names, 6 requests',
                 '        - "example.com"        # 2 requests',
                 '        - "news.bbc.co.uk"     # 2 requests',
                 '        - "upper.example.org"  # 2 requests',
                 '      qtype: ["A", "AAAA"]']:
        assert line in dns_rule.splitlines(), dns_rule
    assert '"*.co.uk"' not in text and '"*.bbc.co.uk"' not in text  # two names only: below the threshold
    http_rule = text[text.index("  - id: learn-web1-http-api.example.com"):]
    assert '        - "/v1/items/*"  # 5 paths, 5 requests' in http_rule
    assert '      method: ["GET", "HEAD"]' in http_rule
    assert "  - id: learn-web1-http-static.example.org" in text
    assert "  - id: learn-web1-ws\n" in text and '        - "ws.example.com"  # 1 request' in text
    assert '        - "<>"             # 1 request (null sender)' in text
    assert '        - "*@partner.net"  # 1 request' in text
    assert '        - "1.3.6.1.2.1.1"           # 3 OIDs, 3 requests' in text
    assert '      op: ["get", "getnext"]' in text
    assert "  - id: learn-web1-tls-dst" in text and '"203.0.113.7"  # 1 request without SNI' in text


def test_output_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    recs = _traffic()
    log = tmp_path / "audit.jsonl"
    write_log(log, recs)
    first = run("learn", str(log))
    again = run("learn", str(log))
    assert first.returncode == 0 and first.stdout == again.stdout
    shuffled = recs[:]
    random.Random(7).shuffle(shuffled)
    for p in tmp_path.glob("audit.jsonl*"):
        p.unlink()
    write_log(log, shuffled)
    assert run("learn", str(log)).stdout == first.stdout


def test_guest_and_time_filters(setup: tuple[Path, Path]) -> None:
    log, _ = setup
    r = run("learn", "--guest", "mail1", str(log))
    assert r.returncode == 0, r.stderr
    assert "learn-mail1-smtp" in r.stdout and "learn-web1" not in r.stdout and "learn-mon1" not in r.stdout
    r = run("learn", "--since", "2026-09-21T14:15:15Z", "--until", "2026-09-21T14:15:40Z", str(log))
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if line.startswith("  - id:")] == [
        "  - id: learn-mail1-smtp", "  - id: learn-mon1-snmp"]


def test_reads_the_configs_log_and_leaves_out_unknown_guests(tmp_path: Path) -> None:
    write_log(tmp_path / "audit.jsonl", [dns("web1", "a.example.com"), dns("ghost", "b.example.com")])
    (tmp_path / "rules.yaml").write_text("mode: learn\n")
    cfg = config(tmp_path, ["web1"], policy="rules.yaml")
    r = run("learn", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"guest 'ghost' is not in {cfg}: its 1 requests are left out" in r.stderr
    assert "learn-web1-dns" in r.stdout and "ghost" not in r.stdout


# -- bad input --------------------------------------------------------------------------------
def _clean(r) -> None:
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_broken_chain_is_refused_unless_no_verify(setup: tuple[Path, Path]) -> None:
    log, _ = setup
    log.write_text(log.read_text().replace('"qname": "api.example.com", "qtype": "A"',
                                           '"qname": "evil.example.com", "qtype": "A"'))
    r = run("learn", str(log))
    _clean(r)
    assert r.returncode == 1
    assert f"{log}:4: line was edited" in r.stderr and "refusing to learn" in r.stderr
    r = run("learn", "--no-verify", str(log))
    assert r.returncode == 0 and "reading it anyway (--no-verify)" in r.stderr


def test_truncated(setup: tuple[Path, Path]) -> None:
    log, _ = setup
    log.write_bytes(log.read_bytes()[:-20])
    r = run("learn", str(log))
    _clean(r)
    assert r.returncode == 1 and "truncated line (no newline)" in r.stderr
    r = run("learn", "--no-verify", str(log))
    assert r.returncode == 0 and "truncated line (no newline): the file was cut mid-write; skipped" in r.stderr


def test_not_json_and_empty_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    p.write_text("<html>not a log</html>\n")
    r = run("learn", str(p))
    _clean(r)
    assert r.returncode == 1 and f"{p}:1: not an audit record (bad JSON or no seq/prev)" in r.stderr
    r = run("learn", "--no-verify", str(p))
    _clean(r)
    assert f"{p}:1: not JSON" in r.stderr and "no audit records in" in r.stderr
    p.write_bytes(b"")
    r = run("learn", str(p))
    _clean(r)
    assert r.returncode == 1 and f"no audit records in {p}" in r.stderr
    r = run("learn", str(tmp_path / "gone.jsonl"))
    _clean(r)
    assert r.returncode == 1 and "gone.jsonl:0: cannot read" in r.stderr


def test_another_version(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "a.example.com"),
                                             {**dns("web1", "b.example.com"), "verdict": "permit"}])
    r = run("learn", str(p))
    _clean(r)
    assert r.returncode == 1
    assert f"{p}:2: unknown verdict 'permit': a record from another version of proxyvm?" in r.stderr
    r = run("learn", "--no-verify", str(p))
    assert r.returncode == 0 and "learn-web1-dns" in r.stdout


def test_huge_line(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "a.example.com"), dns("web1", "b" * 2_000_000)])
    r = run("learn", str(p))
    _clean(r)
    assert r.returncode == 1 and f"{p}:2: line longer than 1048576 bytes" in r.stderr


def test_nothing_to_learn(tmp_path: Path) -> None:
    p = write_log(tmp_path / "audit.jsonl", [dns("web1", "x.test", verdict="deny", rule="default", at="r.yaml:2")])
    r = run("learn", str(p))
    _clean(r)
    assert r.returncode == 1 and "nothing to learn: no allowed decision in 1 records (not learned: 1 deny)" in r.stderr


def test_bad_time_and_threshold(setup: tuple[Path, Path]) -> None:
    log, _ = setup
    r = run("learn", "--since", "soon", str(log))
    assert r.returncode == 2 and "bad time 'soon'" in r.stderr
    r = run("learn", "--threshold", "1", str(log))
    assert r.returncode == 2 and "--threshold must be at least 2" in r.stderr


# -- mode: learn in a running proxy ------------------------------------------------------------------
def test_learn_mode_shows_in_healthz_and_the_log(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("mode: learn\ndefault: deny\n")
    port = free_port("127.0.0.1")
    pvm = ProxyVM.from_text(tmp_path, f"""\
policy: rules.yaml
audit: {{path: audit.jsonl}}
admin: {{listen: "127.0.0.1:{port}"}}
state_dir: state
""")
    with pvm:
        code, body = pvm.healthz()
        assert code == 200
        assert body["policy_mode"] == "learn"
        assert body["warnings"] == [
            "policy mode is learn: every request is allowed and recorded, nothing is enforced; "
            "run `proxyvm learn`, review, then switch to mode: monitor or enforce"]
        (tmp_path / "rules.yaml").write_text("mode: enforce\ndefault: deny\n")
        pvm.reload()
        pvm.wait_audit(lambda r: r.get("kind") == "reload")
        code, body = pvm.healthz()
        assert body["policy_mode"] == "enforce" and "warnings" not in body
    log = pvm.tail(100_000)
    assert "WARNING policy mode is learn: every request is allowed" in log
    assert "WARNING policy mode is now enforce (was learn)" in log


async def test_the_warning_repeats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from proxyvm.config import load_config
    from proxyvm.supervisor import Supervisor

    cfg = config(tmp_path, ["web1"])
    sup = Supervisor(str(cfg), load_config(cfg), [], {}, policy_mode="learn")
    sup.learn_warning_every = 0.05
    with caplog.at_level(logging.WARNING, logger="proxyvm"):
        task = asyncio.create_task(sup._learn_warning_loop())
        await asyncio.sleep(0.23)
        sup.policy_mode = "enforce"
        await asyncio.sleep(0.12)
        task.cancel()
    warnings = [r for r in caplog.records if "policy mode is learn" in r.getMessage()]
    assert 4 <= len(warnings) <= 6
    sup.audit.close()
