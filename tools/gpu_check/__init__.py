"""tools/gpu_check: dpo-lean's GPU paths checked on a lent, offline GPU machine in one call (tools/gpu_check.sh).

    setup       the wheels in .whl/ (tools/gpu_kit.sh) that the image lacks, or has outside pyproject's ranges, are
                installed with pip --no-index --no-deps --target; versions, GPU and CUDA recorded
    cuda-tests  every @pytest.mark.cuda test
    demo        `dpo-lean precompute`, `train`, `evaluate` on the demo config with bf16=true, 4-bit tiny model:
                held-out reward accuracy about 0.5 before, >= 0.9 after
    oom         precompute at the Qwen2.5-1.5B shape uncapped, then under a CUDA memory cap (set_per_process_memory_
                fraction: the loaded reference + 55% of what the uncapped pass needed): long first batches run out
                of memory and halve, later short ones grow back; the capped cache equals the uncapped one
    bench-1.5B  tools/bench real-shapes at Qwen2.5-1.5B, then bench-7B at Qwen2.5-7B: NF4 base, bf16, LoRA r=16,
    bench-7B    cutoff 2,048 (prompt 1,024 + completions 1,024 each), 1 pair a step, 1 warm-up + 2 timed steps:
                dpo-lean, SFT, TRL (QLoRA, reference = adapter off), TRL+precompute; CUDA peak allocated and
                reserved, step time, tokens/s, model FLOPs over a bf16 matmul rate timed in the same step;
                precompute tokens/s against a bare forward. SDPA attention
    bench-1.5B-fa2  dpo-lean's rows with FlashAttention-2, where flash_attn is installed (else skipped)

Every step runs in its own process group under its own cap (runner.Step: cap_s), and all within BUDGET_S (360 s):
a step past its cap is killed and recorded as TIMEOUT with what it had written (the bench rewrites its JSON after
every contender). After every step results.json and summary.md in --out ($OUT) are rewritten, and the step's log
sits beside them: at most 8 files, what a device call brings back. --dry-run (GPU_CHECK_DRY_RUN=1) walks the same
steps on CPU at tiny sizes: nothing is installed, the cuda tests skip, the memory cap is simulated by a forward
hook that raises torch.cuda.OutOfMemoryError past a token count, the bench runs the tiny shape; the test suite runs
it (tests/test_gpu_check.py).

Modules: runner.py (steps, caps, setup), checks.py (the demo and out-of-memory steps, run in a child process),
report.py (environment, parsing, results.json and summary.md), wheels.py (which carried wheels to install).
"""
