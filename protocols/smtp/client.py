"""An asyncio SMTP client session that is encrypted and authenticated before any envelope is sent.

Owns: one outbound connection — greeting, EHLO, STARTTLS (or implicit TLS), the certificate check
(a CA-verifying context, or a post-handshake check such as DANE), the second EHLO, AUTH PLAIN/LOGIN,
and transactions (MAIL, RCPT with pipelining, DATA with dot-stuffing, RSET, QUIT).
Must not: send MAIL/RCPT/DATA or AUTH on a connection that is not TLS-protected and verified; log or
raise anything containing the password; block the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocols.addr import hostport
from protocols.smtp.settings import RelayAuth

MAX_REPLY_LINES = 100


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency. Spooled messages have CRLF line ends only (bare CR/LF are
    refused at DATA; our DSNs are built with CRLF), so a plain replace is exact."""
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..")


class DeliveryError(Exception):
    """An attempt failed before the peer judged the transaction. `alarm` marks security failures
    (STARTTLS missing, TLS handshake or certificate verification failed)."""

    def __init__(self, message: str, *, alarm: str = "", permanent: bool = False):
        super().__init__(message)
        self.alarm = alarm
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.code} " + " / ".join(self.lines)[:400]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True, slots=True)
class TLSInfo:
    version: str
    cipher: str
    verified_by: str  # "ca" | "dane-ee" | "dane-ta" | "mta-sts"


