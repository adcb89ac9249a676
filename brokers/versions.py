"""Which version of a model answers a job: a profile's version policy, and the pure choice it makes.

A model with a policy is served by ``serve``; a ``canary`` takes ``percent`` of the jobs,
chosen by a hash of the job id (so a retried job, same id, lands on the same version);
a ``shadow`` sees a copy of every job the serving version answers, and answers nobody.
The chosen version travels in the message (``Envelope.version``) and in its routing key
(``features.<model>.v<version>``): a stage is bound to the versions it serves.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

VERSION_PATTERN = r"^[0-9A-Za-z_-]{1,32}$"
ModelVersion = Annotated[str, Field(pattern=VERSION_PATTERN, description="A model version (routing-key safe)")]
# Canary shares are cut at this resolution: 10,000 buckets, so 0.01 % steps.
BUCKETS = 10_000


class CanarySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: ModelVersion
    percent: float = Field(gt=0, lt=100, description="Share of the jobs the canary answers")


class VersionPolicy(BaseModel):
    """A profile's ``models: {<model>: {serve: ..., canary: {...}, shadow: ...}}`` entry."""

    model_config = ConfigDict(extra="forbid")

    serve: ModelVersion | None = Field(default=None, description="The version that answers (default: the "
                                                                 "manifest.json entry's)")
    canary: CanarySpec | None = None
    shadow: ModelVersion | None = Field(default=None, description="A version that sees every served job and "
                                                                  "answers nobody")

    @model_validator(mode="after")
    def _versions_differ(self) -> VersionPolicy:
        if self.canary is not None and self.canary.version == self.serve:
            raise ValueError(f"canary version {self.canary.version!r} is the served version")
        if self.shadow is not None and self.shadow == self.serve:
            raise ValueError(f"shadow version {self.shadow!r} is the served version")
        return self

    def versions(self) -> list[str]:
        """The versions this policy names (serve first)."""
        named = [self.serve, self.canary.version if self.canary else None, self.shadow]
        return list(dict.fromkeys(v for v in named if v is not None))


def canary_bucket(job_id: uuid.UUID) -> int:
    """Pure: the job's bucket in 0..BUCKETS-1, the same for the same id in every process."""
    return int.from_bytes(hashlib.blake2b(job_id.bytes, digest_size=8).digest(), "big") % BUCKETS


def choose_version(serving: str, canary: CanarySpec | None, job_id: uuid.UUID) -> str:
    """Pure: the version that answers ``job_id``: the canary for its share of the buckets, else ``serving``."""
    if canary is not None and canary_bucket(job_id) < round(canary.percent * BUCKETS / 100):
        return canary.version
    return serving


def versioned_key(kind: str, model: str, version: str) -> str:
    """The routing key of a message for one version of a model."""
    return f"{kind}.{model}.v{version}"
