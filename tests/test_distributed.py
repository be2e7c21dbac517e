"""Data-parallel train and precompute under torchrun and accelerate launch: 2 CPU processes (gloo).

These are docs/multi-gpu.md's commands with the GPU specifics swapped (2 processes, --multi_gpu on CPU
falls back to gloo): a 2-process run equals a 1-process run with the same global batch, and a
2-process (or 2-node) precompute equals a 1-process one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import FIXTURES, ROOT
from launching import BIN, RUN, assert_same_history, fixture_raw, free_port, launch, write_config

from dpo_lean.config import from_dict
from dpo_lean.precompute import run_precompute


@pytest.fixture(scope="module")
def single(one_process_run):
    return one_process_run[0]


def assert_written_once(stdout: str, out: Path) -> None:
    assert stdout.count("adapter saved to") == 1 and stdout.count("data: 64 of 64 rows kept") == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert (out / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "dpo_metrics" / "summary.json").read_text())
    assert summary["finished"] is True and summary["global_step"] == 8


def test_torchrun_train_equals_one_process_with_the_same_global_batch(single, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "cfg.yaml", fixture_raw(tmp_path, **RUN, output_dir=str(out)))
    torchrun = [BIN / "torchrun", "--standalone", "--nproc_per_node", 2, "-m", "dpo_lean.cli", "train", config]
    stdout = launch(*torchrun)
    assert_written_once(stdout, out)
    assert_same_history(json.loads((out / "dpo_metrics" / "log_history.json").read_text()), single)

    # Resume under the launcher, as after a crash past checkpoint-4: it ends like the uninterrupted runs.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-4", resumed / "checkpoint-4")
    launch(*torchrun, "resume_from_checkpoint=true", f"output_dir={resumed}")
    assert_same_history(json.loads((resumed / "dpo_metrics" / "log_history.json").read_text()), single)


def test_accelerate_launch_train_equals_one_process_with_the_same_global_batch(single, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "cfg.yaml", fixture_raw(tmp_path, **RUN, output_dir=str(out)))
    stdout = launch(BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", 2, "--main_process_port", 0,
                    "-m", "dpo_lean.cli", "train", config)
    assert_written_once(stdout, out)
    assert_same_history(json.loads((out / "dpo_metrics" / "log_history.json").read_text()), single)


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory):
    from make_fixtures import fixture_config

    tmp = tmp_path_factory.mktemp("cache1")
    run_precompute(from_dict({**fixture_config(FIXTURES), "ref_cache_dir": str(tmp / "cache"),
                              "output_dir": str(tmp / "out")}))
    return pd.read_parquet(tmp / "cache").sort_values("row_index").reset_index(drop=True)


def read_cache(path: Path) -> pd.DataFrame:
    manifest = json.loads((path / "_manifest.json").read_text())
    assert manifest["expected_rows"] == 64 and {r["shard"] for r in manifest["runs"]} == {"0/2", "1/2"}
    return pd.read_parquet(path).sort_values("row_index").reset_index(drop=True)


def test_torchrun_precompute_shards_meet_in_one_cache_equal_to_one_process(one_process_cache, tmp_path):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "cfg.yaml", fixture_raw(tmp_path, ref_cache_dir=str(cache),
                                                             output_dir=str(tmp_path / "out")))
    stdout = launch(BIN / "torchrun", "--standalone", "--nproc_per_node", 2, "-m", "dpo_lean.cli", "precompute", config)
    assert "(shard 1 of 2)" in stdout and "(shard 2 of 2)" in stdout
    pd.testing.assert_frame_equal(read_cache(cache), one_process_cache)


def test_two_node_precompute_equals_one_process(one_process_cache, tmp_path):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "cfg.yaml", fixture_raw(tmp_path, ref_cache_dir=str(cache),
                                                             output_dir=str(tmp_path / "out")))
    port = free_port()
    nodes = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(rank), "--master_addr",
                               "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1", "-m", "dpo_lean.cli",
                               "precompute", str(config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-4000:]
    pd.testing.assert_frame_equal(read_cache(cache), one_process_cache)


NAN_ON_RANK_1 = textwrap.dedent("""
    import os, sys, torch, transformers
    from dpo_lean import train
    rank, real, calls, where = int(os.environ["RANK"]), train.pair_metrics, [], sys.argv[2]

    def poisoned(config, scores, batch, **kwargs):  # a NaN loss on rank 1 at step 3 whose gradients stay finite
        losses, stats = real(config, scores, batch, **kwargs)
        if scores["logps"].requires_grad:
            calls.append(1)
            if rank == 1 and len(calls) == 3:
                losses = losses + float("nan")
        return losses, stats

    train.pair_metrics, real_train = poisoned, transformers.Trainer.train

    def train_and_save_lora(self, *args, **kwargs):
        out = real_train(self, *args, **kwargs)
        lora = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save(lora, os.path.join(where, f"lora-rank{rank}.pt"))
        return out

    transformers.Trainer.train = train_and_save_lora
    from dpo_lean.cli import main
    sys.argv = ["dpo-lean", "train", sys.argv[1]]
    main()
