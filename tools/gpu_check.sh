#!/usr/bin/env bash
# Check dpo-lean's GPU paths in one command, and print one summary.
#
#   tools/gpu_check.sh [MODEL]      # MODEL: a hub id or local folder for tools/bench (default Qwen/Qwen2.5-0.5B-Instruct)
#
# On a CUDA machine it runs, each step logged to $OUT (default gpu_check_output/):
#   1. cuda tests        every @pytest.mark.cuda test but the out-of-memory ones (bf16 check, device placement, ...)
#   2. cpu mechanisms    the CPU tests of the same mechanisms (fake OOM, bf16 log-probs, sliding windows, the guard)
#   3. demo bf16 4-bit   the demo's data, precompute, train and evaluate with bf16=true on the 4-bit tiny model
#   4. OOM halving       a real CUDA out-of-memory under a measured memory cap, halved and retried
#   5. torchrun 2 GPUs   precompute and train under torchrun on 2 GPUs (NCCL), when there are two
#   6. bench             tools/bench all --model MODEL
# On a machine without CUDA, steps 1 and 2 run (the cuda tests skip, and it says so) and 3-6 are skipped.
# The exit status is non-zero when a step fails. GPUS=N overrides the detected GPU count (e.g. to walk the GPU
# branch on a CPU machine: the demo and torchrun then run on CPU, in float32, over gloo); PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
MODEL="${1:-Qwen/Qwen2.5-0.5B-Instruct}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
BIN="$(dirname "$PY")"
OUT="${OUT:-gpu_check_output}"
mkdir -p "$OUT"
SUMMARY=()
FAILED=0

gpus=${GPUS:-$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)}
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| CUDA',
      torch.version.cuda, '|', ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or 'no GPU')"

step() {  # step NAME COMMAND...: run it, log to $OUT/NAME.log, record PASS/FAIL and seconds
  local name="$1"; shift
  local log="$OUT/$(printf %s "$name" | tr -c "A-Za-z0-9._-" "_").log" t0=$SECONDS
  echo "== $name: $*"
  if "$@" >"$log" 2>&1; then
    SUMMARY+=("PASS  $name ($((SECONDS - t0)) s)  $(tail -n 1 "$log" | cut -c1-100)")
  else
    SUMMARY+=("FAIL  $name ($((SECONDS - t0)) s)  see $log")
    FAILED=1
  fi
}
skip() { SUMMARY+=("SKIP  $1  ($2)"); }

if [ "$gpus" -gt 0 ]; then
  step "cuda tests" "$PY" -m pytest -q -p no:cacheprovider -m cuda -k "not out_of_memory" -rs
else
  step "cuda tests (all skip: no CUDA)" "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs
fi
step "cpu mechanisms" "$PY" -m pytest -q -p no:cacheprovider -m "not cuda" \
  tests/test_precompute.py tests/test_logprobs.py tests/test_prefix_sharing.py tests/test_nonfinite_guard.py \
  tests/test_modeling.py -k "memory or bf16 or allocation or window or tolerance or guard or step or rank or quantised"

if [ "$gpus" -gt 0 ]; then
  demo_check() {
    local d="$OUT/demo"
    "$PY" -c "from pathlib import Path; from dpo_lean.demo import write_demo_config; print(write_demo_config(Path('$d')))" &&
    "$BIN/dpo-lean" precompute "$d/demo.yaml" bf16=true overwrite_cache=true &&
    "$BIN/dpo-lean" train "$d/demo.yaml" bf16=true &&
    "$BIN/dpo-lean" evaluate "$d/demo.yaml" bf16=true &&
    "$PY" - "$d/run/dpo_metrics/log_history.json" <<'EOF'
import json, sys
acc = [h["eval_rewards/accuracies"] for h in json.load(open(sys.argv[1])) if "eval_rewards/accuracies" in h]
print(f"held-out reward accuracy: {acc[0]:.2f} before training -> {acc[-1]:.2f} after")
sys.exit(0 if acc[-1] >= 0.9 else 1)
EOF
  }
  step "demo bf16 4-bit" demo_check
  step "OOM halving" "$PY" -m pytest -q -p no:cacheprovider -m cuda -k "out_of_memory" -rs
  if [ "$gpus" -ge 2 ]; then
    torchrun_check() {
      local d="$OUT/torchrun"
      "$PY" -c "
import sys, yaml; sys.path.insert(0, 'tools'); from pathlib import Path; from make_fixtures import fixture_config
raw = {**fixture_config(Path('tests/fixtures')), 'output_dir': '$d/out', 'ref_cache_dir': '$d/cache', 'bf16': True,
       'max_steps': 8, 'save_strategy': 'no', 'val_size': 16, 'eval_steps': 4}
Path('$d').mkdir(parents=True, exist_ok=True); Path('$d/cfg.yaml').write_text(yaml.safe_dump(raw))" &&
      "$BIN/torchrun" --standalone --nproc_per_node 2 -m dpo_lean.cli precompute "$d/cfg.yaml" &&
      "$BIN/torchrun" --standalone --nproc_per_node 2 -m dpo_lean.cli train "$d/cfg.yaml"
    }
    step "torchrun 2 GPUs" torchrun_check
  else
    skip "torchrun 2 GPUs" "one GPU"
  fi
  step "bench all --model $MODEL" "$PY" tools/bench all --model "$MODEL" --json "$OUT/bench.json"
else
  for name in "demo bf16 4-bit" "OOM halving" "torchrun 2 GPUs" "bench all --model $MODEL"; do
    skip "$name" "needs CUDA; torch.cuda.is_available() is false here"
  done
fi

echo
echo "== gpu_check summary ($gpus GPU(s); logs in $OUT/)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
