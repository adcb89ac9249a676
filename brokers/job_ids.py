"""Job ids that say which namespace issued them: UUID4s with a tag in their last 32 bits.

The ingress issues every job id it answers with. When a well-formed id carries this
namespace's tag for the caller but its record is gone (it expired, or a Redis without
persistence restarted), ``GET /v1/jobs/{id}`` can say exactly that (410 Gone) instead
of "never existed" (404). The tag covers the owner (the API key id) too, so another
key's ids look to a caller exactly like unknown ones. The tag is a checksum, not a
secret: anyone can make a tagged id for themselves, which only ever turns a 404 into a
410. Ids chosen by other publishers are plain UUIDs. Pure functions; 90 random bits
remain, ample against collisions.
"""

from __future__ import annotations

import hashlib
import os
import uuid

_TAG_BYTES = 4


def _tag(namespace: str, owner: str | None, head: bytes) -> bytes:
    seed = b"toposerve-job:" + namespace.encode() + b":" + (owner or "").encode() + b":"
    return hashlib.sha256(seed + head).digest()[:_TAG_BYTES]


def issue_job_id(namespace: str, owner: str | None = None) -> uuid.UUID:
    """A new random UUID4 whose last 32 bits tag it as issued by ``namespace`` for ``owner``."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    raw[16 - _TAG_BYTES:] = _tag(namespace, owner, bytes(raw[:16 - _TAG_BYTES]))
    return uuid.UUID(bytes=bytes(raw))


def issued_by(job_id: uuid.UUID, namespace: str, owner: str | None = None) -> bool:
    raw = job_id.bytes
    return job_id.version == 4 and raw[16 - _TAG_BYTES:] == _tag(namespace, owner, raw[:16 - _TAG_BYTES])
