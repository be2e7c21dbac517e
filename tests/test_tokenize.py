"""Templates, the prompt/completion split and the truncation policy."""

from __future__ import annotations

import copy

import pytest

from dpo_lean.config import from_dict
from dpo_lean.data.records import Record, Skip
from dpo_lean.data.templates import chat_template_for, fix_tokenizer, template_for
from dpo_lean.data.tokenize import lf_seqlen, tokenize_record, truncate
from dpo_lean.errors import DpoLeanError

P, C, R = list(range(100, 110)), list(range(200, 206)), list(range(300, 303))  # prompt 10, chosen 6, rejected 3


def test_no_truncation_when_it_fits():
    assert truncate(P, C, R, cutoff_len=16, mode="keep_end") == (P, C, R)


def test_keep_end_cuts_prompt_start_first_then_completion_end():
    # longest completion 6, cutoff 12: the prompt keeps max(12 - 6, 12 // 2) = 6 tokens of its end.
    assert truncate(P, C, R, 12, "keep_end") == (P[4:], C, R)
    # cutoff 8: the prompt keeps max(8 - 6, 4) = 4 tokens of its end; completions get 4.
    assert truncate(P, C, R, 8, "keep_end") == (P[6:], C[:4], R)


def test_keep_start_keeps_the_prompt_whole():
    assert truncate(P, C, R, 13, "keep_start") == (P, C[:3], R)
    assert truncate(P, C, R, 10, "keep_start") is None  # the prompt alone fills cutoff_len


@pytest.mark.parametrize("source, target, cutoff, kept", [
    (10, 6, 16, (10, 6)),  # fits
    (30, 5, 16, (11, 5)),  # completion under half: kept whole, the prompt gets the rest
    (5, 30, 16, (5, 11)),  # prompt under half: kept whole, the completion gets the rest
    (30, 10, 16, (12, 4)),  # both long: completion gets int(16 * 10 / 40) = 4
    (1000, 9, 16, (16, 0)),  # a share that rounds to nothing
])
def test_llamafactory_split_by_hand(source, target, cutoff, kept):
    assert lf_seqlen(source, target, cutoff) == kept


def test_llamafactory_mode_keeps_the_starts():
    # prompt 10, longest completion 6, cutoff 12: completion 6 is not under half of 12, prompt 10 is not either,
    # so the completion keeps int(12 * 6 / 16) = 4 and the prompt its first 8.
    assert truncate(P, C, R, 12, "llamafactory") == (P[:8], C[:4], R[:3])
    assert truncate(P, C, R, 16, "llamafactory") == (P, C, R)


def lf(name: str, tokenizer, **keys):
    """A private copy of ``tokenizer`` prepared for LF template ``name``, and the template."""
    tokenizer = copy.deepcopy(tokenizer)
    fix_tokenizer(tokenizer, name)
    return tokenizer, template_for(from_dict({"template": name, **keys}), tokenizer)


def _record(prompt_text="Write these words in upper case: Apple", chosen="APPLE", rejected="apple", system=None):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt_text}]
    return Record(0, prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])


def test_chatml_split_puts_generation_prompt_in_prompt(tiny_tokenizer):
    tiny_tokenizer, chatml = lf("chatml", tiny_tokenizer)
    row = tokenize_record(_record(system="Be brief."), tiny_tokenizer, chatml, 512, "keep_end")
    assert tiny_tokenizer.decode(row.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWrite these words in upper case: Apple<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(row.chosen_ids) == "APPLE<|im_end|>\n"
    assert tiny_tokenizer.decode(row.rejected_ids) == "apple<|im_end|>\n"


def test_plain_template_is_prompt_then_completion_then_eos(tiny_tokenizer):
    plain = chat_template_for("plain", tiny_tokenizer)
    row = tokenize_record(_record("The sky is", " blue.", " green."), tiny_tokenizer, plain, 512, "keep_end")
    assert tiny_tokenizer.decode(row.prompt_ids + row.chosen_ids) == "The sky is blue.<|im_end|>"
    assert row.prompt_ids + row.chosen_ids == tiny_tokenizer("The sky is blue.<|im_end|>")["input_ids"]


def test_truncation_marks_row_and_skips_prompt_too_long(tiny_tokenizer):
    tiny_tokenizer, chatml = lf("chatml", tiny_tokenizer)
    long_prompt = "Write these words in upper case: " + " ".join(["Apple"] * 40)
    row = tokenize_record(_record(long_prompt), tiny_tokenizer, chatml, 24, "keep_end")
    assert row.truncated and len(row.prompt_ids) + len(row.chosen_ids) <= 24
    skip = tokenize_record(_record(long_prompt), tiny_tokenizer, chatml, 24, "keep_start")
    assert isinstance(skip, Skip) and skip.reason == "prompt_too_long"


def test_identical_after_truncation_is_skipped(tiny_tokenizer):
    tiny_tokenizer, chatml = lf("chatml", tiny_tokenizer)
    rec = _record(chosen="apple river stone", rejected="apple river tiger")
    full = tokenize_record(rec, tiny_tokenizer, chatml, 512, "keep_start")
    cutoff = len(full.prompt_ids) + 2  # both completions cut to "apple river"
    skip = tokenize_record(rec, tiny_tokenizer, chatml, cutoff, "keep_start")
    assert isinstance(skip, Skip) and skip.reason == "identical_after_truncation"


def test_auto_template_needs_a_chat_template(tiny_tokenizer):
    assert chat_template_for("auto", tiny_tokenizer) == tiny_tokenizer.chat_template
    class NoTemplate:
        chat_template = None
    with pytest.raises(DpoLeanError, match="template"):
        chat_template_for("auto", NoTemplate())


def test_a_prompt_that_renders_to_no_tokens_is_skipped_with_a_reason(tiny_tokenizer):
    """A template whose prompt rendering diverges from the full conversation at the first token leaves no prompt
    token: the row is skipped (collate could not predict the first completion token from nothing)."""
    from dpo_lean.data.records import SKIP_REASONS

    diverging = ("{% if add_generation_prompt %}<|im_start|>{% endif %}"
                 "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    skip = tokenize_record(_record(), tiny_tokenizer, diverging, 512, "keep_end")
    assert isinstance(skip, Skip) and skip.reason == "empty_prompt" and skip.reason in SKIP_REASONS
