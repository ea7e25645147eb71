"""A real Postfix instance for test labs: STARTTLS MX/relay delivering into a Maildir the test reads.

`PostfixLab(tmpdir, address, port, cert=..., key=...)` writes its own main.cf/master.cf under
tmpdir, runs `postfix -c DIR start` (its own queue, its own log file), and stops the master by pid.
Optional: SASL users (AUTH PLAIN/LOGIN over TLS only, cyrus sasldb), and relay mode (everything
forwarded with `smtp_tls_security_level = verify` to another host — the benchmark's peer).
Never used outside tests; binds only the address it is given.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.labs.proc import daemon_from_pidfile, wait_port

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"


def available() -> str:
    """"" when Postfix can run here, else the reason to skip."""
    if not os.path.exists(POSTFIX):
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "postfix labs need root (CI runs as root)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user"
    return ""


_MASTER_CF = """\
{listen} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
virtual   unix - n n - - virtual
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixLab:
    def __init__(
        self,
        directory: Path | str,
        address: str,
        port: int = 25,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        hostname: str = "mx.lab.test",
        domains: Sequence[str] = ("example.org", "lab.test"),
        sasl_users: dict[str, str] | None = None,
        relay_to: str | None = None,  # "[ip]:port": relay everything there with TLS verify
        relay_name: str | None = None,  # the name that relay's certificate must carry
        relay_ca: Path | None = None,
        connection_reuse: bool = False,
        smtps_port: int | None = None,  # also listen with implicit TLS (RFC 8314) on this port
        sasl_mechs: str = "PLAIN LOGIN",
        extra: dict[str, str] | None = None,
        netns: str | None = None,  # run inside this (existing) network namespace (gateway/e2e lab)
    ):
        self.dir = Path(directory)
        self.netns = netns
        self.address = address
        self.port = port
        self.cert, self.key = cert, key
        self.hostname = hostname
        self.domains = list(domains)
        self.sasl_users = sasl_users or {}
        self.relay_to, self.relay_name, self.relay_ca = relay_to, relay_name, relay_ca
        self.connection_reuse = connection_reuse
        self.smtps_port = smtps_port
        self.sasl_mechs = sasl_mechs
        self.extra = extra or {}
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.mail = self.dir / "mail"
        self.maildir = self.mail / "Maildir"  # every recipient lands here (static map)
        self.log = self.dir / "maillog"
        self.pid: int | None = None

    # -- config ---------------------------------------------------------------------------
    def _main_cf(self) -> str:
        pw = pwd.getpwnam("postfix")
        d = self.dir
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(d / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": "lab.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            # "all": postfix refuses addresses not configured on an interface (127.0.5.x is only
            # routed by lo's 127/8); master.cf binds the one address explicitly.
            "inet_interfaces": "all",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "message_size_limit": "50000000",
            "smtputf8_enable": "yes",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.dir),
            "smtpd_banner": "$myhostname ESMTP lab",
            "smtp_host_lookup": "native",
            "disable_dns_lookups": "yes",
            "default_process_limit": "100",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "in_flow_delay": "0",
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
        }
        if self.relay_to:
            lines.update({
                "relayhost": self.relay_to,
                "relay_domains": ", ".join(self.domains),
                "smtp_tls_security_level": "verify",
                "smtp_tls_CAfile": str(self.relay_ca or ""),
                "smtp_tls_policy_maps": f"texthash:{self.conf / 'tls_policy'}",
                "smtp_tls_connection_reuse": "yes" if self.connection_reuse else "no",
                "smtp_tls_loglevel": "1",
                "default_destination_concurrency_limit": "20",
            })
        else:
            lines.update({
                "virtual_mailbox_domains": ", ".join(self.domains),
                "virtual_mailbox_base": str(self.mail),
                "virtual_mailbox_maps": "static:Maildir/",
                "virtual_uid_maps": f"static:{pw.pw_uid}",
                "virtual_gid_maps": f"static:{pw.pw_gid}",
                "virtual_minimum_uid": "1",
                "virtual_destination_concurrency_limit": "50",
            })
        if self.cert and self.key:
            lines.update({
                "smtpd_tls_cert_file": str(self.cert),
                "smtpd_tls_key_file": str(self.key),
                "smtpd_tls_security_level": "may",
                "smtpd_tls_received_header": "yes",
                "smtpd_tls_loglevel": "1",
            })
        if self.sasl_users:
            lines.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "cyrus",
                # Debian's build reads $config_directory/sasl/smtpd.conf whatever this says
                "cyrus_sasl_config_path": str(self.conf / "sasl"),
                "smtpd_sasl_path": "smtpd",
                "smtpd_tls_auth_only": "yes",
                "smtpd_sasl_local_domain": "lab.test",
            })
        lines.update(self.extra)
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def write_config(self) -> None:
        pw = pwd.getpwnam("postfix")
        for p in (self.conf, self.queue, self.dir / "data", self.mail):
            p.mkdir(parents=True, exist_ok=True)
        os.chown(self.dir / "data", pw.pw_uid, pw.pw_gid)
        os.chown(self.mail, pw.pw_uid, pw.pw_gid)
        for p in (self.dir, self.conf):
            p.chmod(0o755)
        # pytest's tmp dirs are 0700: postfix's unprivileged daemons must be able to traverse them
        for parent in self.dir.resolve().parents:
            if str(parent) in ("/", "/tmp") or not str(parent).startswith("/tmp/"):
                continue
            st = parent.stat()
            if st.st_uid == os.geteuid() and not st.st_mode & 0o001:
                parent.chmod(st.st_mode | 0o011)
        (self.conf / "main.cf").write_text(self._main_cf())
        master = _MASTER_CF.format(listen=f"{self.address}:{self.port}")
        if self.smtps_port:
            master += f"{self.address}:{self.smtps_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes\n"
        (self.conf / "master.cf").write_text(master)
        if self.relay_to:
            name = self.relay_name or self.relay_to
            (self.conf / "tls_policy").write_text(f"{self.relay_to} verify match={name}\n")
        if self.cert and self.key:
            for p in (self.cert, self.key):
                os.chmod(p, 0o644 if p == self.cert else 0o600)
        if self.sasl_users:
            sasl = self.conf / "sasl"
            sasl.mkdir(exist_ok=True)
            db = self.dir / "sasldb2"
            (sasl / "smtpd.conf").write_text(
                f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: {self.sasl_mechs}\nsasldb_path: {db}\n")
            for user, password in self.sasl_users.items():
                subprocess.run(["saslpasswd2", "-p", "-c", "-f", str(db), "-u", "lab.test", user],
                               input=password.encode(), check=True)
            os.chown(db, pw.pw_uid, pw.pw_gid)
            db.chmod(0o600)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> PostfixLab:
        self.write_config()
        env = dict(os.environ, MAIL_CONFIG=str(self.conf))
        # postfix logs its own fatal errors only to syslog; `script` gives it a tty to print them on
        ns = f"ip netns exec {self.netns} " if self.netns else ""
        r = subprocess.run(["script", "-qec", f"{ns}{POSTFIX} -c {self.conf} start", "/dev/null"], env=env,
                           capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}{self.tail()}")
        self.pid = daemon_from_pidfile(self.queue / "pid" / "master.pid")
        if self.netns is None:
            wait_port(self.address, self.port, timeout=20)
        else:
            probe = f"import socket; socket.create_connection(('{self.address}', {self.port}), timeout=1).close()"
            deadline = time.monotonic() + 20
            while subprocess.run(["ip", "netns", "exec", self.netns, "python3", "-c", probe],
                                 capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postfix not listening on {self.address}:{self.port} in {self.netns}")
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> PostfixLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading --------------------------------------------------------------------------
    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def message_files(self) -> list[Path]:
        new = self.maildir / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in self.message_files()]

    def wait_for(self, predicate, timeout: float = 20.0) -> list[bytes]:
        """Wait until `predicate(messages)` is truthy; returns the messages."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if predicate(msgs):
                return msgs
            if time.monotonic() > deadline:
                raise TimeoutError(f"postfix lab: condition not met after {timeout}s; log:\n{self.tail()}")
            time.sleep(0.1)

    def find(self, needle: bytes, timeout: float = 20.0) -> bytes:
        msgs = self.wait_for(lambda ms: any(needle in m for m in ms), timeout)
        return next(m for m in msgs if needle in m)
