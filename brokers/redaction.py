"""Credentials out of text: ``scheme://user:password@host`` -> ``scheme://user:***@host``.

Applied to every error body of the ingress and to readiness details, so an exception
that quotes a connection URL (AMQP, Redis, with or without TLS) never shows its password.
"""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^\s/]+@")


def redact(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1:***@", text)
