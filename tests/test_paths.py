"""A mistyped local path is said at once, with the nearest name that exists, instead of being tried as a hub id
(five retries and 31 s for a dataset; "Repo id must be in the form ..." for a model)."""

from __future__ import annotations

import time

import pytest
import yaml
from click.testing import CliRunner
from conftest import FIXTURES

from dpo_lean.cli import main
from dpo_lean.paths import looks_like_path


def _run(tmp_path, monkeypatch, *overrides: str):
    from make_fixtures import fixture_config

    monkeypatch.chdir(FIXTURES.parent.parent)  # relative paths as a user in the repository writes them
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a hub id would be tried online: it must not be
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**fixture_config(FIXTURES), "output_dir": str(tmp_path / "out")}))
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, ["data-check", str(config), *overrides])
    return result, time.perf_counter() - t0


@pytest.mark.parametrize("override, expected", [
    ("dataset=tests/fixtures/data/sharegpt.jsn",
     "Error: dataset 'tests/fixtures/data/sharegpt.jsn' not found: no file tests/fixtures/data/sharegpt.jsn or "
     "{dataset_dir}/tests/fixtures/data/sharegpt.jsn; did you mean 'tests/fixtures/data/sharegpt.json'? (a hub "
     "dataset id has the form org/name)"),
    ("dataset=data/dpo_en_demo.jsn",
     "Error: dataset 'data/dpo_en_demo.jsn' not found: no file data/dpo_en_demo.jsn or "
     "{dataset_dir}/data/dpo_en_demo.jsn; fix the path (a hub dataset id has the form org/name)"),
    ("model_name_or_path=tests/fixtures/tiny-modl",
     "Error: config key 'model_name_or_path': 'tests/fixtures/tiny-modl' is a path, and no model folder is there; "
     "did you mean 'tests/fixtures/tiny-model'? (a hub id has the form org/name)"),
    ("model_name_or_path=./models/qwen",
     "Error: config key 'model_name_or_path': './models/qwen' is a path, and no model folder is there (nor is there a "
     "folder models); fix the path (a hub id has the form org/name)"),
])
def test_a_mistyped_path_is_said_at_once_with_the_nearest_name(override, expected, tmp_path, monkeypatch):
    result, seconds = _run(tmp_path, monkeypatch, override)
    assert result.exit_code == 1
    assert result.stderr.strip() == expected.format(dataset_dir=FIXTURES / "demo")
    assert seconds < 30  # no hub retries (they took 31 s), even on a loaded machine


@pytest.mark.parametrize("value, is_path", [
    ("data/dpo_en_demo.jsn", True), ("tests/fixtures/tiny-modl", True), ("/abs/model", True), ("./m", True),
    ("a/b/c", True), ("Qwen/Qwen2.5-0.5B", False), ("meta-llama/Llama-3.1-8B", False),
    ("HuggingFaceH4/ultrafeedback_binarized", False), ("trl-lib/ultrafeedback.v2", False), ("demo_case", False),
])
def test_paths_and_hub_ids_are_told_apart(value, is_path, monkeypatch):
    monkeypatch.chdir(FIXTURES.parent.parent)
    assert looks_like_path(value) is is_path
