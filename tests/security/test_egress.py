"""Webhook destinations cannot reach the server's own networks: loopback, private, link-local, metadata."""

from __future__ import annotations

import pytest

from jobs.egress import EgressRefused, pin, status_class, url_problem

INTERNAL = [
    "http://127.0.0.1:6379/", "http://localhost:8000/x", "http://LOCALHOST./x", "http://[::1]:80/",
    "http://2130706433/", "http://0x7f.1/", "http://0177.0.0.1/", "http://127.1/",
    "http://169.254.169.254/latest/meta-data", "http://10.0.0.5/", "http://172.16.3.4/", "http://192.168.1.1/",
    "http://0.0.0.0:22/", "http://[::]/", "http://224.0.0.1/", "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/",
    "http://100.64.0.1/",  # carrier-grade NAT
]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_literals_are_refused_without_dns(url):
    assert "public hosts only" in (url_problem(url, []) or "")
    with pytest.raises(EgressRefused):
        pin(url, [], resolver=lambda host, port: pytest.fail("no DNS for a literal"))


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "fd00::1"])
def test_names_resolving_inside_are_refused_at_delivery(addr):
    assert url_problem("https://hooks.example.com/h", []) is None  # fine at submit: no DNS there
    with pytest.raises(EgressRefused, match="non-public"):
        pin("https://hooks.example.com/h", [], resolver=lambda host, port: [addr])


def test_one_bad_address_among_several_refuses():
    with pytest.raises(EgressRefused):
        pin("http://hooks.example.com/", [], resolver=lambda h, p: ["93.184.216.34", "127.0.0.1"])


def test_unresolvable_host_is_refused_with_a_plain_message():
    def fail(host: str, port: int) -> list[str]:
        raise OSError("[Errno -2] Name or service not known (internal detail)")

    with pytest.raises(EgressRefused) as e:
        pin("http://nowhere.example/", [], resolver=fail)
    assert "does not resolve" in str(e.value) and "Errno" not in str(e.value)


def test_request_goes_to_the_checked_address():
    """DNS rebinding: the second answer (loopback) is never used; the name travels in Host and SNI."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    p = pin("https://hooks.example.com:8443/a/b?c=1", [], resolver=lambda h, port: next(answers))
    assert p.url == "https://93.184.216.34:8443/a/b?c=1"
    assert p.headers == {"host": "hooks.example.com:8443"}
    assert p.extensions == {"sni_hostname": "hooks.example.com"}
    p6 = pin("http://v6.example.com/", [], resolver=lambda h, port: ["2606:2800:220:1:248:1893:25c8:1946"])
    assert p6.url == "http://[2606:2800:220:1:248:1893:25c8:1946]/" and p6.extensions == {}


def test_allow_list_is_trusted_as_named_and_exclusive():
    assert pin("http://127.0.0.1:9000/h", ["127.0.0.1"]).url == "http://127.0.0.1:9000/h"
    with pytest.raises(EgressRefused, match="not in the allowed"):
        pin("http://93.184.216.34/h", ["127.0.0.1"])


def test_status_classes_say_nothing_more():
    assert [status_class(c) for c in (None, 200, 302, 404, 503)] == [
        "connection failed", "HTTP 2xx", "HTTP 3xx", "HTTP 4xx", "HTTP 5xx"]
