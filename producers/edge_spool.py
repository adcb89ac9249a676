"""The telemetry spool: reports waiting to be sent, in a bounded, fsync'd JSON-lines file per model.

Store and forward: a report is appended (and fsync'd) *before* anything tries to
send it, and removed only after the broker confirmed it. A crash anywhere in
between leaves it in the spool, so it is sent again later; the server counts each
report id once, so a resend is harmless.

Bounded by count: when a model's spool is full, its oldest reports are dropped.
Nothing is lost silently: the report that displaced them carries how many reports
(and predictions) were dropped, and ``dropped_total`` in the state file counts them
on this machine. A line cut short by a crash mid-append is skipped (and removed at
the next rewrite); the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from toposerve.brokers import Telemetry, is_model_name
from toposerve.producers.durable_files import fsync_dir, locked, replace_atomically

log = logging.getLogger(__name__)

DEFAULT_MAX_REPORTS = 1000


@dataclass(frozen=True)
class SpoolStats:
    pending: int
    dropped_total: int


def carry_dropped(report: Telemetry, dropped: list[Telemetry]) -> Telemetry:
    """Pure: ``report`` also accounts for ``dropped`` (and whatever they had accounted for)."""
    if not dropped:
        return report
    return report.model_copy(update={
        "dropped_reports": report.dropped_reports + sum(1 + r.dropped_reports for r in dropped),
        "dropped_predictions": report.dropped_predictions + sum(r.predictions + r.dropped_predictions
                                                                for r in dropped),
    })


class Spool:
    def __init__(self, directory: Path, model: str, max_reports: int = DEFAULT_MAX_REPORTS) -> None:
        if not is_model_name(model):
            raise ValueError(f"{model!r} is not a model name")
        if max_reports < 1:
            raise ValueError("max_reports must be at least 1")
        self.directory = directory
        self.model = model
        self.max_reports = max_reports
        self.path = directory / f"{model}.jsonl"
        self._lock = directory / f".{model}.lock"
        self._state = directory / f"{model}.state.json"

    # -- reading ------------------------------------------------------------------------

    def _read(self) -> list[Telemetry]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        reports = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                reports.append(Telemetry.model_validate_json(line))
            except ValidationError:
                # Only a crash mid-append writes a partial line; it never held a sent report.
                log.warning("spool %s: line %d is damaged and is skipped", self.path, number)
        return reports

    def pending(self) -> list[Telemetry]:
        """Reports not confirmed yet, oldest first."""
        with locked(self._lock, shared=True):
            return self._read()

    def stats(self) -> SpoolStats:
        with locked(self._lock, shared=True):
            return SpoolStats(pending=len(self._read()), dropped_total=self._dropped_total())

    def _dropped_total(self) -> int:
        try:
            return int(json.loads(self._state.read_bytes())["dropped_total"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    # -- writing ------------------------------------------------------------------------

    def append(self, report: Telemetry) -> Telemetry:
        """Make ``report`` durable; returns it as spooled (carrying what a full spool dropped for it)."""
        if report.model != self.model:
            raise ValueError(f"a report of {report.model!r} does not belong in the spool of {self.model!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        with locked(self._lock):
            existing = self._read()
            overflow = len(existing) + 1 - self.max_reports
            if overflow > 0:
                dropped, kept = existing[:overflow], existing[overflow:]
                report = carry_dropped(report, dropped)
                self._rewrite([*kept, report])
                replace_atomically(self._state, json.dumps(
                    {"dropped_total": self._dropped_total() + len(dropped)}).encode())
                log.warning("spool %s is full (%d reports): dropped the %d oldest", self.path, self.max_reports,
                            len(dropped))
            else:
                self._append_line(report)
        return report

    def remove(self, ids: set[uuid.UUID]) -> int:
        """Forget reports the broker confirmed; returns how many were removed."""
        if not ids:
            return 0
        with locked(self._lock):
            existing = self._read()
            kept = [r for r in existing if r.id not in ids]
            if len(kept) != len(existing):
                self._rewrite(kept)
            return len(existing) - len(kept)

    def _append_line(self, report: Telemetry) -> None:
        created = not self.path.exists()
        with self.path.open("ab+") as handle:
            # After a crash mid-append the file may end inside a line: start a new one.
            handle.seek(0, os.SEEK_END)
            prefix = b""
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                prefix = b"" if handle.read(1) == b"\n" else b"\n"
            handle.write(prefix + report.model_dump_json().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            fsync_dir(self.directory)

    def _rewrite(self, reports: list[Telemetry]) -> None:
        replace_atomically(self.path, b"".join(r.model_dump_json().encode() + b"\n" for r in reports))
