"""The `http:` config section: defaults, values, and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy.source import SourceError, parse_yaml
from protocols.http.settings import HTTPSettings, parse


def section(tmp_path: Path, text: str):
    return parse_yaml(text, str(tmp_path / "proxyvm.yaml"), tmp_path).get_map()["http"]


def test_full_section(tmp_path: Path) -> None:
    (tmp_path / "web-ca.pem").write_text("x")
    node = section(
        tmp_path,
        """\
http:
  listen: ["198.18.0.1:80"]
  proxy_listen: ["198.18.0.1:3128", "[fd00::1]:3128"]
  passthrough_listen: ["198.18.0.1"]
  ca_file: web-ca.pem
  x_forwarded_for: true
  ssrf_guard: false
  workers: 4
  hosts: {intranet.example: 10.0.0.5, Multi.Example.: [10.0.0.6, "fd00::6"]}
  limits: {header_size: 16KiB, body: 10MB, stream_above: 512KiB, ws_message: 1MiB, connections: 100}
  timeouts: {header: 5s, idle: 2m, dns: 3s}
""",
    )
    s = parse(node, tmp_path)
    assert s.listen == (("198.18.0.1", 80),)
    assert s.proxy_listen == (("198.18.0.1", 3128), ("fd00::1", 3128))
    assert s.passthrough_listen == (("198.18.0.1", 443),)
    assert s.ca_file == tmp_path / "web-ca.pem"
    assert s.x_forwarded_for and not s.ssrf_guard and s.workers == 4
    assert dict(s.hosts) == {"intranet.example": ("10.0.0.5",), "multi.example": ("10.0.0.6", "fd00::6")}
    assert s.limits.header_size == 16384 and s.limits.body == 10_000_000 and s.limits.ws_message == 1 << 20
    assert s.limits.connections == 100
    assert (s.timeouts.header, s.timeouts.idle, s.timeouts.dns) == (5.0, 120.0, 3.0)


def test_defaults_are_safe(tmp_path: Path) -> None:
    s = parse(section(tmp_path, 'http:\n  proxy_listen: ["127.0.0.1:13128"]\n'), tmp_path)
    d = HTTPSettings()
    assert s.ssrf_guard and not s.x_forwarded_for and s.ca_file is None
    assert s.limits == d.limits and s.timeouts == d.timeouts and s.workers == 1
    assert s.limits.ws_message > 0  # WebSocket messages are bounded unless the operator says otherwise


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ('http:\n  listen: ["127.0.0.1:80"]\n  proxy_lisen: ["x:1"]\n', "3:3", "unknown key 'proxy_lisen'"),
        ("http:\n  x_forwarded_for: true\n", "2:3", "no listener"),
        ('http:\n  listen: ["127.0.0.1:80"]\n  ca_file: missing.pem\n', "3:12", "does not exist"),
        ('http:\n  listen: ["127.0.0.1:80"]\n  workers: 0\n', "3:12", "at least 1"),
        ('http:\n  listen: ["127.0.0.1:80"]\n  limits: {header_size: 10B}\n', "3:25", "at least 1KiB"),
        ('http:\n  listen: ["127.0.0.1:80"]\n  timeouts: {idle: 0s}\n', "3:20", "more than zero"),
        ('http:\n  listen: ["127.0.0.1:80"]\n  hosts: {a.example: not-an-ip}\n', "3:22", "bad IP address"),
        ('http:\n  listen: ["127.0.0.1:80"]\n  proxy_listen: ["127.0.0.1:80"]\n', "3:18", "used by both"),
        ('http:\n  listen: ["127.0.0.1:99999"]\n', "2:12", "bad port"),
    ],
)
def test_errors_are_located(tmp_path: Path, text: str, where: str, message: str) -> None:
    with pytest.raises(SourceError) as e:
        parse(section(tmp_path, text), tmp_path)
    text_err = str(e.value)
    assert f"proxyvm.yaml:{where}:" in text_err and message in text_err, text_err
