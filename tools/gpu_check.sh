#!/usr/bin/env bash
# Check dpo-lean's GPU paths on a lent GPU machine, offline, in one call of at most 6 minutes:
#
#   bash tools/gpu_kit.sh                # here, with pip: the wheels the GPU image lacks, into .whl/
#   bash tools/gpu_check.sh              # there (the device tool's run, carry [".whl"]): results in $OUT
#   bash tools/gpu_check.sh --dry-run    # anywhere: every step on CPU at tiny sizes, CUDA calls skipped
#
# Steps, each in its own process under its own time cap, each written to $OUT (results.json, summary.md and the
# step's log) as soon as it ends: the cuda-marked tests; the demo in bf16 on the 4-bit tiny model; a real CUDA
# out-of-memory in precompute under a memory cap (halved, grown back, same values); tools/bench real-shapes at
# Qwen2.5-1.5B then 7B (dpo-lean, SFT, TRL, TRL+precompute; precompute against a bare forward); FlashAttention-2
# rows where flash_attn is installed. tools/gpu_check/__init__.py says more. GPU_CHECK_DRY_RUN=1 = --dry-run;
# PYTHON picks the interpreter (default: the GPU image's /opt/torch/.venv/bin/python3, else .venv/bin/python).
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
exec "$PY" tools/gpu_check "$@"
