"""Job ids tagged with the namespace and owner that issued them (brokers/job_ids.py)."""

from __future__ import annotations

import uuid

from toposerve.brokers.job_ids import issue_job_id, issued_by


def test_an_issued_id_is_a_uuid4_recognised_by_its_namespace_and_owner_only() -> None:
    job = issue_job_id("prod", "alice")
    assert job.version == 4 and job.variant == uuid.RFC_4122
    assert issued_by(job, "prod", "alice")
    assert not issued_by(job, "prod", "bob") and not issued_by(job, "prod") and not issued_by(job, "test", "alice")
    anonymous = issue_job_id("prod")
    assert issued_by(anonymous, "prod") and not issued_by(anonymous, "prod", "alice")


def test_foreign_ids_are_not_taken_for_ours() -> None:
    foreign = [uuid.uuid4() for _ in range(10_000)]
    assert sum(issued_by(job, "prod") for job in foreign) <= 1  # 2**-32 each


def test_ids_stay_random() -> None:
    assert len({issue_job_id("prod") for _ in range(10_000)}) == 10_000
