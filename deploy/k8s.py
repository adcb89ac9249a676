"""Kubernetes manifests rendered from a deploy profile (``toposerve render k8s``).

Pure functions: a ``Profile`` in, plain dicts (one per Kubernetes object) out, so the
manifests can never drift from the profile that ``toposerve up`` runs, and tests can
check them without a cluster. What is rendered for a profile P in namespace NS:

- a ConfigMap with P's YAML, mounted at /etc/toposerve/profile.yaml in every pod;
- one Deployment per stage (``toposerve worker --stage S``) with P's replica count,
  plus a KEDA ScaledObject scaling it on the backlog of its queue ``NS.P.S``, and one
  KEDA TriggerAuthentication that logs in as the ``monitor`` role (queue depths only);
- the ingress Deployment (``toposerve ingress``) and its Service on port 8000.
  A ``single_process`` profile (web_single) gets only these: its ingress runs the stages;
- the broker accounts, as the RabbitMQ messaging-topology-operator's objects: per role a
  ``User`` (credentials imported from a Secret), a ``Permission`` and a ``TopicPermission``
  per topic exchange, on the ``RabbitmqCluster`` named by ``rabbitmq_cluster`` — an existing
  one, or (``rabbitmq_replicas`` > 0) one rendered here: the RabbitMQ Cluster Operator's
  ``RabbitmqCluster`` with that many replicas and quorum-queue-friendly settings.

Every pod carries ``prometheus.io/scrape|port|path`` annotations: stages serve their
metrics on port 9100, the ingress on 8000 (web_single: its stages' metrics too). Stages
have a liveness probe on 9100 ``/healthz`` (is the event loop turning?); the ingress is
probed on 8000 ``/healthz`` and ``/readyz``.

Credentials only ever come from Secrets, never from the manifests: each pod logs in as its
role (brokers/accounts.py) with the URLs of the Secret ``<prefix>-<role>`` (keys ``amqp-url``,
``redis-url``). ``secret_objects`` renders those Secrets, the Users' credentials and the Redis
ACL file with given passwords, for ``toposerve render k8s-secrets`` (a file that is applied,
never committed). The ingress requires API keys: it reads the hashed keys file
(``toposerve keys hash``) from the Secret ``toposerve-api-keys`` (key ``keys.txt``), mounted
read-only.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import yaml

from toposerve.brokers import Account
from toposerve.deploy.accounts import (
    ADMIN_USER,
    AdminPasswords,
    ingress_role,
    logins,
    profile_accounts,
    redis_acl,
    redis_acl_file,
    stage_role,
)
from toposerve.deploy.profile import Profile

Obj = dict[str, Any]

INGRESS = "ingress"
HTTP_PORT = 8000
# Each stage serves its Prometheus metrics here (`toposerve worker --metrics-port`); the
# ingress serves its own at HTTP_PORT/metrics.
METRICS_PORT = 9100
PROFILE_DIR = "/etc/toposerve"
PROFILE_FILE = f"{PROFILE_DIR}/profile.yaml"
# A role's Secret ``<prefix>-<role>``: its URLs (password included) under these keys.
AMQP_URL_KEY, REDIS_URL_KEY = "amqp-url", "redis-url"
DEFAULT_SECRET_PREFIX = "toposerve"
# The RabbitmqCluster (RabbitMQ Cluster Operator) the accounts are made on; its Service has its name.
DEFAULT_RABBITMQ_CLUSTER = "rabbitmq"
VHOST = "/"
MONITOR = "monitor"  # the role KEDA reads queue depths as
ACCOUNTS = "accounts"  # the component label of the accounts' objects
REDIS_ACL_KEY = "users.acl"
# Recent topology operators import (and watch, to rotate passwords) only Secrets with this label;
# older ones ignore it.
TOPOLOGY_OPERATOR_LABEL = {"rabbitmq.com/topology-operator": "true"}
API_KEYS_SECRET_KEY = "keys.txt"  # the key holding the hashed API keys file
API_KEYS_DIR = "/etc/toposerve-keys"
# The image's USER (deploy/Dockerfile); numeric so the kubelet can enforce runAsNonRoot.
RUN_AS_UID = 10001
# SIGTERM drains a stage (Settings.drain_timeout_s, 10 s by default): leave it room.
GRACE_PERIOD_S = 30

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Starting points, to tune with `toposerve bench` on the target nodes. A CPU limit of one
# core matches the processes: one event loop each, ONNX Runtime with one intra-op thread
# (Settings.ort_intra_op_threads). A stage measured about 90 MiB resident after loading.
_Resources = dict[str, dict[str, str]]
_SMALL: _Resources = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}
_MEDIUM: _Resources = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}
# By stage kind; a kind not listed here gets _MEDIUM.
_STAGE_RESOURCES: dict[str, _Resources] = {
    "preprocess": _MEDIUM,
    # Holds up to max_batch_size messages and their tensors at once.
    "predict": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    "store": _SMALL,  # Redis writes only
    "telemetry": _SMALL,
}
# Bodies up to Settings.max_body_bytes (8 MiB) for many concurrent requests.
_INGRESS_RESOURCES: _Resources = {"requests": {"cpu": "250m", "memory": "256Mi"},
                                  "limits": {"cpu": "1", "memory": "1Gi"}}
# web_single: the ingress and every stage replica in one pod.
_SINGLE_PROCESS_RESOURCES: _Resources = {"requests": {"cpu": "1", "memory": "768Mi"},
                                         "limits": {"cpu": "2", "memory": "2Gi"}}


def k8s_name(*parts: str) -> str:
    """A DNS-1123 label from name parts (profile and stage names may hold '_', Kubernetes names may not)."""
    name = "-".join(parts).replace("_", "-")
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise ValueError(f"{name!r} is not a valid Kubernetes name (DNS label, at most 63 characters)")
    return name


def stage_workers(profile: Profile) -> list[str]:
    """Stages that run as their own processes/containers: none when the ingress runs them all."""
    if INGRESS in profile.stages:
        # The ingress's Deployment/Service (and compose service) would share the stage's name.
        raise ValueError(f"profile {profile.name!r}: a stage may not be called {INGRESS!r}")
    return [] if profile.ingress.single_process else list(profile.stages)


def max_replicas(profile: Profile, stage: str) -> int:
    """The autoscaling cap of a stage. TODO: a ``max_replicas`` field on ``_StageBase``."""
    spec = profile.stages[stage]
    explicit: int | None = getattr(spec, "max_replicas", None)
    return explicit if explicit is not None else max(spec.replicas * 4, 4)


def queue_length_target(profile: Profile, stage: str) -> int:
    """Ready messages per replica before KEDA adds one: a full prefetch window waiting on top
    of the one each replica already holds means the replicas are saturated."""
    return profile.stages[stage].prefetch


def profile_yaml(profile: Profile) -> str:
    # Every field written out (defaults included), so the pods read exactly this profile.
    return yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False)


def labels(profile: Profile, component: str | None = None) -> dict[str, str]:
    result = {"app.kubernetes.io/name": "toposerve"}
    if component is not None:
        result["app.kubernetes.io/component"] = component
    result["toposerve/profile"] = profile.name
    return result


def _meta(name: str, namespace: str, object_labels: dict[str, str]) -> Obj:
    return {"name": name, "namespace": namespace, "labels": object_labels}


def role_secret(prefix: str, role: str) -> str:
    """The Secret with a role's URLs (``amqp-url``, ``redis-url``), which its pods read."""
    return k8s_name(prefix, role)


