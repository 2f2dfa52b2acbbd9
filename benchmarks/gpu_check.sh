#!/usr/bin/env bash
# The key paths on a CUDA GPU, float32 against bfloat16, answers compared (issue 43).
#
#   benchmarks/gpu_check.sh [MODEL] [ROWS]      # default qwen2.5-coder-0.5b, 100 rows
#
# Runs, through the CLI with --device cuda, each dtype in turn: the label scorer (zero-shot
# and central ICL), one IFed-ICL calibration round, one FedAvg-LoRA round, and `fedsteer
# serve` answering one greedy completion. Then prints, per path, how many rows' correctness
# agrees, both accuracies and the exact McNemar p, and whether serve said the same thing.
# A few minutes on a GPU. Exits 3 with a message where torch sees no CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FEDSTEER=${FEDSTEER:-.venv/bin/fedsteer}
MODEL=${1:-qwen2.5-coder-0.5b}
ROWS=${2:-100}
OUT=${OUT:-benchmarks/results/gpu_check}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA GPU" \
       "on this machine; run this script on a machine with one (nothing was run)." >&2
  exit 3
fi
"$PY" -c "import torch; print('gpu:', torch.cuda.get_device_name(0),
           '| bf16 supported:', torch.cuda.is_bf16_supported())"
mkdir -p "$OUT"

run() {  # run METHOD DTYPE [--option k=v ...]
  local method=$1 dtype=$2; shift 2
  "$FEDSTEER" run "$method" --model "$MODEL" --task sst2 --test-size "$ROWS" --clients 2 \
    --device cuda --dtype "$dtype" --out "$OUT/$method-$dtype" --force "$@" > "$OUT/$method-$dtype.log"
}
for dtype in float32 bfloat16; do
  echo "== $dtype"
  run zero-shot "$dtype"
  run central-icl "$dtype"
  run ifed-icl "$dtype" --rounds 1 --option local_epochs=2
  run fedavg-lora "$dtype" --rounds 1
done

serve_once() {  # serve_once DTYPE PORT -> prints the completion text
  local dtype=$1 port=$2
  "$FEDSTEER" serve --model "$MODEL" --device cuda --dtype "$dtype" --port "$port" \
    > "$OUT/serve-$dtype.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\": \"$MODEL\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 16,
         \"temperature\": 0}" > "$OUT/serve-$dtype.json"
  kill "$pid"; wait "$pid" 2> /dev/null || true
}
serve_once float32 18431
serve_once bfloat16 18432

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from fedsteer.eval.metrics import mcnemar_exact

out = Path(sys.argv[1])
failed = False
for method in ("zero-shot", "central-icl", "ifed-icl", "fedavg-lora"):
    a, b = (json.loads((out / f"{method}-{d}" / "result.json").read_text())
            for d in ("float32", "bfloat16"))
    ca, cb = a["per_row"]["correct"], b["per_row"]["correct"]
    same = sum(x == y for x, y in zip(ca, cb)) / len(ca)
    only_a, only_b, p = mcnemar_exact(ca, cb)
    print(f"{method:12s} float32 {100 * a['metrics']['accuracy']:5.1f}  bfloat16 "
          f"{100 * b['metrics']['accuracy']:5.1f}  rows agreeing {100 * same:5.1f} %  "
          f"McNemar p {p:.3g}  ran: {a['env']['placement']['reason']} | "
          f"{b['env']['placement']['reason']}")
    failed |= p < 0.05
texts = [json.loads((out / f"serve-{d}.json").read_text())["choices"][0]["text"]
         for d in ("float32", "bfloat16")]
print(f"serve        float32 {texts[0]!r}\n             bfloat16 {texts[1]!r}  "
      f"{'same' if texts[0] == texts[1] else 'DIFFERENT (greedy text may drift in bf16)'}")
sys.exit(1 if failed else 0)
EOF
