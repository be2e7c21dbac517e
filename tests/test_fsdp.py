"""FSDP2 over 2 CPU processes (gloo): a 4-bit NF4 base + LoRA sharded in precompute and in train, under torchrun
(config key fsdp: true) and accelerate launch (configs/accelerate_fsdp_qlora.yaml).

One chain of launches serves every assertion: torchrun precompute (process 0 computes the missing half of the
cache, process 1 only keeps pace with idle forwards), then accelerate launch train killed with SIGKILL right after
its first checkpoint, then torchrun train resuming it. It must end exactly as a 1-process run with the same global
batch ends: the same losses, grad norms and evals (DDP's tolerance), an adapter identical in files, keys, dtypes and
values; `evaluate` and `export` read that adapter in one process.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import FIXTURES, ROOT
from launching import BIN, RUN, assert_same_history, fixture_raw, free_port, launch, write_config

from dpo_lean import sharding
from dpo_lean.config import from_dict
from dpo_lean.errors import DpoLeanError

ACCELERATE_FSDP = ROOT / "configs" / "accelerate_fsdp_qlora.yaml"
TORCHRUN = [BIN / "torchrun", "--standalone", "--nproc_per_node", 2, "-m", "dpo_lean.cli"]
# accelerate launch as a user runs it with the shipped file; on CPU mixed precision is off (dpo-lean computes in fp32)
ACCELERATE = [BIN / "accelerate", "launch", "--config_file", ACCELERATE_FSDP, "--mixed_precision", "no",
              "--num_processes", 2, "--main_process_port", 0]
KILLED_AFTER_FIRST_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import transformers
    save = transformers.Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):  # process 0 dies by SIGKILL once checkpoint-4 is complete
        save(self, *args, **kwargs)
        if os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)

    transformers.Trainer._save_checkpoint = save_then_die
    from dpo_lean.cli import main
    sys.argv = ["dpo-lean", "train", sys.argv[1]]
    main()
""")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """The chain of launches (process 0 of the accelerate launch is killed; torchrun's agent then ends the other);
    the folders and outputs the tests read."""
    tmp = tmp_path_factory.mktemp("fsdp")
    cache, out = tmp / "ref_cache", tmp / "out"
    shutil.copytree(FIXTURES / "demo" / "ref_cache", cache)
    for part in [*cache.glob("part-00000-*"), *cache.glob("part-00002-*")]:  # parts 0 and 2 are process 0's
        part.unlink()
    config = write_config(tmp / "cfg.yaml", fixture_raw(tmp, **RUN, fsdp=True, ref_cache_dir=str(cache),
                                                        output_dir=str(out)))
    precompute = launch(*TORCHRUN, "precompute", config)

    script = tmp / "killed.py"
    script.write_text(KILLED_AFTER_FIRST_CHECKPOINT)
    plain = write_config(tmp / "plain.yaml", {k: v for k, v in read(config).items() if k != "fsdp"})
    killed = subprocess.run([str(a) for a in ACCELERATE + [script, plain]], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    checkpoints_after_kill = sorted(p.name for p in out.glob("checkpoint-*"))
    resumed = launch(*TORCHRUN, "train", config, "resume_from_checkpoint=true")
    return {"tmp": tmp, "cache": cache, "out": out, "config": config, "precompute": precompute, "killed": killed,
            "checkpoints_after_kill": checkpoints_after_kill, "resumed": resumed}


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def assert_holds_half_and_the_head(stdout: str, processes: int) -> None:
    """Each process holds its half of every weight but the output head, which it holds whole: the tiny model's
    untied head is vocab x hidden float32 values (config.json)."""
    config = json.loads((FIXTURES / "tiny-model" / "config.json").read_text())
    head_mb = config["vocab_size"] * config["hidden_size"] * 4 / 2**20
    said = re.findall(r"FSDP: this process holds ([\d.]+) MB of the model's ([\d.]+) MB of weights", stdout)
    assert len(said) == processes, stdout[-2000:]
    for mine, total in said:
        assert float(mine) == pytest.approx(head_mb + (float(total) - head_mb) / 2, abs=0.01), (mine, total, head_mb)


def test_fsdp_precompute_shards_the_reference_and_fills_the_cache_as_one_process(fsdp):
    expected = pd.read_parquet(FIXTURES / "demo" / "ref_cache").sort_values("row_index").reset_index(drop=True)
    got = pd.read_parquet(fsdp["cache"]).sort_values("row_index").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    stdout = fsdp["precompute"]
    assert_holds_half_and_the_head(stdout, processes=2)
    assert "precompute: 32 rows in 2 parts (shard 1 of 2)" in stdout
    assert "precompute: 0 rows in 0 parts (shard 2 of 2) (32 of 64 rows already cached, kept); 4 idle forwards" in stdout


SIGTERM_TO_ONE_PROCESS = textwrap.dedent("""
    import os, signal, sys
    from dpo_lean import precompute
    real, calls = precompute.BatchScorer._score, []

    def score(self, rows):  # process 0 alone is signalled during its second forward (the end of its first part)
        calls.append(1)
        if len(calls) == 2 and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, rows)

    precompute.BatchScorer._score = score
    from dpo_lean.cli import main
    sys.argv = ["dpo-lean", "precompute", sys.argv[1]]
    main()
""")


def test_sigterm_to_one_fsdp_precompute_process_stops_both_before_the_same_forward(tmp_path):
    """FSDP forwards are collective: a process that stopped alone would leave the other waiting in the next forward's
    all-gather. The processes agree before each forward, so both stop after their first part (exit 143, the signal
    that one of them got), keeping it, and a rerun completes the cache a 1-process run writes."""
    cache = tmp_path / "ref_cache"
    config = write_config(tmp_path / "cfg.yaml", fixture_raw(tmp_path, **RUN, fsdp=True, ref_cache_dir=str(cache),
                                                           output_dir=str(tmp_path / "out")))
    for part in cache.glob("part-*"):  # fixture_raw copied the committed cache: compute it all again
        part.unlink()
    script = tmp_path / "sigterm_to_one.py"
    script.write_text(SIGTERM_TO_ONE_PROCESS)
    proc = subprocess.run([str(a) for a in [*TORCHRUN[:4], script, config]], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, output[-4000:]  # (torchrun's own report has one)
    assert output.count("interrupted: 32 of 64 rows are cached in complete parts") == 2, output[-4000:]
    assert len(list(cache.glob("part-*"))) == 2

    launch(*TORCHRUN, "precompute", config)
    expected = pd.read_parquet(FIXTURES / "demo" / "ref_cache").sort_values("row_index").reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_parquet(cache).sort_values("row_index").reset_index(drop=True), expected)


def test_fsdp_train_killed_and_resumed_equals_one_process_with_the_same_global_batch(fsdp, one_process_run):
    assert fsdp["killed"].returncode != 0 and fsdp["checkpoints_after_kill"] == ["checkpoint-4"]
    assert_holds_half_and_the_head(fsdp["killed"].stdout, processes=1)  # train says it on the main process
    out = fsdp["out"]
    expected, single_out = one_process_run
    assert_same_history(json.loads((out / "dpo_metrics" / "log_history.json").read_text()), expected)
    assert fsdp["resumed"].count("adapter saved to") == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    for folder, reference in ((out, single_out), (out / "checkpoint-8", single_out / "checkpoint-8")):
        assert_same_adapter(folder, reference)


def test_a_sharded_state_dict_run_saves_the_same_adapter(one_process_run, tmp_path):
    """fsdp_state_dict_type SHARDED_STATE_DICT (transformers' Trainer saves no adapter then) and transformers'
    legacy fsdp words: the adapter at the end is the 1-process run's."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "cfg.yaml", fixture_raw(
        tmp_path, **RUN, save_strategy="no", fsdp="full_shard auto_wrap",
        fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}, output_dir=str(out)))
    launch(*TORCHRUN, "train", config)
    assert_same_history(json.loads((out / "dpo_metrics" / "log_history.json").read_text()), one_process_run[0])
    assert_same_adapter(out, one_process_run[1])


def assert_same_adapter(got: Path, expected: Path) -> None:
    """The same PEFT adapter: files, config (target modules as a set), tensor keys, dtypes, shapes and values."""
    from safetensors.torch import load_file

    names = ("adapter_config.json", "adapter_model.safetensors")
    assert all((got / n).is_file() for n in names) and all((expected / n).is_file() for n in names)
    config_got, config_expected = (json.loads((d / names[0]).read_text()) for d in (got, expected))
    assert set(config_got.pop("target_modules")) == set(config_expected.pop("target_modules"))
    assert config_got == config_expected
    a, b = load_file(got / names[1]), load_file(expected / names[1])
    assert sorted(a) == sorted(b) and len(a) == 28  # lora_A and lora_B of 7 linear layers x 2 decoder layers
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_evaluate_and_export_read_the_fsdp_adapter(fsdp, one_process_run, tmp_path):
    from safetensors.torch import load_file

    from dpo_lean.evaluate import run_evaluate
    from dpo_lean.export import run_export

    raw = {**read(fsdp["config"]), "output_dir": str(tmp_path), "trained_adapter": str(fsdp["out"])}
    results = run_evaluate(from_dict(raw))  # one process, the config still saying fsdp: true
    final = [e for e in one_process_run[0] if "eval_loss" in e][-1]
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"):
        assert results[key] == pytest.approx(final[key], rel=1e-5, abs=1e-5), key

    merged = run_export(from_dict({**raw, "export_dir": str(tmp_path / "merged")}))
    weights = load_file(merged / "model.safetensors")
    base = load_file(FIXTURES / "tiny-model" / "model.safetensors")
    lora = load_file(fsdp["out"] / "adapter_model.safetensors")
    scale = 2 * RUN["lora_rank"] / RUN["lora_rank"]  # lora_alpha defaults to 2 x lora_rank
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = (lora[f"{prefix}.lora_{x}.weight"].double() for x in "AB")
    expected = base["model.layers.1.mlp.down_proj.weight"].double() + scale * b @ a
    torch.testing.assert_close(weights["model.layers.1.mlp.down_proj.weight"].double(), expected, rtol=0, atol=1e-6)
    assert (b != 0).any()  # trained: the merge is not the base


# ---------------------------------------------------------------- the non-finite guard on sharded gradients


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of one process (FSDP2 then makes every parameter and gradient a DTensor)."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_nonfinite_guard_reads_sharded_gradients(one_process_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dpo_lean.faults import NonFiniteGuard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fully_shard(model[0])
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(skip=True)
    guard.wrap(optimizer, lambda: 1)
    for poisoned in (True, False):
        model(torch.randn(3, 4)).sum().backward()
        grad = next(model.parameters()).grad
        assert isinstance(grad, DTensor)
        if poisoned:
            grad.to_local()[0, 0] = float("nan")
        before = [p.detach().full_tensor().clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        changed = [not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, model.parameters())]
        assert guard.skipped == 1 and any(changed) is not poisoned


# ---------------------------------------------------------------- what cannot work, in one line


ERRORS = [
    ({}, {"WORLD_SIZE": "1"}, "this is one process"),
    ({"fsdp": "hybrid_shard"}, {}, "config key 'fsdp': 'hybrid_shard' is not an FSDP2 option"),
    ({"fsdp_config": {"version": 1}}, {}, "fsdp_version is 1"),
    ({"fsdp_config": {"fsdp_use_orig_params": True}}, {}, "use_orig_params are FSDP1 options"),
    ({"fsdp_config": {"reshard_after_forwards": True}}, {}, "unknown FSDP option(s) reshard_after_forwards"),
    ({"fsdp_config": {"auto_wrap_policy": "NO_WRAP"}}, {}, "NO_WRAP"),
    ({"fsdp_config": {"activation_checkpointing": True}}, {}, "PEFT cannot find when it saves"),
    ({"fsdp_config": {"cpu_offload": True}}, {}, "needs a GPU to offload from"),
    ({"fsdp": "full_shard offload"}, {}, "needs a GPU to offload from"),
    ({"fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}, "save_only_model": True}, {}, "save_only_model"),
    ({"deepspeed": "ds.json"}, {}, "'fsdp' and 'deepspeed' are both set"),
    ({"optim": "paged_adamw_8bit"}, {}, "paged_adamw_8bit is a bitsandbytes optimizer"),
    ({"optim": "adamw_bnb_8bit"}, {}, "adamw_bnb_8bit is a bitsandbytes optimizer"),
    ({"fsdp": None}, {"ACCELERATE_USE_FSDP": "true"}, "accelerate config: fsdp_version is 1 (add fsdp_version: 2"),
    ({"fsdp": None}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "NO_WRAP"),
]


@pytest.mark.parametrize("keys, env, message", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_what_cannot_work_under_fsdp_is_refused_in_one_line(keys, env, message, tiny_config, monkeypatch):
    if torch.cuda.is_available() and "GPU" in message:
        pytest.skip("offloading is possible with a GPU")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tiny_config(**{"fsdp": True, **keys})
    with pytest.raises(DpoLeanError) as err:
        sharding.check(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_mixed_precision_other_than_the_compute_dtype_is_refused(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpoLeanError, match="accelerate's mixed_precision is bf16, but dpo-lean computes in float32"):
        sharding.check(tiny_config(fsdp=True), "bf16", torch.float32)
    assert sharding.check(tiny_config(fsdp=True), "bf16", torch.bfloat16)["version"] == 2


def test_fsdp_in_one_process_is_a_one_line_error_before_any_model_loads(tiny_config, tmp_path):
    from click.testing import CliRunner

    from dpo_lean.cli import main

    path = write_config(tmp_path / "cfg.yaml", {**fixture_raw(tmp_path), "fsdp": True, "output_dir": str(tmp_path)})
    result = CliRunner().invoke(main, ["train", str(path)])
    assert result.exit_code == 1 and "this is one process" in result.output
    result = CliRunner().invoke(main, ["precompute", str(path), "ref_cache_dir=" + str(tmp_path / "c")])
    assert result.exit_code == 1 and "this is one process" in result.output


def accelerate_launch_environment(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file F` gives each process (accelerate's own launch code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config_file),
                                                                              "x.py"]))
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def test_the_shipped_accelerate_file_and_70b_config_pass_the_fsdp_checks(monkeypatch, tmp_path):
    """configs/accelerate_fsdp_qlora.yaml launching configs/llama3_3_70b_qlora_dpo_fsdp.yaml on GPUs (bf16)."""
    from dpo_lean.config import load_config

    env = accelerate_launch_environment(ACCELERATE_FSDP)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for name, value in {**env, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    config = load_config(ROOT / "configs" / "llama3_3_70b_qlora_dpo_fsdp.yaml", [f"output_dir={tmp_path}"])
    assert sharding.requested(config) and config.quantization_bit == 4 and config.bf16
    options = sharding.check(config, env["ACCELERATE_MIXED_PRECISION"], torch.bfloat16)
    assert (options["version"], options["auto_wrap_policy"], options["state_dict_type"]) == (
        "2", "TRANSFORMER_BASED_WRAP", "FULL_STATE_DICT")
    assert sharding.plugin(config).fsdp_version == 2


def test_fsdp_config_without_fsdp_is_refused(tiny_config):
    with pytest.raises(DpoLeanError, match="config key 'fsdp_config' needs fsdp: true"):
        tiny_config(fsdp_config={"cpu_offload": True})


def test_precompute_under_fsdp_refuses_num_shards(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpoLeanError, match="config key 'num_shards': 2, but under FSDP"):
        sharding.check_precompute(tiny_config(fsdp=True, num_shards=2))
