"""Token ids of pairs -> one padded batch, in one of two layouts the log-prob function scores alike.

two sequences per pair (``collate_pairs``):   [prompt | chosen]  and  [prompt | rejected]
one shared sequence per pair (``collate_shared``, prefix sharing):  [prompt | chosen | rejected]

Both give ``score_index`` (flat positions into [rows * T] whose hidden state predicts a completion
token), ``score_targets`` (that token) and ``score_segment`` (0..B-1 for chosen i, B..2B-1 for
rejected i), so logprobs.batch_logps sums the same tokens with the same predictors either way.
``collate`` picks the layout per batch (see ``Sharing``); with ``tails`` it also marks each scored token that
lies past the pair's shorter completion (``score_tail``, for LD-DPO), in either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _scores(spans: list[tuple[int, list[int], list[int]]], width: int, num_pairs: int, num_tokens: int) -> dict:
    """spans: (row, predictor positions, target ids) per completion, chosen ones first, then rejected ones.

    ``num_tokens`` counts prompt + chosen and prompt + rejected of every pair, whatever the layout, so
    tokens/s compares layouts on the same work.
    """
    index, targets, segment = [], [], []
    for seg, (row, positions, ids) in enumerate(spans):
        index += [row * width + p for p in positions]
        targets += ids
        segment += [seg] * len(ids)
    return {"score_index": torch.tensor(index, dtype=torch.long),
            "score_targets": torch.tensor(targets, dtype=torch.long),
            "score_segment": torch.tensor(segment, dtype=torch.long), "num_pairs": num_pairs,
            "num_tokens": num_tokens}


def collate_pairs(prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]],
                  pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` ([2B, T]) plus the score fields.

    Row i is prompt_i + chosen_i, row B + i is prompt_i + rejected_i; completion_mask is 1 on
    completion tokens only.
    """
    seqs = [p + c for p, c in zip(prompts, chosens)] + [p + r for p, r in zip(prompts, rejecteds)]
    completions = list(chosens) + list(rejecteds)
    prompt_lens = [len(p) for p in prompts] * 2
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
        completion_mask[i, n_prompt:len(seq)] = 1
    spans = [(i, list(range(n - 1, n - 1 + len(c))), c) for i, (n, c) in enumerate(zip(prompt_lens, completions))]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            **_scores(spans, width, len(prompts), sum(len(s) for s in seqs))}


def shared_attention_mask(p: int, c: int, r: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[width, width] mask for [prompt | chosen | rejected | padding]: boolean (True = may attend, what
    SDPA takes and runs fastest with) when ``dtype`` is torch.bool, else additive (0 or the dtype's
    minimum, what eager attention adds to its scores).

    Causal, and rejected never sees chosen; padding rows see only themselves (no all-masked row,
    so no NaN from the softmax).
    """
    region = torch.full((width,), 3)
    region[:p], region[p:p + c], region[p + c:p + c + r] = 0, 1, 2
    i, j = torch.arange(width)[:, None], torch.arange(width)[None, :]
    allowed = (j <= i) & ((region[None, :] == 0) | (region[None, :] == region[:, None])) & (region[:, None] != 3)
    allowed |= i == j
    if dtype == torch.bool:
        return allowed
    return torch.zeros((width, width), dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def collate_shared(prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]],
                   pad_id: int, mask_dtype: torch.dtype = torch.float32) -> dict:
    """One row per pair, [prompt | chosen | rejected], with a 4-D mask and position ids.

    Rejected positions restart where the prompt ends; the last prompt position predicts the first
    token of both completions.
    """
    seqs = [p + c + r for p, c, r in zip(prompts, chosens, rejecteds)]
    width = max(len(s) for s in seqs)
    b = len(seqs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.empty((b, 1, width, width), dtype=mask_dtype)
    chosen_spans, rejected_spans = [], []
    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
        n_p, n_c, n_r = len(p), len(c), len(r)
        input_ids[i, :n_p + n_c + n_r] = torch.tensor(p + c + r, dtype=torch.long)
        position_ids[i, :n_p + n_c + n_r] = torch.tensor(
            list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)), dtype=torch.long)
        mask[i, 0] = shared_attention_mask(n_p, n_c, n_r, width, mask_dtype)
        chosen_spans.append((i, list(range(n_p - 1, n_p + n_c - 1)), c))
        rejected_spans.append((i, [n_p - 1] + list(range(n_p + n_c, n_p + n_c + n_r - 1)), r))
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
            **_scores(chosen_spans + rejected_spans, width, b,
                      sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)))}


def layout_flops(lengths: list[int], hidden_size: int, intermediate_size: int) -> int:
    """Forward FLOPs per decoder layer of a right-padded batch of sequences with these ``lengths``:

        rows * width * (8 H^2 + 6 H I + 4 width H)

    the projections (q, k, v, o: 4 H^2 multiply-adds a token; the gated MLP: 3 H I) and attention over all
    ``width`` keys (scores and weighted sum: 2 width H), padding included. The output head is left out:
    both layouts score the same completion tokens with it.
    """
    width, h = max(lengths), hidden_size
    return len(lengths) * width * (8 * h * h + 6 * h * intermediate_size + 4 * width * h)


@dataclass(frozen=True)
class Sharing:
    """Prefix sharing for a model that takes the shared mask: on every batch (``always``), or on the
    batches where one [prompt | chosen | rejected] sequence per pair costs fewer FLOPs than two sequences
    (prompt-heavy pairs save the prompt's second pass; with short prompts, the longer shared rows' attention
    can cost more than the prompt saves)."""

    mask_dtype: torch.dtype
    hidden_size: int
    intermediate_size: int
    always: bool = False

    def pays(self, prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]]) -> bool:
        if self.always:
            return True
        two = [len(p) + len(c) for p, c in zip(prompts, chosens)] + [len(p) + len(r) for p, r in zip(prompts, rejecteds)]
        one = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)]
        h, i = self.hidden_size, self.intermediate_size
        return layout_flops(one, h, i) < layout_flops(two, h, i)


def describe_layout(sharing: Sharing | None) -> str:
    if sharing is None:
        return "two sequences per pair"
    return "one shared sequence per pair" if sharing.always else "prefix sharing on the batches where it saves work"


def mark_tails(batch: dict) -> dict:
    """Add ``score_tail`` [N] bool: True for a scored token at position >= min(n_w, n_l) of its completion, the
    part past the pair's shorter completion (LD-DPO's "verbose" tokens); the shorter completion has none.

    Every completion's tokens are contiguous and in order in the score fields (``_scores``), so a token's
    position in its completion is its offset from its segment's first token.
    """
    segment, b = batch["score_segment"], batch["num_pairs"]
    counts = torch.bincount(segment, minlength=2 * b)
    position = torch.arange(segment.shape[0]) - (torch.cumsum(counts, 0) - counts)[segment]
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)
    batch["score_tail"] = position >= shared[segment]
    return batch


def collate(prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]], pad_id: int,
            sharing: Sharing | None = None, tails: bool = False) -> dict:
    """The batch in the shared layout where ``sharing`` says it pays, else as two sequences per pair;
    ``tails``: with ``score_tail`` (see ``mark_tails``)."""
    if sharing is not None and sharing.pays(prompts, chosens, rejecteds):
        batch = collate_shared(prompts, chosens, rejecteds, pad_id, mask_dtype=sharing.mask_dtype)
    else:
        batch = collate_pairs(prompts, chosens, rejecteds, pad_id)
    return mark_tails(batch) if tails else batch
