"""amqps:// and rediss:// end to end, against real RabbitMQ and Redis that speak TLS only.

The servers are private throwaway processes (deploy/local_services/ with ``tls=``) whose
only listener is TLS, with a certificate from a CA made for this module; the clients get
that CA through the URL query string (``cafile=`` for aio-pika, ``ssl_ca_certs=`` for
redis-py), exactly as README "Security" tells operators to. So a request that completes
went through verified TLS, and a client that does not trust the CA must be refused.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis.exceptions
from aio_pika.exceptions import AMQPConnectionError, ProbableAuthenticationError

from tests.integration.conftest import start_stack
from tests.support.tls import make_ca, make_server_cert, missing_tls_support
from toposerve.brokers.connections import connect_amqp, connect_redis
from toposerve.brokers.redaction import redact
from toposerve.brokers.settings import Settings
from toposerve.deploy.local_services import LocalService, ServiceUnavailable, start_rabbitmq, start_redis

pytestmark = pytest.mark.integration

IRIS_SETOSA = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TlsServices:
    rabbitmq: LocalService
    redis: LocalService
    ca: Path  # signed the servers' certificate
    stranger_ca: Path  # signed nothing here: a client trusting only it must be refused

    def amqp_url(self, *, password: str = "guest", cafile: Path | None = None, scheme: str = "amqps") -> str:
        query = f"?{urlencode({'cafile': str(cafile)}, safe='/')}" if cafile else ""
        return f"{scheme}://guest:{password}@{LOOPBACK}:{self.rabbitmq.port}/{query}"

    def redis_url(self, *, ca: Path | None = None, scheme: str = "rediss") -> str:
        query = f"?{urlencode({'ssl_ca_certs': str(ca), 'ssl_cert_reqs': 'required'}, safe='/')}" if ca else ""
        return f"{scheme}://{LOOPBACK}:{self.redis.port}/0{query}"


def _start(server: str, start: Callable[[], LocalService]) -> LocalService:
    try:
        return start()
    except ServiceUnavailable as exc:
        reason = missing_tls_support(str(exc), server)
        if reason is not None:
            pytest.skip(f"{server} cannot serve TLS on this machine: {reason}")
        raise


@pytest.fixture(scope="module")
def tls_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServices]:
    certs = tmp_path_factory.mktemp("tls")
    files = make_server_cert(certs, make_ca(certs))
    stranger_ca, _ = make_ca(certs, name="stranger")
    with ExitStack() as stack:
        rabbitmq = stack.enter_context(_start("rabbitmq", lambda: start_rabbitmq(tls=files)))
        redis_server = stack.enter_context(_start("redis", lambda: start_redis(tls=files)))
        yield TlsServices(rabbitmq, redis_server, files.ca, stranger_ca)


async def test_a_request_goes_end_to_end_over_amqps_and_rediss(tls_services: TlsServices) -> None:
    # The URLs the factories build: amqps://...?cafile=CA, rediss://...?ssl_ca_certs=CA&ssl_cert_reqs=required
    settings = Settings(
        amqp_url=tls_services.rabbitmq.url,
        redis_url=tls_services.redis.url,
        namespace=f"t-{secrets.token_hex(4)}",
        drain_timeout_s=5,
    )
    assert settings.amqp_url.startswith("amqps://") and settings.redis_url.startswith("rediss://")
    async for stack in start_stack(settings, "asynchronous"):
        assert (await stack.client.get("/readyz")).status_code == 200  # its checks go over TLS too
        response = await stack.client.post("/v1/models/iris/predict", json=IRIS_SETOSA)
        assert response.status_code == 202, response.text
        job_url = f"/v1/jobs/{response.json()['id']}"
        deadline = time.monotonic() + 20
        while (job := await stack.client.get(job_url)).status_code == 202 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert job.status_code == 200, job.text
        assert job.json()["status"] == "succeeded"
        assert [row["label"] for row in job.json()["predictions"]] == ["setosa"]


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_services: TlsServices) -> None:
    with pytest.raises(AMQPConnectionError) as amqp_error:  # raised from ssl.SSLCertVerificationError
        await connect_amqp(tls_services.amqp_url(cafile=tls_services.stranger_ca), "tls-test-untrusted")
    assert "CERTIFICATE_VERIFY_FAILED" in _chain(amqp_error.value)

    client = connect_redis(tls_services.redis_url(ca=tls_services.stranger_ca))
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.ping()
    finally:
        await client.aclose()


async def test_the_servers_accept_no_plaintext(tls_services: TlsServices) -> None:
    """No way around TLS: the plain schemes on the same ports get nowhere."""
    with pytest.raises(AMQPConnectionError):  # the TLS listener resets on a plain AMQP header
        await connect_amqp(tls_services.amqp_url(scheme="amqp"), "tls-test-plain")
    client = connect_redis(tls_services.redis_url(scheme="redis"))
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


async def test_a_wrong_password_over_amqps_is_not_shown(
    tls_services: TlsServices, caplog: pytest.LogCaptureFixture
) -> None:
    # Redaction itself is covered in test_security.py; here the error comes through a real
    # TLS connection, from a URL that also carries TLS options in its query string.
    password = "wrong-" + uuid.uuid4().hex[:8]
    url = tls_services.amqp_url(password=password, cafile=tls_services.ca)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ProbableAuthenticationError, match="ACCESS_REFUSED") as caught:  # past TLS, at login
        await connect_amqp(url, "tls-test-wrong-password")
    assert password not in _chain(caught.value)
    assert not [r for r in caplog.records if password in r.getMessage()]
    assert password not in redact(f"connecting to {url} failed")


def _chain(exc: BaseException) -> str:
    """The text of an exception and of everything it was raised from."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # aiormq's chains can loop
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)