def credentials_secret(prefix: str, role: str) -> str:
    """The Secret a role's ``User`` imports (``username``, ``password``). Not ``<user>-user-credentials``:
    the operator may make one of that name itself."""
    return k8s_name(prefix, role, "rabbitmq")


def redis_acl_secret(prefix: str) -> str:
    return k8s_name(prefix, "redis-acl")


def redis_admin_secret(prefix: str) -> str:
    return k8s_name(prefix, "redis-admin")


def _env(namespace: str, secret: str) -> list[Obj]:
    def from_secret(var: str, key: str) -> Obj:
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}

    return [
        # The toposerve namespace (prefix of exchanges, queues, Redis keys, account names) is the
        # Kubernetes namespace: one toposerve namespace per Kubernetes namespace, and the
        # ScaledObjects' queue names and the accounts' permissions are right by construction.
        {"name": "TOPOSERVE_NAMESPACE", "value": namespace},
        from_secret("TOPOSERVE_AMQP_URL", AMQP_URL_KEY),
        from_secret("TOPOSERVE_REDIS_URL", REDIS_URL_KEY),
    ]


def _deployment(
    profile: Profile,
    namespace: str,
    component: str,
    replicas: int,
    container: Obj,
    profile_sha256: str,
    metrics_port: int,
) -> Obj:
    pod_labels = labels(profile, component)
    annotations = {
        "toposerve/profile-sha256": profile_sha256,
        # The prometheus.io/* convention: Prometheus' kubernetes-pods scrape job (and most
        # agents) scrape annotated pods with no further configuration.
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics_port),
        "prometheus.io/path": "/metrics",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(k8s_name("toposerve", profile.name, component), namespace, pod_labels),
        "spec": {
            # Equal to the ScaledObject's minReplicaCount: re-applying the manifest resets a
            # scaled-up stage to this floor and KEDA raises it again on the next poll.
            "replicas": replicas,
            "selector": {"matchLabels": pod_labels},
            "template": {
                # A changed profile changes this annotation, which rolls the pods onto it.
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": {
                    # Service links would add TOPOSERVE_*_PORT variables (from Services named
                    # toposerve-...) into the settings' environment prefix.
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": GRACE_PERIOD_S,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_UID,
                        "runAsGroup": RUN_AS_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "profile", "configMap": {"name": k8s_name("toposerve", profile.name)}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _container(name: str, args: list[str], image: str, env: list[Obj], resources: _Resources) -> Obj:
    return {
        "name": name,
        "image": image,
        "command": ["toposerve"],
        "args": args,
        # Copies: each returned object is its own, so a caller may edit one safely.
        "env": copy.deepcopy(env),
        "resources": copy.deepcopy(resources),
        "volumeMounts": [
            {"name": "profile", "mountPath": PROFILE_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _http_probe(path: str, period_s: int, failures: int) -> Obj:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "timeoutSeconds": 3,
            "failureThreshold": failures}


def _ingress_container(profile: Profile, image: str, env: list[Obj]) -> Obj:
    resources = _SINGLE_PROCESS_RESOURCES if profile.ingress.single_process else _INGRESS_RESOURCES
    args = ["ingress", "--profile", PROFILE_FILE, "--host", "0.0.0.0", "--port", str(HTTP_PORT)]
    container = _container(INGRESS, args, image, env, resources)
    container["ports"] = [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    # Models load before the server answers: the startup probe gives that a minute, then
    # liveness restarts a hung process and readiness takes the pod out of the Service while
    # RabbitMQ, Redis or a model is not ready (/readyz says which).
    container["startupProbe"] = _http_probe("/healthz", 2, 30)
    container["livenessProbe"] = _http_probe("/healthz", 10, 3)
    container["readinessProbe"] = _http_probe("/readyz", 5, 2)
    return container


def _stage_container(profile: Profile, stage: str, image: str, env: list[Obj]) -> Obj:
    args = ["worker", "--profile", PROFILE_FILE, "--stage", stage,
            "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0"]
    resources = _STAGE_RESOURCES.get(profile.stages[stage].kind, _MEDIUM)
    container = _container(k8s_name(stage), args, image, env, resources)
    container["ports"] = [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    # A crashed stage exits and is restarted; this catches one that is alive but stuck:
    # /healthz answers 503 once its event loop has not turned for 30 s (consumers/liveness.py).
    # No readiness probe: a stage serves no traffic, its queue holds the work meanwhile.
    container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "metrics"}, "initialDelaySeconds": 10,
                                  "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3}
    return container


def _service(profile: Profile, namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(k8s_name("toposerve", profile.name, INGRESS), namespace, labels(profile, INGRESS)),
        "spec": {
            "type": "ClusterIP",
            "selector": labels(profile, INGRESS),
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _trigger_authentication(profile: Profile, namespace: str, secret_prefix: str) -> Obj:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": _meta(k8s_name("toposerve", profile.name, "rabbitmq"), namespace, labels(profile)),
        # KEDA's rabbitmq scaler takes the whole AMQP URL (credentials and vhost) as "host". It
        # logs in as the monitor role: in AMQP mode the scaler reads a queue's depth with a passive
        # declare, which needs no permission (the management API would need a tagged user).
        "spec": {"secretTargetRef": [{"parameter": "host", "name": role_secret(secret_prefix, MONITOR),
                                      "key": AMQP_URL_KEY}]},
    }


def _scaled_object(profile: Profile, namespace: str, stage: str) -> Obj:
    name = k8s_name("toposerve", profile.name, stage)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(name, namespace, labels(profile, stage)),
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": profile.stages[stage].replicas,
            "maxReplicaCount": max_replicas(profile, stage),
            "pollingInterval": 10,
            "triggers": [{
                "type": "rabbitmq",
                "metadata": {
                    "protocol": "amqp",
                    "queueName": profile.queue_spec(namespace, stage).name,
                    "mode": "QueueLength",
                    "value": str(queue_length_target(profile, stage)),
                },
                "authenticationRef": {"name": k8s_name("toposerve", profile.name, "rabbitmq")},
            }],
        },
    }


def _require_api_keys(deployment: Obj, secret: str) -> None:
    """API keys on (api/auth.py): the hashed keys file from a Secret, never literal keys."""
    pod = deployment["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "api-keys", "secret": {"secretName": secret, "defaultMode": 0o440}})
    container = pod["containers"][0]
    container["volumeMounts"].append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    container["env"].append({"name": "TOPOSERVE_API_KEYS_FILE", "value": f"{API_KEYS_DIR}/{API_KEYS_SECRET_KEY}"})


def _account_labels(profile: Profile, role: str) -> dict[str, str]:
    return {**labels(profile, ACCOUNTS), "toposerve/role": role}


def rabbitmq_account_objects(profile: Profile, namespace: str, accounts: list[Account], secret_prefix: str,
                             rabbitmq_cluster: str) -> list[Obj]:
    """The messaging-topology-operator's objects that make ``accounts`` on the cluster's broker:
    per role a ``User`` whose username and password come from its credentials Secret (never from
    here), its ``Permission`` on the vhost and a ``TopicPermission`` per topic exchange."""
    cluster = {"name": rabbitmq_cluster}
    objects: list[Obj] = []
    for account in accounts:
        name = k8s_name(secret_prefix, account.role)
        meta = _account_labels(profile, account.role)
        objects.append({
            "apiVersion": "rabbitmq.com/v1beta1",
            "kind": "User",
            "metadata": _meta(name, namespace, meta),
            # No tags: no management UI or HTTP API, messaging only.
            "spec": {"rabbitmqClusterReference": dict(cluster),
                     "importCredentialsSecret": {"name": credentials_secret(secret_prefix, account.role)}},
        })
        broker = account.broker
        objects.append({
            "apiVersion": "rabbitmq.com/v1beta1",
            "kind": "Permission",
            "metadata": _meta(name, namespace, meta),
            # userReference, not the user name: the operator waits for the User to exist.
            "spec": {"vhost": VHOST, "userReference": {"name": name},
                     "permissions": {"configure": broker.configure, "write": broker.write, "read": broker.read},
                     "rabbitmqClusterReference": dict(cluster)},
        })
        for topic in broker.topics:
            objects.append({
                "apiVersion": "rabbitmq.com/v1beta1",
                "kind": "TopicPermission",
                "metadata": _meta(k8s_name(name, topic.exchange.removeprefix(f"{namespace}.")), namespace, meta),
                "spec": {"vhost": VHOST, "userReference": {"name": name},
                         "permissions": {"exchange": topic.exchange, "write": topic.write, "read": topic.read},
                         "rabbitmqClusterReference": dict(cluster)},
            })
    return objects


# rabbitmq.conf lines of a rendered RabbitmqCluster, for quorum queues (README, "A RabbitMQ cluster"):
# a minority side of a network split pauses instead of serving stale queues, and new queue
# leaders are spread over the nodes instead of all landing on the node the client declared on.
QUORUM_CLUSTER_CONFIG = "cluster_partition_handling = pause_minority\nqueue_leader_locator = balanced\n"


def rabbitmq_cluster_object(name: str, namespace: str, replicas: int, object_labels: dict[str, str]) -> Obj:
    """A ``RabbitmqCluster`` (rabbitmq.com/v1beta1, the RabbitMQ Cluster Operator's): ``replicas``
    nodes; its Service has its name, which the rendered Secrets' URLs point at."""
    if replicas < 1:
        raise ValueError(f"a RabbitmqCluster needs at least one replica, not {replicas}")
    return {
        "apiVersion": "rabbitmq.com/v1beta1",
        "kind": "RabbitmqCluster",
        "metadata": _meta(name, namespace, object_labels),
        "spec": {"replicas": replicas, "rabbitmq": {"additionalConfig": QUORUM_CLUSTER_CONFIG}},
    }


def _check_namespace(namespace: str) -> None:
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace (DNS label)")


def _pod_monitor(profile: Profile, namespace: str) -> Obj:
    """A Prometheus Operator PodMonitor for the profile's pods: the ingress's ``http`` port and the
    stages' ``metrics`` port (what the pods' prometheus.io annotations name, for the Operator)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(k8s_name("toposerve", profile.name), namespace, labels(profile)),
        "spec": {
            "selector": {"matchLabels": labels(profile)},
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "5s"},
                                    {"port": "metrics", "path": "/metrics", "interval": "5s"}],
        },
    }


def render_k8s(
    profile: Profile,
    *,
    namespace: str,
    image: str,
    secret_prefix: str = DEFAULT_SECRET_PREFIX,
    rabbitmq_cluster: str = DEFAULT_RABBITMQ_CLUSTER,
    api_keys_secret: str = "toposerve-api-keys",
    rabbitmq_replicas: int = 0,
) -> list[Obj]:
    """The Kubernetes objects that run ``profile`` in ``namespace`` (see the module docstring);
    ``rabbitmq_replicas`` > 0: a ``RabbitmqCluster`` named ``rabbitmq_cluster`` too (0: it exists)."""
    _check_namespace(namespace)
    workers = stage_workers(profile)
    text = profile_yaml(profile)
    sha = hashlib.sha256(text.encode()).hexdigest()

    objects: list[Obj] = [{
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(k8s_name("toposerve", profile.name), namespace, labels(profile)),
        "data": {"profile.yaml": text},
    }]
    env = _env(namespace, role_secret(secret_prefix, ingress_role(profile)))
    ingress = _deployment(profile, namespace, INGRESS, 1, _ingress_container(profile, image, env), sha, HTTP_PORT)
    _require_api_keys(ingress, api_keys_secret)
    objects.append(ingress)
    objects.append(_service(profile, namespace))
    for stage in workers:
        env = _env(namespace, role_secret(secret_prefix, stage_role(profile, stage)))
        container = _stage_container(profile, stage, image, env)
        objects.append(_deployment(profile, namespace, stage, profile.stages[stage].replicas, container, sha,
                                   METRICS_PORT))
    if workers:
        objects.append(_trigger_authentication(profile, namespace, secret_prefix))
        objects.extend(_scaled_object(profile, namespace, stage) for stage in workers)
    objects.append(_pod_monitor(profile, namespace))
    objects.extend(rabbitmq_account_objects(profile, namespace, profile_accounts(namespace, profile), secret_prefix,
                                            rabbitmq_cluster))
    if rabbitmq_replicas:
        objects.insert(0, rabbitmq_cluster_object(rabbitmq_cluster, namespace, rabbitmq_replicas,
                                                  labels(profile, "rabbitmq")))
    return objects


_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?")


def _secret(name: str, namespace: str, object_labels: dict[str, str], data: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name, namespace, object_labels),
            "type": "Opaque", "stringData": data}


def secret_objects(
    profile: Profile,
    *,
    namespace: str,
    passwords: dict[str, str],
    admins: AdminPasswords,
    amqp_host: str = DEFAULT_RABBITMQ_CLUSTER,
    redis_host: str = "redis",
    secret_prefix: str = DEFAULT_SECRET_PREFIX,
) -> list[Obj]:
    """The Secrets the objects of ``render_k8s`` need, with these passwords (pure):

    - per role, ``<prefix>-<role>-rabbitmq`` (``username``, ``password``): what its ``User`` imports;
    - per role, ``<prefix>-<role>`` (``amqp-url``, and ``redis-url`` for a role that uses Redis):
      its URLs on ``amqp_host`` and ``redis_host`` (``HOST[:PORT]``), what its pods read;
    - ``<prefix>-redis-acl`` (``users.acl``): the ACL file for ``redis-server --aclfile``, with a
      user per role, the administrator and a default user nobody can log in as;
    - ``<prefix>-redis-admin`` (``username``, ``password``): that administrator's login.
    """
    _check_namespace(namespace)
    for host in (amqp_host, redis_host):
        if not _HOST.fullmatch(host):
            raise ValueError(f"{host!r} is not HOST or HOST:PORT")
    accounts = profile_accounts(namespace, profile)
    urls = logins(accounts, passwords, f"amqp://{amqp_host}/", f"redis://{redis_host}/0", namespace)
    objects: list[Obj] = []
    for account in accounts:
        role_labels = _account_labels(profile, account.role)
        objects.append(_secret(credentials_secret(secret_prefix, account.role), namespace,
                               {**role_labels, **TOPOLOGY_OPERATOR_LABEL},
                               {"username": account.broker.user, "password": passwords[account.role]}))
        login = urls.roles[account.role]
        objects.append(_secret(role_secret(secret_prefix, account.role), namespace, role_labels,
                               {AMQP_URL_KEY: login.amqp_url, **({REDIS_URL_KEY: login.redis_url}
                                                                 if login.redis_url else {})}))
    acl = redis_acl_file(redis_acl(accounts, passwords), ADMIN_USER, admins.redis)
    objects.append(_secret(redis_acl_secret(secret_prefix), namespace, labels(profile, ACCOUNTS), {REDIS_ACL_KEY: acl}))
    objects.append(_secret(redis_admin_secret(secret_prefix), namespace, labels(profile, ACCOUNTS),
                           {"username": ADMIN_USER, "password": admins.redis}))
    return objects


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people: no aliases, multi-line strings as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a dict used twice (labels in metadata and selector) is written twice


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None  # the profile in the ConfigMap stays readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.SequenceNode:
    # Lists of scalars (commands, ports) on one line; anything nested as blocks.
    flat = all(isinstance(item, str | int | float | bool) for item in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(list, _list)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)


def render_k8s_yaml(
    profile: Profile,
    *,
    namespace: str,
    image: str,
    secret_prefix: str = DEFAULT_SECRET_PREFIX,
    rabbitmq_cluster: str = DEFAULT_RABBITMQ_CLUSTER,
    api_keys_secret: str = "toposerve-api-keys",
    rabbitmq_replicas: int = 0,
) -> str:
    """``render_k8s`` as one multi-document YAML stream, for ``kubectl apply -f``."""
    objects = render_k8s(profile, namespace=namespace, image=image, secret_prefix=secret_prefix,
                         rabbitmq_cluster=rabbitmq_cluster, api_keys_secret=api_keys_secret,
                         rabbitmq_replicas=rabbitmq_replicas)
    keda = "; KEDA for the ScaledObjects" if any(o["kind"] == "ScaledObject" for o in objects) else ""
    header = (f"# Generated by `toposerve render k8s --profile {profile.name}` from the profile; "
              "regenerate rather than edit. Holds no credential.\n"
              f"# Needs, in namespace {namespace}: the Secrets of `toposerve render k8s-secrets --profile "
              f"{profile.name} --namespace {namespace}` (an account per role) and {api_keys_secret} "
              f"(key {API_KEYS_SECRET_KEY}, lines of `toposerve keys hash`); "
              + (f"the RabbitMQ Cluster Operator (for the RabbitmqCluster {rabbitmq_cluster} below)"
                 if rabbitmq_replicas else f"the RabbitmqCluster {rabbitmq_cluster}")
              + f" and the RabbitMQ messaging-topology-operator for the Users and permissions{keda}.\n"
              + (f"# A {rabbitmq_replicas}-node cluster: this profile uses {profile.queue_type} queues; durable work "
                 "wants `queue_type: quorum` in the profile (README, \"A RabbitMQ cluster\").\n"
                 if rabbitmq_replicas > 1 and profile.queue_type != "quorum" else ""))
    return header + "---\n".join(dump_yaml(obj) for obj in objects)


def render_k8s_secrets_yaml(profile: Profile, **kwargs: Any) -> str:
    """``secret_objects`` as one YAML stream: passwords in the clear, to apply and never commit."""
    header = (f"# Generated by `toposerve render k8s-secrets --profile {profile.name}` with fresh passwords.\n"
              "# Secret: apply it (`kubectl apply -f`), keep it private, never commit it.\n")
    return header + "---\n".join(dump_yaml(obj) for obj in secret_objects(profile, **kwargs))
