"""Tokenizers for ``moe-prepare``: a byte-level BPE trained on the corpus, or an existing ``tokenizer.json``."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from moe.prepare.errors import PrepareError

BYTE_ALPHABET = 256
DEFAULT_EOT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, eot_token: str):
    """A byte-level BPE of at most ``vocab_size`` tokens learnt from ``texts``: the end-of-text token (id 0),
    the 256 bytes, then merges (fewer when the corpus offers fewer). Lossless: decode(encode(s)) == s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eot_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: Path):
    """``(tokenizer, file)`` for a ``tokenizer.json`` or a folder holding one."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise PrepareError(f"tokenizer={str(path)!r}: no tokenizer.json there (give the file or its folder)")
    try:
        return Tokenizer.from_file(str(file)), file
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise PrepareError(f"tokenizer={str(path)!r} does not load: {str(error).splitlines()[0]}") from None


def vocabulary_size(tokenizer) -> int:
    """Largest token id + 1 (added tokens included), the size a model's embedding needs."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def special_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens, by content, with their ids."""
    return {t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special}


def eot_id(tokenizer, eot_token: str) -> int:
    """The id of the document separator ``eot_token``; it must be one of the tokenizer's tokens."""
    token_id = tokenizer.token_to_id(eot_token)
    if token_id is None:
        raise PrepareError(
            f"eot_token={eot_token!r} is not a token of this tokenizer; its special tokens: "
            f"{list(special_tokens(tokenizer))}"
        )
    return token_id
