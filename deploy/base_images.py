"""Base images from Debian packages, for machines that reach Debian's archive but no image
registry: a ``debootstrap --variant=minbase`` rootfs loaded with ``docker import``, and on it
RabbitMQ, Redis and a Python 3.11 runtime (the base of deploy/Dockerfile) built with apt-get.

Each image is tagged with a hash of everything that makes it (suite, mirror, packages, build
steps, the CA bundle copied in), so a second run finds every tag and costs seconds; a changed
recipe makes a new tag. ``toposerve-local/NAME:latest`` always names the newest build, which is
what the test fixture and the compose smoke use.

    DOCKER_HOST=unix://... python -m toposerve.deploy.base_images build   # prints NAME=TAG lines

Where a registry is reachable none of this is needed: the fixture uses the official images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = "toposerve-local"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bump when a build step changes in a way the recipe text below does not show.
RECIPE_VERSION = 2
LATEST = "latest"
CA_BUNDLE_IN_IMAGE = "/usr/local/share/toposerve/build-ca.pem"

# No service may start while packages install inside an image (postinst scripts try).
_POLICY_RC_D = "#!/bin/sh\nexit 101\n"
_APT_INSTALL = ("RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                "--no-install-recommends {packages} >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*")


@dataclass(frozen=True)
class ImageRecipe:
    """One image on the Debian base: its packages and the Dockerfile lines after the install."""

    name: str
    packages: tuple[str, ...]
    steps: tuple[str, ...] = ()
    needs_ca_bundle: bool = False
    # (name in the build context, text): files the steps COPY (part of the content hash).
    files: tuple[tuple[str, str], ...] = ()

    def dockerfile(self, base: str) -> str:
        lines = [f"FROM {base}", _APT_INSTALL.format(packages=" ".join(self.packages))]
        lines += [f"COPY {name} /usr/local/bin/{name}" for name, _ in self.files]
        if self.needs_ca_bundle:
            # pip in later builds (deploy/Dockerfile) must trust what this machine trusts, e.g. a
            # proxy's CA: the host's bundle, passed in by path, never a path baked in here.
            lines += [f"COPY build-ca.pem {CA_BUNDLE_IN_IMAGE}",
                      f"ENV PIP_CERT={CA_BUNDLE_IN_IMAGE} SSL_CERT_FILE={CA_BUNDLE_IN_IMAGE}"]
        return "\n".join([*lines, *self.steps]) + "\n"


# The official images' entrypoint contract, as far as toposerve uses it (compose.yaml execs
# `docker-entrypoint.sh SERVER ...` as root after installing its secret files): the server
# runs as its own user, in the foreground, logging to stdout (docker logs).
_RABBITMQ_ENTRYPOINT = """#!/bin/sh
set -e
if [ "$1" = rabbitmq-server ]; then
  # The real script: /usr/sbin's wrapper sends the console output to /var/log instead.
  shift
  set -- /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
