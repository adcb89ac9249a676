"""deploy/docker_engine.py and deploy/base_images.py without an engine: where the private engine
keeps its state, the install guard, and the content hashes that make the image cache."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from toposerve.deploy import base_images, docker_engine
from toposerve.deploy.base_images import RECIPES, Builder, ImageRecipe, latest


def test_the_engine_state_lives_outside_the_checkout_and_can_be_moved(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.delenv("TOPOSERVE_DOCKER_STATE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert docker_engine.default_state_dir() == tmp_path / "cache" / "toposerve" / "docker"
    monkeypatch.setenv("TOPOSERVE_DOCKER_STATE", str(tmp_path / "elsewhere"))
    engine = docker_engine.Engine(docker_engine.default_state_dir())
    assert engine.docker_host == f"unix://{tmp_path / 'elsewhere' / 'docker.sock'}"
    assert engine.env()["DOCKER_HOST"] == engine.docker_host
    assert engine.pid() is None and not engine.answers()  # nothing started: no pid file, no socket


def test_the_install_guard_is_a_policy_that_forbids_every_service_start(tmp_path: Path) -> None:
    guard = tmp_path / "policy-rc.d"
    guard.write_text(docker_engine._FORBID_ALL_SERVICES)
    guard.chmod(0o755)
    assert docker_engine._guard_allows_no_service(guard)
    assert subprocess.run([str(guard), "docker", "start"], check=False).returncode == 101
    guard.write_text("#!/bin/sh\nexit 0\n")
    assert not docker_engine._guard_allows_no_service(guard)
    assert not docker_engine._guard_allows_no_service(tmp_path / "missing")


def test_image_tags_follow_the_recipe_and_nothing_else(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("a CA\n")
    builder = Builder(mirror="http://mirror.invalid/debian", ca_bundle=bundle)
    base = builder.debian_tag()
    assert base == Builder(mirror="http://mirror.invalid/debian").debian_tag()  # stable across runs
    assert base != Builder(mirror="http://other.invalid/debian").debian_tag()  # another archive: another base
    tags = {recipe.name: builder.recipe_tag(recipe, base) for recipe in RECIPES}
    assert set(tags) == {"rabbitmq", "redis", "python"}
    assert all(tag.startswith(f"{base_images.REPOSITORY}/{name}:") for name, tag in tags.items())
    rabbitmq = next(recipe for recipe in RECIPES if recipe.name == "rabbitmq")
    changed = dataclasses.replace(rabbitmq, packages=(*rabbitmq.packages, "less"))
    assert builder.recipe_tag(changed, base) != tags["rabbitmq"]
    # The python base carries this machine's CA bundle: another bundle, another image.
    python = next(recipe for recipe in RECIPES if recipe.name == "python")
    bundle.write_text("another CA\n")
    assert builder.recipe_tag(python, base) != tags["python"]
    assert builder.recipe_tag(rabbitmq, base) == tags["rabbitmq"]
    assert latest("redis") == "toposerve-local/redis:latest"


def test_a_recipe_installs_its_packages_and_copies_its_files() -> None:
    recipe = ImageRecipe(name="x", packages=("redis-server",), steps=('CMD ["x"]',),
                         files=(("entry.sh", "#!/bin/sh\n"),), needs_ca_bundle=True)
    text = recipe.dockerfile("base:1")
    lines = text.splitlines()
    assert lines[0] == "FROM base:1" and "apt-get install" in lines[1] and "redis-server" in lines[1]
    assert "COPY entry.sh /usr/local/bin/entry.sh" in lines
    assert f"COPY build-ca.pem {base_images.CA_BUNDLE_IN_IMAGE}" in lines
    assert lines[-1] == 'CMD ["x"]'
