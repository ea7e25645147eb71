"""DANE (RFC 7672) and MTA-STS (RFC 8461) delivery to the real Postfix MX.

STAND-IN RESOLVER: these tests give the service a `StaticResolver` with fixed answers and fixed
DNSSEC statuses ("secure"/"insecure") to reach cases the signed-zone lab of test_smtp_dane_lab.py
does not build (DANE-TA, a DANE-matched certificate from an untrusted CA, MTA-STS domains). The real
chain — signed zones, DoT, our validator — is exercised there for DANE-EE match, mismatch, securely
absent TLSA and a bogus TLSA signature. Everything else here is real: Postfix with STARTTLS, the TLS
handshakes and certificate chains, and (MTA-STS) a real nginx serving the policy over verified HTTPS.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocols.smtp.resolver import Answer, StaticResolver, TLSARecord
from tests.labs.proc import Daemon, wait_port
from tests.protocols.smtp.conftest import MX_IP, UNTRUSTED_IP, relay_settings, swaks

pytestmark = pytest.mark.lab
ALLOW = "mode: enforce\ndefault: allow\nrules: []\n"
STS_IP = "127.0.5.30"


def spki_sha256(cert_pem: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def cert_sha256(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def mx_resolver(tlsa: tuple = (), tlsa_status: str = "secure", mx_ip: str = MX_IP, extra=None) -> StaticResolver:
    table = {
        ("mx", "example.org"): Answer(((10, "mx.lab.test"),), status="secure"),
        ("address", "mx.lab.test"): Answer((mx_ip,), status="secure"),
        ("tlsa", "_25._tcp.mx.lab.test"): Answer(tlsa, status=tlsa_status, rcode="NOERROR" if tlsa else "NXDOMAIN"),
    }
    table.update(extra or {})
    return StaticResolver(table)


def mx_settings(tmp_path, ca, tls):
    return replace(relay_settings(tmp_path / "spool", ca), relay=None, tls=tls)


async def send(run, tag):
    rc, out = await swaks(run.server, "--from", "a@example.org", "--to", "user@example.org",
                          "--header", f"Subject: {tag}")
    assert rc == 0 and "queued as" in out, out


async def test_dane_ee_match_delivered(postfix_mx, mx_cert, lab_ca, tmp_path, start_service):
    rec = TLSARecord(3, 1, 1, spki_sha256(mx_cert[0]))
    # no ca_file: the lab CA is NOT trusted, so only DANE can authenticate this peer
    run = await start_service(mx_settings(tmp_path, None, "dane"), resolver=mx_resolver((rec,)), rules=ALLOW)
    tag = f"dane-ee {secrets.token_hex(4)}"
    await send(run, tag)
    await asyncio.to_thread(postfix_mx.find, tag.encode())
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["verified_by"] == "dane-ee"


async def test_dane_ta_match_delivered(postfix_mx, lab_ca, tmp_path, start_service):
    rec = TLSARecord(2, 0, 1, cert_sha256(lab_ca.cert))  # the lab CA as trust anchor (2 0 1)
    run = await start_service(mx_settings(tmp_path, None, "dane"), resolver=mx_resolver((rec,)), rules=ALLOW)
    tag = f"dane-ta {secrets.token_hex(4)}"
    await send(run, tag)
    await asyncio.to_thread(postfix_mx.find, tag.encode())
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["verified_by"] == "dane-ta"


async def test_dane_mismatch_deferred_no_fallback(postfix_mx, lab_ca, tmp_path, start_service):
    rec = TLSARecord(3, 1, 1, b"\x00" * 32)
    # the CA would verify this peer: secure TLSA present means it must match, no fallback to CA
    run = await start_service(mx_settings(tmp_path, lab_ca.ca_pem, "dane"), resolver=mx_resolver((rec,)),
                              rules=ALLOW)
    await send(run, "dane-mismatch")
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "DANE" in att[0]["alarm"] and "mx.lab.test" in att[0]["alarm"]
    assert len(run.spool_ids()) == 1


async def test_dane_untrusted_cert_matched_by_tlsa(postfix_untrusted, tmp_path, start_service):
    cert = Path(postfix_untrusted.cert)
    rec = TLSARecord(3, 1, 1, spki_sha256(cert))
    run = await start_service(mx_settings(tmp_path, None, "dane"), resolver=mx_resolver((rec,), mx_ip=UNTRUSTED_IP),
                              rules=ALLOW)
    tag = f"dane-untrusted {secrets.token_hex(4)}"
    await send(run, tag)
    await asyncio.to_thread(postfix_untrusted.find, tag.encode())
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["verified_by"] == "dane-ee"


async def test_insecure_tlsa_ignored_falls_back_to_verify(postfix_mx, lab_ca, tmp_path, start_service):
    rec = TLSARecord(3, 1, 1, b"\x00" * 32)  # unsigned: not proof of anything
    run = await start_service(mx_settings(tmp_path, lab_ca.ca_pem, "dane"),
                              resolver=mx_resolver((rec,), tlsa_status="insecure"), rules=ALLOW)
    tag = f"dane-insecure {secrets.token_hex(4)}"
    await send(run, tag)
    await asyncio.to_thread(postfix_mx.find, tag.encode())
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["verified_by"] == "ca"


async def test_bogus_tlsa_defers(postfix_mx, lab_ca, tmp_path, start_service):
    run = await start_service(mx_settings(tmp_path, lab_ca.ca_pem, "dane"),
                              resolver=mx_resolver(extra={("tlsa", "_25._tcp.mx.lab.test"):
                                                          Answer(rcode="SERVFAIL", status="bogus")}),
                              rules=ALLOW)
    await send(run, "dane-bogus")
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "TLSA lookup" in att[0]["reply"]


# -- MTA-STS ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sts_server(lab_dir, lab_ca):
    """A real nginx on 127.0.5.30:443 serving two domains' policies over TLS (lab CA)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    d = lab_dir / "sts-nginx"
    (d / "good" / ".well-known").mkdir(parents=True)
    (d / "bad" / ".well-known").mkdir(parents=True)
    (d / "good" / ".well-known" / "mta-sts.txt").write_text(
        "version: STSv1\nmode: enforce\nmx: *.lab.test\nmax_age: 86400\n")
    (d / "bad" / ".well-known" / "mta-sts.txt").write_text(
        "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: 86400\n")
    cert, key = lab_ca.issue(["mta-sts.example.org", "mta-sts.strict.example"], stem="sts")
    (d / "nginx.conf").write_text(f"""
daemon off; master_process off; worker_processes 1; user root;
pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log; types {{ text/plain txt; }} default_type application/octet-stream;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ listen {STS_IP}:443 ssl; server_name mta-sts.example.org;
           ssl_certificate {cert}; ssl_certificate_key {key}; root {d}/good; }}
  server {{ listen {STS_IP}:443 ssl; server_name mta-sts.strict.example;
           ssl_certificate {cert}; ssl_certificate_key {key}; root {d}/bad; }}
}}
""")
    (d / "tmp").mkdir()
    with Daemon([nginx, "-c", str(d / "nginx.conf"), "-p", str(d)], ready=lambda: wait_port(STS_IP, 443, timeout=0.2)
                or True, log=d / "nginx.out"):
        yield d


