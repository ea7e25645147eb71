"""Pure HTTP decisions (no sockets): table-driven."""

from __future__ import annotations

import pytest

from protocols.http import addon, core


@pytest.mark.parametrize(
    ("message", "cause"),
    [
        ("Certificate verify failed: unable to get local issuer certificate", core.UpstreamFailure.UNTRUSTED),
        ("Certificate verify failed: self-signed certificate in certificate chain", core.UpstreamFailure.UNTRUSTED),
        ("Certificate verify failed: self-signed certificate", core.UpstreamFailure.UNTRUSTED),
        ("Certificate verify failed: hostname mismatch", core.UpstreamFailure.NAME_MISMATCH),
        ("Certificate verify failed: IP address mismatch", core.UpstreamFailure.NAME_MISMATCH),
        ("Certificate verify failed: certificate has expired", core.UpstreamFailure.EXPIRED),
        ("The remote server does not speak TLS.", core.UpstreamFailure.NO_TLS),
        ("[Errno 111] Connect call failed ('127.0.7.10', 443)", core.UpstreamFailure.CONNECT_FAILED),
        ("server closed connection", core.UpstreamFailure.CLOSED),
        ("OpenSSL Error([('SSL routines', '', 'sslv3 alert handshake failure')])", core.UpstreamFailure.TLS_FAILED),
        ("something else entirely", core.UpstreamFailure.OTHER),
    ],
)
def test_classify_upstream_error(message: str, cause: core.UpstreamFailure) -> None:
    assert core.classify_upstream_error(message) is cause


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"POST", None),
        (b"", None),
        (b"get / HTTP/1.1\r\n", False),  # methods are case-sensitive upper-case tokens
        (b"\x16\x03\x01\x00", False),
        (b"SSH-2.0-OpenSSH\r\n", False),
        (b"\x00\x01\x02", False),
        (b"A" * 40, False),
        (b"PROPFIND /x HTTP/1.1", True),
    ],
)
def test_looks_like_http(data: bytes, verdict: bool | None) -> None:
    assert core.looks_like_http(data) is verdict


def test_hop_by_hop_names_include_connection_tokens() -> None:
    names = core.hop_by_hop_names(["keep-alive, X-Secret-Hop", "close"])
    assert {"x-secret-hop", "close", "connection", "proxy-authorization", "te", "upgrade"} <= names
    assert "transfer-encoding" not in names  # framing is mitmproxy's


@pytest.mark.parametrize(
    ("port", "plaintext", "plan"),
    [
        (None, False, core.UpstreamPlan("https", 443)),
        (80, False, core.UpstreamPlan("https", 443)),
        (8080, False, core.UpstreamPlan("https", 8080)),
        (None, True, core.UpstreamPlan("http", 80)),
        (8080, True, core.UpstreamPlan("http", 8080)),
    ],
)
def test_plan_upstream(port: int | None, plaintext: bool, plan: core.UpstreamPlan) -> None:
    assert core.plan_upstream(port, plaintext=plaintext) == plan


def test_split_path_drops_query_and_fragment() -> None:
    assert core.split_path("/a/b?token=secret#frag") == "/a/b"
    assert core.split_path("?x=1") == "/"


def test_normalize_host() -> None:
    assert core.normalize_host("WWW.Example.COM.") == "www.example.com"
    assert core.normalize_host("[fd00::1]") == "fd00::1"


def test_hook_names_are_real_mitmproxy_hooks() -> None:
    class Typo:
        pass

    for name in addon.HOOKS:
        setattr(Typo, name, lambda *a: None)
    addon.verify_hooks(Typo())
    Typo.requestheader = Typo.requestheaders  # type: ignore[attr-defined]
    addon.HOOKS = (*addon.HOOKS, "requestheader")
    try:
        with pytest.raises(TypeError, match="requestheader"):
            addon.verify_hooks(Typo())
    finally:
        addon.HOOKS = addon.HOOKS[:-1]


@pytest.mark.parametrize(
    ("value", "host"),
    [("www.Example.com", "www.example.com"), ("www.example.com:8080", "www.example.com"),
     ("[fd00::1]:8080", "fd00::1"), ("[fd00::1]", "fd00::1"), ("10.0.0.1:80", "10.0.0.1")],
)
def test_host_of_authority(value: str, host: str) -> None:
    assert core.host_of_authority(value) == host


def test_authority() -> None:
    assert core.authority("fd00::1", 80) == "[fd00::1]"
    assert core.authority("fd00::1", 8080) == "[fd00::1]:8080"
    assert core.authority("www.example.com", 8080) == "www.example.com:8080"
