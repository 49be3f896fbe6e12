"""Token data for training: corpora cached as memory-mapped token files, a rank-aware batch sampler,
deterministic validation batches.

Sources (``prepare_tokens``):

- ``"stdlib"`` (default): the ``.py`` files of the running Python's standard library, byte-level
  (vocabulary 256). See ``default_corpus_files`` for which files count.
- a text file or a folder of files: byte-level; a folder contributes every non-hidden regular file.
- a pre-tokenised ``.bin`` file: a flat array of uint16 or uint32 token ids, memory-mapped in place.
- a folder written by ``moe-prepare`` (``kind="prepared"``): its ``train.bin`` / ``val.bin``, with the
  vocabulary, dtype, tokenizer and bytes per token read from its ``meta.json``.

Byte corpora of several files are split by file (a file lands wholly in train or in validation, decided
by a hash of its relative path); a single text file is split by position (its last ``val_fraction`` of
bytes is validation). Byte corpora are cached under ``cache_dir`` (default ``$MOE_CACHE`` or
``~/.cache/moe``) as ``uint8`` token files, in a folder whose name is a digest of the source (paths,
sizes, modification times) and the split settings: a changed source gets a fresh cache, an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BIN_DTYPES = ("uint16", "uint32")
SOURCE_KINDS = ("auto", "stdlib", "text", "bin", "prepared")
# Bumped whenever the split rule or cache layout changes, so old caches are not reused.
CACHE_FORMAT = 1
# Parts of the standard library left out of the default corpus: installed third-party packages and
# test suites / demos / tool data (large, repetitive, unlike ordinary library code).
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
)


@dataclass
class TokenSplits:
    """Train and validation token streams (read-only memory maps) and the vocabulary they use.

    ``bytes_per_token``: text bytes per token of the validation split (1 for bytes; None when unknown, as
    for a bare ``.bin``), which turns a loss per token into bits per byte. ``tokenizer_path``: the
    ``tokenizer.json`` that decodes the ids (None for bytes and bare ``.bin`` files).
    """

    train: np.memmap
    val: np.memmap
    vocab_size: int
    is_bytes: bool
    bytes_per_token: float | None = None
    tokenizer_path: Path | None = None


def default_cache_dir() -> Path:
    """``$MOE_CACHE`` if set, else ``~/.cache/moe``."""
    return Path(os.environ.get("MOE_CACHE") or Path.home() / ".cache" / "moe")


def stdlib_root() -> Path:
    """Folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The default corpus: sorted ``.py`` files under the standard library folder ``root``.

    Left out: any file below a folder named in ``STDLIB_EXCLUDED_DIRS`` (site-packages, test suites,
    idlelib, lib2to3, turtledemo), which keeps the corpus to the library proper (about 11 MB, 580
    files on CPython 3.11) and the cache build to a few seconds.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in STDLIB_EXCLUDED_DIRS]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return sorted(path for path in files if path.is_file())


def folder_files(folder: Path) -> list[Path]:
    """Every non-hidden regular file below ``folder`` (hidden folders skipped), sorted."""
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(path)
    return sorted(files)


def _split_key(relative_path: str) -> float:
    """A stable pseudo-random number in [0, 1) for a file's relative path (same on every machine)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_files(relative_paths: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split files into (train, val) by the hash of each relative path, each list sorted.

    A file goes to validation when its hash key is below ``val_fraction``. If that leaves validation
    empty (few files), the file with the smallest key goes there instead; with a single file there is
    nothing to split and this raises.
    """
    _check_fraction(val_fraction)
    if len(relative_paths) < 2:
        raise ValueError(f"a split by file needs at least 2 files, got {len(relative_paths)}")
    keys = {path: _split_key(path) for path in relative_paths}
    val = sorted(path for path in relative_paths if keys[path] < val_fraction)
    if not val:
        val = [min(relative_paths, key=keys.__getitem__)]
    if len(val) == len(relative_paths):
        val.remove(max(val, key=keys.__getitem__))
    val_set = set(val)
    return sorted(path for path in relative_paths if path not in val_set), val


