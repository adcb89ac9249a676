"""Webhook rules (brokers/callbacks.py): which URLs may be called, the signature, the backoff."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from toposerve.brokers.callbacks import CallbackRefused, backoff_s, check_callback_url, shown_url, signature
from toposerve.brokers.settings import Settings

SETTINGS = Settings(callback_allowed_hosts="hooks.example.org, 10.0.0.5:8443")


@pytest.mark.parametrize("url", ["https://hooks.example.org/h", "https://HOOKS.example.org:444/h?x=1",
                                 "https://10.0.0.5:8443/h"])
def test_allowed_hosts_and_ports(url: str) -> None:
    assert check_callback_url(url, SETTINGS).host


@pytest.mark.parametrize(("url", "says"), [
    ("http://hooks.example.org/h", "must use https"),
    ("https://evil.example.org/h", "'evil.example.org' is not allowed"),
    ("https://10.0.0.5/h", "'10.0.0.5' is not allowed"),  # only its port 8443 is
    ("https://a:b@hooks.example.org/h", "must not carry credentials"),
    ("https:///nohost", "host"),
    ("not a url", "must use https"),
])
def test_refused_urls_name_the_rule(url: str, says: str) -> None:
    with pytest.raises(CallbackRefused, match=None) as refused:
        check_callback_url(url, SETTINGS)
    assert says in str(refused.value)


def test_with_no_allowed_host_callbacks_are_off() -> None:
    with pytest.raises(CallbackRefused, match="callbacks are off"):
        check_callback_url("https://hooks.example.org/h", Settings())


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(b"k" * 16, b"1700000000.{}", hashlib.sha256).hexdigest()
    assert signature("k" * 16, "1700000000", b"{}") == f"sha256={expected}"
    assert signature("k" * 16, "1700000001", b"{}") != f"sha256={expected}"


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(30, 1.0) == 60.0


def test_shown_urls_have_no_query_nor_credentials() -> None:
    assert shown_url("https://u:p@hooks.example.org:8443/h?token=t") == "https://hooks.example.org:8443/h"
