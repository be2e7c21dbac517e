"""Records -> prepared record batches, in this process or in ``preprocessing_num_workers`` processes.

Records come in chunks (of CHUNK_ROWS, as the loader streams them); each comes back as one Arrow record batch of
its kept rows (ids as int32 buffers, cheap to send back) and its skips, in order. Workers are forked, so they start
with the tokenizer and template already loaded (a spawned worker would import torch and transformers again).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pyarrow as pa

from .prepared import to_batch
from .records import Record, Skip
from .tokenize import tokenize_records

CHUNK_ROWS = 128
_JOB: tuple = ()


def encode_chunk(records: list[Record], tokenizer, template, cutoff_len: int, mode: str) -> tuple[pa.RecordBatch, list[Skip]]:
    out = tokenize_records(records, tokenizer, template, cutoff_len, mode)
    return to_batch([o for o in out if not isinstance(o, Skip)]), [o for o in out if isinstance(o, Skip)]


def _init(*job) -> None:
    global _JOB
    _JOB = job


def _work(records: list[Record]):
    return encode_chunk(records, *_JOB)


@contextmanager
def _serial_tokenizers():
    """One tokenizer thread per worker process (the workers are the parallelism), and no fork warning from it."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_batches(chunks: Iterable[tuple[list[Record], list[Skip]]], tokenizer, template, cutoff_len: int, mode: str,
                   workers: int = 1) -> Iterator[tuple[pa.RecordBatch, list[Skip]]]:
    """(record batch, skips) per chunk of (records, skips of the load stage), in order; at most two chunks per
    worker are in flight, so memory holds a few chunks, never the dataset."""
    if workers <= 1:
        for records, skips in chunks:
            batch, more = encode_chunk(records, tokenizer, template, cutoff_len, mode)
            yield batch, skips + more
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with _serial_tokenizers(), context.Pool(workers, _init, (tokenizer, template, cutoff_len, mode)) as pool:
        pending: deque = deque()
        for records, skips in chunks:
            pending.append((pool.apply_async(_work, (records,)), skips))
            if len(pending) >= 2 * workers:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def _result(future, skips: list[Skip]) -> tuple[pa.RecordBatch, list[Skip]]:
    batch, more = future.get()
    return batch, skips + more
