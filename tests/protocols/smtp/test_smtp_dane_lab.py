"""DANE through the real chain: signed zones (nsd) → Unbound over DoT → our own DNSSEC-validating
resolver (protocols.dns.resolver) → MX/TLSA decisions → STARTTLS to the real Postfix MX."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from types import SimpleNamespace

import pytest

from policy.source import parse_yaml
from protocols.dns.settings import parse as parse_dns
from tests.protocols.smtp import maildns_lab
from tests.protocols.smtp.conftest import MX_IP, relay_settings, swaks
from tests.protocols.smtp.test_smtp_dane_mtasts import spki_sha256

pytestmark = pytest.mark.lab
ALLOW = "mode: enforce\ndefault: allow\nrules: []\n"


@pytest.fixture(scope="module")
def maildns(lab_dir, lab_ca, mx_cert):
    if maildns_lab.missing():
        pytest.skip(f"missing {', '.join(maildns_lab.missing())}")
    lab = maildns_lab.MailDNSLab(lab_dir / "maildns", lab_ca, MX_IP, spki_sha256(mx_cert[0])).start()
    yield lab
    lab.stop()


def config_for(lab, tmp_path):
    node = parse_yaml(lab.dns_yaml(), str(tmp_path / "dns.yaml"), tmp_path)
    return SimpleNamespace(dns=parse_dns(node.get_map()["dns"], tmp_path))


async def run_to(start_service, tmp_path, lab, ca, domain):
    s = replace(relay_settings(tmp_path / "spool", ca), relay=None, tls="dane")
    run = await start_service(s, rules=ALLOW, config=config_for(lab, tmp_path))
    tag = f"{domain} {secrets.token_hex(4)}"
    rc, out = await swaks(run.server, "--from", "a@example.org", "--to", f"user@{domain}", "--header", f"Subject: {tag}")
    assert rc == 0 and "queued as" in out, out
    return run, tag


async def test_dane_ee_from_signed_zone_delivered(postfix_mx, maildns, tmp_path, start_service):
    run, tag = await run_to(start_service, tmp_path, maildns, None, "dane.smtplab")  # no CA: only DANE can pass
    await asyncio.to_thread(postfix_mx.find, tag.encode())
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["verified_by"] == "dane-ee" and att[0]["upstream"]["peer"] == "mx.dane.smtplab"


async def test_dane_mismatch_from_signed_zone_deferred(postfix_mx, maildns, lab_ca, tmp_path, start_service):
    run, _ = await run_to(start_service, tmp_path, maildns, lab_ca.ca_pem, "bad.smtplab")
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "DANE" in att[0]["alarm"] and "mx.bad.smtplab" in att[0]["alarm"]
    assert len(run.spool_ids()) == 1


async def test_securely_absent_tlsa_uses_ca_verification(postfix_mx, maildns, lab_ca, tmp_path, start_service):
    run, tag = await run_to(start_service, tmp_path, maildns, lab_ca.ca_pem, "plain.smtplab")
    await asyncio.to_thread(postfix_mx.find, tag.encode())
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["verified_by"] == "ca"


async def test_bogus_tlsa_signature_defers(postfix_mx, maildns, lab_ca, tmp_path, start_service):
    run, _ = await run_to(start_service, tmp_path, maildns, lab_ca.ca_pem, "forged.smtplab")
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "TLSA lookup" in att[0]["reply"] and "bogus" in att[0]["reply"]
    assert len(run.spool_ids()) == 1
