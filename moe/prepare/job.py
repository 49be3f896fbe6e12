"""``prepare(cfg)``: read a corpus, train or load a tokenizer, and publish the output folder atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moe.prepare.config import PrepareConfig
from moe.prepare.encode import SplitFiles, encode_pieces
from moe.prepare.errors import PrepareError
from moe.prepare.sources import TRAIN, Corpus, file_sha256, open_corpus, source_digest
from moe.prepare.tokenizer import eot_id, load_tokenizer, special_tokens, train_bpe, vocabulary_size

META_FORMAT = 1
UINT16_LIMIT = 1 << 16
SPLIT_NAMES = ("train", "val")


def check_output(out: Path, input_path: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``), is a file, or lies inside the input folder."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"out={str(out)!r} is a file; give a folder path")
    if out.exists() and not overwrite:
        raise PrepareError(f"out={str(out)!r} already exists; pass overwrite=true to replace it")
    if input_path.is_dir() and out.resolve().is_relative_to(input_path.resolve()):
        raise PrepareError(f"out={str(out)!r} is inside the input folder {str(input_path)!r}; write it elsewhere")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` (replacing it) only on success,
    deleted on any failure or interrupt, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the published one follows the umask
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        retired = staging.with_name(staging.name.replace(".partial-", ".old-"))
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired)
    else:
        os.rename(staging, out)


def _training_texts(corpus: Corpus, limit: int | None) -> Iterator[str]:
    """The training split's text, stopping after ``limit`` characters when given."""
    texts = (piece.text for piece in corpus.read() if piece.split == TRAIN)
    if limit is None:
        yield from texts
        return
    used = 0
    for text in texts:
        yield text[: limit - used]
        used += len(text)
        if used >= limit:
            return


def _progress_bar(corpus: Corpus):
    from tqdm import tqdm

    scale = corpus.progress_unit == "B"
    return tqdm(
        total=corpus.progress_total,
        unit=corpus.progress_unit,
        unit_scale=scale,
        desc="tokenising",
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


def prepare(cfg: PrepareConfig) -> dict:
    """Write ``cfg.out``: train.bin, val.bin, tokenizer.json and meta.json; returns the meta.json contents."""
    input_path, out = Path(cfg.input).expanduser(), Path(cfg.out).expanduser()
    check_output(out, input_path, cfg.overwrite)
    corpus = open_corpus(input_path, cfg.format, cfg.val_fraction, cfg.text_field, cfg.split, cfg.suffixes)
    if cfg.tokenizer is not None:
        tokenizer, tokenizer_file = load_tokenizer(Path(cfg.tokenizer).expanduser())
        origin = {"origin": "loaded", "path": str(tokenizer_file.resolve()), "sha256": file_sha256(tokenizer_file)}
    else:
        tokenizer = train_bpe(_training_texts(corpus, cfg.tokenizer_train_chars), cfg.trained_vocab_size, cfg.eot_token)
        origin = {
            "origin": "trained",
            "type": "byte-level BPE (Hugging Face tokenizers)",
            "requested_vocab_size": cfg.trained_vocab_size,
            "trained_on": "the training split"
            + (f", its first {cfg.tokenizer_train_chars} characters" if cfg.tokenizer_train_chars else ""),
        }
    eot = eot_id(tokenizer, cfg.eot_token)
    vocab_size = vocabulary_size(tokenizer)
    dtype = "uint16" if vocab_size <= UINT16_LIMIT else "uint32"
    with staged_folder(out) as staging:
        files = SplitFiles([staging / f"{name}.bin" for name in SPLIT_NAMES])
        with _progress_bar(corpus) as bar:
            encoded = encode_pieces(corpus.read(), tokenizer.to_str(), eot, dtype, cfg.num_workers)
            files.write_all(encoded, bar.update)
        for index, name in enumerate(SPLIT_NAMES):
            if files.tokens[index] == 0:
                raise PrepareError(
                    f"input {str(input_path)!r} gives an empty {name} split (no text in its documents); "
                    + ("it holds no text (empty corpus)" if sum(files.tokens) == 0 else "raise val_fraction")
                )
        tokenizer.save(str(staging / "tokenizer.json"))
        meta = {
            "format": META_FORMAT,
            "vocab_size": vocab_size,
            "dtype": dtype,
            "splits": {
                name: {
                    "file": f"{name}.bin",
                    "tokens": files.tokens[index],
                    "bytes": files.text_bytes[index],
                    "documents": files.documents[index],
                    "bytes_per_token": files.text_bytes[index] / files.tokens[index],
                }
                for index, name in enumerate(SPLIT_NAMES)
            },
            "split": {"rule": corpus.split_rule, "val_fraction": cfg.val_fraction},
            "source": {
                "input": str(input_path.resolve()),
                "format": corpus.format,
                "text_field": corpus.text_field,
                "files": len(corpus.files),
                **source_digest(corpus),
            },
            "tokenizer": {"file": "tokenizer.json", **origin},
            "special_tokens": {"eot": {"token": cfg.eot_token, "id": eot}, "all": special_tokens(tokenizer)},
            "counts": "tokens include one end-of-text token per document; bytes are the UTF-8 bytes of the text",
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def summary_line(meta: dict, out: str) -> str:
    """One line a person reads after a run."""
    counts = ", ".join(
        f"{name} {s['tokens']:,} tokens / {s['bytes']:,} bytes / {s['documents']:,} documents"
        for name, s in meta["splits"].items()
    )
    return f"moe-prepare: wrote {out}: vocab {meta['vocab_size']:,} ({meta['dtype']}); {counts}"
