"""Test hosts as Linux network namespaces on this machine (``ip netns`` + veth + a bridge).

Each host is a namespace with its loopback up and one veth pair: its end (``eth0`` inside) has
an address in a private /24, the other end is a port of a bridge in the root namespace, which
holds the gateway address (``.1``) that servers started for the test bind to. A host reaches
the servers, and the other hosts, only over its link: cutting it (``link_down``) is a host
losing its network, while its processes keep running.

Everything made here is named ``ts<tag>...`` with a random tag, and removed on exit of
``host_network`` even when the test fails: the processes left in the namespaces are killed,
the namespaces deleted (which deletes their veth pairs) and the bridge deleted.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "test hosts are network namespaces: making them (ip netns add, veth pairs) needs root"
    if shutil.which("ip") is None:
        return "test hosts are network namespaces: the `ip` command (Debian package iproute2) is missing"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no address or route of the root namespace overlaps."""
    used = [ipaddress.ip_network(word, strict=False) for word in ip("-4", "-o", "addr").stdout.split()
            if "/" in word and word[0].isdigit()]
    used += [ipaddress.ip_network(line.split()[0]) for line in ip("-4", "route").stdout.splitlines()
             if line and line[0].isdigit()]
    candidates = list(ipaddress.ip_network("10.213.0.0/16").subnets(new_prefix=24))
    for subnet in [candidates[int(secrets.token_hex(1), 16)], *candidates]:
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free /24 in 10.213.0.0/16 for the test hosts")


@dataclass(frozen=True)
class NamespaceHost:
    """One namespace: ``address`` is its own, ``link`` the root-side end of its veth pair."""

    name: str
    namespace: str
    address: str
    link: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def link_down(self) -> None:
        ip("link", "set", self.link, "down")

    def link_up(self) -> None:
        ip("link", "set", self.link, "up")


@dataclass
class HostNetwork:
    """A bridge with the gateway address, and the hosts on it."""

    tag: str
    subnet: ipaddress.IPv4Network
    bridge: str
    hosts: dict[str, NamespaceHost] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def add_host(self, name: str) -> NamespaceHost:
        index = len(self.hosts)
        host = NamespaceHost(name, f"ts{self.tag}-{name}", str(self.subnet.network_address + 2 + index),
                        f"ts{self.tag}h{index}")
        peer = f"ts{self.tag}n{index}"
        self.hosts[name] = host  # before making anything, so that teardown removes what was made
        ip("netns", "add", host.namespace)
        ip("-n", host.namespace, "link", "set", "lo", "up")
        ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", host.namespace)
        ip("-n", host.namespace, "link", "set", peer, "name", "eth0")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        return host

    def describe(self) -> str:
        return ", ".join(f"{h.name}={h.address} ({h.namespace}, link {h.link})" for h in self.hosts.values())

    def teardown(self) -> None:
        for host in self.hosts.values():
            kill_namespace_processes(host.namespace)
            ip("netns", "delete", host.namespace, check=False)
            ip("link", "delete", host.link, check=False)  # gone with its peer unless the namespace was not made
        ip("link", "delete", self.bridge, check=False)


def kill_namespace_processes(namespace: str) -> None:
    """SIGKILL what still runs in ``namespace`` (only namespaces made here hold anything)."""
    listed = ip("netns", "pids", namespace, check=False)
    for word in listed.stdout.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@contextmanager
def host_network(*host_names: str) -> Iterator[HostNetwork]:
    """A bridge on a free private /24 with the gateway address, and one namespace per name."""
    tag = secrets.token_hex(3)
    network = HostNetwork(tag, free_subnet(), f"ts{tag}br")
    try:
        ip("link", "add", network.bridge, "type", "bridge")
        ip("addr", "add", f"{network.gateway}/{network.subnet.prefixlen}", "dev", network.bridge)
        ip("link", "set", network.bridge, "up")
        for name in host_names:
            network.add_host(name)
        yield network
    finally:
        network.teardown()
