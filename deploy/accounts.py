"""A profile's broker and Redis accounts: which exist, their passwords, and how they reach a server.

``profile_accounts`` derives every role's account from the profile (brokers/accounts.py
says what each role may do). ``AccountsFile`` generates their passwords and keeps them in
a local file with 0600 permissions. The same accounts become RabbitMQ definitions (users
with salted password hashes, permissions, topic permissions: imported at boot by the
throwaway broker and by compose's, posted to the management API by ``--provision``) and
Redis ACL lines. ``with_administrator`` and ``redis_acl_file`` complete them into what a
server boots with (an administrator, the vhost, a default Redis user nobody can use): the
throwaway servers of ``toposerve up`` and the files of ``toposerve render compose-secrets``
/ ``k8s-secrets`` are made by the same functions.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse, urlunparse

import platformdirs
from pydantic import BaseModel, Field

from toposerve.brokers import (
    CLIENT_ROLES,
    SINGLE_PROCESS,
    Account,
    Settings,
    client_account,
    ingress_account,
    single_process_account,
    stage_account,
)
from toposerve.deploy.profile import Profile
from toposerve.deploy.stage_builders import extra_queue_names

# The administrator of every RabbitMQ and Redis toposerve starts or renders files for.
ADMIN_USER = "toposerve-admin"
# Redis's default user: data rights only, no administration. It cannot be switched off: Redis
# 7.0 replays the append-only file's MULTI/EXEC blocks as the default user, and with no rights
# those writes would be lost at every restart. Its password is one nobody is given.
REDIS_DEFAULT_USER_RULES = "~* &* -@all +@read +@write +@keyspace +@transaction +@scripting -@dangerous"


def stage_role(profile: Profile, stage: str) -> str:
    """The role a stage's processes run as: its kind (in a single-process profile, the process's)."""
    return SINGLE_PROCESS if profile.ingress.single_process else profile.stages[stage].kind


def ingress_role(profile: Profile) -> str:
    return SINGLE_PROCESS if profile.ingress.single_process else "ingress"


def profile_accounts(namespace: str, *profiles: Profile) -> list[Account]:
    """Every role's account for these profiles in ``namespace``: the ingress, one per stage kind
    (its queues across the profiles), the clients; a single-process profile's one account."""
    queues: dict[str, list[str]] = {}
    consumes: dict[str, list[str]] = {}
    publishes: dict[str, list[str]] = {}
    single: list[str] = []
    single_publishes: list[str] = []
    for profile in profiles:
        for name, spec in profile.stages.items():
            own = [profile.queue_spec(namespace, name).name, *extra_queue_names(profile, namespace, name)]
            keys = [*spec.consumes, *([f"join-wait.{spec.group}"] if spec.kind == "aggregate" else [])]
            # A ``publishes`` template starts with a literal word: keys starting with it are granted.
            extra = [spec.publishes] if getattr(spec, "publishes", None) else []
            if profile.ingress.single_process:
                single.extend(own)
                single_publishes.extend(extra)
                continue
            queues.setdefault(spec.kind, []).extend(own)
            consumes.setdefault(spec.kind, []).extend(keys)
            publishes.setdefault(spec.kind, []).extend(extra)
    accounts = [ingress_account(namespace)]
    accounts += [stage_account(namespace, kind, queues[kind], consumes[kind], publishes[kind]) for kind in queues]
    if single:
        accounts.append(single_process_account(namespace, single, [], single_publishes))
    return accounts + [client_account(namespace, role) for role in CLIENT_ROLES]


def settings_for_role(settings: Settings, role: str) -> Settings:
    """``settings`` logged in as ``role``, from ``settings.accounts_file``; as they are without one."""
    if not settings.accounts_file:
        return settings
    found = AccountsFile.load(Path(settings.accounts_file))
    if role not in found.roles:
        raise ValueError(f"{settings.accounts_file} has no account for role {role!r} (roles: {', '.join(found.roles)})")
    login = found.roles[role]
    return settings.model_copy(update={"amqp_url": login.amqp_url, "redis_url": login.redis_url or settings.redis_url})


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def rabbitmq_definitions(accounts: list[Account], passwords: dict[str, str], vhost: str = "/") -> dict:
    """The accounts in RabbitMQ's definitions format (``rabbitmqctl import_definitions``, the
    management API's ``POST /api/definitions``, ``load_definitions`` at boot)."""
    return {
        "users": [{"name": a.broker.user, "password_hash": password_hash(passwords[a.role]),
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []} for a in accounts],
        "permissions": [{"user": a.broker.user, "vhost": vhost, "configure": a.broker.configure,
                         "write": a.broker.write, "read": a.broker.read} for a in accounts],
        "topic_permissions": [{"user": a.broker.user, "vhost": vhost, "exchange": topic.exchange,
                               "write": topic.write, "read": topic.read}
                              for a in accounts for topic in a.broker.topics],
    }


