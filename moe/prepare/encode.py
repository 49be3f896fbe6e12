"""Tokenise a corpus's pieces into ``train.bin`` / ``val.bin``, in order, in one process or a pool of workers,
holding at most a few batches in memory."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe.prepare.sources import Piece

BATCH_BYTES = 4 << 20
BATCH_PIECES = 1024
# Batches queued per worker: enough to keep each busy, few enough to bound memory.
IN_FLIGHT_PER_WORKER = 2


@dataclass
class EncodedBatch:
    """Token ids of one batch per split (documents closed by the end-of-text id), and what they cover."""

    tokens: list[np.ndarray]
    text_bytes: list[int]
    documents: list[int]
    progress: int


def batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    """Group pieces into batches of about ``BATCH_BYTES`` characters or ``BATCH_PIECES`` pieces."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= BATCH_BYTES or len(batch) >= BATCH_PIECES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class BatchEncoder:
    """Encodes batches with one tokenizer; text that spells a special token is encoded as plain text, so the
    end-of-text id marks only real document ends."""

    def __init__(self, tokenizer_json: str, eot: int, dtype: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.encode_special_tokens = True
        self.eot, self.dtype = eot, np.dtype(dtype)

    def __call__(self, batch: list[Piece]) -> EncodedBatch:
        encodings = self.tokenizer.encode_batch_fast([p.text for p in batch], add_special_tokens=False)
        parts: list[list[np.ndarray]] = [[], []]
        text_bytes, documents = [0, 0], [0, 0]
        eot = np.array([self.eot], dtype=self.dtype)
        for piece, encoding in zip(batch, encodings):
            parts[piece.split].append(np.array(encoding.ids, dtype=self.dtype))
            text_bytes[piece.split] += len(piece.text.encode("utf-8"))
            if piece.ends_document:
                parts[piece.split].append(eot)
                documents[piece.split] += 1
        tokens = [np.concatenate(p) if p else np.zeros(0, dtype=self.dtype) for p in parts]
        return EncodedBatch(tokens, text_bytes, documents, sum(p.progress for p in batch))


_worker_encoder: BatchEncoder | None = None


def _start_worker(tokenizer_json: str, eot: int, dtype: str) -> None:
    global _worker_encoder
    # Ctrl-C is the parent's to handle: it stops the pool and removes the partial output.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_encoder = BatchEncoder(tokenizer_json, eot, dtype)


def _encode_in_worker(batch: list[Piece]) -> EncodedBatch:
    return _worker_encoder(batch)


def encode_pieces(
    pieces: Iterable[Piece], tokenizer_json: str, eot: int, dtype: str, workers: int
) -> Iterator[EncodedBatch]:
    """Encoded batches in input order; ``workers > 1`` spreads batches over that many forked processes."""
    if workers == 1:
        encoder = BatchEncoder(tokenizer_json, eot, dtype)
        yield from map(encoder, batches(pieces))
        return
    # The workers must not each start tokenizers' own thread pool on top of the process pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer_json, eot, dtype)) as pool:
        pending: deque = deque()
        for batch in batches(pieces):
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class SplitFiles:
    """Appends each split's tokens to its ``.bin`` and keeps the counts meta.json records."""

    paths: list[Path]
    tokens: list[int] = field(default_factory=lambda: [0, 0])
    text_bytes: list[int] = field(default_factory=lambda: [0, 0])
    documents: list[int] = field(default_factory=lambda: [0, 0])

    def write_all(self, encoded: Iterable[EncodedBatch], on_progress: Callable[[int], None]) -> None:
        """Write every batch of ``encoded``, calling ``on_progress`` with each batch's progress."""
        with open(self.paths[0], "wb") as train, open(self.paths[1], "wb") as val:
            files = (train, val)
            for batch in encoded:
                for split in (0, 1):
                    files[split].write(batch.tokens[split].tobytes())
                    self.tokens[split] += len(batch.tokens[split])
                    self.text_bytes[split] += batch.text_bytes[split]
                    self.documents[split] += batch.documents[split]
                on_progress(batch.progress)
            for f in files:
                f.flush()
                os.fsync(f.fileno())
