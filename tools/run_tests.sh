#!/usr/bin/env bash
# The README's test command: set up .venv, then run every tier of the test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest -q tests "$@"
