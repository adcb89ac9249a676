"""One admission gate for every way a caller asks for a prediction.

The native /v1 routes, the Open Inference Protocol's infer, the book-compatible
routes and batch uploads all declare ``ADMITTED`` as a dependency, so the profile's
``ingress.max_in_flight`` bound (and its ``overload_fallback``) holds for each of
them alike, counted together in this process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Depends, Request


async def admitted(request: Request) -> AsyncIterator[None]:
    """Held for the whole request: shed (503, or the fallback) at once when the process is at its bound."""
    with request.app.state.ingress.admission():
        yield


ADMITTED = [Depends(admitted)]