""")


def test_a_non_finite_step_on_one_rank_is_skipped_by_all_ranks_together(tmp_path):
    """Rank 1 alone sees a NaN loss: both ranks skip that step (the decision is all-reduced), so their LoRA
    weights stay identical; a rank-local decision would let rank 0 step alone and the replicas drift apart."""
    import torch

    out = tmp_path / "out"
    raw = fixture_raw(tmp_path, per_device_train_batch_size=2, max_steps=4, logging_steps=1, save_strategy="no",
                      val_size=0, learning_rate=5e-3, lora_rank=8, skip_nonfinite_steps=True, output_dir=str(out))
    config = write_config(tmp_path / "cfg.yaml", raw)
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(config),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stderr.count("step 3: non-finite loss or gradients; step skipped") == 2  # each rank says so
    summary = json.loads((out / "dpo_metrics" / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 1 and summary["global_step"] == 4
    ranks = [torch.load(tmp_path / f"lora-rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


SIGTERM_TO_LAUNCHER = textwrap.dedent("""
    import os, signal, sys, time, transformers
    real, calls = transformers.Trainer.training_step, []

    def step(self, *args, **kwargs):  # in step 3, rank 0 has the launcher signalled, as SLURM or Kubernetes would
        calls.append(1)
        if len(calls) == 3 and os.environ["RANK"] == "0":
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(3)  # the launcher forwards SIGTERM to both ranks while this step runs
        return real(self, *args, **kwargs)

    transformers.Trainer.training_step = step
    from dpo_lean.cli import main
    sys.argv = ["dpo-lean", "train", sys.argv[1]]
    main()
""")


def test_sigterm_to_torchrun_saves_a_checkpoint_and_stops_every_rank(tmp_path):
    """torchrun forwards SIGTERM to its processes: they agree to finish the step, save one checkpoint, stop with a
    message that gives the launcher's shutdown timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), and exit non-zero."""
    from dpo_lean import faults

    out = tmp_path / "out"
    raw = fixture_raw(tmp_path, per_device_train_batch_size=2, max_steps=40, logging_steps=1, save_steps=100,
                      val_size=0, learning_rate=5e-3, lora_rank=8, output_dir=str(out))
    config = write_config(tmp_path / "cfg.yaml", raw)
    script = tmp_path / "sigterm_to_launcher.py"
    script.write_text(SIGTERM_TO_LAUNCHER)
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(config)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert output.count("SIGTERM: finishing this step and saving a checkpoint") == 1  # said by rank 0 only
    assert "under a launcher: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120: the launcher SIGKILLs this process" in output
    assert f"interrupted by SIGTERM at step 3; checkpoint saved to {out / 'checkpoint-3'}" in output
    assert "Traceback" not in proc.stdout and [p.name for p in faults.checkpoints(out)] == ["checkpoint-3"]
    assert faults.is_complete(out / "checkpoint-3")
