"""CPU seconds per process, read from /proc, so a benchmark can say where the time goes.

A run's figure is the difference of two readings of ``utime + stime`` for every process of
a role (a process and its descendants: uvicorn's workers, Erlang's port programs). Linux
only; elsewhere the readings are empty and the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


def available() -> bool:
    return (PROC / "self" / "stat").is_file()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (0 when it is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _parents() -> dict[int, int]:
    parents = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return parents


def with_descendants(pids: Iterable[int], stop_at: frozenset[int] = frozenset(),
                     parents: dict[int, int] | None = None) -> set[int]:
    """``pids`` and their descendants, not entering the subtree of a pid in ``stop_at``."""
    parents = _parents() if parents is None else parents
    found = set(pids)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found - stop_at
        found |= children
        grew = bool(children)
    return found


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            columns = line.split()
            local, state, inode = columns[1], columns[3], columns[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def pid_listening_on(port: int) -> int | None:
    """The process that listens on a local TCP ``port`` (readable here: ours, or as root)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return int(entry.name)
        except OSError:
            continue
    return None


@dataclass
class CpuMeter:
    """CPU seconds per role between ``start()`` and ``stop()``; roles map to root pids."""

    roles: dict[str, list[int]]
    _start: dict[str, dict[int, float]] = field(default_factory=dict)

    def _read(self) -> dict[str, dict[int, float]]:
        # A role's processes end where another role's begin (the load generator started them all).
        roots = frozenset(pid for pids in self.roles.values() for pid in pids)
        parents = _parents()
        return {role: {pid: cpu_seconds(pid) for pid in with_descendants(pids, roots - set(pids), parents)}
                for role, pids in self.roles.items()}

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        """Seconds used per role since ``start()`` (processes that started meanwhile count whole)."""
        now = self._read()
        return {role: round(sum(seconds - self._start.get(role, {}).get(pid, 0.0) for pid, seconds in pids.items()), 4)
                for role, pids in now.items()}
