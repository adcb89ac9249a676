"""Fault injection on a 3-node RabbitMQ cluster: nodes are SIGKILLed under a steady load.

One throwaway cluster for the module (deploy/local_services/rabbitmq_cluster.py; booting
three nodes and joining them is the slow part), with the accounts of every role, and an
append-only Redis. ``TOPOSERVE_AMQP_URL`` lists the three nodes: the ingress, the stage
processes (real ``toposerve worker``s) and the reply router connect to one and fail over
to another (brokers/amqp_nodes.py). Each test leaves every node running.

- asynchronous, quorum queues: the node that leads the predict queue is killed, restarted;
  then a second node is killed after the first rejoined. Every accepted job ends once.
- synchronous (classic queues, as recommended for sync work): callers get a right answer
  or a quick 503/504, never a hang, never another caller's answer.
- batch, quorum queues: a 200k-row batch completes exactly once across a node kill.
- stages on other hosts: with root and ``ip``, the servers listen on the gateway of test hosts
  (network namespaces, tests/support/netns.py) and the asynchronous tests run the ingress and each
  stage on its own host; the predict host's link is cut for 10 s under load. Without, those run
  on loopback or skip.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_fault_injection_batch import BatchLoad, batch_status, check_every_row_once, upload
from tests.support.batches import iris_rows
from tests.support.faults import (
    DoneCounter,
    Load,
    check_exactly_once,
    readyz,
    records,
    summary,
    wait_for_condition,
    wait_until,
)
from tests.support.netns import HostNetwork, host_network, unavailable_reason
from tests.support.processes import IngressProcess, WorkerProcess, stage_processes
from toposerve.brokers.connections import connect_redis
from toposerve.brokers.results import ResultStore
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import load_checked_profile
from toposerve.deploy.local_services import (
    LocalService,
    RabbitMQCluster,
    RabbitMQService,
    ServiceUnavailable,
    start_rabbitmq_cluster,
    start_redis,
)
from toposerve.deploy.profile import PROFILES_DIR, Profile, available_profiles, load_profile

pytestmark = pytest.mark.fault

# A namespace per test: one profile may be live in a namespace (deploy/lifecycle.py).
NAMESPACES = {"asynchronous": "t-cluster-async", "synchronous": "t-cluster-sync", "batch": "t-cluster-batch",
              "asynchronous on hosts": "t-cluster-hosts"}
# Test hosts (network namespaces, tests/support/netns.py): the ingress and each stage on its own.
HOST_NAMES = ("ingress", "preprocess", "predict", "store")
LINK_CUT_S = 10.0


@dataclass(frozen=True)
class ClusterServices:
    cluster: RabbitMQCluster
    redis: LocalService
    accounts_files: dict[str, Path]  # per namespace
    profiles: dict[str, Path]  # quorum copies of the durable profiles

    def settings(self, namespace: str) -> Settings:
        return Settings(amqp_url=self.cluster.url, redis_url=self.redis.url, namespace=namespace,
                        max_rows=100, max_body_bytes=256 * 1024, drain_timeout_s=5,
                        accounts_file=str(self.accounts_files[namespace]))


def quorum_profile(name: str, directory: Path) -> Path:
    """The shipped profile ``name`` with quorum queues (the recommended production setting)."""
    data = yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())
    data.update(name=f"quorum_{name}", queue_type="quorum", delivery_limit=20)
    path = directory / f"quorum_{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def test_hosts() -> Iterator[HostNetwork | str]:
    """The test hosts, or why there are none (their tests skip with it; the others run on loopback)."""
    reason = unavailable_reason()
    if reason is not None:
        yield reason
        return
    with ExitStack() as made:
        try:
            network: HostNetwork | str = made.enter_context(host_network(*HOST_NAMES))
        except RuntimeError as exc:
            network = f"could not make the test hosts (network namespaces): {exc}"
        yield network


@pytest.fixture
def hosts(test_hosts: HostNetwork | str) -> HostNetwork:
    if isinstance(test_hosts, str):
        pytest.skip(test_hosts)
    return test_hosts


@pytest.fixture(scope="module")
def cluster_services(tmp_path_factory: pytest.TempPathFactory, test_hosts: HostNetwork | str) -> Iterator[ClusterServices]:
    from toposerve.deploy.accounts import logins, new_passwords, profile_accounts, rabbitmq_definitions, redis_acl

    directory = tmp_path_factory.mktemp("cluster")
    profiles = {name: quorum_profile(name, directory) for name in ("asynchronous", "batch")}
    every: list[Profile] = [load_profile(n) for n in available_profiles()] + [load_profile(str(p))
                                                                             for p in profiles.values()]
    accounts = {ns: profile_accounts(ns, *every) for ns in NAMESPACES.values()}
    everyone = [account for per_namespace in accounts.values() for account in per_namespace]
    passwords = new_passwords(everyone)
    # With test hosts, the servers listen on the hosts' gateway (a local address of this machine,
    # reached from a host over its link only); without, on loopback.
    bind = test_hosts.gateway if isinstance(test_hosts, HostNetwork) else "127.0.0.1"
    try:
        cluster = start_rabbitmq_cluster(3, definitions=rabbitmq_definitions(everyone, passwords), bind=bind)
    except ServiceUnavailable as exc:
        pytest.fail(f"the cluster tests need local rabbitmq-server processes (three joined nodes):\n{exc}")
    with cluster, start_redis(appendonly=True, acl=redis_acl(everyone, passwords), bind=bind) as redis:
        files = {ns: logins(accounts[ns], passwords, cluster.url, redis.url, ns).save(directory / f"{ns}.json")
                 for ns in NAMESPACES.values()}
        yield ClusterServices(cluster, redis, files, profiles)


async def in_thread(call, *args):  # noqa: ANN001, ANN002, ANN201 - the cluster's blocking calls
    return await asyncio.to_thread(call, *args)


async def kill_node(cluster: RabbitMQCluster, node: RabbitMQService) -> float:
    await in_thread(node.kill)
    return time.monotonic()


async def restart_node(cluster: RabbitMQCluster, node: RabbitMQService) -> float:
    """Restart a killed node; seconds until the cluster runs all its nodes again."""
    started = time.monotonic()
    await in_thread(node.restart)

    async def whole() -> bool:
        return len(await in_thread(cluster.running_nodes)) == len(cluster.nodes)

    await wait_until(whole, timeout=60, interval=0.5)
    return time.monotonic() - started


def other_than(cluster: RabbitMQCluster, node: RabbitMQService, preferred: RabbitMQService) -> RabbitMQService:
    return preferred if preferred is not node else next(n for n in cluster.nodes if n is not node)


def caller_view(sent: list) -> str:
    statuses = Counter(s.status for s in sent)
    slowest = max((s.seconds for s in sent), default=0.0)
    return f"{dict(sorted(statuses.items()))} slowest={slowest:.2f}s"


# --------------------------------------------------------------------------- asynchronous


async def workers_and_ingress(settings: Settings, profile: str, stages: tuple[str, ...],
                              log_dir: Path) -> AsyncIterator[tuple[Stack, dict[str, WorkerProcess]]]:
    """``stages`` as real worker processes, and the ingress in this process."""
    with stage_processes(settings, profile, stages, log_dir) as workers:
        async for stack in start_stack(settings, profile, stages=[]):
            yield stack, workers


@pytest.fixture
async def async_stack(cluster_services: ClusterServices, test_hosts: HostNetwork | str,
                      tmp_path: Path) -> AsyncIterator[tuple[Stack, dict]]:
    """On the test hosts when there are some (the ingress a real process there), else on loopback."""
    settings = cluster_services.settings(NAMESPACES["asynchronous"])
    profile, stages = str(cluster_services.profiles["asynchronous"]), ("preprocess", "predict", "store")
    running = (on_hosts(settings, profile, stages, test_hosts, tmp_path) if isinstance(test_hosts, HostNetwork)
               else workers_and_ingress(settings, profile, stages, tmp_path))
    async for stack_and_processes in running:
        yield stack_and_processes


async def test_asynchronous_quorum_queues_survive_two_node_kills(
    cluster_services: ClusterServices, async_stack: tuple[Stack, dict[str, WorkerProcess]]
) -> None:
    stack, workers = async_stack
    cluster = cluster_services.cluster
    done = DoneCounter(stack.settings.redis_url, stack.results.done_channel).start()
    await asyncio.sleep(0.2)
    # The client waits longer than the ingress's publish timeout (10 s): a POST whose node dies
    # mid-publish must still get its 202 or 503, and a status 0 here is a real hang.
    load = Load(stack, interval_s=0.05, max_seconds=90, client_timeout_s=15).start()
    queue = stack.profile.queue_spec(stack.settings.namespace, "predict").name
    rounds: list[str] = []
    recoveries: list[float] = []
    try:
        await asyncio.sleep(1.0)
        assert load.accepted(), [s.status for s in load.sent][:5]
        first = await in_thread(cluster.leader_of, queue)
        second: RabbitMQService | None = None
        for victim_pick in ("leader of the stage queues", "a second node, after the first rejoined"):
            victim = first if second is None else second
            killed_at = await kill_node(cluster, victim)

            async def completed_after_kill(since: float = killed_at) -> bool:
                ids = [s.job_id for s in load.sent if s.status == 202 and s.at > since and s.job_id]
                return bool(ids) and any(r["status"] == "succeeded" for r in (await records(stack, ids[:20])).values())

            recovered = await wait_for_condition(completed_after_kill, timeout=45, interval=0.1)
            if recovered is None:
                refused = await stack.client.post("/v1/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
            assert recovered is not None, (f"no job accepted after killing {victim.node} completed; callers saw "
                                           f"{caller_view(load.between(killed_at, time.monotonic()))}; now "
                                           f"{refused.status_code} {refused.text}; readyz {await readyz(stack)}\n"
                                           f"{await in_thread(cluster.describe)}\n"
                                           + "\n".join(f"--- {n}\n{w.log()[-1500:]}" for n, w in workers.items()))
            recoveries.append(recovered)
            back = await restart_node(cluster, victim)
            window = load.between(killed_at, time.monotonic())
            rounds.append(f"{victim_pick} ({victim.node}): accepted job completed {recovered:.2f}s after the kill, "
                          f"node back in {back:.1f}s, callers saw {caller_view(window)}")
            if second is None:
                second = other_than(cluster, first, await in_thread(cluster.leader_of, queue))
        await asyncio.sleep(1.0)
    finally:
        await load.stop()
        for line in rounds:
            print(f"\n[fault cluster asynchronous, timeline] {line}")
    try:
        # What callers saw: accepted (202) or a clean refusal (503) while a node was gone; no hang
        # (the slowest is in the timeline: a publish in flight when its node dies waits for its confirm).
        assert {s.status for s in load.sent} <= {202, 503}, caller_view(load.sent)
        for proc in workers.values():  # they failed over by themselves
            assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
        await check_exactly_once(stack, load, done, "cluster asynchronous quorum, 2 node kills", max(recoveries))
    finally:
        await done.close()


# --------------------------------------------------------------------------- stages on other hosts

INGRESS_PORT = 8080  # the ingress host's own port: nothing else listens in its namespace


async def on_hosts(settings: Settings, profile: str, stages: tuple[str, ...], network: HostNetwork,
                   log_dir: Path) -> AsyncIterator[tuple[Stack, dict[str, WorkerProcess]]]:
    """``stages`` as real worker processes and the ingress as a real ``toposerve ingress``, each
    on its own test host; the test process calls the ingress over the ingress host's link. The
    ingress's process is in the yielded dict too (key ``ingress``)."""
    prefixes = {name: network.hosts[name].command() for name in stages}
    ingress_host = network.hosts["ingress"]
    ingress = IngressProcess(settings, profile, log_dir, ingress_host.address, INGRESS_PORT,
                             prefix=ingress_host.command())
    with stage_processes(settings, profile, stages, log_dir, prefixes) as workers:
        ingress.start()
        try:
            await in_thread(ingress.wait_ready)
            checked = load_checked_profile(profile, settings)
            async with httpx.AsyncClient(base_url=ingress.base_url, timeout=30) as client:
                results = ResultStore(connect_redis(settings.redis_url), settings.namespace,
                                      checked.ingress.result_ttl_s)
                try:
                    yield Stack(settings, checked, {}, client, results), {**workers, "ingress": ingress}
                finally:
                    await results.client.aclose()
        finally:
            ingress.stop()


