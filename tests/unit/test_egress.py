"""The callback egress policy: which URLs the server may POST a finished job to. No network: hostname
resolution is replaced by a fake `socket.getaddrinfo`."""

from __future__ import annotations

import socket

import pytest

from moorage.errors import BadRequest
from moorage.security.egress import CallbackNotAllowed, check_callback_url

REFUSED_LITERALS = {
    "loopback": ["127.0.0.1", "127.8.9.10", "[::1]", "[::ffff:127.0.0.1]"],
    "private": [
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "[fc00::1]",
        "[fd12:3456::1]",
        "[2002:a00:1::]",
    ],  # 6to4 for 10.0.0.1
    "link-local": ["169.254.1.1", "[fe80::1]", "[fe80::1%25eth0]"],
    "metadata": ["169.254.169.254", "[fd00:ec2::254]", "100.100.100.200"],
    "unspecified": ["0.0.0.0", "[::]"],
    "multicast": ["224.0.0.1", "239.255.255.250", "[ff02::1]"],
    "reserved": ["240.0.0.1", "255.255.255.255"],
    "not public": ["100.64.0.1", "192.0.2.10", "198.18.0.1", "[2001:db8::1]", "[::ffff:10.0.0.1]"],
}


@pytest.fixture
def resolver(monkeypatch):
    """Answers `socket.getaddrinfo` from a dict {hostname: [addresses]}; counts the look-ups."""
    records: dict[str, list[str]] = {}
    lookups: list[str] = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        if host not in records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in records[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    return records, lookups


def refused_code(url: str, allow: list[str] | None = None) -> str:
    with pytest.raises(CallbackNotAllowed) as info:
        check_callback_url(url, allow or [])
    assert isinstance(info.value, BadRequest) and info.value.status == 400
    return info.value.code


@pytest.mark.parametrize(
    "host", [pytest.param(h, id=f"{kind}-{h}") for kind, hosts in REFUSED_LITERALS.items() for h in hosts]
)
def test_literal_addresses_that_are_not_public_are_refused(host, resolver):
    assert refused_code(f"http://{host}:8080/hook") == "callback_not_allowed"
    assert resolver[1] == []  # a literal address is judged as written, never resolved


@pytest.mark.parametrize("url", ["http://93.184.216.34/hook", "https://93.184.216.34:8443/x", "http://[2606:4700::1]/"])
def test_public_literal_addresses_are_allowed(url, resolver):
    check_callback_url(url, [])


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://93.184.216.34/x", "gopher://93.184.216.34/", "http:///path", "http://:80/", "//x/y"],
)
def test_other_schemes_and_urls_without_a_host_are_refused(url):
    assert refused_code(url) == "callback_not_allowed"


def test_a_bad_port_is_refused():
    assert refused_code("http://93.184.216.34:99999/") == "callback_not_allowed"


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "api.localhost"])
def test_localhost_is_loopback_without_asking_dns(host, resolver):
    assert refused_code(f"http://{host}:8000/") == "callback_not_allowed"
    assert resolver[1] == []


@pytest.mark.parametrize("host", ["metadata.google.internal", "metadata"])
def test_metadata_hostnames_are_refused_even_when_allowed(host, resolver):
    assert refused_code(f"http://{host}/computeMetadata/v1/", allow=[host, "169.254.0.0/16"]) == "callback_not_allowed"


def test_a_metadata_address_stays_refused_inside_an_allowed_network():
    assert refused_code("http://169.254.169.254/latest/", allow=["169.254.0.0/16"]) == "callback_not_allowed"
    assert refused_code("http://169.254.169.254/latest/", allow=["169.254.169.254"]) == "callback_not_allowed"


