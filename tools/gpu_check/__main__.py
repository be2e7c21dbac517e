"""python tools/gpu_check [--dry-run] [--out DIR] [--work DIR] [--budget S]   (tools/gpu_check.sh runs this)

Internal: ``env`` prints the versions and the device as JSON; ``step demo|oom`` runs one step in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: gpu_check, bench
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository: dpo_lean


def default_work() -> Path:
    if os.environ.get("GPU_CHECK_WORK"):
        return Path(os.environ["GPU_CHECK_WORK"])
    try:
        shm = os.statvfs("/dev/shm")
        if shm.f_bavail * shm.f_frsize >= 40e9:
            return Path("/dev/shm/gpu_check_work")
    except OSError:
        pass
    return Path("/tmp/gpu_check_work")


def main() -> None:
    parser = argparse.ArgumentParser(prog="tools/gpu_check", description=__import__("gpu_check").__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="run", choices=("run", "env", "step"))
    parser.add_argument("step", nargs="?", choices=("demo", "oom"))
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                        help="walk every step on CPU at tiny sizes (CUDA calls skipped); also GPU_CHECK_DRY_RUN=1")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_output"))
    parser.add_argument("--work", type=Path, default=default_work(),
                        help="models, caches, runs (default $GPU_CHECK_WORK, else /dev/shm/gpu_check_work where 40 GB "
                             "are free there: the 7B model's 15 GB are written and read 7 times; else /tmp)")
    parser.add_argument("--budget", type=int, default=None, help="seconds for the whole check (default 360)")
    parser.add_argument("--shape", default="Qwen2.5-1.5B", help="step oom: the model shape")
    args = parser.parse_args()
    if args.what == "env":
        from gpu_check.report import print_env

        print_env()
    elif args.what == "step":
        from gpu_check import checks

        {"demo": checks.demo, "oom": checks.oom}[args.step](args.work, args.dry_run, args.shape)
    else:
        from gpu_check.runner import BUDGET_S, run

        sys.exit(run(args.out, args.work, args.dry_run, args.budget or BUDGET_S))


if __name__ == "__main__":
    main()