def _check_fraction(val_fraction) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")


def _atomic_write_json(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_segments(segments: list[tuple[Path, int, int | None]], target: Path) -> int:
    """Write the byte ranges ``(path, start, stop)`` one after another into ``target`` atomically
    (temp file, then rename); return the number of bytes written."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    size = 0
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            for path, start, stop in segments:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read() if stop is None else f.read(stop - start)
                out.write(data)
                size += len(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def _source_digest(kind: str, root: Path, files: list[Path], val_fraction: float) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{kind}|{val_fraction!r}".encode())
    for path in files:
        stat = path.stat()
        h.update(f"|{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _open_tokens(path: Path, dtype: str, what: str) -> np.memmap:
    if path.stat().st_size == 0:
        raise ValueError(f"{what} split at {path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


def _byte_splits(kind: str, root: Path, files: list[Path], cache_dir: Path, val_fraction: float) -> TokenSplits:
    """Build (once) and open the uint8 train/val caches of the byte corpus ``files`` under ``root``."""
    if not files:
        raise ValueError(f"no input files found for data source {str(root)!r}")
    relative = {path.relative_to(root).as_posix(): path for path in files}
    digest = _source_digest(kind, root, files, val_fraction)
    folder = Path(cache_dir) / f"{kind}-{digest}"
    meta_path = folder / "meta.json"
    train_path, val_path = folder / "train.u8", folder / "val.u8"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        for path, key in [(train_path, "train_tokens"), (val_path, "val_tokens")]:
            actual = path.stat().st_size if path.exists() else None
            if actual != meta[key]:
                raise ValueError(
                    f"corrupt data cache {folder}: {path.name} has {actual} bytes, meta.json says {meta[key]}; "
                    f"delete the folder to rebuild it"
                )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        if len(files) == 1:
            (path,) = files
            train_names = val_names = [path.name]
            cut = path.stat().st_size - math.ceil(path.stat().st_size * val_fraction)
            train_segments, val_segments = [(path, 0, cut)], [(path, cut, None)]
        else:
            train_names, val_names = split_files(sorted(relative), val_fraction)
            train_segments = [(relative[name], 0, None) for name in train_names]
            val_segments = [(relative[name], 0, None) for name in val_names]
        train_size = _write_segments(train_segments, train_path)
        val_size = _write_segments(val_segments, val_path)
        if train_size == 0 or val_size == 0:
            raise ValueError(
                f"data source {str(root)!r} gives an empty split (train {train_size} bytes, val {val_size} bytes)"
            )
        meta = {
            "source": str(root),
            "kind": kind,
            "val_fraction": val_fraction,
            "train_files": train_names,
            "val_files": val_names,
            "train_tokens": train_size,
            "val_tokens": val_size,
        }
        _atomic_write_json(meta_path, meta)
    train = _open_tokens(train_path, "uint8", "train")
    val = _open_tokens(val_path, "uint8", "validation")
    return TokenSplits(train=train, val=val, vocab_size=256, is_bytes=True, bytes_per_token=1.0)


def _bin_splits(
    source: Path, val_source: str | os.PathLike | None, dtype: str, val_fraction: float, vocab_size: int | None
) -> TokenSplits:
    """Memory-map a pre-tokenised ``.bin`` (and its validation ``.bin``, or a tail split)."""
    if dtype not in BIN_DTYPES:
        raise ValueError(f"dtype of a pre-tokenised .bin must be one of {BIN_DTYPES}, got {dtype!r}")
    itemsize = np.dtype(dtype).itemsize

    def open_bin(path: Path) -> np.memmap:
        if not path.is_file():
            raise ValueError(f"token file {str(path)!r} does not exist")
        size = path.stat().st_size
        if size == 0 or size % itemsize:
            raise ValueError(
                f"token file {str(path)!r} has {size} bytes, not a positive multiple of {dtype} ({itemsize})"
            )
        return np.memmap(path, dtype=dtype, mode="r")

    tokens = open_bin(source)
    if val_source is not None:
        train, val = tokens, open_bin(Path(val_source))
    else:
        _check_fraction(val_fraction)
        num_val = math.ceil(len(tokens) * val_fraction)
        if num_val >= len(tokens):
            raise ValueError(
                f"token file {str(source)!r} has {len(tokens)} tokens: too few to split off val_fraction={val_fraction}"
            )
        train, val = tokens[: len(tokens) - num_val], tokens[len(tokens) - num_val :]
    if vocab_size is None:
        vocab_size = int(max(train.max(), val.max())) + 1
    else:
        largest = int(max(train.max(), val.max()))
        if largest >= vocab_size:
            raise ValueError(f"token id {largest} in {str(source)!r} is >= vocab_size={vocab_size}")
    return TokenSplits(train=train, val=val, vocab_size=vocab_size, is_bytes=False)


def _prepared_splits(folder: Path, vocab_size: int | None) -> TokenSplits:
    """Memory-map a ``moe-prepare`` folder, checking its files against its ``meta.json``."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"data source {str(folder)!r} has no meta.json; write it with moe-prepare input=... out=...")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dtype = meta["dtype"]
    if dtype not in BIN_DTYPES:
        raise ValueError(f"{meta_path} names dtype {dtype!r}; valid: {BIN_DTYPES}")
    itemsize = np.dtype(dtype).itemsize
    splits = {}
    for name in ("train", "val"):
        info = meta["splits"][name]
        path = folder / info["file"]
        actual = path.stat().st_size if path.is_file() else None
        if actual != info["tokens"] * itemsize:
            raise ValueError(
                f"{path} has {actual} bytes, meta.json says {info['tokens']} {dtype} tokens; "
                f"prepare the folder again with moe-prepare"
            )
        splits[name] = _open_tokens(path, dtype, name)
    if vocab_size is not None and vocab_size < meta["vocab_size"]:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the prepared vocabulary {meta['vocab_size']}")
    tokenizer = folder / meta["tokenizer"]["file"]
    return TokenSplits(
        train=splits["train"],
        val=splits["val"],
        vocab_size=vocab_size or meta["vocab_size"],
        is_bytes=False,
        bytes_per_token=meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"],
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
    )


def prepare_tokens(
    source: str | os.PathLike = "stdlib",
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    *,
    dtype: str = "uint16",
    val_source: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    kind: str = "auto",
) -> TokenSplits:
    """Open a corpus as train/val token memory maps, building the byte cache on first use.

    Args:
        source: ``"stdlib"``, a text file or folder (byte-level), a pre-tokenised ``.bin``, or a
            ``moe-prepare`` folder (with ``kind="prepared"``).
        cache_dir: where byte caches live (default ``default_cache_dir()``); ``.bin`` files are not copied.
        val_fraction: share of files (bytes) or of tokens (``.bin`` without ``val_source``, taken from the end)
            that goes to validation.
        dtype: element type of a ``.bin``: ``"uint16"`` or ``"uint32"``.
        val_source: a separate validation ``.bin``; then all of ``source`` is training data.
        vocab_size: vocabulary of a ``.bin`` (default: largest token id + 1, one pass over the data).
        kind: ``"auto"`` (``"stdlib"`` by name, a ``.bin`` by suffix, else text), or force ``"stdlib"``,
            ``"text"``, ``"bin"`` (a token file without the ``.bin`` suffix) or ``"prepared"`` (a
            ``moe-prepare`` folder; ``vocab_size`` may pad its vocabulary, never shrink it).

    Cost: the first call for a byte source reads and writes the corpus once (a few seconds for the
    stdlib); later calls only stat the files.
    """
    _check_fraction(val_fraction)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"kind must be one of {SOURCE_KINDS}, got {kind!r}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if kind == "stdlib" or (kind == "auto" and source == "stdlib"):
        root = stdlib_root()
        return _byte_splits("stdlib", root, default_corpus_files(root), cache_dir, val_fraction)
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"data source {str(source)!r} does not exist (expected 'stdlib', a text file or folder, or a .bin)"
        )
    if kind == "prepared":
        return _prepared_splits(path, vocab_size)
    if kind == "bin" or (kind == "auto" and path.suffix == ".bin"):
        return _bin_splits(path, val_source, dtype, val_fraction, vocab_size)
    if val_source is not None:
        raise ValueError(f"val_source={str(val_source)!r} is only for pre-tokenised .bin sources, not {str(source)!r}")
    if path.is_dir():
        return _byte_splits("text", path, folder_files(path), cache_dir, val_fraction)
    return _byte_splits("text", path.parent, [path], cache_dir, val_fraction)