def test_a_hostname_is_refused_if_any_of_its_addresses_is_refused(resolver):
    records, _ = resolver
    records["public.example"] = ["93.184.216.34", "2606:4700::1"]
    records["mixed.example"] = ["93.184.216.34", "10.1.2.3"]
    records["rebind.example"] = ["2606:4700::1", "::1"]
    records["meta.example"] = ["169.254.169.254"]
    check_callback_url("https://public.example/hook", [])
    for host in ("mixed.example", "rebind.example", "meta.example"):
        assert refused_code(f"https://{host}/hook") == "callback_not_allowed"


def test_numeric_shorthands_are_judged_by_what_they_resolve_to(resolver):
    records, lookups = resolver
    records["2130706433"] = ["127.0.0.1"]  # what the system resolver makes of http://2130706433/
    assert refused_code("http://2130706433/") == "callback_not_allowed"
    assert lookups == ["2130706433"]


def test_a_name_that_does_not_resolve_has_its_own_code(resolver):
    assert refused_code("http://nowhere.example/") == "callback_unresolvable"


def test_allowed_addresses_and_networks_are_exempt(resolver):
    records, _ = resolver
    records["hooks.example"] = ["10.1.2.3", "10.9.9.9"]
    check_callback_url("http://127.0.0.1:9000/hook", ["127.0.0.1"])
    check_callback_url("http://[::1]:9000/hook", ["::1"])
    check_callback_url("http://10.20.30.40/hook", ["10.0.0.0/8"])
    check_callback_url("http://hooks.example/hook", ["10.0.0.0/8"])  # every resolved address is inside
    assert refused_code("http://hooks.example/hook", allow=["10.1.2.3/32"]) == "callback_not_allowed"  # not 10.9.9.9
    assert refused_code("http://127.0.0.2/hook", allow=["127.0.0.1"]) == "callback_not_allowed"
    assert refused_code("http://192.168.0.1/hook", allow=["10.0.0.0/8"]) == "callback_not_allowed"


def test_allowed_hostnames_are_trusted_whatever_they_resolve_to(resolver):
    records, lookups = resolver
    records["hooks.internal"] = ["10.0.0.5"]
    check_callback_url("http://hooks.internal:8080/done", ["Hooks.Internal"])
    check_callback_url("http://a.hooks.internal/done", ["*.hooks.internal"])
    check_callback_url("http://localhost:8080/done", ["localhost"])
    assert lookups == []
    assert refused_code("http://hooks.internal/done", allow=["*.hooks.internal"]) == "callback_not_allowed"
    assert refused_code("http://evilhooks.internal/done", allow=["*.hooks.internal"]) == "callback_unresolvable"


def test_the_message_says_why_and_how_to_allow_it(resolver):
    records, _ = resolver
    records["intranet.example"] = ["192.168.7.7"]
    with pytest.raises(CallbackNotAllowed) as literal:
        check_callback_url("http://10.0.0.1/x", [])
    assert literal.value.message == (
        "callback host '10.0.0.1' is a private address; an operator can allow it in jobs.callback_allow"
    )
    with pytest.raises(CallbackNotAllowed) as resolved:
        check_callback_url("http://intranet.example/x", [])
    assert "resolves to a private address" in resolved.value.message
    assert "192.168.7.7" not in resolved.value.message  # the internal address is not told to the caller


def test_the_allow_setting_is_checked_when_settings_load(tmp_path):
    from moorage.config import load_settings
    from moorage.errors import ConfigError

    def load(allow: str):
        return load_settings(environ={"MOORAGE_HOME": str(tmp_path), "MOORAGE_JOBS__CALLBACK_ALLOW": allow})

    jobs = load('["127.0.0.1", "Hooks.Internal.", "*.hooks.internal", "10.0.0.0/8", "::1"]').jobs
    assert jobs.callback_allow == ["127.0.0.1", "hooks.internal", "*.hooks.internal", "10.0.0.0/8", "::1"]
    assert (jobs.callback_retries, jobs.callback_timeout_s) == (3, 10.0)
    with pytest.raises(ConfigError, match=r"jobs\.callback_allow.*'10\.0\.0\.0/33' is neither a hostname"):
        load('["10.0.0.0/33"]')
