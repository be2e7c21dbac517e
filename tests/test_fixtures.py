"""The committed fixtures are what tools/make_fixtures.py builds today (fails when they are stale).

Compared by content, not by bytes where a library writes the file: both sides are read by the running libraries and
fields that only record the producing library's version are left out, so the release that pip resolves next week
does not make them stale. Files dpo-lean writes itself (the demo data, the chat template) are compared byte for byte.
"""

from __future__ import annotations

import numpy as np
from conftest import FIXTURES
from make_fixtures import build_cache, build_inputs
from safetensors.torch import load_file

from dpo_lean import cache
from dpo_lean.tiny import _tokenizer_corpus


def _model_files(folder):
    """config.json and generation_config.json as the running transformers reads them, less the version they record."""
    from transformers import AutoConfig, GenerationConfig

    config, generation = AutoConfig.from_pretrained(folder).to_dict(), GenerationConfig.from_pretrained(folder).to_dict()
    for d in (config, generation):
        d.pop("transformers_version", None)
        d.pop("_name_or_path", None)  # where it was read from
    return config, generation


def _tokenizer(folder):
    """What the tokenizer does: its vocabulary, special tokens, chat template and the ids of its training corpus."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.get_vocab(), tok.special_tokens_map, tok.chat_template, tok("\n".join(_tokenizer_corpus()))["input_ids"]


def test_committed_model_and_data_are_what_make_fixtures_builds(tmp_path):
    build_inputs(tmp_path)
    new, old = tmp_path / "tiny-model", FIXTURES / "tiny-model"
    assert _model_files(new) == _model_files(old)
    assert _tokenizer(new) == _tokenizer(old)
    assert (new / "chat_template.jinja").read_bytes() == (old / "chat_template.jinja").read_bytes()
    new_w, old_w = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
    assert new_w.keys() == old_w.keys() and all(torch_equal(new_w[k], old_w[k]) for k in new_w)
    for name in ("demo_case.json", "dataset_info.json"):
        assert (tmp_path / "demo" / name).read_bytes() == (FIXTURES / "demo" / name).read_bytes(), name


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


def test_committed_cache_is_what_precompute_computes_today(tmp_path):
    """Precompute on the committed model and data; the committed cache must match it: the same compared
    fingerprint, rows and token ids exactly, values within kernel rounding (other CPUs round differently)."""
    build_cache(FIXTURES, tmp_path / "ref_cache", tmp_path / "work")
    fresh, committed = cache.scan(tmp_path / "ref_cache"), cache.scan(FIXTURES / "demo" / "ref_cache")
    assert fresh.manifest["fingerprint_sha256"] == committed.manifest["fingerprint_sha256"]
    a, b = (s.table.sort_by("row_index").to_pydict() for s in (fresh, committed))
    for column in ("row_index", "id", "chosen_tokens", "rejected_tokens", "prompt_tokens", "ids_sha256"):
        assert a[column] == b[column], column
    for column in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps"):
        np.testing.assert_allclose(a[column], b[column], rtol=0, atol=1e-4)


def test_fixture_cache_values_equal_a_plain_float64_forward(tmp_path):
    """An independent expected value: the reference's NF4 weights dequantised into a float64 copy of the model,
    a plain full-logits forward, log_softmax and a sum over the completion's tokens."""
    from float64_reference import completion_logp, float64_model
    from make_fixtures import fixture_config

    from dpo_lean import modeling
    from dpo_lean.config import from_dict
    from dpo_lean.data.pipeline import prepare_data

    config = from_dict({**fixture_config(FIXTURES), "output_dir": str(tmp_path)})  # prepared data: not in the fixtures
    plain = float64_model(modeling.load_base_model(config, reference=True), config.model_name_or_path)
    table = cache.scan(FIXTURES / "demo" / "ref_cache").table.to_pydict()
    cached = {i: (c, r) for i, c, r in zip(table["row_index"], table["ref_chosen_logps"], table["ref_rejected_logps"])}
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    assert {r.row_index for r in rows} == set(cached)
    for row in rows[::4]:
        for completion, value in zip((row.chosen_ids, row.rejected_ids), cached[row.row_index]):
            expected = completion_logp(plain, row.prompt_ids, completion)
            assert abs(expected - value) < 1e-4, (row.row_index, expected, value)
