"""``moe-prepare`` settings (a Hydra structured config: ``moe-prepare key=value ...``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from moe.prepare.sources import FORMATS
from moe.prepare.tokenizer import BYTE_ALPHABET, DEFAULT_EOT

DEFAULT_VOCAB_SIZE = 8192
MAX_VOCAB_SIZE = 1 << 32


@dataclass
class PrepareConfig:
    """What to read, how to tokenise it, and where to write.

    ``input``: a text file, a folder, a ``.jsonl`` file, or a dataset on local disk; ``format`` says how to
    read it (``auto``: a folder with a ``dataset_info.json``/``state.json``/``dataset_dict.json`` is a
    ``save_to_disk`` dataset, else by suffix, else text). ``text_field``: the text column of JSON Lines and
    datasets; ``split``: which split of a saved ``DatasetDict``; ``suffixes``: which files of a text folder
    (default: every non-hidden file). ``tokenizer``: a ``tokenizer.json`` or its folder to use as is;
    without it a byte-level BPE of ``vocab_size`` tokens (default 8192) is trained on the training split
    (on its first ``tokenizer_train_chars`` characters when set). ``eot_token`` closes every document.
    ``workers``: tokenising processes (default: the CPUs this process may use).
    """

    input: str = "???"
    out: str = "???"
    format: str = "auto"
    text_field: str = "text"
    split: str = "train"
    suffixes: list[str] | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    tokenizer_train_chars: int | None = None
    eot_token: str = DEFAULT_EOT
    val_fraction: float = 0.05
    workers: int | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not valid; valid: {list(FORMATS)}")
        if isinstance(self.val_fraction, bool) or not 0 < self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction={self.val_fraction!r} is not valid; it must be in (0, 0.5]")
        if not self.eot_token:
            raise ValueError("eot_token='' is not valid; it must be a non-empty string such as '<|endoftext|>'")
        if self.tokenizer is not None and self.vocab_size is not None:
            raise ValueError(
                f"vocab_size={self.vocab_size} is for a trained tokenizer; tokenizer={self.tokenizer!r} has its own"
            )
        smallest = BYTE_ALPHABET + 1
        if self.vocab_size is not None and not smallest <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={self.vocab_size} is not valid: a byte-level BPE needs the 256 bytes plus the "
                f"end-of-text token, so vocab_size must be in [{smallest}, {MAX_VOCAB_SIZE}]"
            )
        for key in ("workers", "tokenizer_train_chars"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}={value} is not valid; it must be >= 1")

    @property
    def trained_vocab_size(self) -> int:
        """The vocabulary a trained tokenizer aims at."""
        return self.vocab_size or DEFAULT_VOCAB_SIZE

    @property
    def num_workers(self) -> int:
        """``workers``, or the number of CPUs this process may run on."""
        return self.workers or len(os.sched_getaffinity(0))
