"""Launching 2-process runs from the tests (torchrun, accelerate launch), and the 1-process run they are compared
with: the same global batch, so the same losses, grad norms and evals (test_distributed: DDP, test_fsdp: FSDP)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, ROOT

BIN = Path(sys.executable).parent
# 48 train rows, 4 per process per step: 6 steps an epoch, so 8 steps cross into epoch 2 (the sampler reseeds).
# 16 eval rows in batches of 6: the ranks get uneven eval batches, padded by accelerate and dropped again.
RUN = dict(per_device_train_batch_size=4, per_device_eval_batch_size=6, max_steps=8, learning_rate=5e-3,
           pref_beta=0.5, lora_rank=8, logging_steps=1, eval_steps=4, save_steps=4, val_size=16,
           lr_scheduler_type="linear")
COMPARED = ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected")


def fixture_raw(tmp_path: Path, **overrides) -> dict:
    from make_fixtures import fixture_config

    cache = tmp_path / "ref_cache"
    if not cache.exists():
        shutil.copytree(FIXTURES / "demo" / "ref_cache", cache)
    return {**fixture_config(FIXTURES), "ref_cache_dir": str(cache), **overrides}


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def launch(*argv, timeout: int = 300) -> str:
    """Run a launcher command from the repository root; its stdout (every process's)."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_process(tmp: Path) -> tuple[list[dict], Path]:
    """The 1-process run with the same global batch as 2 processes x RUN (4 pairs x 2 accumulation steps): its
    log history and output_dir. conftest's session fixture ``one_process_run`` runs it once for every module."""
    from dpo_lean import train
    from dpo_lean.config import from_dict

    config = from_dict(fixture_raw(tmp, **RUN, gradient_accumulation_steps=2, output_dir=str(tmp / "out")))
    train.run_train(config)
    return json.loads((config.metrics_dir / "log_history.json").read_text()), Path(config.output_dir)


def assert_same_history(got: list[dict], expected: list[dict]) -> None:
    logs = lambda h, key: [e for e in h if key in e]  # noqa: E731
    assert [e["step"] for e in logs(got, "loss")] == [e["step"] for e in logs(expected, "loss")] == list(range(1, 9))
    for g, e in zip(logs(got, "loss"), logs(expected, "loss")):
        for key in COMPARED:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-5), (e["step"], key)
    assert len(logs(got, "eval_loss")) == len(logs(expected, "eval_loss")) == 2  # steps 4 and 8, the final one
    for g, e in zip(logs(got, "eval_loss"), logs(expected, "eval_loss")):
        for key in ("loss", *COMPARED[3:]):
            assert g[f"eval_{key}"] == pytest.approx(e[f"eval_{key}"], rel=1e-5, abs=1e-5), (e["step"], key)