@pytest.fixture
async def hosts_async_stack(cluster_services: ClusterServices, hosts: HostNetwork,
                            tmp_path: Path) -> AsyncIterator[tuple[Stack, dict[str, WorkerProcess], HostNetwork]]:
    async for stack, processes in on_hosts(cluster_services.settings(NAMESPACES["asynchronous on hosts"]),
                                           str(cluster_services.profiles["asynchronous"]),
                                           ("preprocess", "predict", "store"), hosts, tmp_path):
        yield stack, processes, hosts


async def test_asynchronous_quorum_queues_survive_a_stage_host_losing_its_link(
    cluster_services: ClusterServices, hosts_async_stack: tuple[Stack, dict[str, WorkerProcess], HostNetwork]
) -> None:
    stack, processes, network = hosts_async_stack
    predict = network.hosts["predict"]
    done = DoneCounter(stack.settings.redis_url, stack.results.done_channel).start()
    await asyncio.sleep(0.2)
    load = Load(stack, interval_s=0.05, max_seconds=60, client_timeout_s=15).start()
    try:
        await asyncio.sleep(1.0)
        assert load.accepted(), [s.status for s in load.sent][:5]
        await in_thread(predict.link_down)
        cut_at = time.monotonic()
        try:
            await asyncio.sleep(LINK_CUT_S)
            # The cut is real: a job accepted once the predict host was cut off does not complete
            # (its stage consumes over that link only); the other hosts keep accepting.
            cut_off = [s.job_id for s in load.between(cut_at + 1.0, time.monotonic()) if s.status == 202 and s.job_id]
            done_while_cut = [i for i, r in (await records(stack, cut_off)).items() if r["status"] == "succeeded"]
        finally:
            await in_thread(predict.link_up)
        up_at = time.monotonic()
        assert cut_off, f"nothing was accepted while the predict host was cut off: {caller_view(load.sent)}"
        assert not done_while_cut, f"{len(done_while_cut)} jobs completed while their predict host had no link"

        async def backlog_done() -> bool:
            return all(r["status"] == "succeeded" for r in (await records(stack, cut_off)).values())

        recovered = await wait_for_condition(backlog_done, timeout=45, interval=0.1)
        assert recovered is not None, (f"jobs accepted during the cut did not complete after the link came back; "
                                       f"readyz {await readyz(stack)}\n{await in_thread(cluster_services.cluster.describe)}\n"
                                       + "\n".join(f"--- {n}\n{p.log()[-1500:]}" for n, p in processes.items()))
        await asyncio.sleep(1.0)
    finally:
        await load.stop()
    window = load.between(cut_at, up_at + recovered)
    print(f"\n[fault cluster asynchronous on hosts, timeline] predict host ({predict.address}) cut off "
          f"{LINK_CUT_S:.0f}s: {len(cut_off)} jobs accepted meanwhile, all completed {recovered:.2f}s after the "
          f"link came back; callers saw {caller_view(window)}; hosts {network.describe()}")
    try:
        assert {s.status for s in load.sent} <= {202, 503}, caller_view(load.sent)
        for proc in processes.values():  # nothing restarted them
            assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
        await check_exactly_once(stack, load, done, "cluster asynchronous quorum, predict host link cut 10s",
                                 recovered)
    finally:
        await done.close()


