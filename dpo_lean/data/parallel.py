"""Records -> prepared record batches, in this process or in ``preprocessing_num_workers`` processes.

Records go out in chunks of CHUNK_ROWS; each comes back as one Arrow record batch of its kept rows (ids as int32
buffers, cheap to send back) and its skips, in order. Workers are forked, so they start with the tokenizer and
template already loaded (a spawned worker would import torch and transformers again).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
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


def encode_batches(records: list[Record], tokenizer, template, cutoff_len: int, mode: str,
                   workers: int = 1) -> Iterator[tuple[pa.RecordBatch, list[Skip]]]:
    """(record batch, skips) per chunk of ``records``, in order."""
    chunks = [records[i:i + CHUNK_ROWS] for i in range(0, len(records), CHUNK_ROWS)]
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        for chunk in chunks:
            yield encode_chunk(chunk, tokenizer, template, cutoff_len, mode)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with _serial_tokenizers(), context.Pool(workers, _init, (tokenizer, template, cutoff_len, mode)) as pool:
        yield from pool.imap(_work, chunks)
