"""The console in a real headless Chromium (driven over the DevTools protocol: real mouse clicks
and typing) against a real `proxyvm run` with the DNS service in front of the lab's Unbound, and
real dig as the guests: log in, the overview with live counts, the audit view filtered (and a
filter full of regex metacharacters), live rows, a guest's page (its rules with file:line,
destinations, denials), quarantine and release by button (dig sees REFUSED, then answers again;
the audit records say `by: console` and who), a guest name with HTML in it shown as text,
the health page, logout. Screenshots go to the test's tmp dir; with PROXYVM_UPDATE_SCREENSHOT=1
the overview one is copied to docs/console.png (the README shows it)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.console.cdp import CHROMIUM, Browser, png_size
from tests.console.lab import ADMIN_IP, GUEST_IP, OTHER_IP, write_lab
from tests.protocols.dns.conftest import lab_ca, lab_dir, needs_peers, upstream1  # noqa: F401
from tests.protocols.dns.dnsfront_lab import dig

HTML_GUEST = '<img src=x onerror="document.title=\'pwned\'">'
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"

needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (.ci/packages-console.txt)")


async def traffic(port: int) -> None:
    for i in range(6):
        r = await dig(ADMIN_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        assert r.status == "NOERROR", r.text
        await dig(ADMIN_IP, port, f"n{i}.lab.test", "A", "-b", GUEST_IP)
    r = await dig(ADMIN_IP, port, "blocked.lab.test", "A", "-b", GUEST_IP)
    assert r.status == "REFUSED", r.text  # rule deny-blocked
    for _ in range(3):
        await dig(ADMIN_IP, port, "www.lab.test", "AAAA", "-b", OTHER_IP)


@needs_peers
@needs_chromium
@pytest.mark.lab
@pytest.mark.slow
async def test_console_in_chromium(tmp_path: Path, upstream1, lab_ca) -> None:  # noqa: F811
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "quarantine.json").write_text(json.dumps({"version": 1, "guests": {
        HTML_GUEST: {"profile": "block", "reason": "<b>bold</b>", "by": "cli", "since": "2026-01-01T00:00:00Z"}}}))
    # new_destination learns web1's baseline from the traffic below (5 allowed requests make it active)
    pvm, token, port = write_lab(tmp_path, ca=lab_ca.ca_pem, upstream=upstream1,
                                 extra="detect:\n  new_destination: {min_baseline: 5}\n")
    await asyncio.to_thread(pvm.start)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    b = Browser(tmp_path)
    base = pvm.admin
    try:
        await b.start()
        await traffic(port)

        # -- login ----------------------------------------------------------------------------
        await b.goto(base + "/console/")
        await b.wait("location.pathname === '/console/login'")
        await b.type("#name", "alice")
        await b.type("#token", "not-the-token-at-all")
        await b.click("#login-button")
        await b.wait("document.querySelector('#login-error').textContent.includes('Wrong token')")
        await b.type("#name", "alice")
        await b.type("#token", token)
        await b.click("#login-button")
        await b.wait("location.pathname === '/console/' && document.querySelector('#who').textContent"
                     " === 'alice@127.0.0.1'")
        assert await b.eval("document.cookie") == ""  # HttpOnly: the page cannot read the session

        # -- overview: live counts per guest, the HTML guest as text ----------------------------
        await b.wait("(() => { const r = document.querySelector('tr[data-guest=web1]');"
                     " return r && +r.querySelector('td.allow').textContent >= 12 &&"
                     " +r.querySelector('td.deny').textContent === 1; })()")
        before = await b.eval("+document.querySelector('tr[data-guest=web2] td.allow').textContent")
        await dig(ADMIN_IP, port, "www.lab.test", "A", "-b", OTHER_IP)
        await b.wait(f"+document.querySelector('tr[data-guest=web2] td.allow').textContent > {before}")  # live
        assert "dns" in await b.eval("document.querySelector('tr[data-guest=web1] td.rate').textContent")
        rows = await b.eval("[...document.querySelectorAll('#guests tr[data-guest]')].map(r => r.dataset.guest)")
        assert rows == ["unknown", "web1", "web2", HTML_GUEST]
        assert await b.eval("document.querySelectorAll('main img, main script, #guests b').length") == 0
        assert await b.eval("document.title") == "proxyvm console: Overview"
        last = await b.eval("[...document.querySelectorAll('#guests tr')].pop().querySelector('.quarantine')"
                            ".textContent")
        assert last.startswith("block since 2026-01-01T00:00:00Z by cli"), last
        assert await b.eval("document.querySelectorAll('svg.spark polyline').length") == 4
        shot = await b.screenshot(shots / "overview.png")
        assert png_size(shot) == (1280, 860)
        if os.environ.get("PROXYVM_UPDATE_SCREENSHOT") == "1":
            shutil.copy(shot, DOCS_SHOT)

        # -- audit: filters (clicked and typed), regex metacharacters, live rows ----------------
        await b.click("#nav-audit")
        await b.wait("location.pathname === '/console/audit' && document.querySelectorAll('#records tr.record')"
                     ".length >= 20")
        await b.type("#f-text", "blocked")
        await b.click("#apply")
        await b.wait("(() => { const w = [...document.querySelectorAll('#records tr.record td.what')];"
                     " return w.length === 1 && w[0].textContent === 'blocked.lab.test A'; })()")
        assert await b.eval("location.search") == "?text=blocked"
        assert await b.eval("document.querySelector('#records tr.record td.deny').textContent") == "deny"
        await b.type("#f-text", ".*(lab[")
        await b.click("#apply")
        await b.wait("document.querySelector('#audit-status').textContent.startsWith('0 records')")
        await b.type("#f-text", "")
        await b.type("#f-guest", "web2")
        await b.choose("#f-verdict", "allow")
        await b.click("#apply")
        await b.wait("(() => { const g = [...document.querySelectorAll('#records tr.record td:nth-child(3)')];"
                     " return g.length >= 4 && g.every(td => td.textContent === 'web2'); })()")
        await dig(ADMIN_IP, port, "live-row.lab.test", "A", "-b", OTHER_IP)  # arrives without a reload
        await b.wait("[...document.querySelectorAll('#records td.what')].some(td => td.textContent"
                     " === 'live-row.lab.test A')")
        await dig(ADMIN_IP, port, "not-for-this-filter.lab.test", "A", "-b", GUEST_IP)
        await asyncio.sleep(2.5)
        assert not await b.eval("[...document.querySelectorAll('#records td.what')].some(td =>"
                                " td.textContent.startsWith('not-for-this-filter'))")
        await b.screenshot(shots / "audit.png")

        # -- one guest: rules with file:line, destinations, denials; quarantine by button ------
        await b.click("#records tr.record a.guest-link")
        await b.wait("document.querySelector('#guest-name') && document.querySelector('#guest-name')"
                     ".textContent === 'web2'")
        await b.goto(base + "/console/guest?name=web1")
        await b.wait("document.querySelector('#guest-name').textContent === 'web1'")
        rules = await b.eval("[...document.querySelectorAll('#rules tr')].slice(1).map(r => r.innerText)")
        rules_file = str(tmp_path / "rules.yaml")
        assert any("deny-blocked" in r and f"{rules_file}:4" in r for r in rules), rules
        assert any("allow-lab" in r and f"{rules_file}:9" in r for r in rules), rules
        dests = await b.eval("[...document.querySelectorAll('#destinations td.mono')].map(t => t.textContent)")
        assert dests[0] == "www.lab.test" and "blocked.lab.test" in dests
        assert await b.eval("document.querySelector('#denials td.what').textContent") == "blocked.lab.test A"
        baseline = await b.eval("document.querySelector('#baseline').innerText")
        # web1's allowed requests, all under one base domain (the denied one is not a destination)
        m = re.search(r"learned from (\d+) allowed requests, 1 destinations", baseline)
        assert m and int(m.group(1)) >= 12 and "dns:lab.test" in baseline, baseline
        assert "not active" not in baseline, baseline
        assert await b.eval("document.querySelector('#guest-quarantine').textContent") == "Not quarantined"
        await b.choose("#q-profile", "block")
        await b.type("#q-reason", "beaconing <seen in console>")
        await b.click("#quarantine")
        await b.wait("document.querySelector('#guest-quarantine').textContent.startsWith('Quarantined: block')")
        text = await b.eval("document.querySelector('#guest-quarantine').textContent")
        assert "by console (alice@127.0.0.1)" in text and "beaconing <seen in console>" in text, text
        rec = await asyncio.to_thread(pvm.wait_audit, lambda r: r.get("kind") == "quarantine" and r["guest"] == "web1")
        assert rec["by"] == "console" and rec["user"] == "alice@127.0.0.1" and rec["profile"] == "block"
        r = await dig(ADMIN_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        assert r.status == "REFUSED" and any(code == 15 for code, _ in r.ede), r.text
        await b.screenshot(shots / "guest-quarantined.png")
        await b.type("#q-reason", "cleaned up")
        await b.click("#release")
        await b.wait("document.querySelector('#guest-quarantine').textContent === 'Not quarantined'")
        rel = await asyncio.to_thread(pvm.wait_audit, lambda r: r.get("kind") == "release" and r["guest"] == "web1")
        assert rel["by"] == "console" and rel["user"] == "alice@127.0.0.1" and "cleaned up" in rel["reason"]
        r = await dig(ADMIN_IP, port, "www.lab.test", "A", "-b", GUEST_IP)
        assert r.status == "NOERROR" and r.answers[0][3] == "192.0.2.10"

        # -- a guest name with HTML in it, on its own page --------------------------------------
        await b.goto(base + "/console/guest?name=" + quote(HTML_GUEST))
        await b.wait(f"document.querySelector('#guest-name').textContent === {json.dumps(HTML_GUEST)}")
        assert await b.eval("document.querySelectorAll('main img, main script, #guest-name *, #guest-quarantine *').length") == 0
        assert "<b>bold</b>" in await b.eval("document.querySelector('#guest-quarantine').textContent")
        await b.goto(base + "/console/guest?name=" + quote("<script>document.title='x'</script>"))
        await b.wait("!!document.querySelector('#guest-error')")
        assert (await b.eval("document.querySelector('#guest-error').textContent")).startswith("no guest named")
        assert await b.eval("document.title") == "proxyvm console: Guest"

        # -- health, logout ---------------------------------------------------------------------
        await b.click("#nav-health")
        await b.wait("[...document.querySelectorAll('#health tr')].some(r => r.innerText.startsWith('dns')"
                     " && r.innerText.includes('ok'))")
        await b.screenshot(shots / "health.png")
        await b.click("#logout")
        await b.wait("location.pathname === '/console/login'")
        assert await b.eval("fetch('/console/api/overview').then(r => r.status)") == 401

        assert b.dialogs() == [], b.dialogs()  # no alert() ever ran
        assert b.console_errors() == [], b.console_errors()
        assert [r["request"]["event"] for r in pvm.audit_records() if r.get("kind") == "console"] == [
            "login_refused", "login", "logout"]
    finally:
        await b.stop()
        await asyncio.to_thread(pvm.stop)
    assert "Traceback" not in pvm.tail(200_000)
