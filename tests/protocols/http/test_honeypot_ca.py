"""The honeypot CA (protocols/http/honeypot.py) without a lab: made once (key 0600), loaded again
unchanged, refused when key and certificate disagree; its leaf for a name (DNS or IP) verifies in
Python's own TLS client trusting only `ca.pem`, and fails for a client that does not trust it; a
connection that is not a honeypot's never gets a server context."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest
from OpenSSL import SSL

from protocols import quarantine
from protocols.http import honeypot


def handshake(server: SSL.Connection, client: ssl.SSLObject, cin: ssl.MemoryBIO, cout: ssl.MemoryBIO) -> None:
    """Drive an in-memory handshake between our server connection and Python's client."""
    for _ in range(20):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        data = cout.read()
        if data:
            server.bio_write(data)
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            while out := server.bio_read(65536):
                cin.write(out)
        except SSL.WantReadError:
            pass
        if done:
            return
    raise AssertionError("handshake did not finish")


def client_for(name: str, cafile: Path | None) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(cin, cout, server_hostname=name), cin, cout


def test_made_once_and_reloaded(tmp_path: Path) -> None:
    ca = honeypot.HoneypotCA.load_or_create(tmp_path)
    key, cert = honeypot.ca_paths(tmp_path)
    assert key.stat().st_mode & 0o777 == 0o600 and cert.stat().st_mode & 0o777 == 0o644
    assert b"PRIVATE KEY" not in cert.read_bytes()
    again = honeypot.HoneypotCA.load_or_create(tmp_path)
    assert again.cert == ca.cert and again.key.private_numbers() == ca.key.private_numbers()
    key.chmod(0o644)
    honeypot.HoneypotCA.load_or_create(tmp_path)
    assert key.stat().st_mode & 0o777 == 0o600  # put back to 0600


def test_mismatch_refused(tmp_path: Path) -> None:
    honeypot.HoneypotCA.load_or_create(tmp_path / "a")
    honeypot.HoneypotCA.load_or_create(tmp_path / "b")
    key_a, _ = honeypot.ca_paths(tmp_path / "a")
    key_b, _ = honeypot.ca_paths(tmp_path / "b")
    key_a.write_bytes(key_b.read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        honeypot.HoneypotCA.load_or_create(tmp_path / "a")


@pytest.mark.parametrize("name", ["api.example.test", "192.0.2.7"])
def test_leaf_verifies_against_ca_pem(tmp_path: Path, name: str) -> None:
    ca = honeypot.HoneypotCA.load_or_create(tmp_path)
    server = SSL.Connection(ca.context(name))
    server.set_accept_state()
    client, cin, cout = client_for(name, honeypot.ca_paths(tmp_path)[1])
    handshake(server, client, cin, cout)
    assert client.selected_alpn_protocol() == "http/1.1"
    assert client.getpeercert()["subject"] == ((("commonName", name),),)
    assert ca.context(name) is ca.context(name)  # cached per name


def test_untrusting_client_fails(tmp_path: Path) -> None:
    ca = honeypot.HoneypotCA.load_or_create(tmp_path)
    server = SSL.Connection(ca.context("www.example.test"))
    server.set_accept_state()
    client, cin, cout = client_for("www.example.test", None)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client, cin, cout)


def test_only_honeypot_connections_get_a_context(tmp_path: Path) -> None:
    hp = honeypot.Honeypot(quarantine.Recorder(tmp_path), lambda *a, **k: None)
    hp.load_ca(tmp_path, None)
    assert hp.ssl_conn(SimpleNamespace(honeypot=None)) is None
    conn = hp.ssl_conn(SimpleNamespace(honeypot=honeypot.HoneypotConn({"profile": "honeypot"}, "a.test", "")))
    assert isinstance(conn, SSL.Connection)


def _make_ca_in_child(state_dir: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    ca = honeypot.HoneypotCA.load_or_create(state_dir)
    return ca.cert.public_bytes(serialization.Encoding.PEM)


def test_workers_starting_together_agree_on_one_ca(tmp_path: Path) -> None:
    """`workers: N` starts N HTTP processes at once: all of them end up with the same CA, and the
    key on disk belongs to the certificate on disk (without the lock, two made different halves)."""
    import multiprocessing

    for round_ in range(3):
        state = tmp_path / f"s{round_}"
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(6) as pool:
            pems = pool.map(_make_ca_in_child, [str(state)] * 6)
        assert len(set(pems)) == 1
        again = honeypot.HoneypotCA.load_or_create(state)  # raises if key and certificate disagree
        assert _make_ca_in_child(str(state)) == pems[0] and again.key is not None
