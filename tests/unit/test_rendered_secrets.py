"""The credentials the deployment files read: `toposerve render compose-secrets` and `render k8s-secrets`.

No services here (tests/integration/test_rendered_accounts.py boots RabbitMQ and Redis with the
compose files). Checked: the committed and rendered manifests hold no password or hash; every
role has an account, its URLs carry its own user; the definitions have no guest; Redis's default
user has no administration and no password anyone knows; the files are 0600 in a 0700 directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from toposerve.brokers.settings import Settings
from toposerve.deploy.accounts import ADMIN_USER, AdminPasswords, new_passwords, profile_accounts
from toposerve.deploy.cli.render import render
from toposerve.deploy.components import load_checked_profile
from toposerve.deploy.compose import (
    COMPOSE_FILE,
    compose_secret_files,
    env_file_text,
    render_compose_yaml,
    write_secret_files,
)
from toposerve.deploy.k8s import render_k8s, render_k8s_yaml, secret_objects
from toposerve.deploy.profile import DEPLOY_DIR, Profile, available_profiles

NS = "shop-ml"
PROFILES = available_profiles()
# A URL with a login (user:password@), a RabbitMQ password hash field, a Redis ACL password hash.
CREDENTIAL = re.compile(r"://[^\s/@'\"]+:[^\s/@'\"]+@|password_hash|passwordHash|#[0-9a-f]{64}")


def load(name: str) -> Profile:
    return load_checked_profile(name, Settings())


def all_profiles() -> list[Profile]:
    return [load(name) for name in PROFILES]


@pytest.fixture
def compose_files() -> tuple[list, dict[str, str], AdminPasswords, dict[str, str]]:
    accounts = profile_accounts(NS, *all_profiles())
    passwords, admins = new_passwords(accounts), AdminPasswords.new()
    return accounts, passwords, admins, compose_secret_files(accounts, passwords, admins, NS)


def env_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def rabbitmq_hash_matches(password_hash: str, password: str) -> bool:
    """rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt."""
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def acl_users(text: str) -> dict[str, list[str]]:
    users = {}
    for line in text.splitlines():
        word, name, *rules = line.split()
        assert word == "user"
        assert name not in users, f"{name} twice: Redis refuses the file"
        users[name] = rules
    return users


# --- no credential in what is committed or rendered -------------------------------------


def test_the_committed_compose_file_holds_no_credential() -> None:
    text = COMPOSE_FILE.read_text()
    assert not CREDENTIAL.search(text)
    assert "guest" not in text
    assert render_compose_yaml(all_profiles()) == text  # rendered with no password to render


@pytest.mark.parametrize("name", PROFILES)
def test_the_k8s_manifests_hold_no_credential(name: str) -> None:
    text = render_k8s_yaml(load(name), namespace=NS, image="toposerve:test")
    assert not CREDENTIAL.search(text)
    assert "password" not in text.lower().replace("passwords", "")
    assert "kind: Secret" not in text and "stringData" not in text


# --- compose ------------------------------------------------------------------------------


def test_compose_env_files_log_each_role_in_on_the_compose_network(compose_files) -> None:
    accounts, passwords, _, files = compose_files
    for account in accounts:
        env = env_of(files[f"{account.role}.env"])
        assert env["TOPOSERVE_NAMESPACE"] == NS
        amqp = urlparse(env["TOPOSERVE_AMQP_URL"])
        assert (amqp.scheme, amqp.hostname, amqp.port, amqp.path) == ("amqp", "rabbitmq", 5672, "/")
        assert unquote(amqp.username) == account.broker.user == f"{NS}.{account.role}"
        assert unquote(amqp.password) == passwords[account.role]
        if account.redis is None:
            assert "TOPOSERVE_REDIS_URL" not in env
            continue
        redis = urlparse(env["TOPOSERVE_REDIS_URL"])
        assert (redis.scheme, redis.hostname, redis.port, redis.path) == ("redis", "redis", 6379, "/0")
        assert unquote(redis.username) == account.redis.user and unquote(redis.password) == passwords[account.role]
    # Every role a compose service runs as has its env file.
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for service in services.values():
        for path in service.get("env_file", []):
            assert Path(path).name in files


def test_compose_host_accounts_file_is_the_same_logins_on_the_published_ports(compose_files) -> None:
    accounts, passwords, _, files = compose_files
    roles = json.loads(files["accounts.json"])["roles"]
    assert set(roles) == {account.role for account in accounts}
    for account in accounts:
        url = urlparse(roles[account.role]["amqp_url"])
        assert (url.hostname, url.port, unquote(url.username)) == ("127.0.0.1", 5672, account.broker.user)


def test_compose_definitions_have_every_role_an_administrator_and_no_guest(compose_files) -> None:
    accounts, passwords, admins, files = compose_files
    definitions = json.loads(files["rabbitmq-definitions.json"])
    assert definitions["vhosts"] == [{"name": "/"}]  # imported at boot, the node makes none itself
    users = {user["name"]: user for user in definitions["users"]}
    assert len(users) == len(definitions["users"])  # a duplicate user fails RabbitMQ's boot import
    assert "guest" not in users and "guest" not in files["rabbitmq-definitions.json"]
    assert set(users) == {ADMIN_USER, *(account.broker.user for account in accounts)}
    assert users[ADMIN_USER]["tags"] == ["administrator"]
    assert rabbitmq_hash_matches(users[ADMIN_USER]["password_hash"], admins.rabbitmq)
    permissions = {(p["user"], p["vhost"]): p for p in definitions["permissions"]}
    assert permissions[(ADMIN_USER, "/")] == {"user": ADMIN_USER, "vhost": "/", "configure": ".*", "write": ".*",
                                              "read": ".*"}
    for account in accounts:
        user = users[account.broker.user]
        assert user["tags"] == [] and "password" not in user
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert rabbitmq_hash_matches(user["password_hash"], passwords[account.role])
        granted = permissions[(account.broker.user, "/")]
        assert (granted["configure"], granted["write"], granted["read"]) == (
            account.broker.configure, account.broker.write, account.broker.read)
        topics = {(t["exchange"], t["write"], t["read"]) for t in definitions["topic_permissions"]
                  if t["user"] == account.broker.user}
        assert topics == {(t.exchange, t.write, t.read) for t in account.broker.topics}
    assert all(password not in files["rabbitmq-definitions.json"] for password in passwords.values())


def test_compose_redis_acl_has_every_role_and_a_default_user_nobody_can_use(compose_files) -> None:
    accounts, passwords, admins, files = compose_files
    users = acl_users(files["redis-users.acl"])
    known = {hashlib.sha256(p.encode()).hexdigest() for p in [*passwords.values(), admins.redis]}
    assert set(users) == {ADMIN_USER, "default", *(a.redis.user for a in accounts if a.redis is not None)}
    for account in accounts:
        if account.redis is not None:
            assert f"#{hashlib.sha256(passwords[account.role].encode()).hexdigest()}" in users[account.redis.user]
            assert "+@all" not in users[account.redis.user] and "-@dangerous" in users[account.redis.user]
    assert f"#{hashlib.sha256(admins.redis.encode()).hexdigest()}" in users[ADMIN_USER]
    default = users["default"]
    # Data rights only (the AOF's MULTI/EXEC replay), no administration: every right removed first,
    # the dangerous ones (CONFIG, FLUSHALL, ACL, DEBUG, KEYS ...) removed last, never +@all.
    assert default[0] == "on" and "-@all" in default and default[-1] == "-@dangerous"
    assert not {"+@all", "allcommands", "+@admin", "+@dangerous", "nopass"} & set(default)
    (password,) = [rule for rule in default if rule.startswith("#")]
    assert re.fullmatch(r"#[0-9a-f]{64}", password) and password[1:] not in known
    assert not any(rule.startswith(">") for rules in users.values() for rule in rules)  # no clear password


def test_compose_admin_password_files_hold_the_administrators_passwords(compose_files) -> None:
    _, _, admins, files = compose_files
    assert files["rabbitmq-admin.password"] == admins.rabbitmq + "\n"
    assert files["redis-admin.password"] == admins.redis + "\n"


def test_env_files_refuse_values_compose_would_not_take_as_they_are() -> None:
    assert env_file_text({"A": "amqp://u:p@h:5672/"}) == "A=amqp://u:p@h:5672/\n"
    for value in ("a b", "a$b", "a#b", "'a'", '"a"'):
        with pytest.raises(ValueError):
            env_file_text({"A": value})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_render_compose_secrets_writes_private_files_and_keeps_them_unless_forced(tmp_path: Path) -> None:
    directory = tmp_path / "deploy" / "secrets"
    runner = CliRunner()
    result = runner.invoke(render, ["compose-secrets", "--namespace", NS, "-o", str(directory)])
    assert result.exit_code == 0, result.output
    assert mode(directory) == 0o700
    written = sorted(directory.iterdir())
    assert {path.name for path in written} >= {"rabbitmq-definitions.json", "redis-users.acl", "ingress.env",
                                               "single.env", "predict.env", "monitor.env", "redis-admin.password"}
    for path in written:
        assert mode(path) == 0o600, path
        assert str(path) in result.output  # it says what it wrote ...
    assert not CREDENTIAL.search(result.output)  # ... and no password
    assert f"{NS}.ingress" in result.output
    before = (directory / "ingress.env").read_text()
    again = runner.invoke(render, ["compose-secrets", "--namespace", NS, "-o", str(directory)])
    assert again.exit_code != 0 and "--force" in again.output
    assert (directory / "ingress.env").read_text() == before  # running brokers keep working
    forced = runner.invoke(render, ["compose-secrets", "--namespace", NS, "-o", str(directory), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (directory / "ingress.env").read_text() != before  # fresh passwords


def test_write_secret_files_tightens_an_existing_directory(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    write_secret_files(directory, {"a.env": "A=1\n"})
    assert mode(directory) == 0o700 and mode(directory / "a.env") == 0o600


def test_generated_secrets_are_ignored_by_git_and_docker() -> None:
    repo = DEPLOY_DIR.parent
    assert "deploy/secrets/" in (repo / ".gitignore").read_text().splitlines()
    assert "deploy/secrets" in (repo / ".dockerignore").read_text().splitlines()


# --- Kubernetes ---------------------------------------------------------------------------


def k8s_secrets(profile: Profile, **options) -> tuple[list[dict], dict[str, str], AdminPasswords]:
    passwords, admins = new_passwords(profile_accounts(NS, profile)), AdminPasswords.new()
    return secret_objects(profile, namespace=NS, passwords=passwords, admins=admins, **options), passwords, admins


@pytest.mark.parametrize("name", PROFILES)
def test_k8s_secrets_give_each_role_its_urls_and_its_users_credentials(name: str) -> None:
    profile = load(name)
    objects, passwords, admins = k8s_secrets(profile, amqp_host="mq.example:5671", redis_host="cache")
    secrets = {obj["metadata"]["name"]: obj for obj in objects}
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
        assert obj["kind"] == "Secret" and obj["metadata"]["namespace"] == NS
        assert all(isinstance(value, str) for value in obj["stringData"].values())
    for account in profile_accounts(NS, profile):
        name = f"toposerve-{account.role.replace('_', '-')}"
        urls = secrets[name]["stringData"]
        assert set(urls) == ({"amqp-url", "redis-url"} if account.redis else {"amqp-url"})
        amqp = urlparse(urls["amqp-url"])
        assert (amqp.scheme, amqp.hostname, amqp.port, amqp.path) == ("amqp", "mq.example", 5671, "/")
        assert unquote(amqp.username) == account.broker.user and unquote(amqp.password) == passwords[account.role]
        if account.redis:
            redis = urlparse(urls["redis-url"])
            assert (redis.hostname, redis.port, redis.path) == ("cache", None, "/0")
            assert unquote(redis.username) == account.redis.user
        credentials = secrets[f"{name}-rabbitmq"]
        assert credentials["stringData"] == {"username": account.broker.user, "password": passwords[account.role]}
        assert credentials["metadata"]["labels"]["rabbitmq.com/topology-operator"] == "true"
    acl = acl_users(secrets["toposerve-redis-acl"]["stringData"]["users.acl"])
    assert "default" in acl and "+@all" not in acl["default"] and "nopass" not in acl["default"]
    assert secrets["toposerve-redis-admin"]["stringData"] == {"username": ADMIN_USER, "password": admins.redis}


@pytest.mark.parametrize("name", PROFILES)
def test_every_secret_the_manifests_name_is_one_k8s_secrets_renders(name: str) -> None:
    profile = load(name)
    rendered = {obj["metadata"]["name"]: obj["stringData"] for obj in k8s_secrets(profile, secret_prefix="acme")[0]}
    manifests = render_k8s(profile, namespace=NS, image="toposerve:test", secret_prefix="acme")
    needed: list[tuple[str, str]] = []
    for obj in manifests:
        if obj["kind"] == "Deployment":
            for env in obj["spec"]["template"]["spec"]["containers"][0]["env"]:
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    needed.append((ref["name"], ref["key"]))
        elif obj["kind"] == "TriggerAuthentication":
            needed += [(ref["name"], ref["key"]) for ref in obj["spec"]["secretTargetRef"]]
        elif obj["kind"] == "User":
            secret = obj["spec"]["importCredentialsSecret"]["name"]
            needed += [(secret, "username"), (secret, "password")]
    assert needed
    for secret, key in needed:
        assert key in rendered[secret], (secret, key)


def test_render_k8s_secrets_writes_a_private_file_and_keeps_it_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "secrets" / "k8s.yaml"
    runner = CliRunner()
    result = runner.invoke(render, ["k8s-secrets", "--profile", "prep_pred", "--namespace", NS,
                                    "--amqp-host", "rabbitmq.mq", "--redis-host", "redis.cache:6380", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert mode(out) == 0o600 and str(out) in result.output and not CREDENTIAL.search(result.output)
    documents = list(yaml.safe_load_all(out.read_text()))
    urls = {doc["metadata"]["name"]: doc["stringData"] for doc in documents}
    assert urlparse(urls["toposerve-ingress"]["amqp-url"]).hostname == "rabbitmq.mq"
    assert urlparse(urls["toposerve-predict"]["redis-url"]).port == 6380
    before = out.read_text()
    again = runner.invoke(render, ["k8s-secrets", "--profile", "prep_pred", "--namespace", NS, "-o", str(out)])
    assert again.exit_code != 0 and "--force" in again.output and out.read_text() == before
    forced = runner.invoke(render, ["k8s-secrets", "--profile", "prep_pred", "--namespace", NS, "-o", str(out),
                                    "--force"])
    assert forced.exit_code == 0 and out.read_text() != before
    piped = runner.invoke(render, ["k8s-secrets", "--profile", "web_single", "--namespace", NS, "-o", "-"])
    assert piped.exit_code == 0
    assert "toposerve-single" in {doc["metadata"]["name"] for doc in yaml.safe_load_all(piped.output)}
    bad = runner.invoke(render, ["k8s-secrets", "--profile", "prep_pred", "--amqp-host", "u:p@h", "-o", "-"])
    assert bad.exit_code != 0 and "HOST" in bad.output
