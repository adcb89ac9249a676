#!/usr/bin/env bash
# Set up a development/run environment in .venv: toposerve and its test tools.
# RabbitMQ and Redis come from Debian (rabbitmq-server, redis-server); when they are
# missing and we are root, install them, because the fixtures and `toposerve up`
# start throwaway servers from those binaries when nothing else answers.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! { command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ]; }; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing rabbitmq-server and redis-server from Debian ..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server redis-server >/dev/null
  else
    echo "setup: rabbitmq-server/redis-server not found; install them (apt-get install -y rabbitmq-server redis-server)" \
         "or point TOPOSERVE_AMQP_URL / TOPOSERVE_REDIS_URL at running servers" >&2
  fi
fi

# The /ui browser tests drive Debian's chromium through Playwright (never a browser download).
if ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium from Debian (the /ui browser tests) ..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
      || echo "setup: could not install chromium; the /ui browser tests will skip" >&2
  else
    echo "setup: /usr/bin/chromium not found; the /ui browser tests skip (apt-get install -y chromium)" >&2
  fi
fi

# The cluster fault tests put the ingress and the stages on test hosts (network namespaces,
# tests/support/netns.py), made with `ip` from iproute2; without it (or root) those tests skip.
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing iproute2 from Debian (ip netns, for the test hosts) ..." >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'

# The AsyncAPI documents are checked with the official parser (npm @asyncapi/parser) when
# Node.js is here; without it that one test is skipped and says how to get it.
if command -v npm >/dev/null 2>&1 && [ ! -d .venv/asyncapi-parser/node_modules/@asyncapi/parser ]; then
  npm install --silent --no-audit --no-fund --prefix .venv/asyncapi-parser @asyncapi/parser@3 >/dev/null 2>&1 \
    || echo "setup: could not install @asyncapi/parser with npm; the AsyncAPI parser test will be skipped" >&2
fi
