#!/usr/bin/env bash
# Creates .venv-bench: medistill plus the peer tools it is measured against (nanodrr, DiffDRR,
# scikit-image, astra-toolbox, ...). Peers live only here, never in the package's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.11}
test -x .venv-bench/bin/python || "$PY" -m venv .venv-bench
.venv-bench/bin/python -m pip install --quiet --upgrade pip
.venv-bench/bin/python -m pip install --quiet torch==2.13.0   # pinned: never a CUDA build by accident
.venv-bench/bin/python -m pip install --quiet -e .
for req in benchmarks/requirements-*.txt; do
  [ -e "$req" ] || continue
  .venv-bench/bin/python -m pip install --quiet -r "$req" || echo "warning: some peers in $req did not install"
done