# --------------------------------------------------------------------------- synchronous


@pytest.fixture
async def sync_stack(cluster_services: ClusterServices, tmp_path: Path) -> AsyncIterator[tuple[Stack, dict]]:
    async for running in workers_and_ingress(cluster_services.settings(NAMESPACES["synchronous"]), "synchronous",
                                             ("preprocess", "predict"), tmp_path):
        yield running


async def test_synchronous_callers_get_answers_or_quick_refusals_across_a_node_kill(
    cluster_services: ClusterServices, sync_stack: tuple[Stack, dict[str, WorkerProcess]]
) -> None:
    stack, workers = sync_stack
    cluster = cluster_services.cluster
    # Classic queues live on the node that declared them: the first node, where every
    # process connects first. Killing it takes the sync queues away until it is back.
    victim = cluster.nodes[0]
    load = Load(stack, interval_s=0.03, max_seconds=90, params={"timeout": "2"}, client_timeout_s=8).start()
    try:
        await asyncio.sleep(1.0)
        assert any(s.status == 200 for s in load.sent), caller_view(load.sent)
        killed_at = await kill_node(cluster, victim)
        await asyncio.sleep(2.0)
        back = await restart_node(cluster, victim)

        async def answering() -> bool:
            return any(s.status == 200 and s.at > killed_at + back for s in load.sent)

        recovered = await wait_until(answering, timeout=45, interval=0.1)
        await asyncio.sleep(1.0)
    finally:
        await load.stop()
    window = load.between(killed_at, time.monotonic())
    wrong = [s for s in load.sent if s.status == 200 and not s.correct]
    hangs = [s for s in load.sent if s.status in (0, -1)]
    summary("cluster synchronous classic, node kill", sent=len(load.sent), accepted=len(load.sent),
            completed=sum(1 for s in load.sent if s.status == 200), lost=len(hangs), duplicated=None,
            recover_s=back + recovered, wrong_answers=len(wrong), callers_from_kill=caller_view(window))
    assert not hangs, caller_view(hangs)
    assert not wrong, [(s.request.label, s.answer) for s in wrong][:5]
    assert {s.status for s in load.sent} <= {200, 503, 504}, caller_view(load.sent)
    for proc in workers.values():
        assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]


