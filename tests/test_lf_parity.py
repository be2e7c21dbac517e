"""dpo-lean's ids equal LLaMA-Factory 0.9.5's own, template by template and truncation mode by mode.

The expected ids come from LF itself: tools/lf_parity.py ran LF's ``get_template_and_fix_tokenizer`` and
``get_dataset(stage="rm")`` in a venv with llamafactory==0.9.5 over the rows in fixtures/lf_parity/data
and wrote fixtures/lf_parity/lf_ids.json.gz. LF cannot be imported here (it pins transformers <= 5.6),
so instead of rebuilding the fixture, test_fixture_is_from_the_committed_inputs checks that it records
LF's version and was made from the committed rows, tokenizer, configs and dpo-lean's template list.
keep_end and keep_start are dpo-lean's modes, not LF's: their expected lengths were computed by the
script from LF's untruncated ids and the rules in docs/data.md (Truncation).
"""

from __future__ import annotations

import copy
import gzip
import json
from functools import cache

import lf_parity
import pytest
from conftest import FIXTURES

from dpo_lean.config import from_dict
from dpo_lean.data.records import Skip
from dpo_lean.data.sources import load_records
from dpo_lean.data.template_table import LF_TEMPLATES
from dpo_lean.data.templates import fix_tokenizer, template_for
from dpo_lean.data.tokenize import tokenize_record, truncate

FIX = FIXTURES / "lf_parity"
LF = json.loads(gzip.decompress((FIX / "lf_ids.json.gz").read_bytes()))
SHORT, FULL = LF["cutoff_len"]["short"], LF["cutoff_len"]["full"]


@cache
def records():
    loaded = load_records(LF["datasets"], str(FIX / "data"))
    assert loaded.skips == [] and len(loaded.records) == len(LF["cases"]["empty"]["rows"])
    return loaded.records


@cache
def base_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIX / "tokenizer")


def case_config(case: str):
    """"qwen3 enable_thinking=false" -> template qwen3 with enable_thinking false."""
    name, _, variant = case.partition(" ")
    key, _, value = variant.partition("=")
    extra = {key: {"false": False, "true": True}.get(value, value)} if key else {}
    return from_dict({"template": name, **extra})


@cache
def ours(case: str):
    """dpo-lean's tokenizer (after its LF fix-ups) and untruncated rows for ``case``."""
    config = case_config(case)
    tokenizer = copy.deepcopy(base_tokenizer())
    fix_tokenizer(tokenizer, config.template)
    template = template_for(config, tokenizer)
    return tokenizer, template, [tokenize_record(r, tokenizer, template, FULL, "keep_end") for r in records()]


@pytest.mark.parametrize("case", sorted(LF["cases"]))
def test_untruncated_ids_and_tokenizer_equal_llamafactory(case):
    expected = LF["cases"][case]
    tokenizer, _, rows = ours(case)
    state = {"eos": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id, "pad": tokenizer.pad_token,
             "pad_id": tokenizer.pad_token_id, "bos_id": tokenizer.bos_token_id, "vocab": len(tokenizer)}
    assert state == {k: expected["tokenizer"][k] for k in state}
    for row, (p, c, r) in zip(rows, expected["rows"], strict=True):
        assert (row.prompt_ids, row.chosen_ids, row.rejected_ids) == (p, c, r), (case, row.row_index)
        assert not row.truncated


def expected_cut(full, kept, mode):
    """The three lists ``mode`` keeps, from LF's untruncated ids and the kept lengths in the fixture."""
    p, c, r = full
    if kept is None:
        return None
    if mode == "llamafactory":
        s, t = kept
        return p[:s], c[:t], r[:t]
    if mode == "keep_end":
        k, b = kept
        return p[len(p) - k:], c[:b], r[:b]
    return p, c[:kept[0]], r[:kept[0]]


@pytest.mark.parametrize("mode", ["llamafactory", "keep_end", "keep_start"])
@pytest.mark.parametrize("case", sorted(LF["cases"]))
def test_truncated_ids_equal_llamafactory(case, mode):
    """At the short cutoff_len: llamafactory keeps exactly what LF keeps; keep_end/keep_start their rule in docs/data.md."""
    expected = LF["cases"][case]
    _, _, rows = ours(case)
    for row, full, kept in zip(rows, expected["rows"], expected["cut"][mode], strict=True):
        assert truncate(row.prompt_ids, row.chosen_ids, row.rejected_ids, SHORT, mode) == expected_cut(full, kept, mode)


@pytest.mark.parametrize("case", ["qwen3_nothink", "llama3", "gemma", "deepseekr1", "glm4_7"])
def test_tokenize_record_cuts_as_llamafactory_and_skips_what_it_cannot_train(case):
    """The per-row function end to end in llamafactory mode; a pair whose kept completions are equal is skipped."""
    tokenizer, template, _ = ours(case)
    expected = LF["cases"][case]
    kept = 0
    for record, full, cut in zip(records(), expected["rows"], expected["cut"]["llamafactory"], strict=True):
        p, c, r = expected_cut(full, cut, "llamafactory")
        out = tokenize_record(record, tokenizer, template, SHORT, "llamafactory")
        if c == r:
            assert isinstance(out, Skip) and out.reason == "identical_after_truncation"
            continue
        kept += 1
        assert (out.prompt_ids, out.chosen_ids, out.rejected_ids) == (p, c, r)
        assert out.truncated == (full != [p, c, r])
    assert kept >= len(records()) // 2


def test_fixture_is_from_the_committed_inputs(tmp_path):
    """LF 0.9.5, every template name dpo-lean accepts, none refused, the committed rows, tokenizer and configs."""
    assert LF["lf_version"] == "0.9.5"
    assert LF["lf_templates"] == sorted(LF_TEMPLATES)
    assert LF["refused"] == {}
    assert set(LF["lf_templates"]) <= set(LF["cases"])
    lf_parity.write_rows(tmp_path)  # the rows the script makes today are the committed ones
    for path in (FIX / "data").iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert LF["rows_sha256"] == lf_parity.digest((FIX / "data").iterdir())
    assert LF["tokenizer_sha256"] == lf_parity.digest((FIX / "tokenizer").iterdir())
    configs = {p.name: lf_parity.digest([p]) for p in lf_parity.dpo_lean_configs()}
    assert {name: c["sha256"] for name, c in LF["configs"].items()} == configs, "rerun tools/lf_parity.py build"


def test_fixture_covers_every_llamafactory_truncation_case():
    """The short cutoff exercises all three branches of LF's infer_seqlen and rows that fit, in qwen3 and empty."""
    branches = set()
    for p, c, r in LF["cases"]["qwen3"]["rows"] + LF["cases"]["empty"]["rows"]:
        source, target = len(p), max(len(c), len(r))
        if source + target <= SHORT:
            branches.add("fits")
        else:
            branches.add("completion short" if target * 2 < SHORT else "prompt short" if source * 2 < SHORT else "both long")
    assert branches == {"fits", "completion short", "prompt short", "both long"}
