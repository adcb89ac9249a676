"""Throwaway local RabbitMQ and Redis servers, without Docker.

Three parts: ``server_process`` (a server process on loopback: ports, pids, the
marker sweep, running as ``rabbitmq``), ``rabbitmq_server`` and ``redis_server``.

Why this exists: integration tests need a real broker and a real Redis, and
``toposerve up`` needs them on a developer machine where nothing answers at the
default URLs. Docker is not always usable (some CI sandboxes have an engine that
cannot pull images), but the Debian packages ``rabbitmq-server`` and
``redis-server`` usually are. This module starts *private* instances of them:

- on free loopback ports (AMQP, Erlang distribution, Redis), in a temp dir that
  holds all their data, logs and config;
- with their own RabbitMQ node name, config file, env file and (empty) plugins
  file, so a system-wide node (e.g. ``rabbit@localhost`` on 5672) or its
  ``/etc/rabbitmq`` settings are never used or touched;
- as the ``rabbitmq`` user when running as root (``rabbitmq-server`` refuses to
  run its files otherwise), with the data dir owned by that user.

Every process started here carries a marker environment variable (and runs in
the work dir), so stopping finds and ends all of them (the Erlang VM, its
helpers, a daemonized Redis) even when a pid file is stale or missing; a
``weakref.finalize`` hook kills them at interpreter exit if ``stop()`` was never
called. System-wide servers (e.g. on 5672/6379) are never touched. See
the project's notes on running RabbitMQ and Redis without Docker (``shared/reference/local-services.md`` beside the repository) for the checked facts behind this.

Typical use::

    with start_rabbitmq() as mq, start_redis(appendonly=True) as rd:
        connect(mq.url, rd.url)
        mq.kill(); mq.restart()      # fault injection: same ports, same data

``start_rabbitmq_cluster(3)`` starts three such nodes joined into one cluster (its ``url``
lists the nodes comma-separated, as ``TOPOSERVE_AMQP_URL`` takes them).

``tls=TlsFiles(ca, cert, key)`` makes either server listen with TLS only; its ``url``
is then ``amqps://...?cafile=CA`` / ``rediss://...?ssl_ca_certs=CA&ssl_cert_reqs=required``.
"""

from toposerve.deploy.local_services.rabbitmq_cluster import RabbitMQCluster, start_rabbitmq_cluster
from toposerve.deploy.local_services.rabbitmq_server import RabbitMQService, start_rabbitmq
from toposerve.deploy.local_services.redis_server import RedisService, start_redis
from toposerve.deploy.local_services.server_process import (
    INSTALL_HINT,
    LocalService,
    ServiceUnavailable,
    TlsFiles,
    find_binary,
    free_port,
    port_answers,
)

__all__ = [
    "INSTALL_HINT",
    "LocalService",
    "RabbitMQCluster",
    "RabbitMQService",
    "RedisService",
    "ServiceUnavailable",
    "TlsFiles",
    "find_binary",
    "free_port",
    "port_answers",
    "start_rabbitmq",
    "start_rabbitmq_cluster",
    "start_redis",
]