if [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$@"
fi
exec "$@"
"""
_REDIS_ENTRYPOINT = """#!/bin/sh
set -e
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
  chown -R redis:redis .
  exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
"""

RECIPES: tuple[ImageRecipe, ...] = (
    ImageRecipe(
        name="rabbitmq",
        packages=("rabbitmq-server",),
        # The node's ports, name and addresses come from the container's environment
        # (tests/support/containers.py); conf.d is where compose.yaml adds its settings.
        files=(("docker-entrypoint.sh", _RABBITMQ_ENTRYPOINT),),
        steps=("RUN install -d -o rabbitmq -g rabbitmq /etc/rabbitmq/conf.d && chmod 0755 "
               "/usr/local/bin/docker-entrypoint.sh",
               "ENV HOME=/var/lib/rabbitmq", "WORKDIR /var/lib/rabbitmq",
               'ENTRYPOINT ["docker-entrypoint.sh"]', 'CMD ["rabbitmq-server"]'),
    ),
    ImageRecipe(
        name="redis",
        packages=("redis-server",),
        files=(("docker-entrypoint.sh", _REDIS_ENTRYPOINT),),
        # /data: the official image's work dir, where compose.yaml mounts the volume.
        steps=("RUN install -d -o redis -g redis /data && chmod 0755 /usr/local/bin/docker-entrypoint.sh",
               "WORKDIR /data", 'ENTRYPOINT ["docker-entrypoint.sh"]',
               'CMD ["redis-server", "--bind", "127.0.0.1", "--protected-mode", "yes"]'),
    ),
    ImageRecipe(
        name="python",
        packages=("python3", "python3-venv", "ca-certificates"),
        # Like the official python image: `python` and `pip` on PATH, installs allowed (a venv,
        # because Debian's own interpreter is externally managed, PEP 668).
        steps=("RUN python3 -m venv /opt/python && /opt/python/bin/pip install -q --no-cache-dir --upgrade pip",
               "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               'CMD ["python"]'),
        needs_ca_bundle=True,
    ),
)


class BuildError(RuntimeError):
    """An image could not be built (debootstrap, import or build failed)."""


def host_ca_bundle() -> Path:
    """The CA bundle this machine's pip uses: $PIP_CERT, $SSL_CERT_FILE, else OpenSSL's default."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    default = ssl.get_default_verify_paths()
    for candidate in (default.cafile, default.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise BuildError("no CA bundle found: set PIP_CERT to the file pip should trust")


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _docker(*args: str, stdin: int | None = None, quiet: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.PIPE if quiet else None
    done = subprocess.run(["docker", *args], stdin=stdin, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"docker {' '.join(args[:3])} ... failed: {done.stderr.strip()[-2000:]}")
    return done


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False).returncode == 0


@dataclass
class Builder:
    mirror: str = field(default_factory=lambda: os.environ.get("TOPOSERVE_DEBIAN_MIRROR", DEFAULT_MIRROR))
    ca_bundle: Path | None = None
    log: list[str] = field(default_factory=list)

    def _say(self, line: str) -> None:
        self.log.append(line)
        print(f"base_images: {line}", file=sys.stderr, flush=True)

    def debian_tag(self) -> str:
        return f"{REPOSITORY}/debian:{_digest(RECIPE_VERSION, SUITE, self.mirror, 'minbase', _POLICY_RC_D)}"

    def build_debian(self) -> str:
        """debootstrap a minbase rootfs and ``docker import`` it (skipped when the tag exists)."""
        tag = self.debian_tag()
        if image_exists(tag):
            self._say(f"debian: cached {tag}")
            return tag
        if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
            raise BuildError("debootstrap is not installed (python -m toposerve.deploy.docker_engine install)")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="toposerve-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            done = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), self.mirror],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BuildError(f"debootstrap failed: {(done.stdout + done.stderr)[-2000:]}")
            policy = rootfs / "usr/sbin/policy-rc.d"
            policy.write_text(_POLICY_RC_D)
            policy.chmod(0o755)
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            try:
                _docker("import", "--change", 'CMD ["bash"]', "-", tag, stdin=tar.stdout.fileno() if tar.stdout
                        else None)
            finally:
                if tar.stdout:
                    tar.stdout.close()
                tar.wait()
        self._say(f"debian: built {tag} in {time.monotonic() - started:.0f} s")
        return tag

    def recipe_tag(self, recipe: ImageRecipe, base: str) -> str:
        ca = self._ca_digest() if recipe.needs_ca_bundle else None
        digest = _digest(RECIPE_VERSION, base, recipe.dockerfile(base), recipe.files, ca)
        return f"{REPOSITORY}/{recipe.name}:{digest}"

    def _ca_digest(self) -> str:
        bundle = self.ca_bundle or host_ca_bundle()
        return hashlib.sha256(bundle.read_bytes()).hexdigest()

    def build_recipe(self, recipe: ImageRecipe, base: str) -> str:
        tag = self.recipe_tag(recipe, base)
        if image_exists(tag):
            self._say(f"{recipe.name}: cached {tag}")
        else:
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix=f"toposerve-{recipe.name}-") as context:
                Path(context, "Dockerfile").write_text(recipe.dockerfile(base))
                for name, text in recipe.files:
                    Path(context, name).write_text(text)
                if recipe.needs_ca_bundle:
                    shutil.copyfile(self.ca_bundle or host_ca_bundle(), Path(context, "build-ca.pem"))
                # Host networking: the engine has no bridge (docker_engine).
                _docker("build", "--network", "host", "-q", "-t", tag, context)
            self._say(f"{recipe.name}: built {tag} in {time.monotonic() - started:.0f} s")
        _docker("tag", tag, latest(recipe.name))
        return tag

    def build_all(self) -> dict[str, str]:
        base = self.build_debian()
        tags = {recipe.name: self.build_recipe(recipe, base) for recipe in RECIPES}
        self.prune({"debian": base, **tags})
        return tags

    def prune(self, keep: dict[str, str]) -> None:
        """Untag earlier builds of our images (a changed recipe leaves its old tags behind), so
        the engine's data root does not grow by a few hundred MB per recipe change."""
        for name, tag in keep.items():
            listed = _docker("images", f"{REPOSITORY}/{name}", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
            stale = [old for old in listed if old not in (tag, latest(name))]
            if stale:
                _docker("image", "rm", *stale)
                self._say(f"{name}: removed {len(stale)} earlier build(s)")


def latest(name: str) -> str:
    """The tag the fixture and the compose smoke use for image ``name`` (rabbitmq, redis, python)."""
    return f"{REPOSITORY}/{name}:{LATEST}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toposerve.deploy.base_images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "tags"])
    parser.add_argument("--ca-bundle", type=Path, default=None, help="CA bundle for pip in the python image "
                        "(default: $PIP_CERT, $SSL_CERT_FILE, OpenSSL's default)")
    args = parser.parse_args(argv)
    # The legacy builder: Debian's engine 20.10 with a CLI that may lack the buildx plugin.
    os.environ.setdefault("DOCKER_BUILDKIT", "0")
    builder = Builder(ca_bundle=args.ca_bundle)
    try:
        if args.action == "build":
            tags = builder.build_all()
        else:
            base = builder.debian_tag()
            tags = {recipe.name: builder.recipe_tag(recipe, base) for recipe in RECIPES}
    except BuildError as exc:
        print(f"base_images: {exc}", file=sys.stderr)
        return 1
    for name, tag in tags.items():
        print(f"{name}={tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
