"""A small Python SDK for callers of the ingress's HTTP API (the AMQP one is producers/client.py).

    from toposerve.producers import Client, AsyncClient

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        record = client.predict("iris", rows=[[5.1, 3.5, 1.4, 0.2]])
        record.predictions[0].label                                   # 'setosa'
        client.predict("digits_fast", image=Path("digit.png"))        # bytes, a path or base64 text

    async with AsyncClient("http://127.0.0.1:8000") as client:
        record = await client.predict("iris", rows=[[6.7, 3.0, 5.2, 2.3]])

``predict`` posts ``/v1/models/{model}/predict`` and returns the job's terminal
``JobRecord`` in every profile: a sync profile's 200 is the record; an async profile's
202 is followed, by default with the job's Server-Sent Events (``wait="sse"``), or by
long-polling ``/v1/jobs/{id}?wait=`` (``wait="poll"``). 503 (and 429) are retried after
their ``Retry-After``, up to ``max_retries`` times; other refusals raise a typed
``HttpApiError`` subclass carrying the API's ``code`` and ``message``; a job that failed
raises ``JobFailed`` with its record.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from httpx_sse import aconnect_sse

from toposerve.brokers import JobRecord, JobStatus
from toposerve.producers.loop_thread import LoopThread

T = TypeVar("T")
_MAX_RETRY_AFTER_S = 30.0


class HttpApiError(RuntimeError):
    """The ingress refused the call: ``status``, and the API's ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class InvalidRequest(HttpApiError):
    """400 or 422: the body, the input or a parameter is wrong (the message names it)."""


class Unauthorized(HttpApiError):
    """401 or 403: no API key, or a key that is not valid."""


class NotFound(HttpApiError):
    """404 or 410: an unknown model, job or item, or a job whose record is gone."""


class TooLarge(HttpApiError):
    """413: more rows, pixels or bytes than the server's limits."""


class Unavailable(HttpApiError):
    """503 or 429 still, after the retries; or 504: no answer within the deadline."""


class ServerError(HttpApiError):
    """A 5xx other than those: a stage failed to run the model."""


class JobFailed(RuntimeError):
    """The job ran and failed: ``record.error`` says why."""

    def __init__(self, record: JobRecord) -> None:
        error = record.error
        super().__init__(f"job {record.id} failed: {error.code}: {error.message}" if error else f"job {record.id} failed")
        self.record = record


def error_for(response: httpx.Response) -> HttpApiError:
    """The typed error of a refused call (pure); the body is the API's ``{"error": {code, message}}``."""
    try:
        error = response.json()["error"]
        code, message = (error["code"], error["message"]) if isinstance(error, dict) else ("error", str(error))
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200] or response.reason_phrase
    status = response.status_code
    kind: type[HttpApiError]
    if status in (400, 422):
        kind = InvalidRequest
    elif status in (401, 403):
        kind = Unauthorized
    elif status in (404, 410):
        kind = NotFound
    elif status == 413:
        kind = TooLarge
    elif status in (429, 503, 504):
        kind = Unavailable
    else:
        kind = ServerError if status >= 500 else HttpApiError
    return kind(status, code, message)


def retry_after_s(response: httpx.Response, default_s: float = 1.0) -> float:
    """Seconds the server asked to wait (``Retry-After``, seconds form), bounded (pure)."""
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return default_s


def predict_body(rows: list[list[float]] | None, image: bytes | str | Path | None,
                 callback: dict[str, str] | None) -> dict[str, Any]:
    """The predict body for exactly one input (pure)."""
    if (rows is None) == (image is None):
        raise ValueError("give exactly one of rows= or image=")
    body: dict[str, Any]
    if rows is not None:
        body = {"instances": rows}
    elif isinstance(image, Path):
        body = {"image": base64.b64encode(image.read_bytes()).decode()}
    elif isinstance(image, bytes):
        body = {"image": base64.b64encode(image).decode()}
    else:
        body = {"image": image}  # already base64
    if callback is not None:
        body["callback"] = callback
    return body


