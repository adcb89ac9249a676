"""Kubernetes manifests rendered from a deploy profile (``toposerve render k8s``).

Pure functions: a ``Profile`` in, plain dicts (one per Kubernetes object) out, so the
manifests can never drift from the profile that ``toposerve up`` runs, and tests can
check them without a cluster. What is rendered for a profile P in namespace NS:

- a ConfigMap with P's YAML, mounted at /etc/toposerve/profile.yaml in every pod;
- one Deployment per stage (``toposerve worker --stage S``) with P's replica count,
  plus a KEDA ScaledObject scaling it on the backlog of its queue ``NS.P.S``, and one
  KEDA TriggerAuthentication that reads the AMQP URL from the AMQP Secret;
- the ingress Deployment (``toposerve ingress``) and its Service on port 8000.
  A ``single_process`` profile (web_single) gets only these: its ingress runs the stages.

Every pod carries ``prometheus.io/scrape|port|path`` annotations: stages serve their
metrics on port 9100, the ingress on 8000 (web_single: its stages' metrics too). Stages
have a liveness probe on 9100 ``/healthz`` (is the event loop turning?); the ingress is
probed on 8000 ``/healthz`` and ``/readyz``.

Credentials only ever come from Secrets (key ``url``), never from the manifests. The
ingress requires API keys: it reads the hashed keys file (``toposerve keys hash``) from
the Secret ``toposerve-api-keys`` (key ``keys.txt``), mounted read-only.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import yaml

from toposerve.deploy.profile import Profile

Obj = dict[str, Any]

INGRESS = "ingress"
HTTP_PORT = 8000
# Each stage serves its Prometheus metrics here (`toposerve worker --metrics-port`); the
# ingress serves its own at HTTP_PORT/metrics.
METRICS_PORT = 9100
PROFILE_DIR = "/etc/toposerve"
PROFILE_FILE = f"{PROFILE_DIR}/profile.yaml"
SECRET_KEY = "url"  # the key holding the connection URL in both Secrets
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


def _env(namespace: str, amqp_secret: str, redis_secret: str) -> list[Obj]:
    def from_secret(var: str, secret: str) -> Obj:
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": SECRET_KEY}}}

    return [
        # The toposerve namespace (prefix of exchanges, queues, Redis keys) is the Kubernetes
        # namespace: one toposerve namespace per Kubernetes namespace, and the ScaledObjects'
        # queue names are right by construction.
        {"name": "TOPOSERVE_NAMESPACE", "value": namespace},
        from_secret("TOPOSERVE_AMQP_URL", amqp_secret),
        from_secret("TOPOSERVE_REDIS_URL", redis_secret),
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


def _trigger_authentication(profile: Profile, namespace: str, amqp_secret: str) -> Obj:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": _meta(k8s_name("toposerve", profile.name, "rabbitmq"), namespace, labels(profile)),
        # KEDA's rabbitmq scaler takes the whole AMQP URL (credentials and vhost) as "host".
        "spec": {"secretTargetRef": [{"parameter": "host", "name": amqp_secret, "key": SECRET_KEY}]},
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


def render_k8s(
    profile: Profile,
    *,
    namespace: str,
    image: str,
    amqp_secret: str = "toposerve-amqp",
    redis_secret: str = "toposerve-redis",
    api_keys_secret: str = "toposerve-api-keys",
) -> list[Obj]:
    """The Kubernetes objects that run ``profile`` in ``namespace`` (see the module docstring)."""
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace (DNS label)")
    workers = stage_workers(profile)
    text = profile_yaml(profile)
    sha = hashlib.sha256(text.encode()).hexdigest()
    env = _env(namespace, amqp_secret, redis_secret)

    objects: list[Obj] = [{
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(k8s_name("toposerve", profile.name), namespace, labels(profile)),
        "data": {"profile.yaml": text},
    }]
    ingress = _deployment(profile, namespace, INGRESS, 1, _ingress_container(profile, image, env), sha, HTTP_PORT)
    _require_api_keys(ingress, api_keys_secret)
    objects.append(ingress)
    objects.append(_service(profile, namespace))
    for stage in workers:
        container = _stage_container(profile, stage, image, env)
        objects.append(_deployment(profile, namespace, stage, profile.stages[stage].replicas, container, sha,
                                   METRICS_PORT))
    if workers:
        objects.append(_trigger_authentication(profile, namespace, amqp_secret))
        objects.extend(_scaled_object(profile, namespace, stage) for stage in workers)
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
    amqp_secret: str = "toposerve-amqp",
    redis_secret: str = "toposerve-redis",
    api_keys_secret: str = "toposerve-api-keys",
) -> str:
    """``render_k8s`` as one multi-document YAML stream, for ``kubectl apply -f``."""
    objects = render_k8s(profile, namespace=namespace, image=image, amqp_secret=amqp_secret,
                         redis_secret=redis_secret, api_keys_secret=api_keys_secret)
    keda = ", and KEDA for the ScaledObjects" if any(o["kind"] == "ScaledObject" for o in objects) else ""
    header = (f"# Generated by `toposerve render k8s --profile {profile.name}` from the profile; "
              "regenerate rather than edit.\n"
              f"# Needs the Secrets {amqp_secret} and {redis_secret} (key {SECRET_KEY}) and {api_keys_secret} "
              f"(key {API_KEYS_SECRET_KEY}, lines of `toposerve keys hash`) in namespace {namespace}{keda}.\n")
    return header + "---\n".join(dump_yaml(obj) for obj in objects)
