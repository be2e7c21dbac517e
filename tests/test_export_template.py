"""The chat template training used is saved with the tokenizer (the trained adapter's and the exported model's) as
Jinja, as LLaMA-Factory's fix_jinja_template does, so that serving formats prompts as training did.

The expected ids and text are LLaMA-Factory 0.9.5's own (fixtures/lf_parity/lf_ids.json.gz, made in LF's venv by
tools/lf_parity.py; see test_lf_parity.py), and dpo-lean's template path, which test_lf_parity checks against them.
"""

from __future__ import annotations

import gzip
import json
import shutil
from functools import cache

import pytest
import yaml
from click.testing import CliRunner
from conftest import FIXTURES

from dpo_lean.cli import main
from dpo_lean.config import from_dict
from dpo_lean.data.sources import load_records
from dpo_lean.data.template_jinja import to_jinja
from dpo_lean.data.templates import fix_tokenizer, template_for
from dpo_lean.data.tokenize import tokenize_record

FIX = FIXTURES / "lf_parity"
LF = json.loads(gzip.decompress((FIX / "lf_ids.json.gz").read_bytes()))
# Templates whose slots meet at special tokens, so the whole text tokenises to LF's slot-by-slot ids (for the
# others, e.g. `empty`, a chat template gives LF's text, whose ids may merge across a slot boundary)
SAME_IDS = ("qwen3_nothink", "qwen", "qwen3", "llama3", "chatml", "mistral", "gemma", "deepseekr1")


@cache
def records():
    return load_records(LF["datasets"], str(FIX / "data")).records


@cache
def jinja_tokenizer(case: str):
    """The LF parity tokenizer, prepared for ``case`` as dpo-lean prepares it, with the case's template as Jinja."""
    from transformers import AutoTokenizer

    name, _, variant = case.partition(" ")
    key, _, value = variant.partition("=")
    config = from_dict({"template": name, **({key: {"false": False, "true": True}.get(value, value)} if key else {})})
    tokenizer = AutoTokenizer.from_pretrained(FIX / "tokenizer")
    fix_tokenizer(tokenizer, name)
    template = template_for(config, tokenizer)
    tokenizer.chat_template = to_jinja(template, tokenizer)
    return tokenizer, template


@pytest.mark.parametrize("case", sorted(LF["cases"]))
def test_the_saved_template_renders_llamafactorys_text(case):
    tokenizer, template = jinja_tokenizer(case)
    thinking_off = template.reasoning and not template.enable_thinking
    for record, (prompt, chosen, _) in zip(records(), LF["cases"][case]["rows"], strict=True):
        full = tokenizer.apply_chat_template(record.prompt + record.chosen, tokenize=False)
        assert full == tokenizer.decode(prompt + chosen), (case, record.row_index)
        words = [w.strip() for w in template.thought_words]
        if thinking_off and any(w in m["content"] for m in record.chosen for w in words):
            continue  # LF's prompt then depends on the completion, which a prompt to generate from cannot know
        text = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
        assert text == tokenizer.decode(prompt), (case, record.row_index)


@pytest.mark.parametrize("case", SAME_IDS)
def test_the_saved_template_gives_llamafactorys_ids(case):
    tokenizer, _ = jinja_tokenizer(case)
    for record, (prompt, chosen, rejected) in zip(records(), LF["cases"][case]["rows"], strict=True):
        ids = lambda messages, **kw: tokenizer.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]  # noqa: E731
        assert ids(record.prompt, add_generation_prompt=True) == prompt, (case, record.row_index)
        assert ids(record.prompt + record.chosen) == prompt + chosen, (case, record.row_index)
        assert ids(record.prompt + record.rejected) == prompt + rejected, (case, record.row_index)


# ---------------------------------------------------------------- train and export write it


@pytest.fixture(scope="module")
def no_template_run(tmp_path_factory):
    """One step of training (simpo: no reference cache) with template qwen3_nothink on a copy of the tiny model
    without a chat template, then `dpo-lean export`."""
    from make_fixtures import fixture_config

    tmp = tmp_path_factory.mktemp("template")
    model = tmp / "model"
    shutil.copytree(FIXTURES / "tiny-model", model, ignore=shutil.ignore_patterns("chat_template.jinja"))
    raw = {**fixture_config(FIXTURES), "model_name_or_path": str(model), "template": "qwen3_nothink",
           "pref_loss": "simpo", "max_steps": 1, "save_strategy": "no", "output_dir": str(tmp / "out"),
           "export_dir": str(tmp / "merged")}
    config = tmp / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    for command in ("train", "export"):
        result = CliRunner().invoke(main, [command, str(config)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return from_dict(raw), result


@pytest.mark.parametrize("folder", ["out", "merged"])
def test_train_and_export_save_the_template_training_used(no_template_run, folder):
    from transformers import AutoTokenizer

    config, export = no_template_run
    assert "chat template: template qwen3_nothink saved with the tokenizer as Jinja" in export.stdout
    saved = AutoTokenizer.from_pretrained(config.output_dir if folder == "out" else config.export_dir)
    assert saved.chat_template
    training = AutoTokenizer.from_pretrained(config.model_name_or_path)
    assert training.chat_template is None
    fix_tokenizer(training, config.template)
    template = template_for(config, training)
    for record in load_records(config.dataset, config.dataset_dir).records[:8]:
        row = tokenize_record(record, training, template, config.cutoff_len, config.truncation_mode)
        if row.truncated:
            continue
        prompt = saved.apply_chat_template(record.prompt, tokenize=True, add_generation_prompt=True)["input_ids"]
        full = saved.apply_chat_template(record.prompt + record.chosen, tokenize=True)["input_ids"]
        assert (prompt, full) == (row.prompt_ids, row.prompt_ids + row.chosen_ids), record.row_index


def test_a_tokenizer_with_its_own_template_keeps_it():
    from transformers import AutoTokenizer

    from dpo_lean.data.templates import fix_jinja_template

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tiny-model")
    own = tokenizer.chat_template
    line = fix_jinja_template(tokenizer, from_dict({"template": "qwen3_nothink"}))
    assert tokenizer.chat_template == own and line.startswith("chat template: the tokenizer's own is kept")
    assert fix_jinja_template(tokenizer, from_dict({"template": "chatml"})).startswith("chat template: template chatml")
    assert tokenizer.chat_template != own  # LF's chatml replaces a tokenizer's own (replace_jinja_template)
