#!/usr/bin/env bash
# Install what the tests need, start the services they use, run the whole suite.
# Usage: bash scripts/test.sh [pytest args...]     (CI: bash .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[local,test]'

# Services: the fake provider and carrier servers are started per test. Redis (the shared session
# store's tests use database 15, flushed per test) is started here when none answers on 6379.
# PostgreSQL, S3 and Chromium arrive with the issues that need them; their start-up goes here.
redis_up() { .venv/bin/python -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=1).ping()" 2>/dev/null; }
if ! redis_up; then
  if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
  for _ in $(seq 1 50); do redis_up && break; sleep 0.1; done
  redis_up || echo "warning: redis-server did not answer on 127.0.0.1:6379; the Redis session tests will skip" >&2
fi
export VOXRAY_TEST_REDIS_URL=${VOXRAY_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}

exec .venv/bin/python -m pytest -q "$@"
