"""The `smtp:` section parser: defaults, every key, located errors, secrets redacted."""

from __future__ import annotations

import textwrap

import pytest

from policy.source import SourceError, parse_yaml
from protocols.smtp.settings import SMTPSettings, parse


def load(tmp_path, text):
    node = parse_yaml(textwrap.dedent(text), str(tmp_path / "proxyvm.yaml"), tmp_path)
    return parse(node.get_map()["smtp"], tmp_path)


def test_full_section(tmp_path):
    (tmp_path / "smtp.pass").write_text("hunter2-secret\n")
    (tmp_path / "ca.pem").write_text("x")
    s = load(tmp_path, """
        smtp:
          listen: ["198.18.0.1:25", "127.0.0.1:2525"]
          spool: spool
          relay: {host: Smtp.Example.org, port: 465, address: "203.0.113.25",
                  auth: {username: relay, password_file: smtp.pass}}
          tls: dane
          ca_file: ca.pem
          hostname: proxy.example.net
          max_message_size: 10MB
          max_recipients: 50
          retry: {first: 1m, max_age: 5d}
          timeouts: {command: 5m, data: 3m, connect: 10s}
    """)
    assert s.listen == (("198.18.0.1", 25), ("127.0.0.1", 2525))
    assert s.spool == tmp_path / "spool"
    assert s.relay.host == "smtp.example.org" and s.relay.port == 465 and s.relay.implicit_tls
    assert s.relay.address == "203.0.113.25"
    assert s.relay.auth.password.reveal() == "hunter2-secret"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.relay)
    assert s.tls == "dane" and s.max_message_size == 10_000_000 and s.max_recipients == 50
    assert s.retry.first == 60 and s.retry.max_age == 5 * 86400
    assert s.timeouts.connect == 10 and s.timeouts.reply == SMTPSettings().timeouts.reply


def test_defaults(tmp_path):
    s = load(tmp_path, "smtp: {listen: ['127.0.0.1:25']}")
    assert s.relay is None and s.tls == "verify" and s.max_message_size == 25_000_000
    assert s.retry.first == 60 and s.retry.max_age == 5 * 86400


@pytest.mark.parametrize("body,where,needle", [
    ("smtp: {listen: ['127.0.0.1:25'], tsl: verify}", "1:34", "did you mean 'tls'"),
    ("smtp: {tls: plaintext}", "1:13", "unknown smtp.tls mode"),
    ("smtp: {relay: {host: 'bad host!'}}", "1:22", "bad host name"),
    ("smtp: {relay: {host: a.example, address: a.example}}", "1:42", "bad IP address"),
    ("smtp: {relay: {host: a.example, auth: {username: u, password_file: missing.pass}}}", "1:68", "does not exist"),
    ("smtp: {relay: {host: a.example, port: 0}}", "1:39", "at least 1"),
    ("smtp: {retry: {first: 0s}}", "1:23", "positive"),
    ("smtp: {retry: {first: 1h, max_age: 1m}}", "1:36", "max_age"),
    ("smtp: {max_message_size: 12 parsecs}", "1:26", "bad size"),
    ("smtp: {listen: []}", "1:16", "empty"),
    ("smtp: {ca_file: nope.pem}", "1:17", "does not exist"),
    ("smtp: {timeouts: {idle: -1s}}", "1:25", "bad duration"),
])
def test_errors_are_located(tmp_path, body, where, needle):
    with pytest.raises(SourceError) as e:
        load(tmp_path, body)
    text = str(e.value)
    assert f"proxyvm.yaml:{where}:" in text and needle in text, text
