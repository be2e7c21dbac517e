"""Template names, LLaMA-Factory's tokenizer fix-ups and what reaches the cache fingerprint."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from conftest import FIXTURES
from test_cli import assert_one_line_error, invoke, write_config

from dpo_lean.config import from_dict
from dpo_lean.data import templates
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.data.templates import fix_tokenizer, template_names
from dpo_lean.errors import DpoLeanError
from dpo_lean.fingerprint import build_fingerprint
from dpo_lean.modeling import load_tokenizer

TINY = FIXTURES / "tiny-model"
DEMO = dict(model_name_or_path=str(TINY), dataset="demo_case", dataset_dir=str(FIXTURES / "demo"), max_samples=8)


def test_null_means_auto():
    assert from_dict({"template": None}).template == "auto"
    assert from_dict({}).template == "auto"


def test_llamafactory_names_are_accepted_and_a_typo_gets_a_suggestion():
    names = template_names()
    assert len(names) == 2 + 121 and {"qwen3_nothink", "llama2", "mistral", "gemma3", "deepseek3", "glm4", "phi4",
                                      "default", "empty", "qwen3_5", "llama4", "mistral_small"} <= set(names)
    with pytest.raises(DpoLeanError) as e:
        from_dict({"template": "qwen3_nothnk"})
    assert "did you mean 'qwen3_nothink'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, value", [("enable_thinking", False), ("default_system", "Be terse."),
                                        ("preserve_thinking", True)])
def test_llamafactory_template_keys_are_refused_with_a_jinja_template(key, value):
    with pytest.raises(DpoLeanError, match=f"'{key}' works with LLaMA-Factory templates"):
        from_dict({"template": "auto", key: value})
    assert getattr(from_dict({"template": "qwen3", key: value}), key) == value


def test_llama3_fix_ups_are_llamafactorys(tiny_tokenizer):
    # LF 0.9.5 fix_special_tokens for llama3: EOS becomes the first stop word, the others become special tokens.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    vocab = len(tokenizer)
    notes = fix_tokenizer(tokenizer, "llama3")
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.eos_token_id == vocab
    assert tokenizer.convert_tokens_to_ids("<|eom_id|>") == vocab + 1 and len(tokenizer) == vocab + 2
    assert tokenizer.encode("a<|eom_id|>b", add_special_tokens=False)[1] == vocab + 1  # one special token
    assert notes == ["EOS token <|eot_id|> (was <|im_end|>)", "stop words <|eom_id|> as special tokens"]
    auto = copy.deepcopy(tiny_tokenizer)
    assert fix_tokenizer(auto, "auto") == [] and len(auto) == vocab and auto.eos_token == "<|im_end|>"


def test_vocabulary_past_the_embedding_is_a_one_line_error(tmp_path):
    # The tiny model's embedding has exactly its tokenizer's rows; llama3's two new tokens do not fit.
    result = invoke("data-check", write_config(tmp_path), "template=llama3")
    assert_one_line_error(result, "template 'llama3' adds <|eot_id|>, <|eom_id|> to the tokenizer", "embedding",
                          "template: auto")


def test_fix_ups_are_said_once_and_fit_a_larger_embedding(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(templates, "_SAID", set())  # once per process: forget earlier tests in this one
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    config_json = json.loads((model / "config.json").read_text())
    config_json["vocab_size"] += 8
    (model / "config.json").write_text(json.dumps(config_json))
    config = from_dict(DEMO | {"model_name_or_path": str(model), "template": "llama3"})
    first, second = load_tokenizer(config), load_tokenizer(config)
    assert first.eos_token == second.eos_token == "<|eot_id|>"
    said = capsys.readouterr().out
    assert said.count("template llama3: tokenizer EOS token <|eot_id|> (was <|im_end|>)") == 1


def test_fingerprint_covers_the_template_definition(tiny_tokenizer):
    """Anything that changes ids changes template_sha256: the template, enable_thinking, default_system."""
    digests = {}
    for name, extra in [("qwen3", {}), ("qwen3", {"enable_thinking": False}), ("qwen3_nothink", {}),
                        ("qwen", {}), ("qwen", {"default_system": "Be terse."}), ("auto", {})]:
        config = from_dict(DEMO | {"template": name, **extra})
        tokenizer = copy.deepcopy(tiny_tokenizer)
        fix_tokenizer(tokenizer, name)
        data = prepare_data(config, tokenizer)
        fp = build_fingerprint(config, tokenizer, data, {"precision": "base"})
        digests[(name, json.dumps(extra))] = fp["template_sha256"]
    assert len(set(digests.values())) == len(digests)


def test_data_page_lists_every_template_and_which_are_multimodal():
    import re

    from conftest import ROOT

    from dpo_lean.data.template_table import LF_TEMPLATES

    page = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    text = re.search(r"^Text templates \((\d+)\): (.*)\.$", page, re.M)
    multimodal = re.search(r"^Templates LLaMA-Factory ties to an image, video or audio processor \((\d+)\), "
                           r"supported in their text form: (.*)\.$", page, re.M)
    for match, wanted in ((text, False), (multimodal, True)):
        names = re.findall(r"`([^`]+)`", match.group(2))
        assert sorted(names) == sorted(n for n, t in LF_TEMPLATES.items() if bool(t.processor) == wanted)
        assert int(match.group(1)) == len(names)


def test_templates_pickle_for_worker_processes():
    import pickle

    from dpo_lean.data.template_table import LF_TEMPLATES

    assert all(pickle.loads(pickle.dumps(t)) == t for t in LF_TEMPLATES.values())


def test_the_tiny_tokenizers_own_chatml_is_llamafactorys_chatml_id_for_id(tmp_path):
    """tiny.py writes ChatML as the Jinja chat_template a hub tokenizer ships (what template: auto renders);
    template_table.py holds LF's chatml as slots. Two representations of one format: they must give the same ids."""
    ids = {}
    for name in ("auto", "chatml"):
        config = from_dict({**DEMO, "max_samples": None, "template": name, "output_dir": str(tmp_path / name)})
        rows = prepare_data(config, load_tokenizer(config)).rows
        ids[name] = [(r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in rows]
    assert len(ids["auto"]) == 64 and ids["auto"] == ids["chatml"]
