#!/usr/bin/env bash
# Serve the bundled model repository, classify and explain the sample images, then stop the server.
set -euo pipefail
PY=${1:-.venv/bin/python}
PORT=${2:-8001}
LOG=$(mktemp)
"$PY" -m serving serve --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do
  grep -q '^SERVING' "$LOG" && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
grep -q '^SERVING' "$LOG" || { cat "$LOG"; echo "server did not start"; exit 1; }
echo "== server ready on 127.0.0.1:$PORT"
"$PY" -m serving models --server "127.0.0.1:$PORT"
echo "== classify (top 3)"
"$PY" -m serving classify --server "127.0.0.1:$PORT" --top-k 3 examples/images/*.png
echo "== explain: class activation maps over each image"
"$PY" -m serving explain --server "127.0.0.1:$PORT" --out-dir cam_overlays examples/images/*.png
echo
echo "Serve it yourself:  $PY -m serving serve --port $PORT"
echo "Then, from another shell:  $PY -m serving classify --server 127.0.0.1:$PORT examples/images/ankle_boot.png"
