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

# Services: this release's tests use only what they start themselves (fake provider and carrier
# servers on 127.0.0.1, started per test). Redis, PostgreSQL, S3 and Chromium arrive with the
# issues that need them; their start-up goes here.

exec .venv/bin/python -m pytest -q "$@"
