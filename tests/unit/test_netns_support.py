"""The test hosts' helper says why it cannot make namespaces (the skip reason), before trying."""

from __future__ import annotations

import pytest

from tests.support import netns


def test_not_root_is_a_clear_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    reason = netns.unavailable_reason()
    assert reason is not None and "needs root" in reason


def test_missing_ip_command_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None if name == "ip" else f"/usr/bin/{name}")
    reason = netns.unavailable_reason()
    assert reason is not None and "iproute2" in reason


def test_root_with_ip_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: f"/usr/sbin/{name}")
    assert netns.unavailable_reason() is None
