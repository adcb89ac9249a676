"""Several broker nodes in TOPOSERVE_AMQP_URL: parsing, refusals (masked), and the failover hook."""

from __future__ import annotations

import pytest
from aio_pika.exceptions import AMQPConnectionError
from pydantic import ValidationError

from toposerve.brokers.accounts import url_user
from toposerve.brokers.amqp_nodes import FailoverConnection, node_urls
from toposerve.brokers.bus import make_broker
from toposerve.brokers.connections import connect_amqp
from toposerve.brokers.settings import Settings
from toposerve.deploy.accounts import with_login
from toposerve.deploy.local_services import free_port
from toposerve.deploy.provision import management_url_for

NODES = "amqp://app:s3cret@10.0.0.1:5672/, amqp://app:s3cret@10.0.0.2:5673/,amqps://app:s3cret@rabbit-3/"


def test_several_node_urls_are_split_and_kept_in_order() -> None:
    settings = Settings(amqp_url=NODES)
    assert settings.amqp_nodes == ["amqp://app:s3cret@10.0.0.1:5672/", "amqp://app:s3cret@10.0.0.2:5673/",
                                   "amqps://app:s3cret@rabbit-3/"]
    assert Settings().amqp_nodes == ["amqp://guest:guest@127.0.0.1:5672/"]
    assert url_user(settings.amqp_url) == "app"
    assert management_url_for(settings.amqp_url) == "http://10.0.0.1:15672"


@pytest.mark.parametrize(("value", "named"), [
    ("amqp://a:s3cret@h1:5672/,", "entry 2 of 2 is empty"),
    ("amqp://a:s3cret@h1:5672/,http://a:s3cret@h2:80/", "entry 2 (http://a:***@h2:80/) must start with amqp://"),
    ("amqp://a:s3cret@h1:5672/,amqp://a:s3cret@h2:port/", "entry 2 (amqp://a:***@h2:port/) is not a URL"),
    ("amqp://a:s3cret@:5672/", "entry 1 (amqp://a:***@:5672/) names no host"),
    ("", "entry 1 of 1 is empty"),
])
def test_a_bad_entry_is_named_without_its_password(value: str, named: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(amqp_url=value)
    assert named in str(refused.value)
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ValueError, match="entry"):
        node_urls(value)


def test_a_login_is_set_on_every_node() -> None:
    urls = with_login("amqp://admin:x@h1:5672/,amqp://admin:x@h2:5673/", "stage-ns", "p@ss")
    assert urls == "amqp://stage-ns:p%40ss@h1:5672/,amqp://stage-ns:p%40ss@h2:5673/"
    assert Settings(amqp_url=urls).amqp_nodes[1] == "amqp://stage-ns:p%40ss@h2:5673/"


def test_the_faststream_broker_gets_the_failover_connection_for_a_cluster() -> None:
    # FastStream has no connection-class option: this guards the hook bus.make_broker sets.
    broker = make_broker(Settings(amqp_url=NODES), "test")
    factory = broker._connection_kwargs["connection_class"]  # noqa: SLF001
    assert factory.func is FailoverConnection and len(factory.keywords["nodes"]) == 3
    assert "connection_class" not in make_broker(Settings(), "test")._connection_kwargs  # noqa: SLF001


async def test_no_node_answering_is_a_clear_error_not_a_hang() -> None:
    dead = f"amqp://u:s3cret@127.0.0.1:{free_port()}/,amqp://u:s3cret@127.0.0.1:{free_port()}/"
    with pytest.raises(AMQPConnectionError) as refused:
        await connect_amqp(dead, "test")
    assert "no RabbitMQ node accepted a connection" in str(refused.value)
    assert "s3cret" not in str(refused.value) and "127.0.0.1" in str(refused.value)
    with pytest.raises(AMQPConnectionError, match="no RabbitMQ node"):
        await make_broker(dead, "test", connect_timeout_s=2).connect()