def sts_resolver() -> StaticResolver:
    return StaticResolver({
        ("mx", "example.org"): Answer(((10, "mx.lab.test"),)),
        ("mx", "strict.example"): Answer(((10, "mx.lab.test"),)),
        ("address", "mx.lab.test"): Answer((MX_IP,)),
        ("txt", "_mta-sts.example.org"): Answer(("v=STSv1; id=20261127a;",)),
        ("txt", "_mta-sts.strict.example"): Answer(("v=STSv1; id=1;",)),
        ("address", "mta-sts.example.org"): Answer((STS_IP,)),
        ("address", "mta-sts.strict.example"): Answer((STS_IP,)),
    })


async def test_mta_sts_enforce_allows_matching_mx(postfix_mx, lab_ca, sts_server, tmp_path, start_service):
    run = await start_service(mx_settings(tmp_path, lab_ca.ca_pem, "mta-sts"), resolver=sts_resolver(), rules=ALLOW)
    tag = f"sts-ok {secrets.token_hex(4)}"
    await send(run, tag)
    await asyncio.to_thread(postfix_mx.find, tag.encode())
    att = await run.wait_records(event="attempt", outcome="delivered")
    assert att[0]["upstream"]["verified_by"] == "mta-sts"
    assert "GET /.well-known/mta-sts.txt" in (sts_server / "access.log").read_text()
    cached = tmp_path / "state" / "mta-sts" / "example.org.json"
    assert cached.exists() and '"mode": "enforce"' in cached.read_text()


async def test_mta_sts_enforce_refuses_unlisted_mx(postfix_mx, lab_ca, sts_server, tmp_path, start_service):
    run = await start_service(mx_settings(tmp_path, lab_ca.ca_pem, "mta-sts"), resolver=sts_resolver(), rules=ALLOW)
    rc, out = await swaks(run.server, "--from", "a@example.org", "--to", "u@strict.example")
    assert rc == 0, out
    att = await run.wait_records(event="attempt", outcome="deferred")
    assert "not allowed by the MTA-STS policy" in att[0]["reply"]
    assert len(run.spool_ids()) == 1