def _check_window(tokens: np.ndarray, seq_len: int) -> int:
    """Number of valid window starts: each window needs seq_len + 1 tokens (inputs and shifted targets)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 1} tokens, but the split has {len(tokens)}")
    return len(tokens) - seq_len


def _check_rank(batch_size, rank, world_size) -> None:
    for name, value, minimum in [("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (len(starts), seq_len) as int64 tensors."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


class BatchSampler:
    """Random training windows; the global batch of each step is split across ranks.

    Step ``s`` draws ``world_size * batch_size`` window starts uniformly (with replacement) from a
    generator seeded by ``(seed, s)``; rank ``r`` takes starts ``[r * batch_size, (r + 1) * batch_size)``.
    So the ranks' batches are disjoint parts of one global batch, and concatenating them gives exactly
    the batch of a single process with ``batch_size * world_size``. Iterating yields ``(x, y)`` int64
    tensors of shape (batch_size, seq_len), ``y`` shifted by one token.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ):
        _check_rank(batch_size, rank, world_size)
        self.num_starts = _check_window(tokens, seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.step = 0

    @property
    def global_batch_size(self) -> int:
        """Sequences per step over all ranks."""
        return self.batch_size * self.world_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of step ``step``'s global batch (does not move the position)."""
        generator = np.random.Generator(np.random.PCG64([self.seed, step]))
        starts = generator.integers(0, self.num_starts, size=self.global_batch_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(self.step)
        self.step += 1
        return x, y

    def state_dict(self) -> dict:
        """The position (next step) and the settings that must match on resume."""
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the world size may differ as long as the global batch is the same."""
        for key in ("seed", "global_batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {key}={getattr(self, key)}")
        self.step = int(state["step"])


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int | None, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches: this rank's part of ``num_batches`` global batches.

    Window starts are spread evenly over the split (``num_batches * world_size * batch_size`` of them;
    they do not overlap when the split is long enough). ``num_batches=None`` takes as many whole
    global batches of non-overlapping windows as fit. Same batches on every call, for every run.
    """
    _check_rank(batch_size, rank, world_size)
    num_starts = _check_window(tokens, seq_len)
    global_batch = batch_size * world_size
    if num_batches is None:
        num_batches = (len(tokens) - 1) // seq_len // global_batch
        if num_batches == 0:
            raise ValueError(
                f"the split has {len(tokens)} tokens: too few for one global batch of "
                f"{global_batch} x seq_len={seq_len}"
            )
    elif isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    total = num_batches * global_batch
    starts = (np.arange(total, dtype=np.int64) * num_starts) // total
    batches = []
    for i in range(num_batches):
        chunk = starts[i * global_batch + rank * batch_size : i * global_batch + (rank + 1) * batch_size]
        batches.append(_windows(tokens, chunk, seq_len))
    return batches


def unigram_entropy_bits(tokens: np.ndarray, chunk: int = 1 << 24) -> float:
    """Entropy in bits/token of the split's unigram (token frequency) distribution. Cost: one pass."""
    if len(tokens) == 0:
        raise ValueError("unigram entropy of an empty split is undefined")
    counts = np.zeros(0, dtype=np.int64)
    for begin in range(0, len(tokens), chunk):
        part = np.bincount(np.asarray(tokens[begin : begin + chunk]))
        if len(part) > len(counts):
            part[: len(counts)] += counts
            counts = part
        else:
            counts[: len(part)] += part
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log2(p)).sum())
