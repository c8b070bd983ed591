#!/usr/bin/env bash
# ResNet-18 on Fashion-MNIST on one GPU in one command of under 10 minutes: train (configs/resnet18_gpu.yaml,
# at most 5 minutes of training), export ONNX with the project's exporter, score the ONNX file with onnxruntime
# on the 10,000 test images, and leave in $OUT at most 8 files of at most 16 MiB each:
#   train.log                    everything printed, the environment first
#   metrics.json learning_curves.png confusion_matrix.png
#   <name>.tar.part-NN           the model repository entry (config.pbtxt, labels.txt, 1/model.onnx, metadata,
#                                CAM weights) in 15 MiB parts; if the export failed, the checkpoint instead
#   reassemble.sh                `bash reassemble.sh [DEST]` checks the parts' sha256 and unpacks them
#
# The lent GPU machine has python3 with torch (CUDA), numpy, matplotlib, onnx and a CPU onnxruntime, and no
# network. The data (31 MB of gz files) and a protobuf wheel (the serving stubs need protobuf >= 6.31; used only
# if the machine's is older) travel in .gputrain/, a git-ignored folder named in the device call's carry:
#   here:   FASHION_MNIST_DIR=DIR bash bench/gpu_train.sh prepare     # DIR holds the four official gz files
#   there:  bash bench/gpu_train.sh run [key=value ...]               # carry: .gputrain; overrides go to training
#   here:   bash bench/gpu_train.sh smoke                             # the same steps on the CPU at toy size
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gputrain
PYTHON=${PYTHON:-python3}          # the lent machine's python3 holds torch; `smoke` takes the project's venv
CONFIG=${CONFIG:-configs/resnet18_gpu.yaml}
DATA=${DATA:-$KIT/data/fashion-mnist}
NAME=${NAME:-fashion_mnist_resnet18}
RUN=${RUN:-runs/gpu_train}
OUT=${OUT:-$RUN/out}
PART_SIZE=${PART_SIZE:-15m}       # under the 16 MiB a returned file may have
# Each step is bounded, and together they stay under the 10 minutes of one device command (config: 300 s of
# training at most, then the epoch under way and the test split).
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-400}
EXPORT_TIMEOUT=${EXPORT_TIMEOUT:-90}
SCORE_TIMEOUT=${SCORE_TIMEOUT:-60}
SITE=/tmp/gpu-train-site
IDX_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

