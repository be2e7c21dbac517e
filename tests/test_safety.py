"""Safe by default: no remote code, a safe YAML loader, no dataset files outside dataset_dir, no pickle weights.

Each unsafe thing needs an explicit config key (trust_remote_code: true, use_safetensors_only: false);
without it the user gets a one-line error, and nothing runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner

from dpo_lean import modeling
from dpo_lean.cli import main
from dpo_lean.config import Config, from_dict, load_config
from dpo_lean.data.sources import load_records
from dpo_lean.errors import DpoLeanError
from dpo_lean.export import run_export

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "fixtures" / "tiny-model"
ROW = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}


def one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def cli(*args) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``dpo-lean ARGS``."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr.splitlines()


# --- trust_remote_code --------------------------------------------------------------------------

@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Record the kwargs modeling and export pass to AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def record(name, *args, _original=original, _cls=cls.__name__, **kwargs):
            calls.append((_cls, kwargs))
            return _original(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    return calls


@pytest.mark.parametrize("setting", [None, True])
def test_trust_remote_code_is_off_unless_the_config_turns_it_on(adapter, from_pretrained_calls, setting, tmp_path):
    raw = {"model_name_or_path": str(TINY_MODEL)} | ({"trust_remote_code": setting} if setting is not None else {})
    config = from_dict(raw)
    modeling.load_tokenizer(config)
    modeling.load_base_model(config)
    export_config = from_dict(raw | {"adapter_name_or_path": str(adapter), "export_dir": str(tmp_path / "m")})
    run_export(export_config)
    assert {cls for cls, _ in from_pretrained_calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert len(from_pretrained_calls) >= 4  # tokenizer and model, for load and for export
    assert all(kwargs["trust_remote_code"] is bool(setting) for _, kwargs in from_pretrained_calls), from_pretrained_calls


def test_model_with_remote_code_in_auto_map_runs_none_of_it_by_default(tmp_path):
    # With trust_remote_code: true, transformers imports evil_modeling.py and the marker appears (checked by hand;
    # not run here, as it would write the module into the user's Hugging Face modules cache).
    model = tmp_path / "remote-code-model"
    shutil.copytree(TINY_MODEL, model)
    marker = tmp_path / "remote_code_ran"
    (model / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name, key in (("config.json", "AutoModelForCausalLM"), ("tokenizer_config.json", "AutoTokenizer")):
        data = json.loads((model / name).read_text())
        data["auto_map"] = {key: "evil_modeling.EvilModel" if key != "AutoTokenizer" else ["evil_modeling.Evil", None]}
        (model / name).write_text(json.dumps(data))
    config = from_dict({"model_name_or_path": str(model)})
    try:
        modeling.load_tokenizer(config)
        modeling.load_base_model(config)
    except DpoLeanError as err:  # refusing is as safe as ignoring the auto_map
        assert len(str(err).splitlines()) == 1
    assert not marker.exists()


# --- YAML ---------------------------------------------------------------------------------------

PAYLOADS = ['!!python/object/apply:os.system ["touch {marker}"]',
            '!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]',
            '!!python/object/new:os.system ["touch {marker}"]']


@pytest.mark.parametrize("payload", PAYLOADS)
def test_yaml_is_read_with_a_safe_loader(tmp_path, payload):
    marker = tmp_path / "pwned"
    text = f"model_name_or_path: {TINY_MODEL}\ndataset: x.jsonl\nrun_name: {payload.format(marker=marker)}\n"
    yaml.unsafe_load(text)  # the payload is live: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(DpoLeanError) as err:
        load_config(config)
    one_line(err, str(config), "line 3", "not valid YAML", "could not determine a constructor")
    code, stderr = cli("data-check", config)
    assert code == 1 and len(stderr) == 1 and stderr[0].startswith("Error: ") and "not valid YAML" in stderr[0]
    override = "run_name=" + payload.format(marker=marker)  # overrides are YAML too: the tag stays text
    assert load_config(None, [override]).run_name == payload.format(marker=marker)
    assert not marker.exists()


# --- dataset_info.json file_name ----------------------------------------------------------------

def _registry(tmp_path: Path, file_name: str) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": file_name}}))
    return data_dir


@pytest.mark.parametrize("file_name", ["../outside.jsonl", "{tmp}/outside.jsonl", "link.jsonl", "linkdir/outside.jsonl",
                                       "sub/../../outside.jsonl"])
def test_dataset_info_file_name_outside_dataset_dir_is_refused(tmp_path, file_name):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps(ROW) + "\n")
    data_dir = _registry(tmp_path, file_name.format(tmp=tmp_path))
    (data_dir / "sub").mkdir()
    (data_dir / "link.jsonl").symlink_to(outside)  # a file symlink out of dataset_dir
    (data_dir / "linkdir").symlink_to(tmp_path)  # a directory symlink out of dataset_dir
    with pytest.raises(DpoLeanError) as err:
        load_records("pairs", dataset_dir=str(data_dir))
    one_line(err, "dataset_info.json", "'pairs'", "outside", str(data_dir))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(TINY_MODEL), "dataset": "pairs",
                                      "dataset_dir": str(data_dir), "output_dir": str(tmp_path / "out")}))
    code, stderr = cli("data-check", config)
    assert code == 1 and len(stderr) == 1 and "outside" in stderr[0]


def test_dataset_info_file_name_inside_dataset_dir_is_read_even_through_a_symlink(tmp_path):
    data_dir = _registry(tmp_path, "link.jsonl")
    (data_dir / "pairs.jsonl").write_text(json.dumps(ROW) + "\n")
    (data_dir / "link.jsonl").symlink_to(data_dir / "pairs.jsonl")
    assert len(load_records("pairs", dataset_dir=str(data_dir)).records) == 1


# --- safetensors only ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory) -> Path:
    """The tiny model with its weights only in pytorch_model.bin (pickle), as older checkpoints ship."""
    out = tmp_path_factory.mktemp("pickle-model")
    for path in TINY_MODEL.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    assert sorted(p.name for p in out.iterdir() if "model" in p.name) == ["pytorch_model.bin"]
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with non-zero weights (so merging changes the base), in safetensors."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    return out


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pickle_weights_are_refused_by_default_naming_the_option(pickle_model):
    with pytest.raises(DpoLeanError) as err:
        modeling.load_base_model(from_dict({"model_name_or_path": str(pickle_model)}))
    one_line(err, str(pickle_model), "use_safetensors_only: false")


def test_pickle_weights_load_with_use_safetensors_only_false(pickle_model):
    loaded = modeling.load_base_model(from_dict({"model_name_or_path": str(pickle_model), "use_safetensors_only": False}))
    reference = modeling.load_base_model(from_dict({"model_name_or_path": str(TINY_MODEL)}))
    expected = _state(reference)
    got = _state(loaded)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_export_refuses_a_pickle_base_by_default_and_merges_it_when_allowed(pickle_model, adapter, tmp_path):
    raw = {"model_name_or_path": str(pickle_model), "adapter_name_or_path": str(adapter)}
    with pytest.raises(DpoLeanError) as err:
        run_export(from_dict(raw | {"export_dir": str(tmp_path / "refused")}))
    one_line(err, str(pickle_model), "use_safetensors_only: false")
    assert not (tmp_path / "refused").exists()

    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump(raw | {"export_dir": str(tmp_path / "cli")}))
    code, stderr = cli("export", config)
    assert code == 1 and len(stderr) == 1 and "use_safetensors_only" in stderr[0]

    allowed = run_export(from_dict(raw | {"use_safetensors_only": False, "export_dir": str(tmp_path / "allowed")}))
    from_safetensors = run_export(from_dict(raw | {"model_name_or_path": str(TINY_MODEL),
                                                   "export_dir": str(tmp_path / "reference")}))
    assert (allowed / "model.safetensors").is_file() and not (allowed / "pytorch_model.bin").exists()
    merged = _state(transformers.AutoModelForCausalLM.from_pretrained(allowed))
    expected = _state(transformers.AutoModelForCausalLM.from_pretrained(from_safetensors))
    base = _state(transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapter was merged in


def test_export_refuses_a_pickle_adapter_by_default(adapter, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-adapter"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    raw = {"model_name_or_path": str(TINY_MODEL), "adapter_name_or_path": str(pickled)}
    with pytest.raises(DpoLeanError) as err:
        run_export(from_dict(raw | {"export_dir": str(tmp_path / "refused")}))
    one_line(err, str(pickled), "adapter_model.bin", "use_safetensors_only: false")
    assert not (tmp_path / "refused").exists()
    allowed = run_export(from_dict(raw | {"use_safetensors_only": False, "export_dir": str(tmp_path / "allowed")}))
    reference = run_export(from_dict(raw | {"adapter_name_or_path": str(adapter), "export_dir": str(tmp_path / "ref")}))
    merged = _state(transformers.AutoModelForCausalLM.from_pretrained(allowed))
    expected = _state(transformers.AutoModelForCausalLM.from_pretrained(reference))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_safe_defaults_in_the_config():
    config = Config()
    assert config.trust_remote_code is False and config.use_safetensors_only is True