# A post-handshake check: given the peer's chain (DER, leaf first) return how it was verified
# ("dane-ee"...) or raise. None means the SSLContext itself verified chain and name ("ca").
PostVerify = Callable[[list[bytes]], str]


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the peer sent, leaf first (DER). Python 3.11 exposes this only privately."""
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [c.public_bytes(2) for c in chain]  # 2 == _ssl.ENCODING_DER
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


class Session:
    """One verified SMTP session to a peer. Create with `await Session.open(...)`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, address: str,
                 reply_timeout: float):
        self.reader = reader
        self.writer = writer
        self.peer = peer  # the verified name
        self.address = address  # "ip:port"
        self.reply_timeout = reply_timeout
        self.extensions: dict[str, str] = {}
        self.tls: TLSInfo | None = None
        self.messages = 0
        self.broken = False

    # -- low level ------------------------------------------------------------------------
    async def read_reply(self, timeout: float | None = None) -> Reply:
        lines: list[str] = []
        code = 0
        async def _read() -> Reply:
            nonlocal code
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise DeliveryError(f"{self.peer} [{self.address}] closed the connection")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if len(line) < 3 or not line[:3].isdigit():
                    raise DeliveryError(f"{self.peer} [{self.address}] sent a malformed reply")
                code = int(line[:3])
                lines.append(line[4:])
                if len(line) == 3 or line[3] == " ":
                    return Reply(code, tuple(lines))
                if len(lines) > MAX_REPLY_LINES:
                    raise DeliveryError(f"{self.peer} [{self.address}] sent an endless reply")
        try:
            async with asyncio.timeout(timeout or self.reply_timeout):  # no extra task per reply
                return await _read()
        except TimeoutError:
            self.broken = True
            raise DeliveryError(f"{self.peer} [{self.address}] did not reply in time") from None
        except (OSError, ValueError, asyncio.LimitOverrunError) as e:
            self.broken = True
            raise DeliveryError(f"{self.peer} [{self.address}]: {type(e).__name__}") from None

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (OSError, RuntimeError) as e:
            self.broken = True
            raise DeliveryError(f"{self.peer} [{self.address}]: connection lost ({type(e).__name__})") from None

    async def command(self, line: str) -> Reply:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def ehlo(self, name: str) -> Reply:
        r = await self.command(f"EHLO {name}")
        if r.code != 250:
            raise DeliveryError(f"{self.peer} [{self.address}] refused EHLO: {r.text}", permanent=False)
        ext: dict[str, str] = {}
        for ln in r.lines[1:]:
            key, _, val = ln.partition(" ")
            ext[key.upper()] = val
        self.extensions = ext
        return r

    # -- opening --------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        *,
        ip: str,
        port: int,
        server_name: str,
        context: ssl.SSLContext,
        implicit_tls: bool,
        post_verify: PostVerify | None,
        ehlo_name: str,
        connect_timeout: float,
        reply_timeout: float,
        auth: RelayAuth | None = None,
    ) -> Session:
        address = hostport(ip, port)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(ip, port, ssl=context if implicit_tls else None,
                                        server_hostname=server_name if implicit_tls else None,
                                        ssl_handshake_timeout=connect_timeout if implicit_tls else None),
                connect_timeout,
            )
        except ssl.SSLError as e:
            raise DeliveryError(f"TLS with {server_name} [{address}] failed: {_ssl_reason(e)}",
                                alarm=f"TLS handshake or certificate verification failed with {server_name} [{address}]") from None
        except (OSError, TimeoutError) as e:
            raise DeliveryError(f"cannot connect to {server_name} [{address}]: {_os_reason(e)}") from None
        s = cls(reader, writer, server_name, address, reply_timeout)
        try:
            greeting = await s.read_reply(connect_timeout)
            if greeting.code != 220:
                raise DeliveryError(f"{server_name} [{address}] greeted with {greeting.text}")
            await s.ehlo(ehlo_name)
            if not implicit_tls:
                if "STARTTLS" not in s.extensions:
                    raise DeliveryError(
                        f"{server_name} [{address}] did not offer STARTTLS; not sending in plaintext",
                        alarm=f"STARTTLS not offered by {server_name} [{address}] (stripped?)")
                r = await s.command("STARTTLS")
                if r.code != 220:
                    raise DeliveryError(f"{server_name} [{address}] refused STARTTLS: {r.text}",
                                        alarm=f"STARTTLS refused by {server_name} [{address}]")
                try:
                    await asyncio.wait_for(
                        writer.start_tls(context, server_hostname=server_name, ssl_handshake_timeout=connect_timeout),
                        connect_timeout + 1)
                except (ssl.SSLError, ssl.CertificateError) as e:
                    s.broken = True
                    raise DeliveryError(f"TLS with {server_name} [{address}] failed: {_ssl_reason(e)}",
                                        alarm=f"TLS handshake or certificate verification failed with {server_name} [{address}]") from None
                except (OSError, TimeoutError, ConnectionError) as e:
                    s.broken = True
                    raise DeliveryError(f"TLS with {server_name} [{address}] failed: {_os_reason(e)}",
                                        alarm=f"TLS handshake failed with {server_name} [{address}]") from None
            sslobj = writer.get_extra_info("ssl_object")
            if sslobj is None:  # defensive: never continue without TLS
                raise DeliveryError(f"no TLS with {server_name} [{address}]", alarm=f"no TLS with {server_name}")
            verified_by = "ca"
            if post_verify is not None:
                try:
                    verified_by = post_verify(peer_chain(sslobj))
                except Exception as e:
                    raise DeliveryError(f"certificate of {server_name} [{address}] rejected: {e}",
                                        alarm=f"certificate verification failed for {server_name} [{address}]: {e}") from None
            cipher = sslobj.cipher()
            s.tls = TLSInfo(sslobj.version() or "", cipher[0] if cipher else "", verified_by)
            if not implicit_tls:
                await s.ehlo(ehlo_name)  # RFC 3207 §4.2: forget what was said in the clear
            if auth is not None:
                await s._auth(auth)
        except BaseException:
            s.abort()
            raise
        return s

    async def _auth(self, auth: RelayAuth) -> None:
        mechs = set(self.extensions.get("AUTH", "").upper().split())
        user, pw = auth.username, auth.password.reveal()
        if "PLAIN" in mechs:
            token = base64.b64encode(f"\0{user}\0{pw}".encode()).decode()
            r = await self.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechs:
            r = await self.command("AUTH LOGIN")
            if r.code == 334:
                r = await self.command(base64.b64encode(user.encode()).decode())
            if r.code == 334:
                r = await self.command(base64.b64encode(pw.encode()).decode())
        else:
            raise DeliveryError(f"{self.peer} offers no AUTH PLAIN/LOGIN after STARTTLS")
        del pw
        if r.code != 235:
            # The reply text is the peer's; it cannot contain our password (we never echo it).
            raise DeliveryError(f"{self.peer} rejected our credentials: {r.code}",
                                alarm=f"relay {self.peer} rejected AUTH for user {user}")

    # -- transactions ---------------------------------------------------------------------
    async def transaction(
        self, mail_from: str, rcpts: Sequence[str], message: bytes, *, body_8bit: bool, smtputf8: bool
    ) -> tuple[Reply, dict[str, Reply], Reply | None]:
        """Send one message. Returns (MAIL reply, RCPT reply per recipient, DATA reply or None when
        no recipient was accepted). Raises DeliveryError when the connection breaks."""
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={len(message)}"
        if body_8bit and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if smtputf8:
            if "SMTPUTF8" not in self.extensions:
                return Reply(553, ("5.6.7 peer does not support SMTPUTF8",)), {}, None
            params += " SMTPUTF8"
        lines = [f"MAIL FROM:<{mail_from}>{params}"] + [f"RCPT TO:<{r}>" for r in rcpts]
        replies: list[Reply] = []
        data_reply: Reply | None = None
        if "PIPELINING" in self.extensions:
            # RFC 2920: DATA may close the group; a server answers it 503/554 when no RCPT succeeded
            await self.send(("\r\n".join([*lines, "DATA"]) + "\r\n").encode("utf-8"))
            for _ in lines:
                replies.append(await self.read_reply())
            data_reply = await self.read_reply()
        else:
            for ln in lines:
                replies.append(await self.command(ln))
                if len(replies) == 1 and not replies[0].ok:
                    break
        mail_reply = replies[0]
        if not mail_reply.ok:
            if data_reply is not None and data_reply.code == 354:
                self.abort()
            else:
                await self._rset()
            return mail_reply, {}, None
        rcpt_replies = dict(zip(rcpts, replies[1:], strict=True))
        if not any(r.ok for r in rcpt_replies.values()):
            if data_reply is not None and data_reply.code == 354:
                self.abort()  # a peer that opened DATA with no recipient: send nothing, drop it
            else:
                await self._rset()
            return mail_reply, rcpt_replies, None
        r = data_reply if data_reply is not None else await self.command("DATA")
        if r.code != 354:
            await self._rset()
            return mail_reply, rcpt_replies, r
        body = dot_stuff(message)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        await self.send(body + b".\r\n")
        final = await self.read_reply(max(self.reply_timeout, 60.0))
        self.messages += 1
        return mail_reply, rcpt_replies, final

    async def _rset(self) -> None:
        try:
            r = await self.command("RSET")
            if r.code != 250:
                self.broken = True
        except DeliveryError:
            self.broken = True

    async def quit(self) -> None:
        try:
            if not self.broken:
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self.reader.read(512), 2.0)
        except (OSError, TimeoutError, RuntimeError, ssl.SSLError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        self.broken = True
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


def _ssl_reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    return getattr(e, "reason", None) or type(e).__name__


def _os_reason(e: Exception) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return getattr(e, "strerror", None) or type(e).__name__
