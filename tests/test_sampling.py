"""The length-grouped order: every row once per epoch, tight batches, seeded, different per epoch."""

from __future__ import annotations

import random

from dpo_lean.sampling import LengthGroupedSampler, length_grouped_order


def _lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(10, 1000) for _ in range(n)]


def test_every_row_exactly_once_per_epoch():
    lengths = _lengths(1003)
    for epoch in range(3):
        order = length_grouped_order(lengths, batch_size=8, seed=1, epoch=epoch)
        assert sorted(order) == list(range(1003))


def test_batches_are_tight_compared_with_random_batches():
    lengths = _lengths()
    order = length_grouped_order(lengths, batch_size=8, seed=1, epoch=0)
    rng = random.Random(0)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)

    def padding(o):  # padded tokens when each batch is padded to its longest row
        return sum(max(lengths[i] for i in o[s:s + 8]) * len(o[s:s + 8]) - sum(lengths[i] for i in o[s:s + 8])
                   for s in range(0, len(o), 8))
    assert padding(order) < 0.2 * padding(shuffled)


def test_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths()
    a = length_grouped_order(lengths, 8, seed=1, epoch=0)
    assert a == length_grouped_order(lengths, 8, seed=1, epoch=0)
    assert a != length_grouped_order(lengths, 8, seed=1, epoch=1)
    assert a != length_grouped_order(lengths, 8, seed=2, epoch=0)


def test_batch_lengths_are_not_sorted_across_the_epoch():
    lengths = _lengths()
    order = length_grouped_order(lengths, 8, seed=3, epoch=0)
    firsts = [lengths[order[s]] for s in range(0, len(order), 8)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_short_last_batch_stays_last_so_slices_stay_aligned():
    lengths = _lengths(21)
    order = length_grouped_order(lengths, 4, seed=0, epoch=0, megabatch_batches=2)
    batches = [order[s:s + 4] for s in range(0, 21, 4)]
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 1]


def test_sampler_follows_set_epoch():
    lengths = _lengths(100)
    sampler = LengthGroupedSampler(lengths, 4, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(100)) and len(sampler) == 100
