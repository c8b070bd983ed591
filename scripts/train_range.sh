#!/usr/bin/env bash
# Train the Fashion-MNIST range that fits a CPU, one after another: python -m training train per config.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA_DIR:-}
for cfg in "$@"; do
  echo "== $cfg"
  "$PY" -m training train --config "configs/$cfg.yaml" progress=false ${DATA:+data_dir=$DATA} ${THREADS:+threads=$THREADS}
done
