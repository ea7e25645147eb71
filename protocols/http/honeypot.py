"""HTTPS for a guest in `honeypot` quarantine: TLS terminated locally, requests answered by the recorder.

Owns: the honeypot CA (created once in `state_dir/honeypot/`: `ca.key` mode 0600, `ca.pem` the
certificate an investigator may trust in a lab), leaf certificates for the names guests ask for
(one leaf key per process, certificates cached per name), the guest-side TLS context of a honeypot
connection (`ssl_conn`), the TLS facts of such a connection (ClientHello: SNI, ALPN offered;
handshake: version, cipher, ALPN chosen) and what is recorded and audited at the TLS layer (the
handshake, done or refused, and non-TLS bytes after a CONNECT or on the passthrough listener).
Must not: open an upstream connection or resolve a name (a honeypot connection never gets a
validated address, so the addon's `server_connect` refuses any dial), terminate TLS of a guest that
is not in honeypot quarantine, or share anything with the upstream TLS context or mitmproxy's
`confdir` (the honeypot CA signs honeypot leaves and nothing else).

The decrypted requests go through the addon's ordinary honeypot path (`PolicyAddon._quarantined`
and `_honeypot_answer`), which adds `HoneypotConn.facts` to each request's recording and record.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import pwd
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mitmproxy import connection
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import ClientTLSLayer
from mitmproxy.tls import ClientHello
from OpenSSL import SSL

from protocols import quarantine
from protocols.http import core, layers

CA_DIR = "honeypot"  # under state_dir
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
CA_NAME = "proxyvm honeypot CA"
CA_DAYS = 3650
LEAF_DAYS = 30
LEAF_RENEW = dt.timedelta(days=7)  # a cached leaf this close to its end is issued again
MAX_CONTEXTS = 256
RAW_MAX = 64 * 1024  # non-TLS (or non-HTTP inside TLS) bytes recorded at most
ANSWER = "TLS terminated with the honeypot CA, requests answered by the local recorder"
CONNECT_ANSWER = "CONNECT answered 200 by the honeypot (nothing dialled); TLS will be terminated with the honeypot CA"


def ca_paths(state_dir: Path | str) -> tuple[Path, Path]:
    """(key, certificate) of the honeypot CA."""
    d = Path(state_dir) / CA_DIR
    return d / CA_KEY, d / CA_CERT


def _name_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class HoneypotCA:
    """The CA and a bounded cache of server contexts, one per requested name."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())  # memory only, one per process
        self._contexts: OrderedDict[str, tuple[dt.datetime, SSL.Context]] = OrderedDict()

    @classmethod
    def load_or_create(cls, state_dir: Path | str, user: str | None = None) -> HoneypotCA:
        """Load `state_dir/honeypot/ca.{key,pem}`, creating both the first time (key 0600). As root
        with a service `user`, the files are given to that user so a worker restarted after the
        privilege drop can still read them."""
        key_path, cert_path = ca_paths(state_dir)
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # `workers: N` starts N HTTP processes at once: one makes the CA, the others wait and load it
        # (without the lock two of them wrote a key and a certificate of different CAs).
        lock_fd = os.open(key_path.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            key, cert = cls._load_or_make(key_path, cert_path)
        finally:
            os.close(lock_fd)  # releases the lock
        if user and os.getuid() == 0:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                pw = None
            if pw is not None:
                for p in (key_path.parent, key_path, cert_path, key_path.parent / ".lock"):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
        return cls(key, cert)

    @staticmethod
    def _load_or_make(key_path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
                raise ValueError(f"{cert_path} does not match {key_path}; remove both to make a new honeypot CA")
            key_path.chmod(0o600)
        else:
            key, cert = _new_ca()
            pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            quarantine.write_durably(key_path, pem_key)  # 0600 from the start
            quarantine.write_durably(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            cert_path.chmod(0o644)
        return key, cert

    def _leaf(self, name: str, now: dt.datetime) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(self.leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([_name_entry(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def context(self, name: str) -> SSL.Context:
        """A server context presenting a certificate for `name` (leaf + honeypot CA)."""
        now = dt.datetime.now(dt.UTC)
        hit = self._contexts.get(name)
        if hit is not None and hit[0] - now > LEAF_RENEW:
            self._contexts.move_to_end(name)
            return hit[1]
        leaf = self._leaf(name, now)
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        # A honeypot wants to see old clients too: every version and cipher OpenSSL still has.
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.use_certificate(leaf)
        ctx.use_privatekey(self.leaf_key)
        ctx.add_extra_chain_cert(self.cert)
        ctx.set_alpn_select_callback(_select_alpn)
        self._contexts[name] = (leaf.not_valid_after_utc, ctx)
        if len(self._contexts) > MAX_CONTEXTS:
            self._contexts.popitem(last=False)
        return ctx


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "proxyvm quarantine"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    # The guest side speaks HTTP/1 only; a client offering nothing else gets no ALPN.
    for proto in (b"http/1.1", b"http/1.0"):
        if proto in offered:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _text(b: bytes) -> str:
    return b.decode("latin-1")


@dataclass(slots=True)
class HoneypotConn:
    """One guest connection whose TLS the honeypot terminates."""

    entry: dict[str, Any]  # the quarantine entry when the connection began
    name: str  # the certificate's name: SNI, else the CONNECT host, else the address
    connect: str  # "host:port" of the CONNECT, "" on the passthrough listener
    facts: dict[str, Any] = field(default_factory=dict)  # recorded and audited with every request
    handshake_reported: bool = False


Emit = Callable[..., None]  # PolicyAddon._emit_plain(info, protocol, decision, request, **extra)


class Honeypot:
    """The addon's helper for honeypot TLS. `emit` writes an audit record, `recorder` the recording."""

    def __init__(self, recorder: quarantine.Recorder, emit: Emit) -> None:
        self.recorder = recorder
        self.emit = emit
        self.ca: HoneypotCA | None = None

    def load_ca(self, state_dir: Path | str, user: str | None) -> None:
        """At start, before the privilege drop: read (or make, once) the honeypot CA."""
        self.ca = HoneypotCA.load_or_create(state_dir, user)

    @staticmethod
    def inside(context: Any) -> bool:
        """True for the layer below a terminated honeypot TLS connection (only honeypots terminate)."""
        return any(isinstance(x, ClientTLSLayer) for x in context.layers)

    def _decision(self, info: Any, entry: dict[str, Any], answer: str) -> Any:
        return quarantine.decision("http", info.guest, entry, answer)

    def start(self, nl: Any, info: Any, entry: dict[str, Any], data: bytes, hello: ClientHello | None,
              problem: str, connect: str) -> None:
        """The first guest bytes of a CONNECT tunnel or a passthrough connection of a honeypot guest:
        terminate TLS, or record what is not TLS and close."""
        context = nl.context
        sni = core.normalize_host(hello.sni or "") if hello is not None else ""
        request = {"sni": sni or (connect.rpartition(":")[0].strip("[]") if connect else ""), "dst": ""}
        if problem or hello is None:
            self.recorder.record(info.guest, entry, "tls", {
                "src": info.src, "event": "not_tls", "connect": connect, "error": problem or "not TLS",
                "bytes": data[:RAW_MAX], "size": len(data)})
            d = self._decision(info, entry, "no TLS ClientHello: the first bytes recorded, connection closed")
            self.emit(info, "tls", d, request, status=None, quarantine="honeypot", first_bytes=len(data),
                      error=(problem or "not TLS")[:200], **({"connect": connect} if connect else {}))
            nl.layer = layers.Reject(context)
            return
        name = sni or (connect.rpartition(":")[0].strip("[]") if connect else "")
        if not name:
            dst = info.orig_dst or context.client.sockname
            name = str(dst[0]) if dst else "localhost"
        hc = HoneypotConn(entry, name, connect)
        hc.facts = {"sni": sni, "alpn_offered": [_text(p) for p in hello.alpn_protocols]}
        info.honeypot = hc
        if context.server.address is None:  # passthrough: the transparent HTTP layer wants a target
            port = info.orig_dst[1] if info.orig_dst else 443
            context.server.address = (name, port)
        nl.layer = ClientTLSLayer(context)

    def ssl_conn(self, info: Any) -> SSL.Connection | None:
        """The `tls_start_client` answer: our certificate for the name, or None (refuse) when this
        connection is not a honeypot's."""
        hc: HoneypotConn | None = getattr(info, "honeypot", None)
        if hc is None or self.ca is None:
            return None
        conn = SSL.Connection(self.ca.context(hc.name))
        conn.set_accept_state()
        return conn

    def handshake(self, info: Any, client: connection.Client, error: str = "") -> None:
        """The guest's TLS handshake ended: record and audit it (the ClientHello facts always; version,
        cipher and ALPN when it succeeded; the error when the guest refused our certificate)."""
        hc: HoneypotConn | None = getattr(info, "honeypot", None)
        if hc is None or hc.handshake_reported:
            return
        hc.handshake_reported = True
        if not error:
            hc.facts.update({
                "tls_version": client.tls_version, "cipher": client.cipher,
                "alpn": _text(client.alpn) if client.alpn else None,
            })
        rec: dict[str, Any] = {"src": info.src, "event": "handshake" if not error else "handshake_failed",
                               "connect": hc.connect, "certificate_for": hc.name, **hc.facts}
        if error:
            rec["error"] = error[:300]
        self.recorder.record(info.guest, hc.entry, "tls", rec)
        answer = ANSWER if not error else f"the guest refused the honeypot certificate for {hc.name}"
        extra: dict[str, Any] = {"event": "handshake", "tls": dict(hc.facts), "quarantine": "honeypot"}
        if error:
            extra["error"] = error[:200]
        if hc.connect:
            extra["connect"] = hc.connect
        self.emit(info, "tls", self._decision(info, hc.entry, answer),
                  {"sni": hc.facts.get("sni") or hc.name, "dst": ""}, status=None, **extra)

    def decrypted_layer(self, nl: Any, info: Any, data: bytes) -> None:
        """The first decrypted bytes: HTTP goes to our HTTP layer (the addon answers every request
        from the recorder); anything else is recorded (bounded) and the connection closed."""
        verdict = core.looks_like_http(data)
        if verdict is None and len(data) < RAW_MAX:
            return  # wait for more (the idle timeout bounds the wait)
        if verdict:
            nl.layer = layers.GuestHttpLayer(nl.context, HTTPMode.transparent)
            return
        hc: HoneypotConn = info.honeypot
        self.recorder.record(info.guest, hc.entry, "tls", {
            "src": info.src, "event": "not_http", "connect": hc.connect, **hc.facts,
            "bytes": data[:RAW_MAX], "size": len(data)})
        d = self._decision(info, hc.entry, "non-HTTP bytes inside TLS: recorded, connection closed")
        self.emit(info, "tls", d, {"sni": hc.facts.get("sni") or hc.name, "dst": ""}, status=None,
                  quarantine="honeypot", tls=dict(hc.facts), first_bytes=len(data))
        nl.layer = layers.Reject(nl.context)
