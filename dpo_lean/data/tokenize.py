"""Records -> token ids: the one tokenisation path that precompute and train both use.

With a LLaMA-Factory template the prompt, chosen and rejected ids are LF's slot encoding
(:meth:`Template.encode_pair`). With a Jinja template (auto, plain) a completion is the token suffix of
the rendered full conversation after the rendered prompt (with its generation prompt), split where the
two diverge, exactly as TRL's DPOTrainer does. Then ``cutoff_len`` bounds prompt + completion for each
of chosen and rejected. Rows go through in batches: the tokenizer is called once per batch, not per string.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import Record, Skip
from .template_model import Template
from .text import lone_surrogate


@dataclass
class TokenizedRow:
    row_index: int
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (what padding a batch is sized by)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], cutoff_len: int, mode: str):
    """Fit prompt + completion into ``cutoff_len`` for both completions; return the three lists or None.

    keep_end (default): when the pair does not fit, the prompt keeps its last
    ``max(cutoff_len - longest_completion, cutoff_len // 2)`` tokens (never more than it has), and the
    completions are cut at their end to what is left.
    keep_start (TRL's default): the prompt is kept whole and the completions cut at their end; a prompt
    that alone fills ``cutoff_len`` leaves no completion token, so the row is skipped (None).
    llamafactory (LF 0.9.5's ``infer_seqlen``): the prompt and the completions keep their starts, with
    ``cutoff_len`` split between them by :func:`lf_seqlen`.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= cutoff_len:
        return prompt, chosen, rejected
    if mode == "llamafactory":
        keep, budget = lf_seqlen(len(prompt), longest, cutoff_len)
        return prompt[:keep], chosen[:budget], rejected[:budget]
    if mode == "keep_start":
        if len(prompt) >= cutoff_len:
            return None
        keep = len(prompt)
    else:
        keep = min(len(prompt), max(cutoff_len - longest, cutoff_len // 2))
    budget = cutoff_len - keep
    return prompt[len(prompt) - keep:], chosen[:budget], rejected[:budget]


def lf_seqlen(source: int, target: int, cutoff_len: int) -> tuple[int, int]:
    """(prompt tokens kept, completion tokens kept) as LF's ``infer_seqlen``: the completion keeps all of
    itself if it is under half of ``cutoff_len``, else all that the prompt leaves if the prompt is under
    half, else the share ``int(cutoff_len * target / (source + target))``; the prompt gets what is left."""
    if target * 2 < cutoff_len:
        max_target = cutoff_len
    elif source * 2 < cutoff_len:
        max_target = cutoff_len - source
    else:
        max_target = int(cutoff_len * (target / (source + target)))
    kept_target = min(max_target, target)
    return min(max(cutoff_len - kept_target, 0), source), kept_target


def tokenize_record(record: Record, tokenizer, template: str | Template, cutoff_len: int,
                    truncation_mode: str) -> TokenizedRow | Skip:
    """One row as token ids, or the reason it is skipped. ``template``: an LF template or a Jinja string."""
    return tokenize_records([record], tokenizer, template, cutoff_len, truncation_mode)[0]


def tokenize_records(records: list[Record], tokenizer, template: str | Template, cutoff_len: int,
                     truncation_mode: str) -> list[TokenizedRow | Skip]:
    """Rows as token ids (or skips), in order: the same ids as one row at a time, with the tokenizer called once
    per batch (batched ``apply_chat_template`` for Jinja templates; one batch encode of every LF slot string)."""
    out: list[TokenizedRow | Skip | None] = [_bad_text(r) for r in records]
    todo = [r for r, o in zip(records, out) if o is None]
    if isinstance(template, Template):
        encoded = encode_pairs_lf(tokenizer, template, todo)
    else:
        encoded = split_completions_batch(tokenizer, todo, template)
    results = iter(_fit(r, *ids, cutoff_len, truncation_mode) for r, ids in zip(todo, encoded))
    return [o if o is not None else next(results) for o in out]


def _bad_text(record: Record) -> Skip | None:
    where = record.location or record.source
    for part in ("prompt", "chosen", "rejected"):  # normalise_row skips these already; a Record built elsewhere may not
        for i, message in enumerate(getattr(record, part)):
            problem = lone_surrogate(message["content"])
            if problem:
                return Skip(record.row_index, where, "bad_text", f"{part} message {i} {problem}")
    return None


def split_completions_batch(tokenizer, records: list[Record], chat_template: str) -> list[tuple]:
    """:func:`split_completions` of each record, with three batched ``apply_chat_template`` calls in all."""
    if not records:
        return []

    def render(conversations, generation):
        out = tokenizer.apply_chat_template(conversations, chat_template=chat_template,
                                            add_generation_prompt=generation, tokenize=True, return_dict=True)
        return [list(ids) for ids in out["input_ids"]]

    prompts = render([r.prompt for r in records], True)
    chosens = render([r.prompt + r.chosen for r in records], False)
    rejecteds = render([r.prompt + r.rejected for r in records], False)
    out = []
    for prompt, full_chosen, full_rejected in zip(prompts, chosens, rejecteds):
        n = min(common_prefix_length(prompt, full_chosen), common_prefix_length(prompt, full_rejected))
        out.append((prompt[:n], full_chosen[n:], full_rejected[n:]))
    return out


class _Deferred:
    """A tokenizer stand-in for :meth:`Template.encode_pair`: ``encode`` records the text and returns a placeholder,
    so that every slot string of a batch is encoded in one call; everything else is the real tokenizer's."""

    def __init__(self, tokenizer):
        self._tokenizer, self.texts = tokenizer, []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        assert add_special_tokens is False, "LF slots are encoded without special tokens"
        self.texts.append(text)
        return [_Pending(len(self.texts) - 1)]


@dataclass(frozen=True)
class _Pending:
    index: int


def encode_pairs_lf(tokenizer, template: Template, records: list[Record]) -> list[tuple]:
    """:meth:`Template.encode_pair` of each record, with the slot strings of all of them encoded in one batch."""
    deferred = _Deferred(tokenizer)
    pending = [template.encode_pair(deferred, r.prompt, r.chosen, r.rejected) for r in records]
    if not deferred.texts:
        return [tuple(list(ids) for ids in p) for p in pending]
    encoded = tokenizer(deferred.texts, add_special_tokens=False)["input_ids"]

    def expand(ids: list) -> list[int]:
        out = []
        for i in ids:
            if isinstance(i, _Pending):
                out += encoded[i.index]
            else:
                out.append(i)
        return out

    return [tuple(expand(ids) for ids in p) for p in pending]


def _fit(record: Record, prompt: list[int], chosen: list[int], rejected: list[int], cutoff_len: int,
         truncation_mode: str) -> TokenizedRow | Skip:
    """The row's ids cut to ``cutoff_len``, or the reason it cannot be trained on."""
    where = record.location or record.source
    if chosen == rejected:
        return Skip(record.row_index, where, "identical_tokens",
                    f"chosen and rejected differ as text but give the same {len(chosen)} tokens")
    fitted = truncate(prompt, chosen, rejected, cutoff_len, truncation_mode)
    if fitted is None:
        return Skip(record.row_index, where, "prompt_too_long",
                    f"prompt has {len(prompt)} tokens, cutoff_len is {cutoff_len}")
    p, c, r = fitted
    if not p:  # the last prompt token predicts the first completion token; collate needs one
        return Skip(record.row_index, where, "empty_prompt", "the prompt renders to no tokens before the completions")
    if c == r:
        return Skip(record.row_index, where, "identical_after_truncation",
                    f"chosen and rejected agree on their first {len(c)} tokens")
    truncated = (len(p), len(c), len(r)) != (len(prompt), len(chosen), len(rejected))
    return TokenizedRow(record.row_index, record.id, p, c, r, truncated)
