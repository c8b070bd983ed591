#!/usr/bin/env bash
# The short GPU check: the serving benchmark for ResNet-50 (and ResNet-18) with the CUDA provider (under
# 5 minutes), then with CUDA graphs, the host's CPU side (`serve --workers 1` and `auto` on the small net), and
# TensorRT where present, each part bounded by its own timeout (9 minutes in all at most, under one call's
# 10); the tables are written to $OUT (or bench/results/).
#
# The lent GPU machine has torch (CUDA 13, cuDNN 9 as pip packages) and a CPU-only onnxruntime, and no
# network. onnxruntime-gpu's wheel (255 MB) is over what one call may carry (64 MiB), so it travels in
# parts over successive calls and is reassembled there:
#   here:   bash bench/gpu_check.sh prepare          # wheels into .whl/ (git-ignored), the big one split
#   there:  bash bench/gpu_check.sh stash PART...    # once per call, each carrying some parts (carry: .whl)
#   there:  bash bench/gpu_check.sh run              # when every part is stashed: install, check, bench
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=/tmp/ort-gpu-parts
SITE=/tmp/site
ORT_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
OUT=${OUT:-bench/results}
PYTHON=${PYTHON:-python3}   # the lent machine's python3 holds torch; `make gpu-check` passes the project's

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl/parts .whl/small
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps "${plat[@]}" -d .whl onnxruntime-gpu==1.31.1
  python3 -m pip download -q --no-deps "${plat[@]}" -d .whl/small grpcio-health-checking==1.80.0 \
    grpcio-reflection==1.80.0 'protobuf==6.33.6' 'grpcio==1.85.3' prometheus-client pillow
  (cd .whl && sha256sum onnxruntime_gpu-*.whl > parts/SHA256 && split -b 60m -d onnxruntime_gpu-*.whl \
    "parts/$(ls onnxruntime_gpu-*.whl).part-" && rm onnxruntime_gpu-*.whl)
  ls -la .whl/parts .whl/small
  echo "carry '.whl' with one or two parts at a time (move the others out of .whl/parts between calls)"
}

stash() {
  mkdir -p "$STASH"
  cp -v .whl/parts/* "$STASH"/
  [ -d .whl/small ] && mkdir -p "$STASH/small" && cp .whl/small/*.whl "$STASH/small/" || true
}

run() {
  mkdir -p "$OUT" "$SITE"
  if ! "$PYTHON" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
    local wheel
    wheel="$STASH/$(basename "$(ls "$STASH"/*.part-00)" .part-00)"
    cat "$STASH"/*.part-* > "$wheel"
    (cd "$STASH" && sha256sum -c SHA256)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$wheel" "$STASH"/small/*.whl
    export PYTHONPATH=$SITE:${PYTHONPATH:-}
  fi
  "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/gpu_providers.txt"
import onnxruntime as ort
ort.preload_dlls()
print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
PY
  export PYTHONUNBUFFERED=1
  timeout 240 "$PYTHON" bench/serving_bench.py --models resnet18,resnet50 --device cuda --concurrency 1,64,256 \
    --batches 1,8,32,64,128,256 --seconds 3 --out "$OUT/gpu_bench.md" 2>"$OUT/gpu_bench.log"
  # CUDA graphs (never run before a GPU machine ran this): the served rows against the ones above.
  timeout 90 "$PYTHON" bench/serving_bench.py --models resnet50 --device cuda --concurrency 1,64 --batches 1,64 \
    --seconds 2 --server-args "--cuda-graphs" --out "$OUT/gpu_bench_cuda_graphs.md" \
    2>"$OUT/gpu_bench_cuda_graphs.log" || true
  # The host's CPU side: single-image requests/s of the small net with one worker and with one per core (up to
  # 8), against the echo ceiling (no perf_analyzer there: it needs packages from the network).
  timeout 100 "$PYTHON" bench/workers_bench.py --workers 1,auto --concurrency "" --rounds 1 --seconds 3 \
    --out "$OUT/gpu_host_workers.md" 2>"$OUT/gpu_host_workers.log" || true
  if "$PYTHON" -c 'import onnxruntime as o, sys; sys.exit("TensorrtExecutionProvider" not in o.get_available_providers())'; then
    timeout 120 "$PYTHON" bench/serving_bench.py --models resnet50 --device cuda --tensorrt --concurrency 64 \
      --batches 1,64 --seconds 2 --out "$OUT/gpu_bench_tensorrt.md" 2>"$OUT/gpu_bench_tensorrt.log" || true
  fi
  cat "$OUT"/gpu_bench*.md
}

case "${1:-}" in
  prepare) prepare ;;
  stash) stash ;;
  run) run ;;
  *) echo "usage: $0 prepare|stash|run" >&2; exit 2 ;;
esac