prepare() {
  local src=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
  grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
  mkdir -p "$KIT/data/fashion-mnist" "$KIT/wheels"
  for f in "${IDX_FILES[@]}"; do install -m 0644 "$src/$f" "$KIT/data/fashion-mnist/"; done
  local py=python3
  [ -x .venv/bin/python ] && py=.venv/bin/python
  "$py" -c "from training.data import load_idx_dataset as l; l('fashion-mnist', '$KIT/data/fashion-mnist')"
  # Needed there only if the machine's protobuf is older than the stubs; without network here, go on without it.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$KIT/wheels" protobuf==6.33.6 || echo "no protobuf wheel (no index?)"
  du -sh "$KIT" && ls -l "$KIT"/*/*
  echo "checksums verified; name '$KIT' in the device call's carry"
}

environment() {
  echo "== $(date -u +%FT%TZ) $(uname -m), $(nproc) cores"
  command -v nvidia-smi >/dev/null && nvidia-smi -L || true
  "$PYTHON" - <<'PY'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB", "bf16", torch.cuda.is_bf16_supported())
for name in ("numpy", "onnx", "onnxruntime", "google.protobuf", "matplotlib", "yaml", "tqdm"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING:", e)
PY
}

# The exporter needs onnx, onnxruntime and the serving stubs (protobuf >= 6.31): take the carried wheel if not.
export_ready() {
  "$PYTHON" -c 'import onnx, onnxruntime, serving.repository_format' 2>/dev/null && return 0
  if compgen -G "$KIT/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$KIT"/wheels/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PYTHON" -c 'import onnx, onnxruntime, serving.repository_format'
}

# The test split through the exported file on onnxruntime's CPU provider: the accuracy a server would have.
score_onnx() {
  timeout "$SCORE_TIMEOUT" "$PYTHON" - "$1" "$DATA" <<'PY'
import sys
import numpy as np
import onnxruntime as ort
from training.data import load_idx_dataset
test = load_idx_dataset("fashion-mnist", sys.argv[2] if len(sys.argv) > 2 else None, verify=False).test
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = test.images.transpose(0, 3, 1, 2).astype(np.float32) / 255
pred = np.concatenate([sess.run(["logits"], {"input": x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
print(f"ONNX (onnxruntime CPU) test accuracy {100 * (pred == test.labels).mean():.2f}% ({len(pred)} images)")
PY
}

# tar DIR's ITEM into parts under $OUT with a reassemble.sh that checks the whole tar's sha256.
package() {
  local dir=$1 item=$2 label=$3 tarball sum
  tarball="$RUN/$label.tar"
  tar -C "$dir" -cf "$tarball" "$item"
  sum=$(sha256sum "$tarball" | cut -d' ' -f1)
  rm -f "$OUT/$label".tar.part-*
  split -b "$PART_SIZE" -d -a 2 "$tarball" "$OUT/$label.tar.part-"
  cat > "$OUT/reassemble.sh" <<EOF
#!/usr/bin/env bash
# $item, written by bench/gpu_train.sh, as a tar in $(ls "$OUT/$label".tar.part-* | wc -l) parts (sha256 $sum).
# Usage: bash reassemble.sh [DEST] (default: model_repository); the parts can stay where they are (read-only).
set -euo pipefail
here=\$(dirname "\$0"); dest=\${1:-model_repository}
got=\$(cat "\$here"/$label.tar.part-* | sha256sum | cut -d' ' -f1)
[ "\$got" = "$sum" ] || { echo "sha256 \$got, expected $sum: a part is missing or damaged" >&2; exit 1; }
mkdir -p "\$dest" && cat "\$here"/$label.tar.part-* | tar -xf - -C "\$dest" && echo "unpacked $item into \$dest"
EOF
  rm -f "$tarball"
}

run() {
  mkdir -p "$OUT" "$RUN"
  export PYTHONUNBUFFERED=1
  local log=$OUT/train.log status=0 data_arg=()
  [ -d "$DATA" ] && data_arg=("data_dir=$DATA")
  environment 2>&1 | tee "$log"
  rm -rf "${RUN:?}/train" "$RUN/repository"
  echo "== train: $CONFIG ${data_arg[*]} $*" | tee -a "$log"
  timeout "$TRAIN_TIMEOUT" "$PYTHON" -m training train --config "$CONFIG" "${data_arg[@]}" "out_dir=$RUN/train" "$@" \
    2>&1 | tee -a "$log" || status=$?
  [ "$status" = 0 ] || echo "== training ended with status $status (124: stopped by the timeout)" | tee -a "$log"
  [ -f "$RUN/train/config.json" ] && cat "$RUN/train/config.json" >> "$log"
  for f in metrics.json learning_curves.png confusion_matrix.png; do
    [ -f "$RUN/train/$f" ] && cp "$RUN/train/$f" "$OUT/"
  done
  [ -f "$RUN/train/checkpoint.pt" ] || { echo "== no checkpoint: nothing to export" | tee -a "$log"; return 1; }

  echo "== export" | tee -a "$log"
  if export_ready >>"$log" 2>&1 && timeout "$EXPORT_TIMEOUT" "$PYTHON" -m training export "$RUN/train/checkpoint.pt" \
      --model-repository "$RUN/repository" --name "$NAME" --version 1 ${data_arg:+--data-dir "$DATA"} 2>&1 | tee -a "$log"; then
    score_onnx "$RUN/repository/$NAME/1/model.onnx" 2>&1 | tee -a "$log" || echo "== scoring the ONNX file failed" | tee -a "$log"
    package "$RUN/repository" "$NAME" "$NAME"
  else
    echo "== export failed: the checkpoint comes back instead (python -m training export it here)" | tee -a "$log"
    package "$RUN/train" checkpoint.pt "${NAME}_checkpoint"
  fi
  summary 2>&1 | tee -a "$log"
  return "$status"
}

summary() {
  "$PYTHON" - "$OUT/metrics.json" <<'PY' || true
import json, sys
m = json.load(open(sys.argv[1]))
h = m["history"]
print(f"== {m['model']}: test accuracy {100 * m.get('test_acc', float('nan')):.2f}%, best val {100 * m['best_val_acc']:.2f}%, "
      f"{m['epochs_run']} epochs in {m['train_time_s']} s, {h[-1]['train_images_per_s']:,} train img/s at the last epoch; "
      f"{m['setup']['runtime']}; goal >= 95.00% within 300 s: "
      f"{'met' if m.get('test_acc', 0) >= 0.95 and m['train_time_s'] <= 300 else 'NOT met'}")
PY
  local n
  n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  echo "== $n files in $OUT (at most 8 come back, each at most 16 MiB):"
  ls -l "$OUT"
  [ "$n" -le 8 ] || echo "== WARNING: more than 8 files: some will not come back"
  if find "$OUT" -type f -size +16M | grep -q .; then echo "== WARNING: a file is over 16 MiB"; fi
}

# The same steps on the CPU at toy size: 400 training and 200 test images cut from the real files, 1 epoch
# of ResNet-18 under bf16 autocast (as on the GPU), the real export and the real packaging.
smoke() {
  local src=${FASHION_MNIST_DIR:-$DATA} tiny=runs/gpu_train_smoke/data
  PYTHON=${SMOKE_PYTHON:-.venv/bin/python}
  mkdir -p "$tiny"
  "$PYTHON" - "$src" "$tiny" <<'PY'
import gzip, struct, sys
from pathlib import Path
from training.data import load_idx_dataset
ds = load_idx_dataset("fashion-mnist", sys.argv[1])
def write(name, a):
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    (Path(sys.argv[2]) / name).write_bytes(gzip.compress(header + a.astype("uint8").tobytes(), 1))
write("train-images-idx3-ubyte.gz", ds.train.images[:400, ..., 0]); write("train-labels-idx1-ubyte.gz", ds.train.labels[:400])
write("t10k-images-idx3-ubyte.gz", ds.test.images[:200, ..., 0]); write("t10k-labels-idx1-ubyte.gz", ds.test.labels[:200])
PY
  PYTHON=$PYTHON DATA=$tiny RUN=runs/gpu_train_smoke OUT=${SMOKE_OUT:-runs/gpu_train_smoke/out} \
    run verify_checksums=false epochs=1 warmup_epochs=0 device=cpu amp=bf16 eval_batch_size=200 "$@"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  smoke) shift; smoke "$@" ;;
  *) echo "usage: $0 prepare|run [key=value ...]|smoke [key=value ...]" >&2; exit 2 ;;
esac
