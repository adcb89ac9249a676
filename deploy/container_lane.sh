#!/usr/bin/env bash
# The container lane of CI (and of a developer's machine, as root): a private Docker engine,
# the base images from Debian packages, and the product image built on them.
#
#   bash deploy/container_lane.sh start   # last line on stdout: DOCKER_HOST=unix://...
#   bash deploy/container_lane.sh stop    # stops the engine (and so every container of it)
#
# start: installs docker.io + debootstrap (deploy/docker_engine.py, behind a policy-rc.d guard),
# starts dockerd with its own state (~/.cache/toposerve/docker, or $TOPOSERVE_DOCKER_STATE) and
# no bridge / no iptables, builds toposerve-local/{debian,rabbitmq,redis,python} (cached by a
# content hash: seconds when nothing changed) and toposerve:VERSION from deploy/Dockerfile on
# the local Python base. Needs .venv (deploy/setup.sh). Exits non-zero, saying why, when any
# step fails: the caller decides whether to fall back (.ci/run does, loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

step() {  # step NAME COMMAND...: run, and say how long it took (stderr)
  local name=$1 started=$SECONDS
  shift
  "$@"
  echo "container lane: $name took $((SECONDS - started)) s" >&2
}

case "${1:-}" in
  start)
    [ -x "$PY" ] || { echo "container lane: no .venv (run deploy/setup.sh first)" >&2; exit 1; }
    step "install docker.io + debootstrap" "$PY" -m toposerve.deploy.docker_engine install
    docker_host=$("$PY" -m toposerve.deploy.docker_engine start | sed -n 's/^DOCKER_HOST=//p')
    export DOCKER_HOST=$docker_host
    echo "container lane: engine answers at $DOCKER_HOST" >&2
    step "base images" "$PY" -m toposerve.deploy.base_images build >&2
    version=$("$PY" -c "from importlib.metadata import version; print(version('toposerve'))")
    # The product image on the local Python base; the legacy builder, host networking (no bridge).
    step "product image toposerve:$version" env DOCKER_BUILDKIT=0 docker build -q --network host \
      --build-arg BASE=toposerve-local/python:latest -f deploy/Dockerfile -t "toposerve:$version" . >&2
    # The image it replaced, and other untagged layers: this engine is ours alone.
    docker image prune -f >/dev/null
    # Containers really run here (runtime, cgroups, storage, host networking), before CI commits
    # to them (TOPOSERVE_TEST_REQUIRE_DOCKER=1): else this fails and CI falls back, saying so.
    step "container smoke" docker run --rm --network host "toposerve:$version" profiles >/dev/null
    echo "DOCKER_HOST=$DOCKER_HOST"
    ;;
  stop)
    "$PY" -m toposerve.deploy.docker_engine stop
    ;;
  *)
    echo "usage: bash deploy/container_lane.sh start|stop" >&2
    exit 2
    ;;
esac