# --------------------------------------------------------------------------- batch

BATCH_ROWS, BATCH_CHUNK_ROWS = 200_000, 1000


@pytest.fixture
async def batch_stack(cluster_services: ClusterServices, tmp_path: Path) -> AsyncIterator[tuple[Stack, dict]]:
    settings = cluster_services.settings(NAMESPACES["batch"])
    profile = str(cluster_services.profiles["batch"])
    async for stack in start_stack(settings, profile, stages=["preprocess"]):
        with stage_processes(settings, profile, ("predict", "store"), tmp_path) as workers:
            yield stack, workers


async def test_batch_of_200k_rows_completes_once_across_a_node_kill(
    cluster_services: ClusterServices, batch_stack: tuple[Stack, dict[str, WorkerProcess]]
) -> None:
    stack, workers = batch_stack
    cluster = cluster_services.cluster
    store = workers["store"].process
    assert store is not None
    load = BatchLoad(stack, interval_s=0.5, client_timeout_s=15).start()
    try:
        # The node dies holding the big batch's chunks and predictions (the store is frozen,
        # so none of it is stored yet): they must come through once, from the other replicas.
        store.send_signal(signal.SIGSTOP)
        big = await upload(stack, iris_rows(BATCH_ROWS, seed=11), timeout_s=120, chunk_rows=BATCH_CHUNK_ROWS)
        assert big.status == 202 and big.batch_id is not None, big.status
        at_kill = await batch_status(stack, big.batch_id)
        victim = await in_thread(cluster.leader_of, stack.profile.queue_spec(stack.settings.namespace, "store").name)
        killed_at = await kill_node(cluster, victim)
        store.send_signal(signal.SIGCONT)

        async def accepting() -> bool:
            return any(u.status == 202 and u.at > killed_at for u in load.uploads)

        recovered = await wait_until(accepting, timeout=45, interval=0.05)
        await asyncio.sleep(1.0)
    finally:
        store.send_signal(signal.SIGCONT)
        await load.stop()
    assert not [u for u in load.uploads if u.status not in (202, 503)], Counter(u.status for u in load.uploads)
    for proc in workers.values():
        assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
    await check_every_row_once(stack, load, big, "cluster quorum node kill", recovered, killed=victim.node,
                               chunks_done_at_kill=at_kill and at_kill["chunks_done"])