def with_administrator(definitions: dict, user: str, password: str, vhost: str = "/") -> dict:
    """``definitions`` as a broker imports them at boot: with ``vhost`` and an administrator on it.
    A node that imports definitions at boot makes neither its default user (guest) nor its default
    vhost, so the file must carry both."""
    admin = {"name": user, "password_hash": password_hash(password), "tags": ["administrator"],
             "hashing_algorithm": "rabbit_password_hashing_sha256"}
    return {
        **definitions,
        "vhosts": [{"name": vhost}, *definitions.get("vhosts", [])],
        "users": [admin, *definitions.get("users", [])],
        "permissions": [{"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"},
                        *definitions.get("permissions", [])],
    }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def redis_acl(accounts: list[Account], passwords: dict[str, str]) -> list[str]:
    """ACL file lines for the roles that use Redis (password as its sha256, never in the clear)."""
    return [f"user {a.redis.user} " + " ".join([*a.redis.rules, f"#{_sha256(passwords[a.role])}"])
            for a in accounts if a.redis is not None]


def redis_acl_file(role_lines: list[str], admin_user: str, admin_password: str) -> str:
    """A whole ACL file (``--aclfile``): the administrator, the roles' lines, and the default user,
    with data rights only and a password nobody has (the sha256 of random bytes). Listed, because
    Redis gives a default user the file does not name every right and no password."""
    unusable = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
    return "\n".join([f"user {admin_user} on #{_sha256(admin_password)} ~* &* +@all", *role_lines,
                      f"user default on #{unusable} {REDIS_DEFAULT_USER_RULES}"]) + "\n"


@dataclass(frozen=True)
class AdminPasswords:
    """The passwords of the administrator (``ADMIN_USER``) of one RabbitMQ and of one Redis."""

    rabbitmq: str
    redis: str

    @staticmethod
    def new() -> AdminPasswords:
        return AdminPasswords(rabbitmq=secrets.token_urlsafe(24), redis=secrets.token_urlsafe(24))


def write_private(path: Path, text: str) -> Path:
    """Write ``path`` readable by this user only (0600; a missing directory is made 0700), atomically:
    a reader never sees half a file, and the secret is never in a file anyone else may read."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # whatever the umask
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def with_login(url: str, user: str, password: str) -> str:
    """``url`` with this user and password instead of its own (on every node of a comma-separated list)."""
    if "," in url:
        return ",".join(with_login(node.strip(), user, password) for node in url.split(","))
    parsed = urlparse(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parsed.hostname}"
    if parsed.port:
        netloc += f":{parsed.port}"
    return urlunparse(parsed._replace(netloc=netloc))


class RoleLogin(BaseModel):
    amqp_url: str = Field(repr=False)
    redis_url: str | None = Field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The environment of a process that logs in as this role."""
        return {"TOPOSERVE_AMQP_URL": self.amqp_url, **({"TOPOSERVE_REDIS_URL": self.redis_url}
                                                        if self.redis_url else {})}


class AccountsFile(BaseModel):
    """Every role's URLs for one namespace, kept where only this user can read them (0600)."""

    namespace: str
    roles: dict[str, RoleLogin]

    def env(self, role: str) -> dict[str, str]:
        return self.roles[role].env()

    @staticmethod
    def path_for(namespace: str, directory: Path | None = None) -> Path:
        return (directory or platformdirs.user_state_path("toposerve")) / f"accounts-{namespace}.json"

    def save(self, path: Path) -> Path:
        return write_private(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> AccountsFile:
        return cls.model_validate_json(path.read_text())


def new_passwords(accounts: list[Account], keep: AccountsFile | None = None) -> dict[str, str]:
    """A password per role: those ``keep`` has (provisioning again changes nothing), new ones else."""
    kept = {} if keep is None else {role: unquote(urlparse(login.amqp_url).password or "")
                                    for role, login in keep.roles.items()}
    return {account.role: kept.get(account.role) or secrets.token_urlsafe(24) for account in accounts}


def logins(accounts: list[Account], passwords: dict[str, str], amqp_url: str, redis_url: str,
           namespace: str) -> AccountsFile:
    """Each role's URLs on these servers (its own user and password)."""
    return AccountsFile(namespace=namespace, roles={
        a.role: RoleLogin(amqp_url=with_login(amqp_url, a.broker.user, passwords[a.role]),
                          redis_url=None if a.redis is None else with_login(redis_url, a.redis.user,
                                                                             passwords[a.role]))
        for a in accounts})
