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
