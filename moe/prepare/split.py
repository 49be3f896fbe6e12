"""Train/validation split rules of ``moe-prepare``: by document (a stable hash of its id) or, for one
text file, by position."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moe.data import split_files
from moe.prepare.errors import PrepareError

# Rows are keyed in blocks so that the key of every document need never be held at once.
KEY_BLOCK = 1 << 20
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def row_keys(indices: np.ndarray) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per row index (splitmix64 of the index)."""
    z = indices.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class RowSplit:
    """Which of the documents ``0 .. n-1`` are validation: those whose ``row_keys`` is below ``val_fraction``.

    If that leaves validation empty, the document with the smallest key goes there; if it leaves training
    empty, the one with the largest key stays in training (the rule of ``moe.data.split_files``).
    """

    def __init__(self, num_rows: int, val_fraction: float):
        if num_rows < 2:
            raise PrepareError(f"a split by document needs at least 2 documents, the input has {num_rows}")
        self.num_rows, self.val_fraction = num_rows, val_fraction
        num_val, smallest, largest = 0, (2.0, -1), (-1.0, -1)
        for start in range(0, num_rows, KEY_BLOCK):
            keys = row_keys(np.arange(start, min(num_rows, start + KEY_BLOCK)))
            num_val += int((keys < val_fraction).sum())
            smallest = min(smallest, (float(keys.min()), start + int(keys.argmin())))
            largest = max(largest, (float(keys.max()), start + int(keys.argmax())))
        self.forced_val = smallest[1] if num_val == 0 else None
        self.forced_train = largest[1] if num_val == num_rows else None
        self._block, self._block_is_val = -1, None

    def is_val(self, index: int) -> bool:
        """Whether document ``index`` belongs to validation (cheap for indices read in order)."""
        if index == self.forced_val:
            return True
        if index == self.forced_train:
            return False
        block, offset = divmod(index, KEY_BLOCK)
        if block != self._block:
            start = block * KEY_BLOCK
            self._block = block
            self._block_is_val = row_keys(np.arange(start, min(self.num_rows, start + KEY_BLOCK))) < self.val_fraction
        return bool(self._block_is_val[offset])

    def rule(self) -> str:
        return (
            f"by document: document i (0-based, in input order) is validation when (splitmix64(i) >> 11) / 2^53 < "
            f"{self.val_fraction}; at least one document in each split"
        )


def file_split(relative_paths: list[str], val_fraction: float) -> tuple[set[str], str]:
    """(validation files, rule) for a folder of text files, by the hash of each relative path."""
    if len(relative_paths) < 2:
        raise PrepareError(f"a split by file needs at least 2 files, got {len(relative_paths)}")
    _, val = split_files(relative_paths, val_fraction)
    rule = (
        f"by file: a file is validation when sha256(relative path) read as a fraction is < {val_fraction}; "
        "at least one file in each split (moe.data.split_files)"
    )
    return set(val), rule


def position_cut(path: Path, val_fraction: float) -> tuple[int, str]:
    """(byte offset, rule): one text file's last ``ceil(val_fraction * size)`` bytes are validation, the cut
    moved back to the start of a UTF-8 character."""
    size = path.stat().st_size
    cut = size - math.ceil(size * val_fraction)
    with open(path, "rb") as f:
        while cut > 0:
            f.seek(cut)
            if f.read(1)[0] & 0xC0 != 0x80:
                break
            cut -= 1
    if cut <= 0:
        raise PrepareError(f"input {str(path)!r} has {size} bytes: too few to split off val_fraction={val_fraction}")
    rule = f"by position: the last ceil({val_fraction} x {size}) bytes of the file (cut at byte {cut}) are validation"
    return cut, rule
