"""Token ids of pairs -> one padded batch of 2B sequences: the chosen ones, then the rejected ones."""

from __future__ import annotations

import torch


def collate_pairs(prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]],
                  pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` ([2B, T]).

    Row i is prompt_i + chosen_i, row B + i is prompt_i + rejected_i; completion_mask is 1 on
    completion tokens only.
    """
    seqs = [p + c for p, c in zip(prompts, chosens)] + [p + r for p, r in zip(prompts, rejecteds)]
    prompt_lens = [len(p) for p in prompts] * 2
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
        completion_mask[i, n_prompt:len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
