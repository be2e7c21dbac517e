"""The committed fixtures are what tools/make_fixtures.py builds today (fails when they are stale)."""

from __future__ import annotations

import numpy as np
from conftest import FIXTURES
from make_fixtures import build
from safetensors.torch import load_file

from dpo_lean import cache


def test_committed_fixtures_are_fresh(tmp_path):
    build(tmp_path)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "tiny-model" / name).read_bytes() == (FIXTURES / "tiny-model" / name).read_bytes(), name
    new, old = load_file(tmp_path / "tiny-model" / "model.safetensors"), load_file(FIXTURES / "tiny-model" / "model.safetensors")
    assert new.keys() == old.keys() and all((new[k] == old[k]).all() for k in new)
    for name in ("demo_case.json", "dataset_info.json"):
        assert (tmp_path / "demo" / name).read_bytes() == (FIXTURES / "demo" / name).read_bytes(), name

    fresh, committed = cache.scan(tmp_path / "demo" / "ref_cache"), cache.scan(FIXTURES / "demo" / "ref_cache")
    assert fresh.manifest["fingerprint_sha256"] == committed.manifest["fingerprint_sha256"]
    a, b = (s.table.sort_by("row_index").to_pydict() for s in (fresh, committed))
    for column in ("row_index", "id", "chosen_tokens", "rejected_tokens", "prompt_tokens"):
        assert a[column] == b[column], column
    for column in ("ref_chosen_logps", "ref_rejected_logps"):  # other CPUs may round differently
        np.testing.assert_allclose(a[column], b[column], rtol=0, atol=1e-4)


def test_fixture_cache_values_equal_a_plain_float64_forward():
    """An independent expected value: the reference's NF4 weights dequantised into a float64 copy of the model,
    a plain full-logits forward, log_softmax and a sum over the completion's tokens."""
    from float64_reference import completion_logp, float64_model
    from make_fixtures import fixture_config

    from dpo_lean import modeling
    from dpo_lean.config import from_dict
    from dpo_lean.data.pipeline import prepare_data

    config = from_dict(fixture_config(FIXTURES))
    plain = float64_model(modeling.load_base_model(config, reference=True), config.model_name_or_path)
    table = cache.scan(FIXTURES / "demo" / "ref_cache").table.to_pydict()
    cached = {i: (c, r) for i, c, r in zip(table["row_index"], table["ref_chosen_logps"], table["ref_rejected_logps"])}
    rows = prepare_data(config, modeling.load_tokenizer(config)).rows
    assert {r.row_index for r in rows} == set(cached)
    for row in rows[::4]:
        for completion, value in zip((row.chosen_ids, row.rejected_ids), cached[row.row_index]):
            expected = completion_logp(plain, row.prompt_ids, completion)
            assert abs(expected - value) < 1e-4, (row.row_index, expected, value)
