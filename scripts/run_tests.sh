#!/usr/bin/env bash
# Runs the suite with the venv's pytest. pytest exits 5 when no test ran: that is a failure here.
set -u
venv="${1:-.venv}"
"$venv/bin/pytest" "${@:2}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; treating as failure" >&2
  exit 1
fi
exit "$rc"
