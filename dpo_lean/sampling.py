"""Length-grouped, seeded order of training pairs: little padding, random order, exact on resume.

transformers' LengthGroupedSampler draws from the global RNG when an epoch starts, so a run resumed
mid-epoch sees another order than the run it resumes. This one is a pure function of (seed, epoch).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                         megabatch_batches: int = 50) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive ``batch_size`` slices hold similar lengths.

    Shuffle (seeded by seed and epoch), cut into megabatches of ``megabatch_batches`` batches, sort each
    megabatch by length (longest first) and shuffle the order of the resulting full batches (a short
    last batch stays last, so every slice stays aligned), so batches are tight but the sequence of
    lengths seen in training stays random.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    mega = max(1, min(megabatch_batches, len(lengths) // (batch_size * 4))) * batch_size
    batches = []
    for start in range(0, len(perm), mega):
        group = sorted(perm[start:start + mega], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    order = torch.randperm(len(batches), generator=g).tolist()
    return [i for b in order for i in batches[b]] + [i for b in tail for i in b]


class LengthGroupedSampler(Sampler[int]):
    """Sampler over :func:`length_grouped_order`; the Trainer calls ``set_epoch`` at every epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed, self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)