class AsyncClient:
    """The HTTP API from asyncio code; one connection pool per client."""

    def __init__(self, url: str, api_key: str | None = None, *, wait: Literal["sse", "poll"] = "sse",
                 timeout_s: float = 60.0, max_retries: int = 5, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.wait_mode = wait
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, transport=transport,
                                      timeout=httpx.Timeout(30.0, read=timeout_s))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, **options: Any) -> httpx.Response:
        """One call, retried after ``Retry-After`` on 503/429; a refusal raised as its typed error."""
        for attempt in range(self.max_retries + 1):
            response = await self.http.request(method, path, **options)
            if response.status_code in (429, 503) and attempt < self.max_retries:
                await asyncio.sleep(retry_after_s(response))
                continue
            if response.status_code >= 400:
                raise error_for(response)
            return response
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def submit(self, model: str, *, rows: list[list[float]] | None = None,
                     image: bytes | str | Path | None = None, callback: dict[str, str] | None = None
                     ) -> httpx.Response:
        return await self._send("POST", f"/v1/models/{model}/predict", json=predict_body(rows, image, callback))

    async def predict(self, model: str, *, rows: list[list[float]] | None = None,
                      image: bytes | str | Path | None = None, callback: dict[str, str] | None = None) -> JobRecord:
        """The job's terminal record (succeeded), whatever the profile's mode; ``JobFailed`` if it failed."""
        response = await self.submit(model, rows=rows, image=image, callback=callback)
        answer = response.json()
        if response.status_code == 202 and answer.get("status") == JobStatus.PENDING.value:
            record = await self.wait(answer["id"])
        else:
            record = JobRecord.model_validate(answer)
        if record.status is JobStatus.FAILED:
            raise JobFailed(record)
        return record

    async def job(self, job_id: str, wait_s: float = 0.0) -> JobRecord:
        response = await self._send("GET", f"/v1/jobs/{job_id}", params={"wait": wait_s})
        return JobRecord.model_validate_json(response.content)

    async def wait(self, job_id: str) -> JobRecord:
        """The job's record once it has ended, within ``timeout_s``."""
        async with asyncio.timeout(self.timeout_s):
            if self.wait_mode == "sse":
                return await self._wait_sse(job_id)
            while (record := await self.job(job_id, wait_s=min(25.0, self.timeout_s))).status is JobStatus.PENDING:
                pass
            return record

    async def _wait_sse(self, job_id: str) -> JobRecord:
        last_event_id = ""
        while True:  # a dropped stream is resumed where it stopped (Last-Event-ID)
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                async with aconnect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        if source.response.status_code in (429, 503):
                            await asyncio.sleep(retry_after_s(source.response))
                            continue
                        raise error_for(source.response)
                    async for event in source.aiter_sse():
                        last_event_id = event.id or last_event_id
                        if event.event == "outcome":
                            return JobRecord.model_validate_json(event.data)
                        if event.event == "error":
                            error = json.loads(event.data)
                            if error.get("code") == "job_gone":
                                raise NotFound(410, error["code"], error["message"])
            except (httpx.TransportError, httpx.RemoteProtocolError):
                pass
            await asyncio.sleep(0.5)  # the stream ended early (an ingress restart): reconnect


class Client:
    """``AsyncClient`` for code without an event loop: its loop runs in a thread of its own."""

    def __init__(self, url: str, api_key: str | None = None, **options: Any) -> None:
        self._thread = LoopThread("toposerve-http-client")
        # Made on its loop: httpx's pool belongs to the loop that uses it.
        self._client = self._run(self._make(url, api_key, options))

    @staticmethod
    async def _make(url: str, api_key: str | None, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(url, api_key, **options)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._thread.run(coroutine)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._thread.stop(self._client.close)

    def predict(self, model: str, **inputs: Any) -> JobRecord:
        return self._run(self._client.predict(model, **inputs))

    def job(self, job_id: str, wait_s: float = 0.0) -> JobRecord:
        return self._run(self._client.job(job_id, wait_s))

    def wait(self, job_id: str) -> JobRecord:
        return self._run(self._client.wait(job_id))
